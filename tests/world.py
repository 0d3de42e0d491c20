"""A small simulated world for learning tests: a frozen random linear base with a hidden
low-rank correction, unit-norm inputs, and quality = held-out cosine mapped to [0, 1]."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sona.lora import MicroLoRA, TargetModule


@dataclass
class LinearWorld:
    base: np.ndarray  # (d, d)
    correction: np.ndarray  # (d, d), rank `rank`
    held_out: np.ndarray  # (n, d) unit inputs
    rng: np.random.Generator

    @classmethod
    def make(
        cls, d: int = 256, rank: int = 2, base_quality: float = 0.83, seed: int = 0
    ) -> LinearWorld:
        rng = np.random.default_rng(seed)
        base = rng.standard_normal((d, d)) / np.sqrt(d)
        u, _ = np.linalg.qr(rng.standard_normal((d, rank)))
        v, _ = np.linalg.qr(rng.standard_normal((d, rank)))
        shape = u @ np.diag(np.linspace(1.0, 0.7, rank)) @ v.T
        held = rng.standard_normal((512, d))
        held /= np.linalg.norm(held, axis=1, keepdims=True)
        world = cls(base.astype(np.float32), shape.astype(np.float32), held.astype(np.float32), rng)
        lo, hi = 0.0, 1000.0  # scale the correction so the frozen base has the asked quality
        for _ in range(60):
            mid = (lo + hi) / 2
            world.correction = (shape * mid).astype(np.float32)
            q = world.quality_of(np.zeros_like(world.held_out @ world.base.T))
            lo, hi = (mid, hi) if q > base_quality else (lo, mid)
        return world

    @property
    def dim(self) -> int:
        return int(self.base.shape[0])

    def inputs(self, n: int, norm: float = 1.0) -> np.ndarray:
        x = self.rng.standard_normal((n, self.dim))
        return (norm * x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def target_delta(self, x: np.ndarray) -> np.ndarray:
        """What the adapter should output: ideal output minus base output."""
        return (x @ self.correction.T).astype(np.float32)

    def quality_of(self, delta: np.ndarray, x: np.ndarray | None = None) -> float:
        x = self.held_out if x is None else x
        return float(np.mean(self.rate(x, delta)))

    def rate(self, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Per-row quality of base(x) + delta: cosine to the ideal output, mapped to [0, 1]."""
        out = x @ self.base.T + delta
        ideal = x @ (self.base + self.correction).T
        cos = np.sum(out * ideal, axis=-1) / (
            np.linalg.norm(out, axis=-1) * np.linalg.norm(ideal, axis=-1) + 1e-12
        )
        return (1.0 + cos) / 2.0

    def base_rms(self, x: np.ndarray) -> float:
        return float(np.sqrt(np.mean((x @ self.base.T) ** 2)))

    def adapter_quality(self, lora: MicroLoRA, module: TargetModule = TargetModule.Q_PROJ) -> float:
        return self.quality_of(lora.forward(self.held_out, module))
