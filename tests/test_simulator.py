"""``sona.simulator.DomainWorld``: arguments it cannot build a world from are refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from sona.simulator import DomainWorld


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"dim": 0}, "dim"),
        ({"dim": 4}, "subspace"),  # the default subspace (6) does not fit in 4 dimensions
        ({"domains": 0}, "domains"),
        ({"subspace": 0}, "subspace"),
        ({"shared": 7}, "shared"),
        ({"shared": -1}, "shared"),
        ({"correction_rank": 0}, "correction_rank"),
        ({"correction_rank": 7}, "correction_rank"),
        ({"held_out": 0}, "held_out"),
        ({"noise": -0.1}, "noise"),
        ({"noise": float("nan")}, "noise"),
        ({"base_quality": 1.5}, "base_quality"),
        ({"base_quality": 1.0}, "base_quality"),
        ({"base_quality": float("nan")}, "base_quality"),
        ({"seed": -1}, "seed"),
    ],
)
def test_arguments_it_cannot_build_from_are_refused_by_name(
    kwargs: dict[str, Any], named: str
) -> None:
    """Before, most of these built a world silently (a NaN base quality from no held-out
    inputs, no correction at rank 0, a base of 1.0 when 1.5 was asked for) or failed deep in
    numpy with a message about matmul or negative dimensions."""
    args = {"dim": 16, "domains": 1, **kwargs}
    with pytest.raises(ValueError, match=rf"^{named} "):
        DomainWorld(**args)


def test_a_base_quality_the_world_cannot_reach_is_refused() -> None:
    """Quality falls toward about 0.5 as the correction grows, so a base of 0.2 cannot be
    made: the world would have been built with another base than the one asked for."""
    with pytest.raises(ValueError, match=r"^base_quality 0.2 cannot be reached"):
        DomainWorld(16, 1, base_quality=0.2)


def test_the_base_quality_asked_for_is_the_one_built() -> None:
    world = DomainWorld(32, 3, shared=2, base_quality=0.7, seed=4)
    assert [round(world.base_quality(d), 3) for d in range(3)] == [0.7, 0.7, 0.7]


def test_inputs_are_unit_vectors_in_their_domain_subspace_plus_the_noise_asked_for() -> None:
    """An input is a draw in the domain's subspace (k directions) plus isotropic noise whose
    energy is ``noise**2`` times the subspace part's: after scaling to unit length, the share
    outside the subspace averages noise**2 (d - k) / d · k / (k - 2) (the last factor is the
    mean of k over a chi-square with k degrees of freedom)."""
    dim, k = 64, 6
    for noise in (0.05, 0.2):
        world = DomainWorld(dim, 1, subspace=k, noise=noise, seed=0)
        x = world.inputs(0, 4000, np.random.default_rng(1))
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
        basis = world.domains[0].basis
        outside = np.sum((x - x @ basis.T @ basis) ** 2, axis=1)
        expected = noise**2 * (dim - k) / dim * k / (k - 2)
        assert outside.mean() == pytest.approx(expected, rel=0.25)
