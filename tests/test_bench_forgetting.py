"""``sona bench forgetting`` says what its boundary detection did, and keeps stdout for the
report."""

from __future__ import annotations

import argparse
import json

import pytest

from sona.bench import forgetting

SHORT = ["--ranks", "2", "--lambdas", "10", "--seeds", "1", "--steps-per-task", "100"]
SHORT += ["--no-torch"]


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    forgetting.add_arguments(parser)
    return forgetting.run(parser.parse_args([*SHORT, *argv]))


def _ewc_row(text: str) -> str:
    return next(line for line in text.splitlines() if "EWC++" in line)


def test_no_detected_boundary_is_reported_as_none_detected(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """100 samples per task are too few for the detector: EWC++ then never consolidates, its
    numbers equal plain SGD's, and the table must say so rather than 'explicit'."""
    assert _run() == 0
    row = _ewc_row(capsys.readouterr().out)
    assert "none detected (missed 3)" in row and "explicit" not in row


def test_explicit_boundaries_are_labelled_explicit(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("--boundaries", "explicit", "--tasks", "2") == 0
    assert "explicit" in _ewc_row(capsys.readouterr().out)


def test_describe_boundaries() -> None:
    switches = [100, 200, 300]
    ewc = forgetting.Outcome(2, "EWC++", 10.0, boundaries=[[], []])
    assert forgetting.describe_boundaries(ewc, switches, "detected") == "none detected (missed 6)"
    ewc.boundaries = [[105, 230, 310], [50, 104, 212, 301]]
    assert forgetting.describe_boundaries(ewc, switches, "detected") == "1–30 (extra 1)"
    ewc.boundaries = [[100, 205, 399]]  # one right at its switch: a lag of 0, not an extra
    assert forgetting.describe_boundaries(ewc, switches, "detected") == "0–99"
    ewc.boundaries = [[105, 310]]
    assert forgetting.describe_boundaries(ewc, switches, "detected") == "5–10 (missed 1)"
    assert forgetting.describe_boundaries(ewc, switches, "explicit") == "explicit"


def test_progress_goes_to_stderr_and_json_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("--json", "--progress", "--tasks", "2") == 0
    out, err = capsys.readouterr()

    def strict(constant: str) -> None:
        raise ValueError(constant)

    report = json.loads(out, parse_constant=strict)
    assert {r["method"] for r in report["results"]} == {"plain SGD", "EWC++", "joint (shuffled)"}
    assert "rank 2 seed 0 plain SGD" in err


def test_seconds_add_up_over_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock that moves 1 s per reading: each method's time is summed over its two seeds."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(forgetting.time, "perf_counter", lambda: float(next(ticks)))
    setting = forgetting.Setting(dim=8, tasks=2, subspace_dim=2, steps_per_task=5)
    outcomes = forgetting.evaluate(setting, [2], [], [0, 1], [])
    assert [o.seconds for o in outcomes] == [2.0, 2.0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dim", "8", "--tasks", "3", "--subspace-dim", "3"], "= 9 exceeds --dim 8"),
        (["--dim", "24", "--ranks", "2,25"], "argument --ranks: rank 25 exceeds --dim 24"),
    ],
)
def test_settings_that_cannot_be_built_are_refused(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        _run(*argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err
