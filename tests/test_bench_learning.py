"""``sona bench learning``: runs end to end and measures what each feedback form learns."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import pytest

from sona.bench import learning


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    learning.add_arguments(parser)
    assert learning.run(parser.parse_args(["--json", *argv])) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_learning_bench_reports_every_form_against_base_and_ideal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _run(capsys, "--updates", "600", "--every", "200", "--seeds", "1", "--dim", "64")
    forms = {f["form"]: f for f in out["forms"]}  # type: ignore[attr-defined]
    assert set(forms) == set(learning.FORMS)
    base = out["frozen_base_quality"]
    assert isinstance(base, float) and 0.8 < base < 0.86
    assert out["ideal_quality"] == pytest.approx(1.0, abs=1e-4)
    # supervised forms learn measurably within a few hundred updates; nothing is a constant
    for name in ("target", "gradient"):
        assert forms[name]["final_quality"] > base + 0.05
        assert forms[name]["applied_fraction"] == 1.0
    curves = {c["form"]: c for c in out["curves"]}  # type: ignore[attr-defined]
    assert curves["target"]["updates"] == [0, 200, 400, 600]
    assert curves["target"]["quality_mean"][0] == pytest.approx(base, abs=0.02)


def test_learning_bench_prints_tables(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    learning.add_arguments(parser)
    args = parser.parse_args(
        ["--updates", "100", "--every", "50", "--seeds", "1", "--dim", "32", "--forms", "target"]
    )
    assert learning.run(args) == 0
    text = capsys.readouterr().out
    assert "frozen base" in text and "ideal correction" in text and "target" in text


def test_learning_bench_refuses_unknown_forms(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    learning.add_arguments(parser)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--forms", "telepathy"])
    assert exc.value.code == 2
    assert "argument --forms: unknown forms ['telepathy']" in capsys.readouterr().err


@pytest.mark.parametrize(("every", "marks"), [(30, [0, 30, 60, 90, 100]), (250, [0, 100])])
def test_the_curve_ends_after_the_last_update(
    capsys: pytest.CaptureFixture[str], every: int, marks: list[int]
) -> None:
    """``--every`` need not divide ``--updates``: the final quality is still measured after
    the last update, and the applied fraction counts all of them."""
    out: dict[str, Any] = _run(
        capsys,
        *["--updates", "100", "--every", str(every), "--seeds", "1", "--dim", "32"],
        *["--forms", "target"],
    )
    (curve,) = out["curves"]
    (summary,) = out["forms"]
    assert curve["updates"] == marks
    assert summary["final_quality"] == pytest.approx(curve["quality_mean"][-1])
    assert summary["final_quality"] > out["frozen_base_quality"]
    assert summary["updates_to_peak"] == 100
    assert summary["applied_fraction"] == 1.0


def test_curves_of_different_lengths_share_one_table(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    learning.add_arguments(parser)
    argv = ["--updates", "200", "--quality-updates", "100", "--every", "50", "--seeds", "1"]
    argv += ["--dim", "32", "--forms", "quality only,target"]
    assert learning.run(parser.parse_args(argv)) == 0
    text = capsys.readouterr().out
    curves = text[text.index("Learning curves") :]
    header = next(line for line in curves.splitlines() if "feedback" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["feedback", "0", "100", "200"]
    quality_only = next(line for line in curves.splitlines() if "quality only" in line)
    assert quality_only.rstrip(" │").endswith("-")  # not run to 200 updates


def test_curve_marks_take_every_curves_last_update() -> None:
    a = learning.Curve("target", 0.05, updates=[0, 250, 500, 600])
    b = learning.Curve("quality only", 0.03, updates=[0, 250, 300])
    assert learning.curve_marks([a, b]) == [0, 250, 300, 500, 600]


def test_summary_milestones_are_read_off_the_mean_curve() -> None:
    """Two seeds, hand-made: the peak (400), the first mark at 90 % of the peak's gain over
    the base (300; the 100 a half-gain level, the 200 a final-gain level or the 400 a last
    hit would give are wrong), half the gap to the ideal reached exactly at 100 (a level met
    counts), the final quality and its sample sd over seeds, and the applied fraction over
    every update."""
    per_seed = [[0.5] * 2, [0.75] * 2, [0.8125] * 2, [0.9375] * 2, [0.96875, 0.9375]]
    curve = learning.Curve(
        "target",
        0.05,
        updates=[0, 100, 200, 300, 400, 500],
        quality=[*per_seed, [0.875, 0.8125]],
        applied=[475, 500],
    )
    s = learning.summarize(curve, base=0.5)
    assert s["peak_quality"] == 0.953125 and s["updates_to_peak"] == 400
    assert s["updates_to_90pct_of_gain"] == 300
    assert s["updates_to_half_of_ideal_gap"] == 100
    assert s["final_quality"] == 0.84375
    assert s["final_sd"] == pytest.approx(0.0625 / 2**0.5)
    assert s["applied_fraction"] == 0.975


def test_a_curve_that_never_gains_reaches_no_milestone() -> None:
    curve = learning.Curve("rated output", 0.02, updates=[0, 50], quality=[[0.8], [0.7]])
    curve.applied = [50]
    s = learning.summarize(curve, base=0.8)
    assert s["updates_to_peak"] == 0 and s["final_sd"] == 0.0
    assert s["updates_to_90pct_of_gain"] is None
    assert s["updates_to_half_of_ideal_gap"] is None


def test_each_form_runs_with_its_own_settings(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its own learning rate (--lr-FORM), and for quality only its own number of updates and
    exploration noise; the summary reports the rate each form was run with."""
    calls: dict[str, dict[str, Any]] = {}

    def curve(form: str, **kw: Any) -> learning.Curve:
        calls[form] = kw
        return learning.Curve(
            form, kw["learning_rate"], updates=[0, 1], quality=[[0.8], [0.9]], applied=[1]
        )

    monkeypatch.setattr(learning, "learning_curve", curve)
    argv = ["--updates", "40", "--quality-updates", "70", "--explore-std", "3", "--seeds", "1"]
    out = _run(capsys, *argv, "--dim", "16", "--lr-gradient", "0.07", "--lr-group", "0.3")
    rates = learning.DEFAULT_LR | {"gradient": 0.07, "group of 4": 0.3}
    assert {form: kw["learning_rate"] for form, kw in calls.items()} == rates
    assert {f["form"]: f["learning_rate"] for f in out["forms"]} == rates  # type: ignore[attr-defined]
    assert {form: kw["updates"] for form, kw in calls.items()} == dict.fromkeys(
        learning.FORMS, 40
    ) | {"quality only": 70}
    assert {form: kw["explore_std"] for form, kw in calls.items()} == dict.fromkeys(
        learning.FORMS, 0.5
    ) | {"quality only": 3.0}


def test_updates_the_pipeline_did_not_apply_are_not_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every other update refused: half applied, as the pipeline reported each time."""
    train_step = learning.TrainingPipeline.train_step
    seen = [0]

    def every_other(self: Any, *args: Any, **kw: Any) -> Any:
        seen[0] += 1
        result = train_step(self, *args, **kw)
        return dataclasses.replace(result, applied=result.applied and seen[0] % 2 == 0)

    monkeypatch.setattr(learning.TrainingPipeline, "train_step", every_other)
    curve = learning.learning_curve(
        "target", updates=20, every=10, learning_rate=0.05, seeds=[0, 1], dim=16
    )
    assert curve.applied == [10, 10]
    assert learning.summarize(curve, base=0.8)["applied_fraction"] == 0.5
