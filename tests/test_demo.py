"""``sona demo``: the world, the users, the command line, report.json and the plots."""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

import sona.demo
import sona.demo.command
import sona.demo.output
import sona.demo.simulation
import sona.demo.users
from sona.demo import plots, report
from sona.demo.simulation import RunRecord
from sona.demo.summary import print_summary
from sona.demo.users import Feedback, SimulatedUsers, UserModel
from sona.demo.world import DemoWorld, Traffic, schedule
from sona.feedback import AdaptFeedback, FeedbackKind

SONA = shutil.which("sona", path=str(Path(sys.executable).parent)) or "sona"
SMALL = ["--dim", "48", "--domains", "2", "--steps", "1500"]


def _args(out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sona.demo.add_arguments(parser)
    return parser.parse_args([*SMALL, "--out", str(out), "--quiet", *extra])


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SONA, "demo", *args], capture_output=True, text=True, timeout=300, check=False
    )


# ---------------------------------------------------------------------------- the world
def test_schedule_visits_every_domain_then_returns_to_the_earlier_ones() -> None:
    phases = schedule(3, 1000)
    assert [p.domain for p in phases] == [0, 1, 2, 0, 1]
    assert [p.returning for p in phases] == [False, False, False, True, True]
    assert phases[0].start == 0 and phases[-1].stop == 1000
    assert all(a.stop == b.start for a, b in itertools.pairwise(phases))
    assert [p.domain for p in schedule(1, 10)] == [0]


def test_schedule_refuses_fewer_steps_than_phases() -> None:
    with pytest.raises(ValueError, match="steps"):
        schedule(3, 4)
    assert [p.length for p in schedule(3, 5)] == [1, 1, 1, 1, 1]  # one request each is enough


def test_the_last_phase_takes_the_requests_that_do_not_divide_evenly() -> None:
    """Every request is served by some phase: 1003 over five phases leaves three over."""
    phases = schedule(3, 1003)
    assert [p.length for p in phases] == [200, 200, 200, 200, 203]
    assert phases[-1].stop == 1003


def test_domains_conflict_what_one_teaches_is_wrong_for_another() -> None:
    world = DemoWorld(64, 2, seed=0)
    x0, x1 = world.held_out(0), world.held_out(1)
    # each domain's own correction makes the base ideal on it ...
    assert world.held_out_quality(0, lambda x: world.correction(0, x)) > 0.99
    # ... and, applied to the other domain's inputs, makes that domain worse than the base
    learned_0 = world.held_out_quality(1, lambda x: world.correction(0, x))
    assert learned_0 < world.base_quality[1] - 0.01
    assert x0.shape == x1.shape == (256, 64)


def test_the_report_describes_the_world_that_was_built() -> None:
    world = DemoWorld(24, 3, seed=5, subspace=6, shared=1, held_out=100)
    assert world.describe() == {
        "dim": 24,
        "domains": 3,
        "input_subspace_per_domain": 6,
        "shared_input_directions": 1,
        "correction_rank": 1,
        "held_out_per_domain": 100,
        "base_quality": [0.8, 0.8, 0.8],
        "module": "q_proj",
    }


def test_a_world_as_wide_as_one_domain_subspace_is_built_a_narrower_one_refused() -> None:
    assert DemoWorld(8, 1, seed=0).dim == 8
    with pytest.raises(ValueError, match="dim must be >= 8"):
        DemoWorld(7, 1, seed=0)


def test_vectorised_rating_matches_the_simulator() -> None:
    world = DemoWorld(32, 2, seed=3)
    phases = schedule(2, 30)
    traffic = world.traffic(phases, seed=0)
    rng = np.random.default_rng(0)
    rows = slice(phases[1].start, phases[1].start + 5)  # domain 1's requests
    cands = rng.standard_normal((5, 3, 32)).astype(np.float32) * 0.3
    fast = world.rate(traffic.base_out[rows], traffic.ideal_out[rows], cands)
    for k in range(3):
        slow = world.sim.rate(1, traffic.x[rows], cands[:, k])
        np.testing.assert_allclose(fast[:, k], slow, atol=1e-5)
    np.testing.assert_allclose(
        traffic.correction(rows), world.correction(1, traffic.x[rows]), atol=1e-5
    )


