"""Float64 reference math for MicroLoRA tests, plus helpers to build adapters and snapshot them.

The references are written straight from the formulas in DESIGN.md (ΔW = s·Bᵀ·A with Bt the
stored transpose, h = s·A·x, dBt = h·gᵀ, dA = s·(Bt·g)·xᵀ) and sona/lora.py's docstring (each
sample's gradient divided by max(‖x‖², 1)), independently of the kernels, so a test comparing
the two can fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from sona.lora import MicroLoRA, MicroLoraConfig, TargetModule

Q = TargetModule.Q_PROJ
V = TargetModule.V_PROJ
K = TargetModule.K_PROJ


def f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def ref_forward(a: np.ndarray, bt: np.ndarray, scale: float, x: np.ndarray) -> np.ndarray:
    """μ(x) = s·Bᵀ·A·x for one vector (in,) or a batch (n, in)."""
    return f64(scale * (f64(x) @ f64(a).T) @ f64(bt))


def ref_magnitude(a: np.ndarray, bt: np.ndarray, scale: float, x: np.ndarray) -> np.ndarray:
    """The same sum over absolute values: the scale a float32 rounding error is relative to."""
    return f64(abs(scale) * (np.abs(f64(x)) @ np.abs(f64(a)).T) @ np.abs(f64(bt)))


def ref_grads(
    a: np.ndarray, bt: np.ndarray, scale: float, x: np.ndarray, g: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(dA, dBt) of ⟨g, μ(x)⟩ for an output-space gradient g."""
    h = scale * f64(a) @ f64(x)
    u = scale * f64(bt) @ f64(g)
    return np.outer(u, f64(x)), np.outer(h, f64(g))


def step_weight(x: np.ndarray) -> float:
    """The per-sample factor adapt applies to every gradient: 1 / max(‖x‖², 1) (normalised LMS)."""
    return 1.0 / max(float(f64(x) @ f64(x)), 1.0)


def assert_f32_close(
    actual: np.ndarray, expected: np.ndarray, magnitude: np.ndarray | float, terms: int
) -> None:
    """``actual`` (float32) equals ``expected`` up to rounding of a ``terms``-long float32 sum."""
    tol = 4.0 * terms * float(np.finfo(np.float32).eps) * np.asarray(magnitude) + 1e-30
    err = np.abs(f64(actual) - f64(expected))
    bad = err > tol
    assert not np.any(bad), f"max excess error {float(np.max(err - tol))}; err={err[bad][:5]}"


def config(
    n_in: int = 12,
    n_out: int = 10,
    rank: int = 2,
    modules: tuple[TargetModule, ...] = (Q, V),
    **kw: Any,
) -> MicroLoraConfig:
    return MicroLoraConfig(
        in_features=n_in, out_features=n_out, rank=rank, target_modules=modules, **kw
    )


def trained(cfg: MicroLoraConfig, seed: int = 0, b_scale: float = 1.0) -> MicroLoRA:
    """An adapter whose B is random (not the zero start), so every path through B is exercised."""
    lora = MicroLoRA(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    for m, a, bt in list(lora.iter_factors()):
        lora.set_factors(m, a, b_scale * rng.standard_normal(bt.shape) / np.sqrt(cfg.rank))
    return lora


def vec(rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(n)).astype(np.float32)


@dataclass
class Snapshot:
    """Everything observable about an adapter's state, compared bit for bit."""

    exported: bytes
    grads: list[tuple[bytes, bytes]]
    pending: int
    version: int
    note: str | None
    update_norm: float | None

    @classmethod
    def of(cls, lora: MicroLoRA) -> Snapshot:
        grads = []
        for m in lora.modules:
            ga, gb = lora.gradients(m)
            grads.append((ga.tobytes(), gb.tobytes()))
        return cls(
            exported=lora.export_weights(),
            grads=grads,
            pending=lora.pending_updates,
            version=lora.version,
            note=lora.last_note,
            update_norm=lora.last_update_norm,
        )


def weights_bytes(lora: MicroLoRA) -> list[bytes]:
    return [a.tobytes() + bt.tobytes() for _, a, bt in lora.iter_factors()]


def near_float32_max(adapter: MicroLoRA, module: TargetModule, fraction: float) -> None:
    """Give ``module`` the rank-1 delta ``fraction``·max·u·vᵀ (u, v fixed unit vectors): a
    valid adapter (s·‖A‖·‖B‖ = fraction of float32's max) that learning toward targets near
    float32's max can reach."""
    a, bt = np.zeros_like(adapter.factors(module)[0]), np.zeros_like(adapter.factors(module)[1])
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal(a.shape[1]), rng.standard_normal(bt.shape[1])
    c = math.sqrt(fraction * float(np.finfo(np.float32).max) / adapter.scaling)
    a[0], bt[0] = c * u / np.linalg.norm(u), c * v / np.linalg.norm(v)
    adapter.set_factors(module, a, bt)
