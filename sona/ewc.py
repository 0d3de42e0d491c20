"""EWC++ with the importance in ΔW space: which input directions earlier tasks relied on.

A per-parameter (diagonal) Fisher over A and B protects every column of B after the first task,
because h = A·x touches all of them, so nothing new can be learned (measured, DESIGN.md). What an
old task needs is that ΔW keeps acting the same on *its* inputs. So the importance is the input
covariance of earlier tasks, C, and the penalty is λ·‖(ΔW − ΔW*)·C^½‖²: directions old inputs
never used stay free.

C is kept as a sketch of ``ewc_rank`` orthonormal directions with weights (never in × in), and
the anchor only as ΔW*·u_j per direction (out × k per module). At a boundary the current task's
recent inputs give C_new (normalised to max eigenvalue 1, so every task counts alike whatever
its input scale), C ← γ·C + C_new is re-sketched to its top directions and normalised again, and
the anchor is re-taken from the current ΔW on the new directions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sona.errors import FormatError
from sona.kernels import ewc as k_ewc
from sona.kernels import linalg as k_linalg
from sona.kernels.replay import EwcArrays
from sona.kernels.warmup import fast, warm_up
from sona.linalg import principal_directions
from sona.lora import MicroLoRA
from sona.lora_config import TargetModule
from sona.validation import MAX_COUNT

_F32 = np.float32
# Eigenvalues below this fraction of the largest carry no information worth protecting.
_RELATIVE_FLOOR = 1e-4


class InputWindow:
    """The last ``capacity`` input vectors, oldest first on request; fixed memory."""

    def __init__(self, capacity: int, dim: int) -> None:
        self.capacity = capacity
        self.dim = dim
        self._rows = np.zeros((capacity, dim), _F32)
        self._next = 0
        self.count = 0

    def push(self, x: np.ndarray) -> None:
        self._rows[self._next] = x
        self._next = (self._next + 1) % self.capacity
        self.count = min(self.count + 1, self.capacity)

    def push_many(self, rows: np.ndarray) -> None:
        """Push each row in order (the same result as pushing them one by one)."""
        rows = rows[-self.capacity :]
        n = rows.shape[0]
        first = min(n, self.capacity - self._next)
        self._rows[self._next : self._next + first] = rows[:first]
        self._rows[: n - first] = rows[first:]
        self._next = (self._next + n) % self.capacity
        self.count = min(self.count + n, self.capacity)

    def ordered(self) -> np.ndarray:
        """The kept inputs, oldest first (a copy)."""
        if self.count < self.capacity:
            return self._rows[: self.count].copy()
        return np.concatenate([self._rows[self._next :], self._rows[: self._next]])

    def clear(self) -> None:
        self._next = 0
        self.count = 0

    def refill(self, rows: np.ndarray) -> None:
        self.clear()
        for row in rows[-self.capacity :]:
            self.push(row)

    def state(self) -> tuple[dict[str, int], np.ndarray]:
        return {"count": self.count}, self.ordered()

    def load(self, meta: dict[str, Any], rows: np.ndarray) -> None:
        count = int(meta["count"])
        if rows.shape != (count, self.dim) or count > self.capacity:
            raise FormatError(
                f"input window holds shape {rows.shape}, expected ({count}, {self.dim})"
            )
        self.refill(rows)


def covariance_sketch(
    rows: np.ndarray, rank: int, *, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``rank`` eigen-directions (k, dim) and eigenvalues of Σ wᵢ·rowᵢ·rowᵢᵀ, max 1.

    Computed from the weighted rows (n × dim), never a dim × dim matrix. Fewer than
    ``rank`` directions are returned padded with zero rows and zero weights.
    """
    dim = rows.shape[1]
    ut = np.zeros((rank, dim), _F32)
    c = np.zeros(rank, _F32)
    if rows.shape[0] == 0:
        return ut, c
    ev, vt = principal_directions(rows, top=rank, weights=weights)
    if ev.size == 0 or not np.isfinite(ev).all() or ev[0] <= 0.0:
        return ut, c
    keep = int(min(rank, int(np.sum(ev > ev[0] * _RELATIVE_FLOOR))))
    ut[:keep] = vt[:keep]
    c[:keep] = ev[:keep] / ev[0]
    return ut, c


