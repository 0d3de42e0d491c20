"""Exact merging of adapters in weight space.

The merged delta must equal Σ wᵢ·ΔWᵢ with ΔWᵢ = sᵢ·Bᵢ·Aᵢ. Averaging A and B separately is
wrong: (ΣBᵢ)(ΣAᵢ) adds cross terms Bᵢ·Aⱼ. Concatenating ranks is exact; when a smaller rank is
wanted, the truncated SVD of the exact sum is the best approximation (Eckart–Young).

The merged adapter keeps the bound every adapter keeps, s·‖A‖·‖B‖ below float32's max (see
:func:`sona.lora.delta_bound`): individually valid adapters can sum to a delta beyond it (ten
near the limit, or one with a weight of 10), and such a merge is refused with an
:class:`InvalidInputError` instead of returning factors whose forward gives inf.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from sona.errors import InvalidInputError
from sona.kernels import merge as k_merge
from sona.kernels.update import F32_MAX as _F32_MAX
from sona.lora import delta_bound
from sona.lora_config import TargetModule
from sona.validation import as_list, real_number

if TYPE_CHECKING:
    from sona.lora import MicroLoRA

_F32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32, 2**-126
# A source's nonzero B entries are at least 2**-149 (float32's smallest), so an entry of the
# scaled Bᵀ below this comes from a weight·scale more than 2**250 times smaller than the
# largest one's: flushing it changes nothing float32 can show next to that source.
_FLUSH = 2.0**-400


def merge_adapters(
    adapters: Sequence[tuple[MicroLoRA, float]], *, rank: int | None = None
) -> MicroLoRA:
    """Σ wᵢ·ΔWᵢ as one adapter (see the module docstring); ``rank`` truncates it by SVD.

    Refuses, with every source untouched, a sum whose smallest factors (√σ on each side) would
    not keep s·‖A‖·‖B‖ below float32's max. Any finite weight is accepted as input: the
    computation factors out a common power of two so no intermediate overflows first.
    """
    from sona.lora import MicroLoRA

    items = as_list(adapters, "adapters", "(MicroLoRA, weight) pairs")
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
    rng = _Draws(merged.seed)
    for m in modules:
        a_cat, bt_cat, e = _weighted_concat(items, m)
        factors = _concatenated(a_cat, bt_cat, e) if exact_concat else None
        if factors is None:
            factors = _low_rank(a_cat, bt_cat, new_rank, e)
        if factors is not None and _install(merged, m, factors, rng):
            continue
        at_rank = f" at rank {new_rank}" if rank is not None else ""
        raise InvalidInputError(
            f"the weighted sum of the adapters' deltas for {m.value}{at_rank} is too large "
            f"for float32: no factors of it keep s·‖A‖·‖B‖ below {_F32_MAX:.4g}, so "
            "delta_weight and forward would overflow; use smaller weights"
        )
    return merged


def _weighted_concat(
    items: Sequence[tuple[MicroLoRA, float]], module: TargetModule
) -> tuple[np.ndarray, np.ndarray, int]:
    """(A, Bᵀ, e), ranks concatenated in float64, with Σ wᵢ·sᵢ·Bᵢ·Aᵢ = 2**e · Bᵀᵀ·A.

    Each wᵢ·sᵢ is folded into its rows of Bᵀ with the largest power of two among them factored
    out into e, so every row of Bᵀ is scaled by at most 1: no finite weight, however large,
    overflows Bᵀ or the squares the low-rank path sums. Scaling by a power of two is exact, so
    the result is the same as folding wᵢ·sᵢ in directly. Entries that end up below
    :data:`_FLUSH` are set to zero: the QR's reflections divide by squared norms, which for
    them (and for the rounding residue they leave) would fall out of float64's normal range
    and turn into inf and NaN.
    """
    parts = []
    for adapter, w in items:
        mw, ew = math.frexp(w)
        ms, es = math.frexp(adapter.scaling)
        parts.append((mw * ms, ew + es))
    e = max(x for _, x in parts)
    first = items[0][0]
    total = sum(a.config.rank for a, _ in items)
    a_cat = np.empty((total, first.config.in_features))
    bt_cat = np.empty((total, first.config.out_features))
    row = 0
    for (adapter, _), (mant, x) in zip(items, parts, strict=True):
        a, bt = adapter.factors(module)
        k_merge.weighted_rows(a, bt, math.ldexp(mant, x - e), _FLUSH, a_cat, bt_cat, row)
        row += adapter.config.rank
    return a_cat, bt_cat, e


def _concatenated(a: np.ndarray, bt: np.ndarray, e: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The concatenated factors of 2**e · Bᵀᵀ·A as float32, the sources' rows of A unchanged
    (a row whose B is zero still steers what the merged adapter learns next); None when the
    scaled Bᵀ or s·‖A‖·‖B‖ would not fit float32, or when a non-zero entry of the scaled Bᵀ
    would fall below float32's normal range: there it loses bits or becomes zero, and a
    source with a tiny scaling (1e-49, A near 1e30) lost its whole delta, which float32
    shows.

    The caller then takes the sum's SVD at the same rank instead: the same sum, exactly, with
    √σ on each side, which is the factorization with the smallest ‖A‖·‖B‖ (the nuclear norm).
    Cancelling sources (X and -X) or lopsided factors (A tiny, B huge) can exceed the bound
    when concatenated and fit that way.
    """
    magnitudes = np.abs(bt)
    largest = float(magnitudes.max()) if bt.size else 0.0
    if not (k_merge.fits(delta_bound(1.0, a, bt), e) and k_merge.fits(largest, e)):
        return None
    nonzero = magnitudes[magnitudes != 0.0]
    # below `largest`, so this ldexp stays below float32's max
    if nonzero.size and math.ldexp(float(nonzero.min()), e) < _F32_TINY:
        return None
    return a.astype(np.float32), np.ldexp(bt, e).astype(np.float32)


