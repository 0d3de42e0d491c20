"""``sona bench soak`` runs end to end: load, chaos, durable log, per-window report."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

from sona.bench import soak


def run(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    soak.add_arguments(parser)
    base = ["--minutes", "0.04", "--rate", "300", "--dim", "16", "--producers", "4", "--json"]
    assert soak.run(parser.parse_args([*base, *extra])) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    soak.add_arguments(parser)
    assert soak.run(parser.parse_args(["--minutes", "0"])) == 2