def test_held_out_quality_matches_the_simulator() -> None:
    world = DemoWorld(32, 2, seed=1)
    predict = lambda x: 0.5 * world.correction(0, x)  # noqa: E731
    assert world.held_out_quality(0, predict) == pytest.approx(world.sim.evaluate(0, predict))
    assert world.held_out_quality(1, np.zeros_like) == pytest.approx(world.base_quality[1])


def test_traffic_follows_the_schedule_and_is_reproducible() -> None:
    world = DemoWorld(32, 3, seed=0)
    phases = schedule(3, 500)
    a, b = world.traffic(phases, seed=7), world.traffic(phases, seed=7)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.x.shape == a.base_out.shape == a.ideal_out.shape == (500, 32)
    for p in phases:  # requests of a phase lie in its domain's input subspace
        basis = world.sim.domains[p.domain].basis
        x = a.x[p.start : p.stop]
        inside = np.linalg.norm(x @ basis.T, axis=1) / np.linalg.norm(x, axis=1)
        assert inside.mean() > 0.95


# ---------------------------------------------------------------------------- the users
def test_users_give_noisy_delayed_and_missing_feedback_in_two_forms() -> None:
    world = DemoWorld(32, 2, seed=0)
    n = 4000
    traffic = world.traffic(schedule(1, n), seed=1)
    model = UserModel()
    users = SimulatedUsers(model, seed=0)
    for step in range(0, n, 20):
        users.serve(step, traffic, 20, np.zeros((20, 32), np.float32))
    arrived = []
    for step in range(n):
        items = users.due(step)
        assert all(item.due <= step and item.served <= item.due for item in items)
        arrived += items
    arrived += users.flush()
    c = users.counts
    assert c.requests == n
    assert c.missing + c.groups + c.corrections == n
    assert c.delivered == len(arrived) == c.groups + c.corrections
    assert abs(c.missing / n - model.missing) < 0.04
    assert abs(c.corrections / n - model.corrections) < 0.03
    delays = [item.due - item.served for item in arrived]
    assert 0.7 * model.mean_delay < np.mean(delays) < 1.3 * model.mean_delay
    assert min(delays) == 0 and max(delays) > 2 * model.mean_delay
    kinds = {item.form: item.feedback.kind for item in arrived}
    assert kinds == {"group": FeedbackKind.GROUP, "correction": FeedbackKind.TARGET}
    group = next(item.feedback for item in arrived if item.form == "group")
    assert group.group_qualities is not None and group.group_qualities.shape == (4,)
    # a correction is the wanted delta up to the users' small error
    fix = next(item for item in arrived if item.form == "correction")
    want = traffic.correction(np.array([fix.served]))[0]
    assert fix.feedback.vector is not None
    err = np.linalg.norm(fix.feedback.vector - want) / np.linalg.norm(want)
    assert 0 < err < 3 * model.correction_noise


@dataclass
class _Served:
    """Feedback on 20,000 requests answered with half the wanted correction, with the
    candidates and ratings each rated group was built from."""

    world: DemoWorld
    traffic: Traffic
    users: SimulatedUsers
    arrived: list[Feedback]
    shown: dict[int, tuple[np.ndarray, np.ndarray]]  # id(feedback) -> (candidates, ratings)


SERVED_DELTA = 0.5  # the answers carry this share of the wanted correction


