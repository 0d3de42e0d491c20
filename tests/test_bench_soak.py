"""``sona bench soak`` runs end to end: load, chaos, durable log, per-window report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from sona.bench import soak


def _strict(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def run(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    soak.add_arguments(parser)
    base = ["--minutes", "0.04", "--rate", "300", "--dim", "16", "--producers", "4", "--json"]
    assert soak.run(parser.parse_args([*base, *extra])) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out, parse_constant=_strict)
    return out


def test_soak_reports_every_window_and_accounts_for_every_sample(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = run(capsys, "--chaos", "0.01")
    windows = report["windows"]
    assert len(windows) == 5 and all(w["samples"] > 0 and w["rss_mb"] > 0 for w in windows)
    s = report["stats"]
    assert not s["gave_up"]
    assert s["submitted"] == s["applied"] + s["skipped"] + s["dropped"] + s["dead_lettered"]
    assert sum(w["samples"] for w in windows) + sum(report["submit_errors"].values()) == 720
    log = report["durable_log"]
    assert log["samples"] == s["submitted"] and log["transactions"] >= 1


def test_soak_without_the_log(capsys: pytest.CaptureFixture[str]) -> None:
    report = run(capsys, "--no-log", "--chaos", "0")
    assert report["durable_log"] is None and report["stats"]["restarts"] == 0


def test_soak_refuses_nonsense(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="sona bench soak")
    parser.add_argument("--json", action="store_true")
    soak.add_arguments(parser)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--minutes", "0"])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "error: argument --minutes:" in err


def test_each_window_is_measured_over_its_own_span(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """3.25 s in windows of 1 s: the last row covers 2-3.25 s and its rate divides by 1.25 s.
    The checkpoints written at start and at stop are counted, as the directory shows."""
    state = tmp_path / "state"
    report = run(
        capsys,
        *["--minutes", str(3.25 / 60), "--window", "1", "--rate", "200", "--chaos", "0"],
        *["--dir", str(state)],
    )
    windows = report["windows"]
    assert [w["window"] for w in windows] == ["0-1 s", "1-2 s", "2-3.25 s"]
    assert windows[-1]["end_s"] == pytest.approx(3.25)
    for w in windows:
        span = w["end_s"] - w["start_s"]
        assert w["samples_per_s"] == pytest.approx(w["samples"] / span)
        assert w["samples_per_s"] == pytest.approx(200, rel=0.02)  # scheduled open-loop load
    assert report["config"]["window_s"] == 1.0
    written = report["checkpoints"]["written"]
    assert written == 2 == len(list(state.glob("checkpoint-*.sona")))
    assert report["checkpoints"]["mean_bytes"] > 0


def test_one_window_reports_valid_json_and_no_growth_figure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = run(capsys, "--minutes", "0.01", "--window", "0.6", "--no-log", "--chaos", "0")
    (window,) = report["windows"]
    assert window["window"] == "0-0.6 s" and abs(window["samples"] - 180) <= 1
    assert report["rss_growth_after_first_window"] is None
    assert report["last_p99_over_second_p99"] is None
    assert report["checkpoints"] == {"written": 0, "mean_bytes": None}


def test_short_runs_default_to_five_windows() -> None:
    assert soak.default_window(300.0) == 60.0
    assert soak.default_window(2.4) == pytest.approx(0.48)
    spans = soak.windows_for(2.4, soak.default_window(2.4))
    assert len(spans) == 5 and spans[-1][1] == 2.4
    assert soak.windows_for(3.5, 1.0)[-1] == (2.0, 3.5)
