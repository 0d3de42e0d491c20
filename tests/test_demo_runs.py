"""One demo run, driven directly: pacing, and what a run that stopped early reports."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from rich.console import Console

from sona.config import SupervisionConfig
from sona.demo import live, plots, report, simulation
from sona.demo.output import Output
from sona.demo.simulation import DemoSettings, RunRecord, Snapshot, simulate
from sona.demo.summary import print_summary
from sona.demo.users import FeedbackCounts, SimulatedUsers
from sona.demo.world import DemoWorld, schedule
from sona.events import SamplesDropped
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