def _with_exponent(a: np.ndarray, bt: np.ndarray, e: int) -> tuple[np.ndarray, np.ndarray] | None:
    """float32 factors of 2**e · Bᵀᵀ·A for :func:`_low_rank_numpy`'s balanced (A, Bᵀ) (√σ on each
    side), the power of two split between the sides; None when 2**e·‖A‖·‖Bᵀ‖ reaches float32's
    max. Below it, each side's norm is under √2 times the bound's square root, so the scaling
    cannot overflow either."""
    if not k_merge.fits(delta_bound(1.0, a, bt), e):
        return None
    half = e // 2
    return np.ldexp(a, half).astype(np.float32), np.ldexp(bt, e - half).astype(np.float32)


class _Draws:
    """The merged adapter's random stream, created at its first draw: most merges revive no
    rank, and creating the generator was ~20 µs of a ~185 µs merge (rank 2 + 2 → 2, width
    4096), which the Background loop runs at every consolidation."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._rng: np.random.Generator | None = None

    def standard_normal(self, shape: tuple[int, int]) -> np.ndarray:
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return self._rng.standard_normal(shape)


def _install(
    merged: MicroLoRA,
    module: TargetModule,
    factors: tuple[np.ndarray, np.ndarray],
    rng: _Draws,
) -> bool:
    """Set the factors, with their dead ranks revived (:func:`_revived`) unless the fresh rows
    of A would take s·‖A‖·‖B‖ to float32's max; False when even the factors as they are do."""
    for candidate in (_revived(*factors, rng), factors):
        with contextlib.suppress(InvalidInputError):  # beyond delta_bound's limit
            merged.set_factors(module, *candidate)
            return True
    return False


def _revived(a: np.ndarray, bt: np.ndarray, rng: _Draws) -> tuple[np.ndarray, np.ndarray]:
    """The factors with every rank whose rows of A and Bᵀ are both zero given a fresh random
    row of A, drawn as a new adapter's is; Bᵀ stays zero there, so the delta is the same.

    A truncated SVD leaves such ranks wherever the sum has fewer directions than ``rank`` (a
    sum of untrained adapters, cancelling ones, a rank above the sum's): there A·x and Bᵀ's
    row are both zero, so their gradients are zero too and no update could ever move them,
    while ``apply_updates`` reports success. A random A row learns like a fresh adapter's.
    """
    dead = np.empty(a.shape[0], np.bool_)
    count = k_merge.dead_rows(a, bt, dead)
    if not count:
        return a, bt
    a = a.copy()
    fresh = rng.standard_normal((count, a.shape[1])) / math.sqrt(a.shape[1])
    a[dead] = fresh.astype(np.float32)
    return a, bt


def _low_rank(
    a: np.ndarray, bt: np.ndarray, rank: int, e: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """float32 (A, Bᵀ) of the best rank-``rank`` approximation of 2**e · Btᵀ·A, balanced
    between the factors (√σ on each side); None when they would not keep the bound.

    Works on the factors (QR of each side, SVD of the small core), so it costs O(d·R²) for a
    total rank R instead of an SVD of the full d × d matrix, in one single-threaded GIL-free
    kernel (:func:`sona.kernels.merge.low_rank_into`): numpy's LAPACK would run on a
    multi-threaded BLAS whose helper threads wait for a busy core (see
    :mod:`sona.kernels.linalg`). Tiny shapes where R exceeds a side, and a core whose Jacobi
    sweeps do not converge, take numpy's QR and SVD.
    """
    if a.shape[0] <= min(a.shape[1], bt.shape[1]):
        out_a = np.empty((rank, a.shape[1]), np.float32)
        out_bt = np.empty((rank, bt.shape[1]), np.float32)
        status = k_merge.low_rank_into(a, bt, rank, e, out_a, out_bt)
        if status == k_merge.LOW_RANK_OK:
            return out_a, out_bt
        if status == k_merge.LOW_RANK_TOO_LARGE:
            return None
    return _with_exponent(*_low_rank_numpy(a, bt, rank), e)


def _low_rank_numpy(a: np.ndarray, bt: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The balanced float64 (A, Bᵀ) of Btᵀ·A's best rank-``rank`` approximation with numpy's
    QR and SVD (any shape): :func:`_low_rank`'s fallback, before :func:`_with_exponent`."""
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