class _ModuleAnchor:
    """ΔW*·u_j per protected direction for one module, plus the kernels' scratch."""

    __slots__ = ("bt_new", "dq", "gram", "kmat", "lower", "mt", "q", "vec", "w")

    def __init__(self, rank: int, k: int, n_out: int) -> None:
        self.mt = np.zeros((k, n_out), _F32)
        self.q = np.zeros((rank, k), _F32)
        self.dq = np.zeros((rank, k), _F32)
        # The r×r systems are solved in float64 (see kernels.ewc.prox_step).
        self.w = np.zeros((rank, k), np.float64)
        self.gram = np.zeros((rank, rank), np.float64)
        self.kmat = np.zeros((rank, rank), np.float64)
        self.lower = np.zeros((rank, rank), np.float64)
        self.vec = np.zeros(rank, np.float64)
        self.bt_new = np.zeros((rank, n_out), _F32)


class EwcImportance:
    """Accumulated input importance of finished tasks and the anchor ΔW* of each module."""

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        lora_rank: int,
        modules: tuple[TargetModule, ...],
        rank: int,
        gamma: float,
    ) -> None:
        warm_up()
        k_linalg.warm_up()
        self.in_features = in_features
        self.out_features = out_features
        self.lora_rank = lora_rank
        self.modules = modules
        self.rank = min(rank, in_features)
        self.gamma = gamma
        self.ut = np.zeros((self.rank, in_features), _F32)
        self.c = np.zeros(self.rank, _F32)
        self.anchors = {m: _ModuleAnchor(lora_rank, self.rank, out_features) for m in modules}
        self.folded = 0

    @classmethod
    def for_lora(cls, lora: MicroLoRA, *, rank: int, gamma: float) -> EwcImportance:
        cfg = lora.config
        return cls(
            in_features=cfg.in_features,
            out_features=cfg.out_features,
            lora_rank=cfg.rank,
            modules=cfg.target_modules,
            rank=rank,
            gamma=gamma,
        )

    def shape_meta(self) -> dict[str, Any]:
        """The adapter shape this state belongs to, JSON-able."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "lora_rank": self.lora_rank,
            "modules": [m.value for m in self.modules],
        }

    @property
    def active(self) -> bool:
        """True once some task's importance has been folded in (the penalty can be non-zero)."""
        return bool(self.c.any())

    def matches(self, lora: MicroLoRA) -> bool:
        cfg = lora.config
        return (
            cfg.in_features == self.in_features
            and cfg.out_features == self.out_features
            and cfg.rank == self.lora_rank
            and cfg.target_modules == self.modules
        )

    def fold(self, lora: MicroLoRA, inputs: np.ndarray) -> None:
        """C ← γ·C + C_new(inputs), re-sketched and normalised; anchor ← current ΔW."""
        new_ut, new_c = covariance_sketch(inputs, self.rank)
        rows = np.concatenate([self.ut, new_ut])
        weights = np.concatenate([self.gamma * self.c, new_c]).astype(np.float64)
        self.ut, self.c = covariance_sketch(rows, self.rank, weights=weights)
        self.folded += 1
        self.reanchor(lora)

    def reanchor(self, lora: MicroLoRA) -> None:
        for m, a, bt in lora.iter_factors():
            st = self.anchors[m]
            k_ewc.anchor(a, bt, lora.scaling, self.ut, st.q, st.mt)

    def shift_anchor(self, before: MicroLoRA, after: MicroLoRA) -> None:
        """anchor ← anchor + (ΔW_after − ΔW_before) on every protected direction: a change
        that belongs to the task the anchor closed, made on a copy while it ended (a Deep run
        over its samples), joins what that task is protected at. Exact: the anchor is linear
        in ΔW, and ΔW·uⱼ = s·Bᵀ(A·uⱼ) costs O(r·d·k)."""
        for m in self.modules:
            st = self.anchors[m]
            shift = _on_directions(after, m, self.ut) - _on_directions(before, m, self.ut)
            # added in float64: the shift alone can exceed float32's range (2·3e38 for deltas
            # near it) while the shifted anchor, ΔW·uⱼ of a valid adapter when the anchor was
            # taken from ``before``, does not
            st.mt[...] = st.mt + shift

    def penalty(self, lora: MicroLoRA) -> float:
        """‖(ΔW − ΔW*)·C^½‖² summed over modules (without λ)."""
        if not self.active:
            return 0.0
        total = 0.0
        for m, a, bt in lora.iter_factors():
            st = self.anchors[m]
            total += float(fast.ewc_penalty(a, bt, lora.scaling, self.ut, self.c, st.mt, st.q))
        return total

    def step(self, lora: MicroLoRA, tau: float, modules: tuple[TargetModule, ...]) -> float:
        """One proximal step of strength τ = 2·η·λ on ``modules``; the penalty after it.

        Returns −1.0 when some module's step would not have been finite (that module keeps
        its weights).
        """
        total = 0.0
        s = lora.scaling
        for m in modules:
            a, bt = lora.factors(m)
            st = self.anchors[m]
            p = float(
                fast.ewc_prox_step(
                    a,
                    bt,
                    s,
                    self.ut,
                    self.c,
                    st.mt,
                    tau,
                    st.q,
                    st.dq,
                    st.w,
                    st.gram,
                    st.kmat,
                    st.lower,
                    st.vec,
                    st.bt_new,
                )
            )
            if p < 0.0:
                return -1.0
            total += p
        return total

    def replay_arrays(self, modules: tuple[TargetModule, ...]) -> EwcArrays:
        """What ``kernels.replay.replay_epoch`` takes for :meth:`step` on ``modules``: the
        importance, every module's anchor stacked in that order, and one module's scratch
        (the kernel steps the modules one after another)."""
        first = self.anchors[modules[0]]
        mt = np.stack([self.anchors[m].mt for m in modules])
        return (
            self.ut, self.c, mt, first.q, first.dq, first.w, first.gram, first.kmat, first.lower,
            first.vec, first.bt_new,
        )  # fmt: skip

    # ------------------------------------------------------------------ state
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {"rank": self.rank, "gamma": self.gamma, "folded": self.folded}
        arrays = {"ewc.ut": self.ut.copy(), "ewc.c": self.c.copy()}
        for m, st in self.anchors.items():
            arrays[f"ewc.anchor.{m.value}"] = st.mt.copy()
        return meta, arrays

    def load(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Install a state from :meth:`state`; validates everything before changing anything."""
        try:
            rank = int(meta["rank"])
            folded = int(meta["folded"])
            ut = np.asarray(arrays["ewc.ut"])
            c = np.asarray(arrays["ewc.c"])
            mts = {m: np.asarray(arrays[f"ewc.anchor.{m.value}"]) for m in self.anchors}
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"EWC state is incomplete or malformed: {exc}") from None
        if rank != self.rank:
            raise FormatError(f"EWC state has rank {rank}, this pipeline keeps {self.rank}")
        if not 0 <= folded <= MAX_COUNT:
            raise FormatError(f"EWC state has folded {folded}, outside [0, 2**53]")
        expect = {"ewc.ut": (ut, (self.rank, self.in_features)), "ewc.c": (c, (self.rank,))}
        for m, mt in mts.items():
            expect[f"ewc.anchor.{m.value}"] = (mt, (self.rank, self.out_features))
        for name, (arr, shape) in expect.items():
            if arr.shape != shape:
                raise FormatError(f"EWC state array {name} has shape {arr.shape}, expected {shape}")
            if arr.dtype.kind != "f" or not np.isfinite(arr).all():
                raise FormatError(f"EWC state array {name} must hold finite floats")
        if (c < 0).any():
            raise FormatError("EWC state array ewc.c must be >= 0")
        self.ut = np.ascontiguousarray(ut, dtype=_F32)
        self.c = np.ascontiguousarray(c, dtype=_F32)
        for m, mt in mts.items():
            np.copyto(self.anchors[m].mt, mt.astype(_F32))
        self.folded = folded


def _on_directions(lora: MicroLoRA, module: TargetModule, ut: np.ndarray) -> np.ndarray:
    """(k, out) float64: ΔW·uⱼ for each protected direction uⱼ (a row of ``ut``)."""
    a, bt = lora.factors(module)
    q = ut.astype(np.float64) @ a.T.astype(np.float64)  # (k, rank): A·uⱼ
    return float(lora.scaling) * (q @ bt.astype(np.float64))
