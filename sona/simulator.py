"""A simulated model and users: the world the demo, the benchmarks and the tests learn in.

A frozen base model is a fixed random linear map. Each domain has its own input distribution
(a random low-dimensional subspace plus a little isotropic noise) and its own hidden low-rank
correction; what the adapter should output for x is that correction applied to x (the ideal
output minus the base output). Quality is the cosine between the produced and the ideal output,
mapped to [0, 1]. Corrections of different domains conflict: they are independent random maps,
so what one domain teaches is wrong for the others wherever their inputs overlap (``shared``
input directions common to all domains), and with a small adapter rank they compete for the
same factors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sona.validation import check_seed, config_int, config_number

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass
class Domain:
    basis: np.ndarray  # (k, d) orthonormal rows: where this domain's inputs lie
    correction: np.ndarray  # (d, d), low rank
    held_out: np.ndarray  # (n, d)


class DomainWorld:
    """``domains`` domains over a frozen random linear base of width ``dim``."""

    def __init__(
        self,
        dim: int = 64,
        domains: int = 2,
        *,
        subspace: int = 6,
        shared: int = 0,
        correction_rank: int = 1,
        base_quality: float = 0.8,
        noise: float = 0.05,
        held_out: int = 256,
        seed: int = 0,
    ) -> None:
        _check_arguments(
            dim=dim,
            domains=domains,
            subspace=subspace,
            shared=shared,
            correction_rank=correction_rank,
            base_quality=base_quality,
            noise=noise,
            held_out=held_out,
            seed=seed,
        )
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.noise = noise
        self.rng = np.random.default_rng(seed + 1)
        self.base = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
        self.domains: list[Domain] = []
        common = np.linalg.qr(rng.standard_normal((dim, max(shared, 1))))[0][:, :shared]
        for _ in range(domains):
            own = rng.standard_normal((dim, subspace - shared))
            basis, _ = np.linalg.qr(np.concatenate([common, own], axis=1))
            u, _ = np.linalg.qr(rng.standard_normal((dim, correction_rank)))
            # the correction reads this domain's input directions, writes anywhere
            v = basis.T.T @ np.linalg.qr(rng.standard_normal((subspace, correction_rank)))[0]
            shape = (u @ v.T).astype(np.float32)
            dom = Domain(basis.T.astype(np.float32), shape, np.zeros((0, dim), np.float32))
            dom.held_out = self._draw(dom, held_out, rng)
            scale = self._scale_for(dom, shape, base_quality)
            dom.correction = (shape * scale).astype(np.float32)
            reached = self.quality(len(self.domains), dom.held_out * 0.0, dom)
            if abs(reached - base_quality) > BASE_QUALITY_TOLERANCE:
                # quality falls toward ~0.5 as the correction grows; below that, or at 1
                # (a zero correction), no scale gives the base asked for
                raise ValueError(
                    f"base_quality {base_quality:g} cannot be reached in this world (domain "
                    f"{len(self.domains)}: {reached:.3f} at the nearest correction scale)"
                )
            self.domains.append(dom)

    def _draw(self, dom: Domain, n: int, rng: np.random.Generator) -> np.ndarray:
        k = dom.basis.shape[0]
        x = rng.standard_normal((n, k)) @ dom.basis + self.noise * rng.standard_normal(
            (n, self.dim)
        ) * np.sqrt(k / self.dim)
        return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)

    def _scale_for(self, dom: Domain, shape: np.ndarray, target: float) -> float:
        lo, hi = 0.0, 1000.0
        zeros = np.zeros((dom.held_out.shape[0], self.dim), np.float32)
        for _ in range(50):
            mid = (lo + hi) / 2
            dom.correction = (shape * mid).astype(np.float32)
            q = self.quality(len(self.domains), zeros, dom)
            lo, hi = (mid, hi) if q > target else (lo, mid)
        return (lo + hi) / 2

    # ---------------------------------------------------------------- sampling and rating
    def inputs(self, domain: int, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """``n`` unit inputs from ``domain``; from ``rng`` when given (a reproducible stream
        that leaves the world's own generator untouched), else from the world's generator."""
        return self._draw(self.domains[domain], n, rng if rng is not None else self.rng)

    def target_delta(self, domain: int, x: np.ndarray) -> np.ndarray:
        """What the adapter should add to the base output for ``x`` in ``domain``."""
        return np.asarray(x @ self.domains[domain].correction.T, dtype=np.float32)

    def base_output(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x @ self.base.T, dtype=np.float32)

    def rate(self, domain: int, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Per-row quality of base(x) + delta in ``domain``: cosine to ideal, mapped to [0, 1]."""
        return _rate(self.base, self.domains[domain].correction, x, delta)

    def quality(self, domain: int, delta: np.ndarray, dom: Domain | None = None) -> float:
        """Mean held-out quality of ``delta`` (the adapter's outputs on the held-out inputs)."""
        d = dom if dom is not None else self.domains[domain]
        return float(np.mean(_rate(self.base, d.correction, d.held_out, delta)))

    def held_out(self, domain: int) -> np.ndarray:
        return self.domains[domain].held_out

    def evaluate(self, domain: int, predict: Predict) -> float:
        x = self.held_out(domain)
        return self.quality(domain, predict(x))

    def base_quality(self, domain: int) -> float:
        x = self.held_out(domain)
        return self.quality(domain, np.zeros_like(x))


BASE_QUALITY_TOLERANCE = 1e-3
"""How far a domain's base quality may end from the one asked for (the scale search lands
within ~1e-6 wherever the target can be reached)."""


def _check_arguments(
    *,
    dim: int,
    domains: int,
    subspace: int,
    shared: int,
    correction_rank: int,
    base_quality: float,
    noise: float,
    held_out: int,
    seed: int,
) -> None:
    """``ValueError`` naming the first argument no world can be built from: these would
    otherwise build a meaningless world silently (no held-out inputs give a NaN quality, a
    rank-0 correction nothing to learn) or fail inside numpy with a message about shapes."""
    config_int(dim, "dim", lo=1)
    config_int(domains, "domains", lo=1)
    config_int(subspace, "subspace", lo=1, hi=dim)
    config_int(shared, "shared", lo=0, hi=subspace)
    config_int(correction_rank, "correction_rank", lo=1, hi=subspace)
    config_int(held_out, "held_out", lo=1)
    config_number(noise, "noise", lo=0.0)
    config_number(base_quality, "base_quality", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    check_seed(seed)


def _rate(base: np.ndarray, corr: np.ndarray, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
    out = x @ base.T + delta
    ideal = x @ (base + corr).T
    cos = np.sum(out * ideal, axis=-1) / (
        np.linalg.norm(out, axis=-1) * np.linalg.norm(ideal, axis=-1) + 1e-12
    )
    return np.asarray((1.0 + cos) / 2.0)
