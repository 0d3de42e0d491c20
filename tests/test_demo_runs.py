"""One demo run, driven directly: pacing, and what a run that stopped early reports."""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from rich.console import Console

from sona.config import SupervisionConfig
from sona.demo import live, plots, report, simulation, world
from sona.demo.output import Output
from sona.demo.simulation import DemoSettings, RunRecord, Snapshot, simulate
from sona.demo.summary import log_summary, print_summary
from sona.demo.users import FeedbackCounts, SimulatedUsers
from sona.demo.world import DemoWorld, schedule
from sona.events import (
    BackgroundCompleted,
    DeepCompleted,
    Lagged,
    SamplesDropped,
    SupervisorGaveUpEvent,
)
from sona.results import LearningStats


class _Quiet:
    """An observer that keeps the snapshots it is handed."""

    def __init__(self) -> None:
        self.snapshots: list[Snapshot] = []

    def started(self, label: str, title: str, total: int) -> None:
        pass

    def update(self, snapshot: Snapshot) -> None:
        self.snapshots.append(snapshot)

    def finished(self, record: RunRecord) -> None:
        pass


class _Clock:
    """A perf_counter that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def test_pacing_starts_when_the_runtime_is_ready_not_before_it_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Starting a runtime (loading, or on a fresh machine compiling, the kernels) takes from
    a fraction of a second to a minute. Pacing measured from before it would find itself that
    far behind and send the first requests as fast as they go: a burst in the first run only
    (the second finds the kernels loaded), so the two runs compared would not see the same
    traffic."""
    clock = _Clock()
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await anyio.sleep(0)

    monkeypatch.setattr(simulation, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(
        simulation, "anyio", SimpleNamespace(sleep=sleep, create_task_group=anyio.create_task_group)
    )

    class SlowStart(simulation.SonaRuntime):
        async def __aenter__(self) -> Any:
            clock.now += 30.0  # the runtime took 30 s to start
            return await super().__aenter__()

    monkeypatch.setattr(simulation, "SonaRuntime", SlowStart)
    settings = DemoSettings(steps=64, dim=16, domains=1, rate=100.0)
    world = DemoWorld(16, 1, seed=0)
    phases = schedule(1, 64)
    traffic = world.traffic(phases, seed=2)
    anyio.run(
        lambda: simulate(
            world, phases, traffic, settings, label="x", title="x", ewc=True, observer=_Quiet()
        )
    )
    # the clock stands still while requests are served: every batch is ahead of its schedule
    paced = [s for s in sleeps if s != 0.05]  # 0.05: the event watcher's last look
    assert paced == pytest.approx([0.16, 0.32, 0.48, 0.64])


def _stopped_early_run(monkeypatch: pytest.MonkeyPatch) -> tuple[RunRecord, DemoWorld, Any]:
    """A run over three phases (0, 1, 0) whose supervisor may restart nothing, under chaos:
    it gives up at the first crash, long before traffic returns to domain 0 at step 512."""
    configured = simulation.runtime_config

    def no_restarts(settings: DemoSettings, phases: int, *, ewc: bool) -> Any:
        config = configured(settings, phases, ewc=ewc)
        return dataclasses.replace(config, supervision=SupervisionConfig(max_restarts=0))

    monkeypatch.setattr(simulation, "runtime_config", no_restarts)
    settings = DemoSettings(steps=768, dim=16, domains=2, chaos=0.3, rate=0.0)
    world = DemoWorld(16, 2, seed=0)
    phases = schedule(2, 768)
    traffic = world.traffic(phases, seed=2)
    record = anyio.run(
        lambda: simulate(
            world, phases, traffic, settings, label="sona", title="x", ewc=True, observer=_Quiet()
        )
    )
    assert record.stopped is not None and record.stopped.startswith("the supervisor gave up")
    return record, world, phases


def test_a_run_that_stopped_early_reports_only_what_it_measured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its last measurement is at the request it stopped at, not at the end of a schedule it
    never served, and it reports no return to a domain that traffic never came back to (the
    quality "at return" would be an earlier measurement under a later step's name)."""
    record, world, phases = _stopped_early_run(monkeypatch)
    served = record.eval_steps[-1]
    assert served < phases[2].start
    assert record.eval_steps == sorted(record.eval_steps)
    summary = report.run_summary(record, phases, world)
    assert summary["returns"] == []
    assert summary["requests_served"] == served
    assert summary["timeline"]["step"][-1] == served


def test_a_comparison_with_a_run_that_stopped_early_tells_only_what_both_measured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other run's returns have no counterpart: the report is still written, and whether
    sona forgets less or serves better on every return cannot be told."""
    record, world, phases = _stopped_early_run(monkeypatch)
    full = RunRecord("no-ewc", "no-ewc", 0.0)
    full.eval_steps = [0, 256, 512, 768]
    full.quality = [[0.8, 0.8], [0.9, 0.8], [0.85, 0.9], [0.9, 0.88]]
    doc = report.build(DemoSettings(steps=768, dim=16, domains=2), world, phases, [record, full],
                       command="sona demo")  # fmt: skip
    doc["seconds_total"] = 0.0
    comp = doc["comparison"]
    assert comp["returns"] == []
    assert comp["sona_forgets_less_on_every_return"] is None
    assert comp["sona_higher_at_every_return"] is None
    text = io.StringIO()
    print_summary(Console(file=text, width=300), doc, Path("out"))
    assert "not reached (stopped early)" in text.getvalue()
    assert "0.900 → 0.850" in text.getvalue()  # the run that got there keeps its numbers


def _no_updates_doc() -> dict[str, Any]:
    """The report of a one-domain run in which no update was applied (nothing timed)."""
    world = DemoWorld(16, 1, seed=0)
    phases = schedule(1, 16)
    record = RunRecord("sona", "sona", 0.1)
    record.eval_steps, record.quality = [0, 16], [[0.8], [0.8]]
    doc = report.build(DemoSettings(steps=16, dim=16, domains=1), world, phases, [record],
                       command="sona demo")  # fmt: skip
    doc["seconds_total"] = 0.0
    return doc


def test_a_latency_nothing_measured_is_not_shown_as_zero() -> None:
    """Before the first update is applied (or in a run that applied none) there is no
    latency to show: "p50 0.0 µs" would be a constant presented as a measurement."""
    doc = _no_updates_doc()
    assert doc["runs"]["sona"]["instant_latency"] == {"count": 0}
    text = io.StringIO()
    print_summary(Console(file=text, width=300), doc, Path("out"))
    assert "0.0 µs" not in text.getvalue()
    assert "instant update latency not measured (no update applied)" in text.getvalue()

    snap = Snapshot(
        label="sona", title="sona", step=16, total=16, phase=schedule(1, 16)[0], phases=1,
        quality=[0.8], best=[0.8], base=[0.8], stats=LearningStats(),
        latency_p50_us=None, latency_p99_us=None, feedback=FeedbackCounts(), events={},
        elapsed_s=0.1,
    )  # fmt: skip
    shown = io.StringIO()
    Console(file=shown, width=300).print(live._counters(snap))
    assert "0.0 µs" not in shown.getvalue()
    assert "not measured yet" in shown.getvalue()


def test_a_snapshot_before_any_update_has_no_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first snapshots of a run come before any feedback has arrived."""
    world = DemoWorld(16, 1, seed=0)
    phases = schedule(1, 16)
    settings = DemoSettings(steps=16, dim=16, domains=1, rate=0.0)
    users = SimulatedUsers(settings.users, seed=1)
    state = simulation._Run(world, phases, settings, RunRecord("x", "x", 0.1), _Quiet())

    class NoRuntime:
        def stats(self) -> LearningStats:
            return LearningStats()

    snap = state.snapshot(NoRuntime(), users)  # type: ignore[arg-type]
    assert snap.latency_p50_us is None and snap.latency_p99_us is None


def test_dropped_samples_are_counted_by_sample_not_by_event() -> None:
    """One SamplesDropped event can announce many samples (everything still queued when the
    supervisor gives up): the supervision plot's "samples dropped (n)" must count samples."""
    world = DemoWorld(16, 1, seed=0)
    phases = schedule(1, 16)
    settings = DemoSettings(steps=16, dim=16, domains=1)
    record = RunRecord("sona", "sona", 0.1)
    state = simulation._Run(world, phases, settings, record, _Quiet())
    state.step = 7

    async def events() -> Any:
        yield SamplesDropped(count=5, stage="gave_up")
        yield SamplesDropped(count=1, stage="shutdown")

    anyio.run(state.watch, events())
    assert record.markers["drops"] == [7] * 6
    assert state.events["SamplesDropped"] == 2  # the events themselves are counted as events
    record.eval_steps, record.quality = [0, 16], [[0.8], [0.8]]
    doc = report.build(settings, world, phases, [record], command="sona demo")
    fig = plots.supervision_figure(doc)
    labels = fig.get_axes()[0].get_legend_handles_labels()[1]
    assert "samples dropped (6)" in labels


def test_dead_letters_in_the_plot_are_named_as_the_messages_they_count() -> None:
    """DeadLettered events count messages of every loop (a Background hand-over too), while
    the accounting line's "dead-lettered" counts samples: under chaos the two differ (318
    against 294 in one run), so the plot must not call its number by the same name."""
    world = DemoWorld(16, 1, seed=0)
    phases = schedule(1, 16)
    record = RunRecord("sona", "sona", 0.1)
    record.eval_steps, record.quality = [0, 16], [[0.8], [0.8]]
    record.markers = {"dead_letters": [3, 9, 12]}
    doc = report.build(DemoSettings(steps=16, dim=16, domains=1, chaos=0.1), world, phases,
                       [record], command="sona demo")  # fmt: skip
    labels = plots.supervision_figure(doc).get_axes()[0].get_legend_handles_labels()[1]
    assert "messages dead-lettered (3)" in labels
    legend = [t.get_text() for t in plots.quality_figure(doc).legends[0].texts]
    assert "messages dead-lettered (sona)" in legend


@pytest.mark.parametrize(
    ("kept", "forgets_less"),
    [
        ((0.9, 0.7), True),
        ((0.7, 0.9), False),
        ((1.0, 0.8), True),
        # both gained while traffic was away: neither forgot, so sona did not forget less
        ((1.0674, 1.0565), False),
        ((1.02, 1.0), False),
        ((0.95, 1.1), False),
    ],
)
def test_forgets_less_compares_what_each_run_forgot(
    kept: tuple[float, float], forgets_less: bool
) -> None:
    """A share kept above 1 means the domain went on improving while traffic was away (late
    feedback, Deep replays): nothing was forgotten. Comparing the shares themselves said
    "sona forgets less: yes" for 1.067 against 1.057 (a --chaos 0.5 run), where neither run
    forgot anything."""
    runs = {
        label: {
            "final_above_base": [True],
            "returns": [{"phase_index": 2, "domain": 0, "quality_at_return": 0.9,
                         "kept_fraction_of_gain": share}],
        }
        for label, share in zip(("sona", "no-ewc"), kept, strict=True)
    }  # fmt: skip
    row = report.comparison(runs)["returns"][0]
    assert row["sona_forgets_less"] is forgets_less
    assert row["neither_forgot"] is (min(kept) >= 1.0)


def test_summary_says_when_neither_run_forgot() -> None:
    doc = _no_updates_doc()
    doc["comparison"]["returns"] = [
        {"phase_index": 2, "domain": 0, "sona_at_return": 0.9, "no_ewc_at_return": 0.89,
         "sona_kept_fraction": 1.06, "no_ewc_kept_fraction": 1.05, "sona_higher_at_return": True,
         "sona_forgets_less": False, "neither_forgot": True}
    ]  # fmt: skip
    text = io.StringIO()
    print_summary(Console(file=text, width=300), doc, Path("out"))
    assert "sona forgets less no (neither forgot)" in text.getvalue()


def test_a_plot_an_earlier_run_left_in_out_is_not_kept_beside_the_new_report(
    tmp_path: Path,
) -> None:
    """A demo with --chaos writes supervision.png, one without does not: left in place, the
    earlier run's plot would sit beside the new report as if this run had drawn it."""
    out = Output(tmp_path / "out")
    out.prepare()
    (out.path / "supervision.png").write_bytes(b"an earlier run's plot")
    (out.path / "notes.txt").write_text("not the demo's")
    staging = out.staging()
    (staging / "report.json").write_text("{}")
    (staging / "quality.png").write_bytes(b"new")
    out.commit(staging)
    assert sorted(p.name for p in out.path.iterdir()) == ["notes.txt", "quality.png", "report.json"]


def test_the_runtime_is_configured_as_documented() -> None:
    """The Deep loop triggers about twice per phase (half the quality a phase's feedback
    brings, at a typical 0.85), never below 50; under chaos the restart budget grows by four
    per expected crash so the supervisor keeps restarting; the adapter is rank 2 on one
    module; only ``ewc_lambda`` tells the two runs apart."""
    settings = DemoSettings(steps=12000, dim=64, domains=3, chaos=0.1, instant_lr=0.03)
    sona_config = simulation.runtime_config(settings, 5, ewc=True)
    plain = simulation.runtime_config(settings, 5, ewc=False)
    feedback_per_phase = 12000 / 5 * (1.0 - settings.users.missing)
    assert sona_config.deep_trigger_threshold == pytest.approx(0.5 * 0.85 * feedback_per_phase)
    assert sona_config.supervision.max_restarts == 50 + 4 * 0.1 * 12000
    assert sona_config.instant_lr == 0.03
    assert sona_config.micro_lora.rank == 2
    assert sona_config.micro_lora.target_modules == (world.MODULE,)
    assert sona_config.training.ewc_lambda > 0 and plain.training.ewc_lambda == 0
    assert dataclasses.replace(plain, training=sona_config.training) == sona_config
    short = simulation.runtime_config(DemoSettings(steps=100, dim=64, domains=1), 1, ewc=True)
    assert short.deep_trigger_threshold == 50.0
    assert short.supervision.max_restarts == 50


def test_the_event_watcher_counts_what_each_event_stands_for() -> None:
    """Lagged counts the events it says were missed; consolidations keep their measured
    quality change for the report; a supervisor that gave up is named as the plots name it."""
    world = DemoWorld(16, 1, seed=0)
    record = RunRecord("sona", "sona", 0.1)
    state = simulation._Run(world, schedule(1, 16), DemoSettings(steps=16, dim=16, domains=1),
                            record, _Quiet())  # fmt: skip

    async def events() -> Any:
        yield Lagged(missed=7)
        yield BackgroundCompleted(samples_used=10, strategy="ewc", quality_delta=0.02,
                                  latency_ms=1.0)  # fmt: skip
        yield BackgroundCompleted(samples_used=10, strategy="ewc", quality_delta=None,
                                  latency_ms=1.0)  # fmt: skip
        yield DeepCompleted(samples_used=10, epochs=1, quality_delta=-0.01, latency_ms=1.0,
                            installed=True)  # fmt: skip
        yield SupervisorGaveUpEvent(actor="instant", error_type="E", error="e", restarts=1,
                                    within_s=1.0)  # fmt: skip

    anyio.run(state.watch, events())
    assert state.events["Lagged"] == 7
    assert state.events["BackgroundCompleted"] == 2
    assert state.events["SupervisorGaveUp"] == 1
    assert record.background_quality_deltas == [0.02]
    assert record.deep_quality_deltas == [-0.01]
    assert record.markers == {"deep_runs": [0]}


class _Ramp:
    """A runtime whose answer is the wanted correction times the next of ``scales``."""

    def __init__(self, world: DemoWorld, scales: list[float]) -> None:
        self.world, self.scales = world, iter(scales)

    def forward(self, x: Any, module: Any) -> Any:
        return next(self.scales) * self.world.correction(0, x)

    def stats(self) -> LearningStats:
        return LearningStats()


def test_a_snapshot_shows_the_latest_quality_the_best_so_far_and_the_feedback_counts() -> None:
    world = DemoWorld(16, 1, seed=0)
    settings = DemoSettings(steps=16, dim=16, domains=1, rate=0.0)
    record = RunRecord("x", "x", 0.1)
    state = simulation._Run(world, schedule(1, 16), settings, record, _Quiet())
    rt = _Ramp(world, [1.0, 0.0])
    state.evaluate(rt)  # type: ignore[arg-type]
    state.evaluate(rt)  # type: ignore[arg-type]
    record.latencies_us = [float(v) for v in range(1, 101)]
    users = SimulatedUsers(settings.users, seed=1)
    traffic = world.traffic(schedule(1, 16), seed=2)
    users.serve(0, traffic, 16, world.correction(0, traffic.x))
    users.due(10)
    snap = state.snapshot(rt, users)  # type: ignore[arg-type]
    assert snap.quality == [pytest.approx(world.base_quality[0])]  # the second measurement
    assert snap.best == [pytest.approx(1.0, abs=1e-4)]  # the first one
    assert snap.latency_p50_us == pytest.approx(50.5)
    assert snap.latency_p99_us == pytest.approx(99.01)
    assert dataclasses.asdict(snap.feedback) == dataclasses.asdict(users.counts)
    assert 0 < snap.feedback.delivered < snap.feedback.groups + snap.feedback.corrections


def test_evaluations_are_evenly_spaced_and_taken_at_every_phase_start() -> None:
    phases = schedule(3, 12000)
    steps = simulation.evaluation_steps(phases, 12000, 90)
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] < 12000
    assert {p.start for p in phases} <= set(steps)
    assert set(range(0, 12000, 12000 // 90)) <= set(steps)
    assert len(steps) <= 90 + 1 + len(phases)


def test_a_run_measures_where_it_said_and_shows_every_phase(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the clock standing still no update is due by time: the observer still sees each
    phase. Measurements are taken at the planned requests (before serving them) and at the
    end; each request is served once, and feedback reaches the runtime only once the request
    at which it arrives has been served (what arrives later, once the run has served all)."""
    clock = _Clock()
    monkeypatch.setattr(simulation, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    served: list[int] = []
    submitted: list[tuple[int, int]] = []  # (last request served, request the feedback is due)
    serve, submit = SimulatedUsers.serve, simulation._Run.submit

    def serving(self: SimulatedUsers, step: int, traffic: Any, n: int, deltas: Any) -> None:
        served.extend(range(step, step + n))
        serve(self, step, traffic, n, deltas)

    async def submitting(self: simulation._Run, rt: Any, items: list[Any]) -> None:
        submitted.extend((served[-1], item.due) for item in items)
        await submit(self, rt, items)

    monkeypatch.setattr(SimulatedUsers, "serve", serving)
    monkeypatch.setattr(simulation._Run, "submit", submitting)
    settings = DemoSettings(steps=100, dim=16, domains=2, rate=0.0, evaluations=4)
    world = DemoWorld(16, 2, seed=0)
    phases = schedule(2, 100)  # 33, 33 and 34 requests: batches of 16 do not fit evenly
    observer = _Quiet()
    traffic = world.traffic(phases, seed=2)
    record = anyio.run(
        lambda: simulate(
            world, phases, traffic, settings, label="x", title="x", ewc=True, observer=observer
        )
    )
    assert sorted(served) == list(range(100))
    assert record.feedback.requests == 100
    # a planned point is measured at the first batch that starts there or after it
    planned = simulation.evaluation_steps(phases, 100, 4)
    assert len(record.eval_steps) == len(planned) + 1 and record.eval_steps[-1] == 100
    for point, measured in zip(planned, record.eval_steps, strict=False):
        assert point <= measured < point + settings.batch
    assert {p.start for p in phases} <= set(record.eval_steps)
    assert [s.phase.index for s in observer.snapshots][:3] == [0, 1, 2]
    # what is due after the last request is handed over at the end of the run
    assert submitted and all(due <= last or last == 99 for last, due in submitted)


def _three_domain_doc() -> dict[str, Any]:
    """The report of two runs over schedule(3, 500) (domains 0, 1, 2, 0, 1): sona keeps half of
    domain 0's gain and all of domain 1's, the run without EWC a fifth and a quarter."""
    world = DemoWorld(16, 3, seed=0)
    phases = schedule(3, 500)  # phases start at 0, 100, 200, 300, 400
    steps = [0, 100, 200, 300, 400, 500]

    def record(label: str, q0: float, q1: float) -> RunRecord:
        r = RunRecord(label, f"{label} run", 0.1 if label == "sona" else 0.0)
        r.eval_steps = steps
        r.quality = [[0.8, 0.8, 0.8], [0.9, 0.8, 0.8], [0.85, 0.88, 0.8], [q0, 0.86, 0.9],
                     [0.9, q1, 0.85], [0.9, 0.9, 0.85]]  # fmt: skip
        r.stats = LearningStats(background_count=7, deep_count=2, task_count=3, restarts=4)
        r.event_counts = {"LoopCrashed": 5, "LoopRestarted": 4}
        r.latencies_us = [10.0, 20.0]
        return r

    sona_run, plain = record("sona", 0.85, 0.88), record("no-ewc", 0.82, 0.82)
    plain.stopped = "the supervisor gave up: too many crashes"
    doc = report.build(DemoSettings(steps=500, dim=16, domains=3), world, phases,
                       [sona_run, plain], command="sona demo")  # fmt: skip
    doc["seconds_total"] = 0.0
    return doc


def test_the_summary_shows_each_return_with_its_own_numbers() -> None:
    doc = _three_domain_doc()
    text = io.StringIO()
    print_summary(Console(file=text, width=300), doc, Path("out"))
    lines = text.getvalue().splitlines()
    # phases are numbered from 1; each row holds that return's numbers for each run
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if "→" in line]
    assert [row for row in rows if row] == [
        ["4", "0", "0.900 → 0.850 (50 %)", "0.900 → 0.820 (20 %)"],
        ["5", "1", "0.880 → 0.880 (100 %)", "0.880 → 0.820 (25 %)"],
    ]
    out = text.getvalue()
    assert (
        "back to domain 0 (phase 4): sona forgets less yes, serves it better yes "
        "(0.850 vs 0.820 without EWC)" in out
    )
    assert "back to domain 1 (phase 5): sona forgets less yes" in out
    assert "background 7, deep 2, task boundaries 3; restarts 4, crashes 5" in out
    assert "the supervisor gave up: too many crashes" in out


def test_the_comparison_takes_each_run_numbers_from_that_run() -> None:
    doc = _three_domain_doc()
    first, second = doc["comparison"]["returns"]
    assert (first["sona_at_return"], first["no_ewc_at_return"]) == (0.85, 0.82)
    assert (first["sona_kept_fraction"], first["no_ewc_kept_fraction"]) == (0.5, 0.2)
    assert (second["sona_at_return"], second["no_ewc_at_return"]) == (0.88, 0.82)
    assert first["sona_higher_at_return"] and second["sona_higher_at_return"]


def test_a_run_summary_holds_what_the_run_measured() -> None:
    doc = _three_domain_doc()
    run = doc["runs"]["sona"]
    assert run["requests_served"] == 500
    assert run["best_quality"] == [0.9, 0.9, 0.9]
    (first, second) = run["returns"]
    assert first["gain_over_base"] == pytest.approx(0.1, abs=1e-4)
    assert second["gain_over_base"] == pytest.approx(0.08, abs=1e-4)
    record = RunRecord("x", "x", 0.0)
    record.eval_steps, record.quality = [0, 16], [[0.8], [0.8]]
    record.background_quality_deltas = [0.01, 0.05, -0.02, 0.5]
    record.deep_quality_deltas = [0.3]
    summary = report.run_summary(record, schedule(1, 16), DemoWorld(16, 1, seed=0))
    assert summary["background_quality_delta"] == {"measured_runs": 4, "median": 0.03}
    assert summary["deep_quality_delta"] == [0.3]


def test_latencies_outside_the_histogram_are_counted_in_its_end_bins() -> None:
    lat = report.latency_summary([0.5, 3.0, 10.0, 50.0, 2e6])
    counts = lat["histogram"]["counts"]
    assert sum(counts) == lat["count"] == 5
    assert counts[0] == 1 and counts[-1] == 1
    assert lat["max_us"] == 2e6 and lat["mean_us"] == pytest.approx(400012.7)
    assert lat["p50_us"] == 10.0


def test_a_return_reached_at_the_request_the_run_stopped_at_is_reported() -> None:
    """Its measurement at return is the one taken before that request was served."""
    phases = schedule(2, 300)
    record = RunRecord("sona", "sona", 0.1)
    record.eval_steps = [0, 100, 200]
    record.quality = [[0.8, 0.8], [0.9, 0.8], [0.85, 0.9]]
    (back,) = report.returns(record, phases, [0.8, 0.8])
    assert (back["quality_when_left"], back["quality_at_return"]) == (0.9, 0.85)


def test_the_report_states_the_settings_phases_users_and_world_of_the_run() -> None:
    settings = DemoSettings(steps=300, dim=16, domains=2, seed=9, chaos=0.05, batch=8,
                            instant_lr=0.02)  # fmt: skip
    world = DemoWorld(16, 2, seed=9)
    phases = schedule(2, 300)
    record = RunRecord("sona", "sona", 0.1)
    record.eval_steps, record.quality = [0, 300], [[0.8, 0.8], [0.8, 0.8]]
    doc = report.build(settings, world, phases, [record], command="sona demo --seed 9")
    assert doc["settings"] == {"steps": 300, "dim": 16, "domains": 2, "seed": 9, "chaos": 0.05,
                               "batch": 8, "instant_lr": 0.02}  # fmt: skip
    assert doc["phases"] == [dataclasses.asdict(p) for p in phases]
    assert doc["users"] == settings.users.describe()
    assert doc["world"] == world.describe()
    assert doc["command"] == "sona demo --seed 9"


def _snapshot(**changes: Any) -> Snapshot:
    """Mid-run, phase 2 of 3 (traffic from domain 1), with known counters."""
    fields: dict[str, Any] = {
        "label": "sona", "title": "sona run", "step": 40, "total": 96,
        "phase": schedule(2, 96)[1], "phases": 3, "quality": [0.85, 0.81], "best": [0.91, 0.82],
        "base": [0.8, 0.8], "stats": LearningStats(restarts=2),
        "latency_p50_us": 12.0, "latency_p99_us": 30.0,
        "feedback": FeedbackCounts(requests=40, missing=8, groups=25, corrections=7,
                                   delivered=20, delay_sum=0),
        "events": {"LoopCrashed": 3, "LoopRestarted": 2}, "elapsed_s": 1.0,
    }  # fmt: skip
    return Snapshot(**{**fields, **changes})


def test_the_live_view_shows_where_traffic_is_and_what_has_been_learned() -> None:
    shown = io.StringIO()
    console = Console(file=shown, width=200)
    display = live.LiveDisplay(console, runs=2)
    display.index, display._title, display._snap = 1, "sona run", _snapshot()
    console.print(display._render())
    text = shown.getvalue()
    assert "phase 2/3: traffic from domain 1" in text
    cells = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in text.splitlines() if line.count("│") == 5}  # fmt: skip
    assert cells["0"] == ["0.800", "0.850", "0.910"]
    assert cells["1 ◀ traffic"] == ["0.800", "0.810", "0.820"]
    assert "25 rated groups · 7 corrections · 8 never rated · 12 on their way" in text
    assert "restarts 2 · crashes 3" in text


def test_the_live_view_numbers_the_runs() -> None:
    shown = io.StringIO()
    console = Console(file=shown, width=200)
    display = live.LiveDisplay(console, runs=2)
    for title in ("first", "second"):
        display.started(title, title, 96)
        display.update(_snapshot(title=title))
        record = RunRecord(title, title, 0.0)
        display.finished(record)
    text = shown.getvalue()
    assert "run 1/2 (first) finished" in text and "run 2/2 (second) finished" in text


def test_the_log_says_when_each_run_starts_its_first_phase(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One domain gives one phase: the second run's first phase is the same phase index as
    the first run's last, and must still be logged."""
    caplog.set_level(logging.INFO, logger="sona.demo")
    progress = live.LogProgress()
    phase = schedule(1, 16)[0]
    for label in ("sona", "no-ewc"):
        progress.started(label, label, 16)
        progress.update(_snapshot(label=label, phase=phase, phases=1))
        record = RunRecord(label, label, 0.0)
        record.quality = [[0.8], [0.9]]
        progress.finished(record)
    events = [r.msg for r in caplog.records if isinstance(r.msg, dict)]
    started = [e["run"] for e in events if e["event"] == "phase_started"]
    assert started == ["sona", "no-ewc"]
    finished = [e["final_quality"] for e in events if e["event"] == "run_finished"]
    assert finished == [[0.9], [0.9]]


def test_only_updates_that_were_applied_are_timed() -> None:
    """A skipped or dropped update did not change the adapter: its latency would be the
    time to refuse, not an instant update's."""
    world = DemoWorld(16, 1, seed=0)
    record = RunRecord("x", "x", 0.1)
    state = simulation._Run(world, schedule(1, 16), DemoSettings(steps=16, dim=16, domains=1),
                            record, _Quiet())  # fmt: skip
    outcomes = iter([(True, 12.0), (False, 0.5), (True, 30.0), (False, 0.0)])

    class Runtime:
        async def adapt(self, x: Any, feedback: Any) -> Any:
            applied, latency = next(outcomes)
            return SimpleNamespace(applied=applied, latency_us=latency)

    items = [SimpleNamespace(x=x, feedback=None) for x in world.held_out(0)[:4]]
    anyio.run(state.submit, Runtime(), items)
    assert record.latencies_us == [12.0, 30.0]


def test_the_quiet_summary_logs_each_run_numbers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sona.demo")
    log_summary(_three_domain_doc(), Path("out/report.json"))
    events = [r.msg for r in caplog.records if isinstance(r.msg, dict)]
    results = {e["run"]: e for e in events if e["event"] == "result"}
    assert results["sona"]["restarts"] == 4
    assert results["sona"]["returns"] == [(0, 0.9, 0.85), (1, 0.88, 0.88)]
    assert results["no-ewc"]["final_quality"] == [0.9, 0.9, 0.85]
    (comparison,) = [e for e in events if e["event"] == "comparison"]
    assert comparison["verdict"] == "sona forgets less on every return: yes"
