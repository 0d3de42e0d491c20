"""``sona bench forgetting`` and the acceptance numbers on DESIGN.md's default sequence."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from sona.bench import forgetting


def test_acc_and_bwt_follow_gem() -> None:
    r = np.array([[0.9, 0.1, 0.2], [0.7, 0.8, 0.3], [0.6, 0.5, 1.0]])
    assert forgetting.acc_of(r) == pytest.approx(0.7)
    assert forgetting.bwt_of(r) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)


def test_bench_runs_end_to_end_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    forgetting.add_arguments(parser)
    argv = "--json --ranks 2 --lambdas 10 --seeds 1 --steps-per-task 250 --dim 32 --tasks 2 "
    argv += "--subspace-dim 4 --no-torch"
    assert forgetting.run(parser.parse_args(argv.split())) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["method"], r["ewc_lambda"]): r for r in out["results"]}
    assert set(rows) == {("plain SGD", 0.0), ("EWC++", 10.0), ("joint (shuffled)", None)}
    ewc, sgd = rows[("EWC++", 10.0)], rows[("plain SGD", 0.0)]
    assert np.array(ewc["R_mean"]).shape == (2, 2)
    assert ewc["bwt_mean"] > sgd["bwt_mean"]
    (fired,) = ewc["boundaries_fired"]  # one seed
    assert len(fired) == 1 and 250 <= fired[0] < 450
    assert rows[("joint (shuffled)", None)]["bwt_mean"] is None


@pytest.mark.slow
def test_default_sequence_meets_the_forgetting_targets() -> None:
    """Rank 2: EWC++ BWT >= -0.05 where SGD <= -0.25, ACC >= SGD's. Rank 4: ACC >= SGD + 0.05
    and within 0.05 of joint training. Three seeds, boundaries detected, lambda 10."""
    setting = forgetting.Setting()
    outcomes = forgetting.evaluate(setting, [2, 4], [10.0], [0, 1, 2], [])
    by = {(o.rank, o.method): o for o in outcomes}
    for rank in (2, 4):
        for fired in by[(rank, "EWC++")].boundaries:
            assert len(fired) == setting.tasks - 1
    sgd2, ewc2 = by[(2, "plain SGD")], by[(2, "EWC++")]
    assert sgd2.bwt().mean() <= -0.25
    assert ewc2.bwt().mean() >= -0.05
    assert ewc2.acc().mean() >= sgd2.acc().mean()
    sgd4, ewc4, joint4 = by[(4, "plain SGD")], by[(4, "EWC++")], by[(4, "joint (shuffled)")]
    assert ewc4.acc().mean() >= sgd4.acc().mean() + 0.05
    assert ewc4.acc().mean() >= joint4.acc().mean() - 0.05


def test_outcome_json_summarises_acc_and_bwt_over_seeds() -> None:
    """Two seeds' R matrices in: ACC and BWT are means over seeds with sample sds, R_mean the
    element-wise mean; a joint row, not sequential, has no BWT."""
    r0 = np.array([[0.9, 0.1], [0.5, 0.8]])  # ACC 0.65, BWT -0.4
    r1 = np.array([[0.7, 0.3], [0.7, 0.9]])  # ACC 0.8, BWT 0.0
    row = forgetting.Outcome(2, "EWC++", 10.0, matrices=[r0, r1], boundaries=[[5], [7]])
    out = row.to_json()
    assert out["acc_mean"] == pytest.approx(0.725)
    assert out["acc_sd"] == pytest.approx(np.std([0.65, 0.8], ddof=1))
    assert out["bwt_mean"] == pytest.approx(-0.2)
    assert out["bwt_sd"] == pytest.approx(0.4 / 2**0.5)
    assert out["R_mean"] == [[0.8, 0.2], [0.6, 0.85]]
    assert out["boundaries_fired"] == [[5], [7]]
    joint = forgetting.Outcome(2, "joint (shuffled)", None, matrices=[r0, r1]).to_json()
    assert joint["bwt_mean"] is None and joint["bwt_sd"] is None
    assert joint["acc_mean"] == pytest.approx(0.725)
