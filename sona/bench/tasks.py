"""Simulated tasks for the learning and forgetting benchmarks.

Every task is a frozen random linear base plus a hidden low-rank correction the adapter should
learn; quality is the cosine between base + adapter output and the ideal output, mapped to
[0, 1], as a host rating answers might see it. The forgetting sequence gives each task its own
input subspace (mutually orthogonal) and its own rank-1 correction, so a full-rank learner could
hold all of them at once and only a small adapter's shared hidden space makes them conflict:
that is the conflict EWC++ has to manage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sona.lora import MicroLoRA
from sona.lora_config import TargetModule

_F32 = np.float32


def rate(base: np.ndarray, correction: np.ndarray, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Per-row quality of base(x) + delta: cosine to the ideal output, mapped to [0, 1]."""
    out = x @ base.T + delta
    ideal = x @ (base + correction).T
    cos = np.sum(out * ideal, axis=-1) / (
        np.linalg.norm(out, axis=-1) * np.linalg.norm(ideal, axis=-1) + 1e-12
    )
    return np.asarray((1.0 + cos) / 2.0)


def _calibrate(shape: np.ndarray, quality_at: object, target: float) -> float:
    """The scale of ``shape`` at which the frozen base has quality ``target`` (bisection)."""
    lo, hi = 0.0, 1000.0
    assert callable(quality_at)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if quality_at(shape * mid) > target else (lo, mid)
    return (lo + hi) / 2


@dataclass
class LinearTask:
    """One task: isotropic unit inputs, a rank-``rank`` hidden correction (learning bench)."""

    base: np.ndarray
    correction: np.ndarray
    held_out: np.ndarray
    rng: np.random.Generator

    @classmethod
    def make(
        cls, d: int = 256, rank: int = 2, base_quality: float = 0.83, seed: int = 0
    ) -> LinearTask:
        rng = np.random.default_rng(seed)
        base = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(_F32)
        u, _ = np.linalg.qr(rng.standard_normal((d, rank)))
        v, _ = np.linalg.qr(rng.standard_normal((d, rank)))
        shape = u @ np.diag(np.linspace(1.0, 0.7, rank)) @ v.T
        held = rng.standard_normal((512, d))
        held = (held / np.linalg.norm(held, axis=1, keepdims=True)).astype(_F32)
        zero = np.zeros((held.shape[0], d), _F32)

        def q(corr: np.ndarray) -> float:
            return float(np.mean(rate(base, corr, held, zero)))

        scale = _calibrate(shape, q, base_quality)
        return cls(base, (shape * scale).astype(_F32), held, rng)

    @property
    def dim(self) -> int:
        return int(self.base.shape[0])

    def inputs(self, n: int) -> np.ndarray:
        x = self.rng.standard_normal((n, self.dim))
        return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=_F32)

    def target_delta(self, x: np.ndarray) -> np.ndarray:
        """What the adapter should output: the ideal output minus the base output."""
        return np.asarray(x @ self.correction.T, dtype=_F32)

    def rate(self, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return rate(self.base, self.correction, x, delta)

    def quality_of(self, delta: np.ndarray) -> float:
        return float(np.mean(self.rate(self.held_out, delta)))

    def adapter_quality(self, lora: MicroLoRA, module: TargetModule) -> float:
        return self.quality_of(lora.forward(self.held_out, module))


@dataclass
class SubspaceSequence:
    """Tasks whose inputs lie in their own orthogonal subspace, each with a rank-1 correction."""

    base: np.ndarray
    subspaces: list[np.ndarray]  # (d, subspace_dim) orthonormal, mutually orthogonal
    corrections: list[np.ndarray]  # (d, d), rank 1, acting only on the task's subspace
    held_out: list[np.ndarray]  # (n, d) unit inputs per task

    @classmethod
    def make(
        cls,
        *,
        d: int = 96,
        n_tasks: int = 4,
        subspace_dim: int = 6,
        base_quality: float = 0.56,
        held_out: int = 256,
        seed: int = 0,
    ) -> SubspaceSequence:
        rng = np.random.default_rng(seed)
        if n_tasks * subspace_dim > d:
            raise ValueError(f"n_tasks·subspace_dim must be <= d, got {n_tasks * subspace_dim}")
        base = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(_F32)
        q, _ = np.linalg.qr(rng.standard_normal((d, n_tasks * subspace_dim)))
        subspaces = [q[:, t * subspace_dim : (t + 1) * subspace_dim] for t in range(n_tasks)]
        seq = cls(base, subspaces, [], [])
        shapes = []
        for s in subspaces:
            v = s @ rng.standard_normal(subspace_dim)
            v /= np.linalg.norm(v)
            u = rng.standard_normal(d)
            u /= np.linalg.norm(u)
            shapes.append(np.outer(u, v))
            seq.held_out.append(seq._draw(s, held_out, rng))
        for t, shape in enumerate(shapes):
            held = seq.held_out[t]
            zero = np.zeros_like(held)

            def qual(corr: np.ndarray, held: np.ndarray = held, zero: np.ndarray = zero) -> float:
                return float(np.mean(rate(base, corr, held, zero)))

            seq.corrections.append((shape * _calibrate(shape, qual, base_quality)).astype(_F32))
        return seq

    @staticmethod
    def _draw(subspace: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        z = rng.standard_normal((n, subspace.shape[1]))
        x = z @ subspace.T
        return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=_F32)

    @property
    def dim(self) -> int:
        return int(self.base.shape[0])

    @property
    def n_tasks(self) -> int:
        return len(self.subspaces)

    def inputs(self, task: int, n: int, rng: np.random.Generator) -> np.ndarray:
        return self._draw(self.subspaces[task], n, rng)

    def target_delta(self, task: int, x: np.ndarray) -> np.ndarray:
        return np.asarray(x @ self.corrections[task].T, dtype=_F32)

    def quality_of(self, task: int, delta: np.ndarray) -> float:
        held = self.held_out[task]
        return float(np.mean(rate(self.base, self.corrections[task], held, delta)))

    def adapter_quality(self, lora: MicroLoRA, task: int, module: TargetModule) -> float:
        return self.quality_of(task, lora.forward(self.held_out[task], module))
