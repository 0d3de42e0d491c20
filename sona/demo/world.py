"""The demo's world: a frozen base model, conflicting domains and a schedule that returns.

Built on :class:`sona.simulator.DomainWorld`: a frozen random linear map is the base model;
each domain draws its inputs from its own subspace and has its own hidden rank-1 correction
(what the adapter should add to the base output). A few input directions are ``shared`` by all
domains, and each domain's correction reads them differently, so what one domain teaches is
wrong for the others on those directions: learning a later domain without protection
overwrites part of an earlier one. That conflict is what makes forgetting, and EWC++, visible.

The schedule visits every domain once, then comes back to each earlier one but the last, so
every return measures how much of a domain survived the domains learned after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sona.lora_config import TargetModule
from sona.simulator import DomainWorld

MODULE = TargetModule.Q_PROJ
"""The one projection the demo's adapter targets (one module keeps the arithmetic readable)."""

SUBSPACE = 8
"""Input directions per domain."""

SHARED = 2
"""Input directions common to every domain: where the domains' corrections conflict."""

BASE_QUALITY = 0.8
"""Held-out quality of the frozen base on every domain (cosine to the ideal output, in [0, 1])."""

HELD_OUT = 256
"""Held-out inputs per domain, never trained on."""


@dataclass(frozen=True, slots=True)
class Phase:
    """Requests ``start`` to ``stop - 1`` come from ``domain``; ``returning``: seen before."""

    index: int
    domain: int
    start: int
    stop: int
    returning: bool

    @property
    def length(self) -> int:
        return self.stop - self.start


def schedule(domains: int, steps: int) -> list[Phase]:
    """Every domain once in order, then back to each earlier one but the last.

    Three domains give 0, 1, 2, 0, 1: the return to 0 shows what survived two later domains,
    the return to 1 what survived the next one and the relearning of 0. Phases are equally long
    (the last takes the remainder).
    """
    if domains < 1:
        raise ValueError(f"domains must be >= 1, got {domains}")
    order = list(range(domains)) + list(range(domains - 1))
    if steps < len(order):
        raise ValueError(f"steps must be >= {len(order)} for {domains} domains, got {steps}")
    length = steps // len(order)
    phases: list[Phase] = []
    seen: set[int] = set()
    for i, domain in enumerate(order):
        start = i * length
        stop = steps if i == len(order) - 1 else start + length
        phases.append(Phase(i, domain, start, stop, domain in seen))
        seen.add(domain)
    return phases


@dataclass(frozen=True, slots=True)
class Traffic:
    """Every request of a run, drawn up front: both runs answer exactly the same requests.

    The base and ideal outputs are computed here in a few large matrix products, so serving a
    request costs the simulation no more than the runtime's own work.
    """

    x: np.ndarray  # (steps, dim) request inputs
    base_out: np.ndarray  # (steps, dim) the frozen base's outputs
    ideal_out: np.ndarray  # (steps, dim) the outputs users want

    def correction(self, rows: slice | np.ndarray) -> np.ndarray:
        """What the adapter should add to the base output for these requests."""
        return np.asarray(self.ideal_out[rows] - self.base_out[rows])


class DemoWorld:
    """The simulated model and domains, with the vectorised ratings the simulated users need."""

    def __init__(
        self,
        dim: int,
        domains: int,
        *,
        seed: int = 0,
        subspace: int = SUBSPACE,
        shared: int = SHARED,
        base_quality: float = BASE_QUALITY,
        held_out: int = HELD_OUT,
    ) -> None:
        if dim < subspace:
            raise ValueError(f"dim must be >= {subspace}, got {dim}")
        self.dim = dim
        self.sim = DomainWorld(
            dim,
            domains,
            subspace=subspace,
            shared=shared,
            correction_rank=1,
            base_quality=base_quality,
            held_out=held_out,
            seed=seed,
        )
        self.subspace = subspace
        self.shared = shared
        self._ideal = [(self.sim.base + d.correction).astype(np.float32) for d in self.sim.domains]
        # held-out outputs never change: measure only the adapter's delta on each evaluation
        self._held = [
            (d.held_out, d.held_out @ self.sim.base.T, d.held_out @ ideal.T)
            for d, ideal in zip(self.sim.domains, self._ideal, strict=True)
        ]
        self.base_quality = [self.sim.base_quality(d) for d in range(domains)]

    @property
    def domains(self) -> int:
        return len(self.sim.domains)

    def traffic(self, phases: list[Phase], seed: int) -> Traffic:
        """The requests of a whole schedule: phase ``p``'s from ``p.domain``'s distribution."""
        rng = np.random.default_rng(seed)
        xs, base, ideal = [], [], []
        for p in phases:
            x = self.sim.inputs(p.domain, p.length, rng)
            xs.append(x)
            base.append(x @ self.sim.base.T)
            ideal.append(x @ self._ideal[p.domain].T)
        return Traffic(
            np.concatenate(xs).astype(np.float32),
            np.concatenate(base).astype(np.float32),
            np.concatenate(ideal).astype(np.float32),
        )

    def correction(self, domain: int, x: np.ndarray) -> np.ndarray:
        """What the adapter should add to the base output for ``x`` in ``domain``."""
        return self.sim.target_delta(domain, x)

    @staticmethod
    def rate(base_out: np.ndarray, ideal_out: np.ndarray, deltas: np.ndarray) -> np.ndarray:
        """Quality in [0, 1] of every candidate: cosine of base + delta to the ideal output.

        ``base_out`` and ``ideal_out`` are (n, dim), ``deltas`` (n, k, dim): k candidate answers
        per request; returns (n, k).
        """
        produced = base_out[:, None, :] + deltas
        dot = np.einsum("nkd,nd->nk", produced, ideal_out)
        norms = np.linalg.norm(produced, axis=-1) * np.linalg.norm(ideal_out, axis=-1)[:, None]
        return np.asarray((1.0 + dot / (norms + 1e-12)) / 2.0)

    def held_out(self, domain: int) -> np.ndarray:
        return self.sim.held_out(domain)

    def held_out_quality(self, domain: int, predict: Callable[[np.ndarray], np.ndarray]) -> float:
        """Mean quality on the domain's held-out inputs of base + ``predict(inputs)``."""
        x, base_out, ideal_out = self._held[domain]
        return float(np.mean(self.rate(base_out, ideal_out, predict(x)[:, None, :])))

    def describe(self) -> dict[str, object]:
        """What the report says about the world."""
        return {
            "dim": self.dim,
            "domains": self.domains,
            "input_subspace_per_domain": self.subspace,
            "shared_input_directions": self.shared,
            "correction_rank": 1,
            "held_out_per_domain": int(self.held_out(0).shape[0]),
            "base_quality": [round(q, 4) for q in self.base_quality],
            "module": MODULE.value,
        }