@pytest.fixture(scope="module")
def served() -> _Served:
    world = DemoWorld(16, 1, seed=0)
    n = 20000
    traffic = world.traffic(schedule(1, n), seed=1)
    users = SimulatedUsers(UserModel(), seed=0)
    shown: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    class Recorded:
        from_quality = AdaptFeedback.from_quality

        @staticmethod
        def from_group(outputs: np.ndarray, qualities: np.ndarray) -> AdaptFeedback:
            fb = AdaptFeedback.from_group(outputs, qualities)
            shown[id(fb)] = (np.array(outputs), np.array(qualities))
            return fb

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sona.demo.users, "AdaptFeedback", Recorded)
        for step in range(0, n, 16):
            deltas = SERVED_DELTA * traffic.correction(slice(step, step + 16))
            users.serve(step, traffic, 16, deltas.astype(np.float32))
    arrived = users.flush()
    return _Served(world, traffic, users, arrived, shown)


def test_each_form_of_feedback_arrives_after_the_mean_delay(served: _Served) -> None:
    """Corrections are delayed like ratings; the report's mean delay is the one users had."""
    mean = UserModel().mean_delay
    delays = {
        form: [item.due - item.served for item in served.arrived if item.form == form]
        for form in ("group", "correction")
    }
    # about 14,000 rated groups (standard error of the mean 0.17) and 2,000 corrections (0.46)
    assert abs(np.mean(delays["group"]) - mean) < 0.6
    assert abs(np.mean(delays["correction"]) - mean) < 1.5
    every = delays["group"] + delays["correction"]
    told = served.users.counts.describe()["mean_delay_requests"]
    assert told == pytest.approx(np.mean(every), abs=0.01)


def test_feedback_is_about_the_request_it_was_given_on(served: _Served) -> None:
    for item in served.arrived:
        np.testing.assert_array_equal(item.x, served.traffic.x[item.served])
    corrections = [item for item in served.arrived if item.form == "correction"]
    assert corrections and all(item.feedback.quality == 1.0 for item in corrections)


def test_candidates_spread_around_the_served_answer_and_are_rated_by_their_quality(
    served: _Served,
) -> None:
    """The candidates shown are the served answer plus noise scaled to the base output, and
    each rating is that candidate's true quality plus the users' small rating noise."""
    model = UserModel()
    t = served.traffic
    dots, squares, spread, residuals = [], [], [], []
    for item in served.arrived:
        if item.form != "group":
            continue
        cands, ratings = served.shown[id(item.feedback)]
        s = item.served
        answer = SERVED_DELTA * t.correction(slice(s, s + 1))[0]
        dots.append(cands.mean(axis=0) @ answer)
        squares.append(answer @ answer)
        spread.append(np.std(cands - answer) / np.sqrt(np.mean(t.base_out[s] ** 2)))
        true = served.world.rate(t.base_out[s : s + 1], t.ideal_out[s : s + 1], cands[None])[0]
        residuals.append(ratings - true)
    # the candidates' mean, projected on the served answers: the answers themselves
    assert np.sum(dots) / np.sum(squares) == pytest.approx(1.0, abs=0.1)
    assert np.mean(spread) == pytest.approx(model.sampling_noise, rel=0.05)
    res = np.concatenate(residuals)
    assert abs(res.mean()) < 0.1 * model.rating_noise
    assert res.std() == pytest.approx(model.rating_noise, rel=0.05)


def test_feedback_due_at_a_step_arrives_at_that_step(served: _Served) -> None:
    """``due(step)`` is inclusive, and what is still on its way is counted as such."""
    world = served.world
    traffic = world.traffic(schedule(1, 64), seed=3)
    users = SimulatedUsers(UserModel(missing=0.0, mean_delay=5.0), seed=0)
    users.serve(0, traffic, 64, np.zeros((64, 16), np.float32))
    for step in range(200):
        on_the_way = users.counts.awaiting
        items = users.due(step)
        assert all(item.due == step for item in items)
        assert users.counts.awaiting == on_the_way - len(items)
    assert users.counts.awaiting == 0 and users.counts.delivered == 64


def test_a_rated_group_needs_two_candidates() -> None:
    with pytest.raises(ValueError, match="2 candidates"):
        SimulatedUsers(UserModel(candidates=1), seed=0)
    SimulatedUsers(UserModel(candidates=2), seed=0)


