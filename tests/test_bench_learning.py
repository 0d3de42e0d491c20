"""``sona bench learning``: runs end to end and measures what each feedback form learns."""

from __future__ import annotations

import argparse
import json

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


def test_learning_bench_refuses_unknown_forms() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    learning.add_arguments(parser)
    with pytest.raises(SystemExit, match="unknown forms"):
        learning.run(parser.parse_args(["--forms", "telepathy"]))
