"""What the demo exists to show, on a smaller world than the default (width 128): feedback
lifts every domain above the frozen base, and when traffic comes back to the first domain after
the two others, sona (EWC++) serves it better than the same run without EWC, which forgot part
of it. Measured by the demo itself, from its report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import sona.demo


def test_sona_learns_every_domain_and_keeps_more_than_without_ewc(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    sona.demo.add_arguments(parser)
    args = parser.parse_args(["--dim", "128", "--steps", "6000", "--out", str(tmp_path), "--quiet"])
    assert sona.demo.run(args) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    base = rep["base_quality"]
    sona_run, plain = rep["runs"]["sona"], rep["runs"]["no-ewc"]
    assert all(sona_run["final_above_base"]), (sona_run["final_quality"], base)
    first = rep["comparison"]["returns"][0]
    assert first["domain"] == 0
    assert first["sona_at_return"] > first["no_ewc_at_return"], first
    forgotten = plain["returns"][0]
    assert forgotten["quality_at_return"] < forgotten["quality_when_left"], forgotten