def test_the_report_describes_the_users_as_they_were_configured() -> None:
    model = UserModel(
        candidates=3,
        sampling_noise=0.4,
        rating_noise=0.02,
        correction_noise=0.06,
        missing=0.3,
        corrections=0.15,
        mean_delay=7.0,
    )
    assert model.describe() == {
        "candidates_per_group": 3,
        "sampling_noise_x_output_rms": 0.4,
        "rating_noise_sd": 0.02,
        "correction_noise": 0.06,
        "missing_probability": 0.3,
        "correction_probability": 0.15,
        "mean_delay_requests": 7.0,
    }


def test_ratings_prefer_candidates_closer_to_the_ideal_output() -> None:
    world = DemoWorld(32, 1, seed=0)
    traffic = world.traffic(schedule(1, 50), seed=0)
    ideal = traffic.correction(slice(0, 50))
    cands = np.stack([np.zeros_like(ideal), 0.5 * ideal, ideal], axis=1).astype(np.float32)
    q = world.rate(traffic.base_out, traffic.ideal_out, cands)
    assert np.all(q[:, 1] > q[:, 0]) and np.all(q[:, 2] >= q[:, 1] - 1e-6)
    np.testing.assert_allclose(q[:, 2], 1.0, atol=1e-5)


# ---------------------------------------------------------------------------- the command
def test_without_the_demo_extra_it_says_how_to_install_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)  # makes `import rich` fail
    assert sona.demo.run(_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "pip install 'sona[demo]'" in err and "rich" in err
    assert not (tmp_path / "report.json").exists()


@pytest.fixture
def nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the demo starts a run: bad input must be refused before that."""

    async def run_all(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo ran")

    monkeypatch.setattr(sona.demo.command, "run_all", run_all)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--domains", "0"),
        ("--domains", "9"),
        ("--dim", "4"),
        ("--dim", "4097"),
        ("--chaos", "2"),
        ("--steps", "3"),
        ("--steps", "1000001"),
        ("--seed", "-1"),
        ("--seed", str(2**62)),  # beyond SonaRuntime's range: refused before the world is built
    ],
)
@pytest.mark.usefixtures("nothing_runs")
def test_bad_options_exit_2_with_a_message(
    option: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = _args(out, option, value)
    assert sona.demo.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sona demo: {option} ") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.usefixtures("nothing_runs")
def test_steps_times_dim_is_bounded_by_what_the_requests_take(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(tmp_path, "--dim", "4096", "--steps", "40000")  # 1.2 GiB per request array
    assert sona.demo.run(args) == 2
    err = capsys.readouterr().err
    assert "--steps × --dim must be <=" in err and "--steps <= 32768" in err


@pytest.mark.parametrize("where", ["a regular file", "under a regular file", "/proc"])
@pytest.mark.usefixtures("nothing_runs")
def test_an_unusable_out_is_refused_before_anything_runs(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out = {
        "a regular file": afile,
        "under a regular file": afile / "sub",
        "/proc": Path("/proc/sona-demo-out"),
    }[where]
    if where == "/proc" and not Path("/proc/self").exists():
        pytest.skip("needs /proc")
    assert sona.demo.run(_args(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sona demo: --out {out}: ") and err.count("\n") == 1, err
    assert afile.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("out", ["", "  "])
@pytest.mark.usefixtures("nothing_runs")
def test_an_empty_out_is_refused_rather_than_taken_as_the_current_directory(
    out: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert sona.demo.run(_args(tmp_path, "--out", out)) == 2
    assert capsys.readouterr().err == "sona demo: --out must name a directory, got an empty path\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("nothing_runs")
def test_an_out_that_cannot_take_files_is_refused_and_not_left_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sona.demo.output.tempfile, "TemporaryFile", denied)
    out = tmp_path / "new" / "out"
    assert sona.demo.run(_args(out)) == 2
    assert "cannot write files there (Permission denied)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    proc = _run_cli(*SMALL, "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout + proc.stderr


def _report(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "report.json").read_text())
    return data


def test_quiet_run_logs_progress_and_results_only(quiet_run: tuple[Path, str]) -> None:
    _out, text = quiet_run
    assert "run_started" in text and "phase_started" in text and "run_finished" in text
    assert "accounting" in text and "holds" in text
    assert "━" not in text  # no live display


def test_report_holds_both_runs_and_every_figure_shown(quiet_run: tuple[Path, str]) -> None:
    out, _ = quiet_run
    rep = _report(out)
    assert set(rep["runs"]) == {"sona", "no-ewc"}
    assert rep["settings"]["dim"] == 48 and rep["settings"]["domains"] == 2
    assert [p["domain"] for p in rep["phases"]] == [0, 1, 0]
    assert sorted(rep["files"]) == ["latency.png", "quality.png", "report.json"]
    for f in rep["files"]:
        assert (out / f).stat().st_size > 0
    for run in rep["runs"].values():
        t = run["timeline"]
        assert len(t["step"]) == len(t["quality"]) == len(t["seconds"]) > 10
        assert t["step"] == sorted(t["step"]) and t["step"][-1] == 1500
        assert all(len(q) == 2 for q in t["quality"])
        assert run["final_quality"] == t["quality"][-1]
        assert run["final_above_base"] == [
            q > b for q, b in zip(run["final_quality"], rep["base_quality"], strict=True)
        ]
        acc = run["accounting"]
        assert acc["holds"] and acc["in_flight"] == 0 and acc["consolidation_holds"]
        assert acc["applied"] == acc["consolidated"] + acc["evicted"] + acc["pending"]
        assert acc["submitted"] == run["feedback"]["delivered"]
        assert acc["submitted"] == (
            acc["applied"] + acc["skipped"] + acc["dropped"] + acc["dead_lettered"]
        )
        lat = run["instant_latency"]
        assert lat["count"] == acc["applied"] and 0 < lat["p50_us"] <= lat["p99_us"]
        assert sum(lat["histogram"]["counts"]) == lat["count"]
        ret = run["returns"]
        assert [(r["phase_index"], r["domain"]) for r in ret] == [(2, 0)]
    assert rep["runs"]["sona"]["ewc_lambda"] > 0 and rep["runs"]["no-ewc"]["ewc_lambda"] == 0
    comp = rep["comparison"]
    row = comp["returns"][0]
    sona_at = rep["runs"]["sona"]["returns"][0]["quality_at_return"]
    plain_at = rep["runs"]["no-ewc"]["returns"][0]["quality_at_return"]
    assert row["sona_higher_at_return"] == (sona_at > plain_at)
    kept = rep["runs"]["sona"]["returns"][0]["kept_fraction_of_gain"]
    plain_kept = rep["runs"]["no-ewc"]["returns"][0]["kept_fraction_of_gain"]
    if kept is not None and plain_kept is not None:
        assert row["sona_forgets_less"] == (max(0, 1 - kept) < max(0, 1 - plain_kept))


def _record(left: float, at_return: float) -> RunRecord:
    """A run over schedule(2, 300) whose domain 0 measured ``left`` when traffic moved to
    domain 1 (step 100) and ``at_return`` when it came back (step 200)."""
    record = RunRecord("sona", "sona", 0.1)
    record.eval_steps = [0, 100, 200, 300]
    record.quality = [[0.8, 0.8], [left, 0.8], [at_return, 0.9], [at_return, 0.9]]
    return record


def test_a_share_of_the_gain_is_given_only_for_a_gain_worth_comparing() -> None:
    phases = schedule(2, 300)
    base = [0.8, 0.8]
    # 0.0015 over the base then 0.0045 under it: the share would read -300 %
    (tiny,) = report.returns(_record(0.8015, 0.7955), phases, base)
    assert tiny["kept_fraction_of_gain"] is None and tiny["gain_over_base"] == 0.0015
    (real,) = report.returns(_record(0.9, 0.85), phases, base)
    assert real["kept_fraction_of_gain"] == pytest.approx(0.5)
    # the threshold is a tenth of the room above the base
    (edge,) = report.returns(_record(0.821, 0.8105), phases, base)
    assert edge["kept_fraction_of_gain"] == pytest.approx(0.5)
    (under,) = report.returns(_record(0.819, 0.8095), phases, base)
    assert under["kept_fraction_of_gain"] is None


def _runs(*kept: tuple[float | None, float | None]) -> dict[str, dict[str, Any]]:
    """Run summaries whose returns kept the given shares (sona's, no-ewc's)."""

    def run(i: int) -> dict[str, Any]:
        rows = [
            {"phase_index": 3 + k, "domain": k, "quality_at_return": 0.9,
             "kept_fraction_of_gain": pair[i]}
            for k, pair in enumerate(kept)
        ]  # fmt: skip
        return {"final_above_base": [True], "returns": rows}

    return {"sona": run(0), "no-ewc": run(1)}


@pytest.mark.parametrize(
    ("kept", "verdict"),
    [
        (((0.9, 0.7), (0.95, 0.8)), True),
        (((0.9, 0.7), (None, 0.8)), None),  # one return cannot be told: neither yes nor no
        (((0.9, None), (0.95, 0.8)), None),
        (((None, 0.7), (0.6, 0.8)), False),  # a known "no" settles it
        (((0.5, 0.7), (0.95, 0.8)), False),
    ],
)
def test_forgets_less_on_every_return_is_unknown_when_a_return_is_unknown(
    kept: tuple[tuple[float | None, float | None], ...], verdict: bool | None
) -> None:
    comp = report.comparison(_runs(*kept))
    assert comp["sona_forgets_less_on_every_return"] is verdict


def test_summary_says_when_forgetting_could_not_be_told(quiet_run: tuple[Path, str]) -> None:
    out, _ = quiet_run
    doc = _report(out)
    for run in doc["runs"].values():
        for row in run["returns"]:
            row["kept_fraction_of_gain"] = None
    doc["comparison"] = report.comparison(doc["runs"])
    assert doc["comparison"]["sona_forgets_less_on_every_return"] is None
    buf = io.StringIO()
    print_summary(Console(file=buf, width=300), doc, out)
    text = buf.getvalue()
    assert "gain too small to compare" in text
    assert "could not be told whether sona forgets less on every return" in text
    assert "sona forgets less can't tell" in text


def test_no_ewc_runs_only_the_comparison(tmp_path: Path) -> None:
    assert sona.demo.run(_args(tmp_path, "--no-ewc")) == 0
    rep = _report(tmp_path)
    assert list(rep["runs"]) == ["no-ewc"]
    assert "returns" not in rep["comparison"]


def test_chaos_run_restarts_loops_and_keeps_the_accounting(tmp_path: Path) -> None:
    proc = _run_cli(*SMALL, "--out", str(tmp_path), "--chaos", "0.02")
    assert proc.returncode == 0, proc.stderr
    assert "restarts" in proc.stdout
    assert proc.stdout.count("accounting: submitted") == 2
    assert proc.stdout.count("consolidation: applied") == 2
    assert "holds" in proc.stdout and "DOES NOT HOLD" not in proc.stdout
    rep = _report(tmp_path)
    assert "supervision.png" in rep["files"]
    for run in rep["runs"].values():
        assert run["stopped_early"] is None
        assert run["stats"]["restarts"] > 0
        assert len(run["markers"]["restarts"]) == run["events"]["LoopRestarted"]
        assert run["accounting"]["holds"] and run["accounting"]["consolidation_holds"]


# ---------------------------------------------------------------------------- the plots
def test_every_figure_has_a_title_axis_labels_and_a_legend(
    quiet_run: tuple[Path, str], tmp_path: Path
) -> None:
    out, _ = quiet_run
    rep = _report(out)
    rep["settings"]["chaos"] = 0.02  # draw the supervision figure too
    figs = plots.figures(rep)
    assert set(figs) == {"quality.png", "latency.png", "supervision.png"}
    for name, fig in figs.items():
        axes = fig.get_axes()
        titled = fig.get_suptitle() or all(ax.get_title(loc="left") or ax.get_title()
                                           for ax in axes)  # fmt: skip
        assert titled, name
        assert all(ax.get_ylabel() for ax in axes), name
        assert any(ax.get_xlabel() for ax in axes), name
        assert fig.legends or all(ax.get_legend() is not None for ax in axes), name
    for path in plots.save_all(rep, tmp_path):
        with Image.open(path) as img:
            dpi = img.info.get("dpi", (0, 0))
            assert min(dpi) >= 100, (path.name, dpi)
            assert img.size[0] >= 800


def test_saved_plots_are_at_least_100_dpi(quiet_run: tuple[Path, str]) -> None:
    out, _ = quiet_run
    for name in ("quality.png", "latency.png"):
        with Image.open(out / name) as img:
            assert min(img.info["dpi"]) >= 100


def _stats(**changes: int) -> Any:
    """Runtime stats whose two accounting identities hold, with ``changes`` applied."""
    fields = {
        "submitted_count": 10,
        "instant_count": 6,
        "skipped_count": 1,
        "dropped_samples": 1,
        "dead_lettered": 1,
        "in_flight": 1,
        "consolidated_count": 4,
        "evicted_samples": 1,
        "pending_samples": 1,
    }
    return argparse.Namespace(**{**fields, **changes})


def test_accounting_fails_when_either_identity_is_off_by_one() -> None:
    ok = report.accounting(_stats())
    assert ok["holds"] and ok["consolidation_holds"]
    assert not report.accounting(_stats(submitted_count=11))["holds"]
    assert report.accounting(_stats(submitted_count=11))["consolidation_holds"]
    assert not report.accounting(_stats(consolidated_count=3))["consolidation_holds"]
    assert report.accounting(_stats(consolidated_count=3))["holds"]


@pytest.mark.parametrize(
    ("holds", "consolidation_holds", "stopped_early", "status"),
    [
        (True, True, None, 0),
        (False, True, None, 1),
        (True, False, None, 1),
        (True, True, "the runtime failed", 1),
    ],
)
def test_exit_status_is_1_when_any_run_stopped_early_or_broke_an_identity(
    capsys: pytest.CaptureFixture[str],
    holds: bool,
    consolidation_holds: bool,
    stopped_early: str | None,
    status: int,
) -> None:
    good = {"stopped_early": None, "accounting": {"holds": True, "consolidation_holds": True}}
    bad = {
        "stopped_early": stopped_early,
        "accounting": {"holds": holds, "consolidation_holds": consolidation_holds},
    }
    doc = {"runs": {"sona": good, "no_ewc": bad}}
    assert sona.demo.command._exit_status(doc, Path("report.json")) == status
    err = capsys.readouterr().err
    assert (err == "") == (status == 0)
    if status:
        assert "'no_ewc'" in err and "'sona'" not in err


@pytest.mark.parametrize(
    "options",
    [
        ["--dim", "16"],
        ["--dim", "4096", "--steps", "32768"],  # steps × dim exactly at its bound
        ["--domains", "8", "--steps", "240"],  # 15 phases of one batch each
        ["--domains", "3", "--steps", "80"],
        ["--chaos", "0.5"],
        ["--dim", "16", "--steps", "1000000"],
        ["--seed", str(2**62 - 1)],
    ],
)
def test_options_at_their_limits_are_accepted(options: list[str], tmp_path: Path) -> None:
    """Every limit the help gives is inclusive."""
    args = _args(tmp_path, *options)
    settings = sona.demo.command.settings_from(args)
    given = dict(zip(options[::2], options[1::2], strict=True))
    for option, value in given.items():
        assert str(getattr(settings, option.removeprefix("--"))) == value


def test_the_command_line_in_the_report_runs_the_same_demo(tmp_path: Path) -> None:
    args = _args(tmp_path, "--seed", "3", "--chaos", "0.02", "--no-ewc")
    settings = sona.demo.command.settings_from(args)
    line = sona.demo.command.command_line(settings, no_ewc=True)
    assert line == "sona demo --steps 1500 --dim 48 --domains 2 --seed 3 --chaos 0.02 --no-ewc"
    parser = argparse.ArgumentParser()
    sona.demo.add_arguments(parser)
    again = parser.parse_args(line.split()[2:])
    assert sona.demo.command.settings_from(again) == settings and again.no_ewc


def test_sona_runs_first_and_both_runs_answer_the_same_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = sona.demo.command.run_plan(no_ewc=False)
    assert [(label, ewc) for label, _, ewc in plan] == [("sona", True), ("no-ewc", False)]
    seen: list[Any] = []

    async def simulate(world: Any, phases: Any, traffic: Any, settings: Any, **kw: Any) -> Any:
        seen.append(traffic)
        return kw["label"]

    monkeypatch.setattr(sona.demo.command, "simulate", simulate)
    world = DemoWorld(16, 2, seed=0)
    phases = schedule(2, 96)
    settings = sona.demo.simulation.DemoSettings(steps=96, dim=16, domains=2, seed=4)
    labels = asyncio.run(sona.demo.command.run_all(world, phases, settings, plan, None))  # type: ignore[arg-type]
    assert labels == ["sona", "no-ewc"]
    first, second = seen
    np.testing.assert_array_equal(first.x, second.x)
    np.testing.assert_array_equal(first.ideal_out, second.ideal_out)


def test_the_world_is_built_from_the_seed_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    built: list[DemoWorld] = []

    class Stop(Exception):
        pass

    async def run_all(world: DemoWorld, *args: object) -> None:
        built.append(world)
        raise Stop

    monkeypatch.setattr(sona.demo.command, "run_all", run_all)
    with pytest.raises(Stop):
        sona.demo.run(_args(tmp_path / "out", "--seed", "5"))
    np.testing.assert_array_equal(built[0].sim.base, DemoWorld(48, 2, seed=5).sim.base)
    assert not (tmp_path / "out").exists()  # nothing is left of a demo that failed


def test_a_quiet_demo_leaves_the_log_level_as_it_found_it(tmp_path: Path) -> None:
    demo_logger = logging.getLogger("sona.demo")
    before = demo_logger.level
    demo_logger.setLevel(logging.WARNING)
    try:
        assert sona.demo.run(_args(tmp_path, "--no-ewc", "--steps", "48", "--domains", "1")) == 0
        assert demo_logger.level == logging.WARNING
    finally:
        demo_logger.setLevel(before)


def test_an_out_holding_a_directory_by_a_file_name_of_the_demo_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    out.mkdir(parents=True)
    (out / "quality.png").mkdir()
    output = sona.demo.output.Output(out)
    with pytest.raises(sona.demo.output.OutputError, match=r"quality\.png there is a directory"):
        output.prepare()


def test_a_failed_demo_leaves_neither_its_staging_nor_the_directory_it_made(
    tmp_path: Path,
) -> None:
    output = sona.demo.output.Output(tmp_path / "new" / "out")
    output.prepare()
    staging = output.staging()
    (staging / "report.json").write_text("{}")
    output.discard(staging)
    assert list(tmp_path.iterdir()) == []


def test_a_stale_link_to_a_demo_file_is_removed_too(tmp_path: Path) -> None:
    output = sona.demo.output.Output(tmp_path / "out")
    output.prepare()
    (output.path / "supervision.png").symlink_to(tmp_path / "gone.png")  # dangling
    staging = output.staging()
    (staging / "report.json").write_text("{}")
    output.commit(staging)
    assert sorted(p.name for p in output.path.iterdir()) == ["report.json"]
