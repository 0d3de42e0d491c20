"""Exact merging of adapters in weight space.

The merged delta must equal Σ wᵢ·ΔWᵢ with ΔWᵢ = sᵢ·Bᵢ·Aᵢ. Averaging A and B separately is
wrong: (ΣBᵢ)(ΣAᵢ) adds cross terms Bᵢ·Aⱼ. Concatenating ranks is exact; when a smaller rank is
wanted, the truncated SVD of the exact sum is the best approximation (Eckart–Young).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from sona.errors import InvalidInputError
from sona.kernels import linalg as k_linalg
from sona.validation import real_number

if TYPE_CHECKING:
    from sona.lora import MicroLoRA


def merge_adapters(
    adapters: Sequence[tuple[MicroLoRA, float]], *, rank: int | None = None
) -> MicroLoRA:
    from sona.lora import MicroLoRA

    items = list(adapters)
    if not items:
        raise InvalidInputError("adapters must not be empty")
    for i, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], MicroLoRA)):
            raise TypeError(f"adapters[{i}] must be a (MicroLoRA, weight) pair")
        w = real_number(item[1], f"adapters[{i}] weight", "a finite number")
        if not math.isfinite(w):
            raise InvalidInputError(f"adapters[{i}] weight must be a finite number, got {w!r}")
        items[i] = (item[0], w)
    first = items[0][0].config
    shape = (first.in_features, first.out_features)
    modules = first.target_modules
    for i, (a, _) in enumerate(items):
        if (a.config.in_features, a.config.out_features) != shape:
            raise InvalidInputError(f"adapters[{i}] has a different shape than adapters[0]")
        if set(a.config.target_modules) != set(modules):
            raise InvalidInputError(f"adapters[{i}] targets different modules than adapters[0]")
    max_rank = min(shape)
    if rank is not None and (
        isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank
    ):
        raise InvalidInputError(f"rank must be an int in [1, {max_rank}], got {rank!r}")
    total = sum(a.config.rank for a, _ in items)
    exact_concat = rank is None and total <= max_rank
    new_rank = total if exact_concat else (rank if rank is not None else max_rank)
    # alpha = rank gives scaling 1, so every source's weight·scale is folded into B.
    config = first.replace(rank=new_rank, alpha=float(new_rank))
    merged = MicroLoRA._blank(config, items[0][0].seed)
    for m in modules:
        a_cat = np.concatenate([a.factors(m)[0] for a, _ in items], axis=0)
        bt_cat = np.concatenate([w * a.scaling * a.factors(m)[1] for a, w in items], axis=0)
        if exact_concat:
            a_new, bt_new = a_cat, bt_cat
        else:
            a_new, bt_new = _low_rank(a_cat, bt_cat, new_rank)
        merged.set_factors(m, a_new.astype(np.float32), bt_new.astype(np.float32))
    return merged


def _low_rank(a: np.ndarray, bt: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, Bᵀ) of the best rank-``rank`` approximation of Btᵀ·A, balanced between the factors.

    Works on the factors (QR of each side, SVD of the small core), so it costs O(d·R²) for a
    total rank R instead of an SVD of the full d × d matrix. The QRs and the core's SVD are
    single-threaded GIL-free kernels (Householder, one-sided Jacobi): numpy's LAPACK would run
    them on a multi-threaded BLAS whose helper threads wait for a busy core (see
    :mod:`sona.kernels.linalg`). Tiny shapes where R exceeds a side keep numpy's reduced QR.
    """
    total = a.shape[0]
    if total > min(a.shape[1], bt.shape[1]):
        return _low_rank_numpy(a, bt, rank)
    qa = np.empty((total, a.shape[1]))
    ra = np.empty((total, total))
    k_linalg.householder_rows(np.array(a, np.float64), qa, ra)  # aᵀ = qaᵀ·ra
    qb = np.empty((total, bt.shape[1]))
    rb = np.empty((total, total))
    k_linalg.householder_rows(np.array(bt, np.float64), qb, rb)
    core = rb @ ra.T  # btᵀ·a = qbᵀ·core·qa
    u = np.empty((total, total))
    s = np.empty(total)
    v = np.empty((total, total))
    if not k_linalg.jacobi_svd(core, u, s, v):
        return _low_rank_numpy(a, bt, rank)
    k = min(rank, total)
    root = np.sqrt(s[:k])
    a_new = np.zeros((rank, a.shape[1]))
    bt_new = np.zeros((rank, bt.shape[1]))
    k_linalg.combine_rows(np.ascontiguousarray(root[:, None] * v[:, :k].T), qa, a_new[:k])
    k_linalg.combine_rows(np.ascontiguousarray(root[:, None] * u[:, :k].T), qb, bt_new[:k])
    return a_new, bt_new


def _low_rank_numpy(a: np.ndarray, bt: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_low_rank` with numpy's QR and SVD (any shape)."""
    a = np.asarray(a, np.float64)
    bt = np.asarray(bt, np.float64)
    qb, rb = np.linalg.qr(bt.T)  # (out, R), (R, R)
    qa, ra = np.linalg.qr(a.T)  # (in, R), (R, R)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    k = min(rank, s.shape[0])
    root = np.sqrt(s[:k])
    a_new = np.zeros((rank, a.shape[1]))
    bt_new = np.zeros((rank, bt.shape[1]))
    a_new[:k] = root[:, None] * (vt[:k] @ qa.T)
    bt_new[:k] = root[:, None] * (qb @ u[:, :k]).T
    return a_new, bt_new
