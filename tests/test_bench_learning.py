"""``sona bench learning``: runs end to end and measures what each feedback form learns."""

from __future__ import annotations

import argparse
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
