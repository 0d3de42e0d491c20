"""MicroLoRA: a tiny low-rank adapter that learns from feedback in microseconds.

ΔW = s·B·A with s = alpha / rank, A (rank × in) random, B (out × rank) zero at start, as in
PEFT. B is stored transposed (rank × out) so every kernel loop is contiguous. ``forward`` returns
only the delta μ(x) = ΔW·x; the host adds it to its frozen base output.

Learning is two-phase: ``adapt`` accumulates the gradient of the objective its feedback defines
(see :mod:`sona.feedback`), ``apply_updates`` applies their mean, norm-clipped, and only if the
result is finite. Each sample's gradient is divided by max(‖x‖², 1) (normalised LMS), so the
output-space step does not grow with the input's scale: embeddings of norm 50 learn with the same
learning rate as unit vectors. Bad input raises before anything changes.
"""

from __future__ import annotations

import math
import os
import secrets
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sona import container
from sona.baseline import RunningBaseline
from sona.errors import ConfigMismatchError, FormatError, InvalidInputError, UnknownModuleError
from sona.feedback import AdaptFeedback, FeedbackKind
from sona.kernels import lora as k_lora
from sona.kernels import random as k_random
from sona.kernels import replay as k_replay
from sona.kernels import update as k_update
from sona.kernels.ownership import COUNTS_PROVE_FREE
from sona.kernels.update import F32_MAX as _F32_MAX
from sona.kernels.warmup import fast, warm_up
from sona.log import get_logger
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.validation import as_f32, as_list, check_positive, check_seed

if TYPE_CHECKING:
    from sona.peft_format import PeftNaming
    from sona.replay import ReplayBatch

__all__ = [
    "AdaptFeedback",
    "ComposedAdapter",
    "MicroLoRA",
    "MicroLoraConfig",
    "TargetModule",
]

_log = get_logger("sona.lora")
_F32 = np.dtype(np.float32)
_MAGIC = b"SONALORA"
_KIND = "micro_lora"
_MAX_EXPLORED = 4096
_NO_KEY = np.uint64(0)
_F32_MAX_SQ = _F32_MAX * _F32_MAX
# Hot-path constants as module globals: cheaper to load than attributes of np or an Enum.
_ND = np.ndarray
_BAD_OUT = k_lora.FORWARD_BAD_OUT
_NOT_FINITE = k_lora.FORWARD_NOT_FINITE
_INF = math.inf
_TARGET = FeedbackKind.TARGET
_GRADIENT = FeedbackKind.GRADIENT
_OUTPUT = FeedbackKind.OUTPUT
_GROUP = FeedbackKind.GROUP
_MODE_REGRESS = k_lora.MODE_REGRESS
_MODE_GRADIENT = k_lora.MODE_GRADIENT
_MODE_RESIDUAL = k_lora.MODE_RESIDUAL
_NONE_ID = id(None)
# What sys.getrefcount(buf) reports when nobody but its owner holds a reused buffer: the
# owner's slot, the caller's local and getrefcount's argument (-1, matching no count, where
# counts prove nothing; see kernels.ownership).
_UNHELD = 3 if COUNTS_PROVE_FREE else -1
_BATCH_REJECTIONS = {
    k_replay.BATCH_NOT_FINITE: "rejected: the accumulated gradient is not finite",
    k_replay.BATCH_WEIGHTS: "rejected: the update would make the weights non-finite",
    k_replay.BATCH_OVERFLOW: "rejected: the update would make delta_weight overflow",
}
_ZERO_INPUT = (
    "declined: the input is zero (such as the embedding of a text with no words), so no "
    "weight of the adapter affects its output and nothing can be learned from it"
)
_UNEXPLORED = (
    "declined: quality-only feedback gives no direction unless the adapter explored on this "
    "input (call forward(x, module, explore=True) first)"
)
_INPUT_TOO_LARGE = (  # no regex metacharacters: tests match on it
    "x is finite but too large: ‖x‖² is above 1e38, where float32 cannot hold it and the "
    "normalised update would be zero"
)
assert k_update.MAX_INPUT_SQ_NORM == 1e38
_STEP_REJECTIONS = {
    2: "rejected: the gradient is not finite",
    3: "rejected: the update would make the weights non-finite",
    4: "rejected: the update would make delta_weight overflow",
}
# what the replay kernels report for their last sample: a rejection, or a sample declined
_DECLINES = {k_replay.DECLINED_ZERO: _ZERO_INPUT, k_replay.DECLINED_RATING: _UNEXPLORED}
_STEP_OUTCOMES = {**_STEP_REJECTIONS, **_DECLINES}
_BATCH_OUTCOMES = {**_BATCH_REJECTIONS, **_DECLINES}


class _Module:
    """Weights, gradient accumulators and preallocated scratch for one target module."""

    __slots__ = (
        "a",
        "bt",
        "forward",
        "fused",
        "g",
        "grad_a",
        "grad_bt",
        "h",
        "index",
        "module",
        "out",
        "scale",
        "sums",
        "target",
        "u",
        "w",
    )

    def __init__(
        self, index: int, module: TargetModule, a: np.ndarray, bt: np.ndarray, scale: float
    ) -> None:
        self.index = index
        self.module = module
        self.scale = scale
        # A square adapter keeps A and Bᵀ in one (2, rank, n) array, which forward passes as
        # one argument (see kernels.lora.forward_reused_packed); a and bt are views of it.
        self.w: np.ndarray | None = None
        self.forward = fast.forward_reused
        if a.shape == bt.shape:
            self.w = _aligned(np.stack([a, bt]))
            a, bt = self.w[0], self.w[1]  # each a whole number of cache lines at d = 4096
            self.forward = fast.forward_reused_packed
        else:
            a, bt = _aligned(a), _aligned(bt)
        self.a = a
        self.bt = bt
        self.grad_a = _aligned(np.zeros_like(a))
        self.grad_bt = _aligned(np.zeros_like(bt))
        rank, n_out = bt.shape
        self.h = np.zeros(rank, np.float32)
        self.u = np.zeros(rank, np.float32)
        self.g = np.zeros(n_out, np.float32)
        self.sums = np.zeros(8, np.float64)
        # this module's row of MicroLoRA._fused (step_fused_grad's scratch), set by the adapter
        self.fused: np.ndarray = np.zeros(k_lora.FUSED_SCRATCH, np.float64)
        self.target = np.zeros(n_out, np.float32)
        # forward's result, reused while nobody else holds it; 64-byte aligned like the
        # factors: stores straddling cache lines made a forward at d = 4096 ~3 % slower
        self.out: np.ndarray = _aligned(np.zeros(n_out, np.float32))

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (
            self.a,
            self.bt,
            self.grad_a,
            self.grad_bt,
            self.h,
            self.u,
            self.g,
            self.sums,
            self.target,
            self.out,
        )


def _aligned(arr: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``arr`` starting on a 64-byte boundary (NumPy guarantees 16).

    The kernels' vector loads then never straddle two cache lines: ~6 % of a forward at
    d = 4096, which streams A and Bᵀ from the L2 cache."""
    raw = np.empty(arr.nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start : start + arr.nbytes].view(arr.dtype).reshape(arr.shape)
    out[...] = arr
    return out


def delta_bound(scale: float, a: np.ndarray, bt: np.ndarray) -> float:
    """s·‖A‖·‖Bᵀ‖ (Frobenius norms, summed in float64 so large factors do not overflow it).

    It bounds every entry of s·B·A, and ``apply_updates`` and ``step`` refuse any update that
    would bring it to float32's max, so delta_weight never overflows. Factors whose entries are
    all finite (1e30, say) can still exceed it, and forward and delta_weight would then return
    inf: every way of installing factors from outside (:meth:`MicroLoRA.set_factors`, the
    import paths) compares it with float32's max too.
    """
    return _bound_from_sq_norms(scale, k_update.sq_norm(a), k_update.sq_norm(bt))


def _bound_from_sq_norms(scale: float, sq_a: float, sq_b: float) -> float:
    """:func:`delta_bound` from the factors' squared norms, for a caller that has them."""
    return scale * math.sqrt(sq_a) * math.sqrt(sq_b)


def check_delta_fits(
    scale: float,
    a: np.ndarray,
    bt: np.ndarray,
    what: str,
    error: type[ValueError] = FormatError,
) -> None:
    """Refuse factors unless :func:`delta_bound` stays below float32's max, with ``error`` (a
    :class:`FormatError` for factors read from a file) whose message starts with ``what``."""
    _refuse_beyond_f32(delta_bound(scale, a, bt), what, error)


def _refuse_beyond_f32(bound: float, what: str, error: type[ValueError] = FormatError) -> None:
    """:func:`check_delta_fits` on a bound already computed."""
    if not bound < _F32_MAX:
        raise error(
            f"{what} give s·‖A‖·‖B‖ = {bound:.4g}, not below float32's max {_F32_MAX:.4g}: "
            "delta_weight and forward would overflow"
        )


def _check_input(x: np.ndarray) -> None:
    """Refuse x with NaN or inf, or with ‖x‖² beyond ``MAX_INPUT_SQ_NORM``."""
    status = k_update.vec_input_status(x)
    if status == k_update.INPUT_NOT_FINITE:
        raise InvalidInputError("x contains NaN or inf")
    if status == k_update.INPUT_TOO_LARGE:
        raise InvalidInputError(_INPUT_TOO_LARGE)


_FORWARD_OVERFLOW = (
    "x is finite but so large that the delta overflows float32 (s·A·x, or s·B·A·x with "
    "weights near float32's largest value)"
)
_GRADIENT_OVERFLOW = (
    "the gradient overflows float32: x and the feedback are finite, but their product with "
    "the adapter's weights is not, as with a feedback vector near float32's largest value "
    "or weights grown that large"
)


def _not_finite_error(x: np.ndarray, overflow: str) -> InvalidInputError:
    """Why a kernel's result was not finite: the kernels report NaN or inf in x and an
    overflow of finite values (``overflow`` says which) alike, and only the error path tells
    them apart, so that a finite x is not blamed."""
    if not k_update.all_finite(x):
        return InvalidInputError("x contains NaN or inf")
    return InvalidInputError(overflow)


def _out_not_finite() -> InvalidInputError:
    return InvalidInputError("out contains NaN or inf; forward_add would add the delta to it")


def passed_over_note(n: int) -> str:
    """The note for samples a consolidation passed over because their gradient overflows."""
    return (
        f"rejected: passed over {n} sample{'s' if n > 1 else ''} whose gradient overflows "
        "float32 against the adapter as it is now"
    )


class MicroLoRA:
    """A low-rank (1 <= rank <= min(in, out)) LoRA adapter over one or more target modules of the
    same shape; the request path is tuned for ranks 1-2."""

    def __init__(self, config: MicroLoraConfig, *, seed: int | None = None) -> None:
        if not isinstance(config, MicroLoraConfig):
            raise TypeError(f"config must be a MicroLoraConfig, got {type(config).__name__}")
        checked = check_seed(seed)
        self._setup(config, checked if checked is not None else secrets.randbits(63), draw=True)

    @classmethod
    def _blank(cls, config: MicroLoraConfig, seed: int) -> MicroLoRA:
        """An adapter whose factors the caller overwrites at once (a clone, a merge): A starts
        at zero instead of drawn, which at rank 8 and width 4096 saves ~0.3 ms per adapter."""
        lora = cls.__new__(cls)
        lora._setup(config, seed, draw=False)
        return lora

    def _setup(self, config: MicroLoraConfig, seed: int, *, draw: bool) -> None:
        warm_up()
        self.config = config
        self.seed = seed
        self._scale = float(config.scaling)
        self._in = config.in_features
        # Set on a live adapter, which an event loop steps in place while readers in other
        # threads may read it: batch reads then hold the GIL too (single vectors always do).
        self.written_in_place = False
        self._out = config.out_features
        rng = np.random.default_rng(self.seed) if draw else None
        self._modules: dict[TargetModule, _Module] = {}
        for i, m in enumerate(config.target_modules):
            if rng is not None:
                a = rng.standard_normal((config.rank, self._in)) / math.sqrt(self._in)
                a32 = np.ascontiguousarray(a, dtype=np.float32)
            else:
                a32 = np.zeros((config.rank, self._in), np.float32)
            bt = np.zeros((config.rank, self._out), np.float32)
            self._modules[m] = _Module(i, m, a32, bt, self._scale)
        # Identity-keyed view: any argument can be looked up without hashing it (an unhashable
        # or unknown one finds nothing, and the general path says why).
        self._by_id = {id(m): st for m, st in self._modules.items()}
        self._states = list(self._modules.values())
        # forward() checks the first module by identity before the dict (~0.04 µs less).
        self._first_module = config.target_modules[0]
        self._first = self._states[0]
        # step()'s one-kernel path: rank 1-2 without dropout, per module (and for module=None
        # when there is only one).
        self._fused_by_id: dict[int, _Module] = {}
        # With several modules, module=None takes _step_modules: one step_fused_grad per
        # module, one step_fused_decide on the joint norm, then one step_fused_apply per
        # module; each module's scratch is a row of _fused.
        self._fused_all: list[_Module] | None = None
        self._fused = np.zeros((len(self._states), k_lora.FUSED_SCRATCH), np.float64)
        for st in self._states:
            st.fused = self._fused[st.index]
        if config.rank <= 2 and config.dropout == 0.0:
            self._fused_by_id.update(self._by_id)
            if len(self._states) == 1:
                self._fused_by_id[id(None)] = self._states[0]
            else:
                self._fused_all = self._states
        self._residual_modes = [_MODE_RESIDUAL] * len(self._states)
        # whether step(module=None) can take the fused kernels (_step_rated relies on it)
        self._fused_step_covers_all = self._fused_all is not None or _NONE_ID in self._fused_by_id
        self._xd = np.zeros(self._in, np.float32)
        self._key = np.uint64(self.seed & 0xFFFFFFFFFFFFFFFF)
        self._dropout_counter = 0
        self._explored: OrderedDict[tuple[int, int], float] = OrderedDict()
        self._baseline = RunningBaseline(config.baseline_decay)
        # what the rated-step kernels weigh a rating with, besides the baseline's state
        self._rating_params = (
            config.baseline_decay,
            config.advantage_temperature,
            config.advantage_cap,
        )
        self._pending = 0
        self.version = 0
        self.last_note: str | None = None
        self.last_update_norm: float | None = None

    # ------------------------------------------------------------------ introspection
    @property
    def modules(self) -> tuple[TargetModule, ...]:
        return self.config.target_modules

    @property
    def scaling(self) -> float:
        return self._scale

    @property
    def pending_updates(self) -> int:
        """Samples whose gradients are accumulated but not yet applied."""
        return self._pending

    @property
    def param_count(self) -> int:
        c = self.config
        return len(self._modules) * c.rank * (c.in_features + c.out_features)

    @property
    def memory_bytes(self) -> int:
        """Bytes held in arrays: weights, gradient accumulators and scratch."""
        own = sum(arr.nbytes for st in self._modules.values() for arr in st.arrays())
        return own + self._xd.nbytes + self._fused.nbytes

    @property
    def baseline(self) -> RunningBaseline:
        return self._baseline

    def factors(self, module: TargetModule) -> tuple[np.ndarray, np.ndarray]:
        """The live (A, Bᵀ) arrays of ``module``; write to them only between published steps."""
        st = self._state(module)
        return st.a, st.bt

    def gradients(self, module: TargetModule) -> tuple[np.ndarray, np.ndarray]:
        """The live accumulated (dA, dBᵀ) of ``module`` (sums, not yet divided by the count)."""
        st = self._state(module)
        return st.grad_a, st.grad_bt

    def __repr__(self) -> str:
        c = self.config
        mods = ",".join(m.value for m in c.target_modules)
        return f"MicroLoRA(in={c.in_features}, out={c.out_features}, rank={c.rank}, modules={mods})"

    # ------------------------------------------------------------------ inference
    def forward(self, x: Any, module: TargetModule, *, explore: bool = False) -> np.ndarray:
        """The delta μ(x) = s·B·A·x: shape (out,) for x of shape (in,), (n, out) for (n, in).

        A vector's result is a buffer the adapter reuses for a later call once nothing holds the
        result any more (a weak reference does not count): keep it, or a view of it, as long as
        it is needed; it is never overwritten while referenced.

        ``explore=True`` adds Gaussian noise, σ = explore_std·‖x‖/√out, regenerable from
        (seed, module, hash of x), so a later ``adapt(x, AdaptFeedback.from_quality(q))`` can
        turn the rating into a REINFORCE step. Its advantage is measured against a running
        baseline of earlier ratings; the adapter's very first rating has none to be measured
        against, so it only starts the baseline (``adapt`` returns False and says so). Each
        exploration is rated once.
        """
        st = self._first if module is self._first_module else self._by_id.get(id(module))
        # The hot path: a float32 vector. The kernel checks its length and that it is
        # contiguous; anything else takes the general path.
        if (
            st is not None
            and explore is False
            and type(x) is _ND
            and x.dtype is _F32
            and x.ndim == 1
        ):
            # The previous result is reused when only the module holds it: a caller that keeps
            # it, a view of it or a memoryview raises the count, which the kernel reads, as it
            # reads whether a former holder froze it. The dtype and ndim are checked here, as
            # Numba's conversion of the argument relies on them.
            out = st.out
            if out.ndim != 1 or out.dtype is not _F32:
                out = st.out = np.empty(self._out, _F32)
            w = st.w
            if w is not None:
                status = st.forward(w, st.scale, x, out)
            else:
                status = st.forward(st.a, st.bt, st.scale, x, out)
            if not status:
                return out
            if status == _BAD_OUT:  # held elsewhere, frozen or resized: a new buffer
                out = st.out = np.empty(self._out, _F32)
                status = fast.forward_into(st.a, st.bt, st.scale, x, out)
                if not status:
                    return out
            if status == _NOT_FINITE:
                raise _not_finite_error(x, _FORWARD_OVERFLOW)
        return self._forward_general(x, module, explore)

    def _delta_into(self, x: np.ndarray, module: TargetModule, out: np.ndarray, add: bool) -> bool:
        """out = μ(x) (or out += μ(x) with ``add``) for a checked float32 vector and a float32
        buffer the caller owns: ``forward`` or ``forward_add`` without their argument checks
        and result buffer, for the Instant loop's per-sample offsets. False when the kernel
        refused (a length, a stride, or a delta beyond float32), and the caller's general
        path then says why; with ``add``, a delta that overflows only in B·h is left in ``out``
        as inf, which ``step`` refuses as a non-finite offset."""
        st = self._first if module is self._first_module else self._by_id[id(module)]
        if add:  # this kernel trusts its caller with lengths and strides
            if x.shape[0] != self._in or x.strides[0] != 4 or out.shape[0] != self._out:
                return False
            return bool(fast.forward_add_vec(st.a, st.bt, self._scale, x, st.h, out))
        return not fast.forward_into(st.a, st.bt, self._scale, x, out)

    def _add_delta(self, x: np.ndarray, module: TargetModule, out: np.ndarray) -> None:
        """out += μ(x) for a checked float32 vector and a buffer the caller owns, with the
        kernel and rounding of the Instant loop's rated path (``forward_add_vec``), so its
        general path computes the same offsets bit for bit. s·A·x beyond float32 raises as in
        ``forward``; a delta that overflows only in B·h is left in ``out`` as inf, which
        ``step`` refuses as a non-finite offset."""
        if not self._delta_into(x, module, out, True):
            raise _not_finite_error(x, _FORWARD_OVERFLOW)

    def _forward_general(self, x: Any, module: TargetModule, explore: bool) -> np.ndarray:
        if not isinstance(explore, (bool, np.bool_)):  # a truthy "no" or NaN would explore
            raise TypeError(f"explore must be a bool, got {type(explore).__name__}")
        explore = bool(explore)
        st = self._state(module)
        x = as_f32(x, "x")
        if x.ndim == 2:
            return self._forward_batch(st, x, explore)
        if x.ndim != 1 or x.shape[0] != self._in:
            raise InvalidInputError(
                f"x must have shape ({self._in},) or (n, {self._in}), got {x.shape}"
            )
        out = np.empty(self._out, _F32)
        if fast.forward_into(st.a, st.bt, self._scale, x, out):
            raise _not_finite_error(x, _FORWARD_OVERFLOW)
        if explore:
            self._explore(st, x, out)
        return out

    def forward_add(self, x: Any, module: TargetModule, out: np.ndarray) -> None:
        """out += μ(x) in place; ``out`` is float32 (out,) or (n, out). A vector's delta goes
        through the adapter's reused result buffer (see :meth:`forward`), so nothing is
        allocated while the previous result is not held.

        NaN or inf already in ``out`` is refused like one in ``x``, and so is a sum that would
        overflow float32: ``out`` is then left as it was."""
        st = self._by_id.get(id(module))
        if st is None:
            st = self._state(module)
        if not (type(x) is np.ndarray and x.dtype is _F32):
            x = as_f32(x, "x")
        if type(out) is not np.ndarray or out.dtype is not _F32 or not out.flags.writeable:
            raise TypeError("out must be a writeable float32 numpy array")
        if x.ndim == 1:
            if x.shape[0] != self._in or out.shape != (self._out,):
                raise InvalidInputError(
                    f"x must have shape ({self._in},) and out ({self._out},), "
                    f"got {x.shape} and {out.shape}"
                )
        elif x.ndim == 2:
            n = x.shape[0]
            if x.shape[1] != self._in or out.shape != (n, self._out):
                raise InvalidInputError(
                    f"x must have shape (n, {self._in}) and out (n, {self._out}), "
                    f"got {x.shape} and {out.shape}"
                )
        else:
            raise InvalidInputError(f"x must be 1- or 2-dimensional, got shape {x.shape}")
        if out.flags.c_contiguous:
            flat = out.reshape(-1)
            if not fast.all_finite_vec(flat):
                raise _out_not_finite()
            delta = self.forward(x, st.module).reshape(-1)
            added = fast.add_if_finite(flat, delta)
        else:
            if not np.isfinite(out).all():
                raise _out_not_finite()
            with np.errstate(over="ignore", invalid="ignore"):
                total = out + self.forward(x, st.module)
            added = bool(np.isfinite(total).all())
            if added:
                out[...] = total
        if not added:
            raise InvalidInputError(
                "out + the delta overflows float32: out holds values too large to add to"
            )

    def _forward_batch(self, st: _Module, x: np.ndarray, explore: bool) -> np.ndarray:
        if x.shape[1] != self._in:
            raise InvalidInputError(f"x must have shape (n, {self._in}), got {x.shape}")
        n = x.shape[0]
        out = np.empty((n, self._out), _F32)
        h = np.empty((n, self.config.rank), _F32)
        batch = k_lora.forward_batch_held if self.written_in_place else k_lora.forward_batch
        if not batch(st.a, st.bt, self._scale, x, h, out, False):
            raise _not_finite_error(x, _FORWARD_OVERFLOW)
        if explore:
            self._explore(st, x, out)
        return out

    def _add_batch(self, x: np.ndarray, module: TargetModule, out: np.ndarray, sign: float) -> None:
        """out += sign·μ(x) for a checked (n, in) float32 batch and an (n, out) float32 buffer
        the caller owns, ``sign`` ±1: ``forward`` without its result array, for sums of
        several adapters' predictions (a Background run's ``quality_delta``). Raises as
        ``forward`` does where the sum leaves float32, with ``out`` then partly added to."""
        st = self._state(module)
        if x.shape[1] != self._in or out.shape != (x.shape[0], self._out):
            raise InvalidInputError(
                f"x must be (n, {self._in}) and out (n, {self._out}), got {x.shape}, {out.shape}"
            )
        h = np.empty((x.shape[0], self.config.rank), _F32)
        batch = k_lora.forward_batch_held if self.written_in_place else k_lora.forward_batch
        if not batch(st.a, st.bt, sign * self._scale, x, h, out, True):
            raise _not_finite_error(x, _FORWARD_OVERFLOW)

    def delta_weight(self, module: TargetModule) -> np.ndarray:
        """The full (out, in) matrix s·B·A; for inspection and merging, not the hot path.

        Formed in float64: with s < 1, B·A alone may overflow float32 where s·B·A does not
        (``apply_updates`` bounds s·‖A‖·‖B‖, which bounds every entry)."""
        st = self._state(module)
        product = st.bt.T.astype(np.float64) @ st.a.astype(np.float64)
        return (self._scale * product).astype(np.float32)

    # ------------------------------------------------------------------ exploration
    def _explore_key(self, st: _Module, x: np.ndarray) -> int:
        salt = self._key ^ np.uint64((st.index + 1) * 0x9E3779B1)
        return int(k_random.hash_vector(np.ascontiguousarray(x), salt))

    def _explore(self, st: _Module, xs: np.ndarray, outs: np.ndarray) -> None:
        """Adds the noise to each row of ``outs`` (one vector or a batch) and records it only
        once every row has finite noise: an input so large that σ·z overflows float32 is
        refused with nothing recorded. ‖x‖ is taken in float64 for the same reason."""
        rows = [(xs, outs)] if xs.ndim == 1 else list(zip(xs, outs, strict=True))
        records = []
        for x, out in rows:
            sigma = self.config.explore_std * math.sqrt(k_update.sq_norm(x) / self._out)
            key = self._explore_key(st, x)
            k_random.add_normal(np.uint64(key), sigma, out)
            if not (math.isfinite(sigma) and k_update.all_finite(out)):
                raise InvalidInputError(
                    "x is finite but so large that its exploration noise overflows float32"
                )
            records.append(((st.index, key), sigma))
        explored = self._explored
        for slot, sigma in records:
            explored[slot] = sigma
            explored.move_to_end(slot)
            if len(explored) > _MAX_EXPLORED:
                explored.popitem(last=False)

    # ------------------------------------------------------------------ learning
    def adapt(
        self,
        x: Any,
        feedback: AdaptFeedback,
        module: TargetModule | None = None,
        *,
        weight: float = 1.0,
        offsets: Mapping[TargetModule, np.ndarray] | None = None,
    ) -> bool:
        """Accumulate the gradient ``feedback`` defines for input ``x``.

        All target modules when ``module`` is None. ``weight`` scales this sample's objective
        (consolidation strategies weight samples by quality). ``offsets`` holds, per module, the
        output of adapters applied together with this one (a consolidated adapter): target,
        rated-output and group feedback then train this adapter on the residual, so the sum of
        the adapters meets the target. Returns False, changes nothing and
        says why in ``last_note`` when the feedback gives no direction (quality alone without
        exploration, the very first rating, which only seeds the baseline, or a zero input).
        """
        prepared = self._prepare(x, feedback, module, weight, offsets, with_sums=False)
        if prepared is None:
            return self._adapt_quality(feedback, x, module, weight)
        states, xu = prepared
        if not any(states[0].h.tolist()) and not xu.any():  # h = s·A·x is 0 when x is
            return self._zero_input()
        self._commit(states, xu)
        self._after(feedback)
        return True

    def _zero_input(self) -> bool:
        """Decline a zero input. The delta is s·B·A·x, so for x = 0 every gradient is zero:
        counting the sample as learned from would report an update that changed nothing, and
        accumulating it would dilute the mean gradient of the samples that do teach something.
        """
        self.last_note = _ZERO_INPUT
        return False

    def step(
        self,
        x: Any,
        feedback: AdaptFeedback,
        learning_rate: float,
        *,
        max_norm: float | None = 1.0,
        module: TargetModule | None = None,
        weight: float = 1.0,
        offsets: Mapping[TargetModule, np.ndarray] | None = None,
    ) -> bool:
        """``adapt`` then ``apply_updates`` for one sample, fused: the Instant loop's update.

        Same result and the same guarantees (clipping, finiteness, bit-identical weights and a
        note on rejection), but the rank-one gradient is applied directly from its factors:
        its norm and the updated weights' norms are known in closed form before anything is
        written, so no accumulator is touched. With gradients already pending, or for
        quality-only feedback, it falls back to ``adapt`` + ``apply_updates``.

        A zero input (such as the embedding of a text with no words) is declined as by
        ``adapt``: False, a note, and nothing changed, ``version`` included.
        """
        st = self._fused_by_id.get(id(module))
        if (
            (st is not None or (module is None and self._fused_all is not None))
            and type(feedback) is AdaptFeedback
            and type(x) is _ND
            and x.dtype is _F32
            and x.ndim == 1
            and type(learning_rate) is float
            and 0.0 < learning_rate < _INF
            and (max_norm is None or (type(max_norm) is float and 0.0 < max_norm < _INF))
            and type(weight) is float
            and 0.0 <= weight < _INF
            and not self._pending
        ):
            # The common case in one kernel call. Everything the general path would refuse is
            # either excluded above or reported by the kernel, which then has changed nothing,
            # and the general path below raises the same error it always did.
            kind = feedback._kind
            vec = feedback._vector
            off = vec
            if kind is _TARGET:
                mode, w = _MODE_REGRESS, feedback._quality * weight
            elif kind is _GRADIENT:
                mode, w = _MODE_GRADIENT, weight
            elif kind is _OUTPUT:
                mode, w = _MODE_REGRESS, self._output_weight(feedback._quality) * weight
            elif kind is _GROUP:
                mode, w = _MODE_REGRESS, weight
            else:
                mode, w = -1, 0.0  # quality only
            if st is None:  # every module, with the clip on their joint norm
                if mode >= 0:
                    assert self._fused_all is not None
                    done = self._step_modules(
                        self._fused_all, x, feedback, vec, w, mode, learning_rate, max_norm,
                        offsets,
                    )  # fmt: skip
                    if done is not None:
                        return done
                return self._step_general(
                    x, feedback, learning_rate, max_norm, module, weight, offsets
                )
            if offsets is not None and mode == _MODE_REGRESS:
                try:
                    o = offsets.get(st.module)
                except Exception:  # not a mapping: the general path raises, in its own order
                    o, mode = None, -1
                if o is None:
                    pass
                elif type(o) is _ND and o.dtype is _F32 and o.ndim == 1:
                    mode, off = _MODE_RESIDUAL, o
                else:
                    mode = -1  # converted and checked by the general path
            if mode >= 0:
                r = fast.step_fused(
                    st.a, st.bt, self._scale, x, vec, off, w, mode, learning_rate,
                    -1.0 if max_norm is None else max_norm,
                )  # fmt: skip
                done = self._fused_outcome(r, x, feedback._quality if kind is _OUTPUT else None)
                if done is not None:
                    return done
        return self._step_general(x, feedback, learning_rate, max_norm, module, weight, offsets)

    def _step_rated(
        self,
        x: np.ndarray,
        output: np.ndarray,
        quality: float,
        learning_rate: float,
        max_norm: float,
        offsets: Sequence[np.ndarray],
    ) -> bool | None:
        """``step(x, rated output, learning_rate, max_norm=max_norm, offsets=...)`` on every
        module of an adapter with several, without building the feedback and the offsets
        mapping: the Instant loop's update for a rated sample, whose arrays are the sample's
        checked float32 copies, with one offset per module in the order of ``modules``. The
        same kernels, weights and outcome as ``step``; None, with nothing changed, wherever
        ``step`` would take its general path (which then decides or raises). One or two
        modules take :meth:`_step_rated_over`."""
        states = self._fused_all
        if states is None or not self._fused_rates(learning_rate, max_norm):
            return None
        return self._step_states(
            states, x, output, offsets, self._residual_modes, self._output_weight(quality),
            learning_rate, max_norm, quality,
        )  # fmt: skip

    def _step_rated_over(
        self,
        base: MicroLoRA,
        transit: MicroLoRA | None,
        x: np.ndarray,
        output: np.ndarray,
        quality: float,
        learning_rate: float,
        max_norm: float,
        offs: Sequence[np.ndarray],
    ) -> bool | None:
        """:meth:`_step_rated` for an adapter with one module or two, whose offsets are the
        deltas of ``base`` (an adapter on the same modules) plus those of ``transit`` (when
        given): they go into ``offs`` (one buffer per module, in the order of ``modules``),
        and the offsets and the step take one kernel call (``kernels.lora.step_rated_over``,
        ``step_rated_over_pair``). The same code, weights and outcome as ``_delta_into`` on
        each adapter and then ``step``; None, with no weight changed, where an offset kernel
        refused or ``step`` would take its general path."""
        if not self._fused_rates(learning_rate, max_norm):
            return None
        rating = self._baseline.values
        decay, temperature, cap = self._rating_params
        st = self._fused_by_id.get(_NONE_ID)
        if st is not None:
            c = base._first
            t = st if transit is None else transit._first  # unread without a transit
            if c.module is not st.module or t.module is not st.module:
                return None
            r = fast.step_rated_over(
                c.a, c.bt, base._scale, t.a, t.bt, t.scale, t.h, transit is not None, st.a,
                st.bt, self._scale, x, output, offs[0], quality, rating, decay, temperature,
                cap, _MODE_RESIDUAL, learning_rate, max_norm,
            )  # fmt: skip
            return self._fused_outcome(r, x, None)
        states = self._fused_all
        if states is None or len(states) != 2:
            return None
        trans = states if transit is None else transit._states  # unread without a transit
        if len(base._states) != 2 or len(trans) != 2:
            return None
        (q, v), (cq, cv), (tq, tv) = states, base._states, trans
        if not (cq.module is tq.module is q.module and cv.module is tv.module is v.module):
            return None
        r = fast.step_rated_over_pair(
            cq.a, cq.bt, cv.a, cv.bt, base._scale, tq.a, tq.bt, tv.a, tv.bt, tq.scale, tq.h,
            transit is not None, q.a, q.bt, offs[0], _MODE_RESIDUAL, v.a, v.bt, offs[1],
            _MODE_RESIDUAL, self._scale, x, output, quality, rating, decay, temperature, cap,
            learning_rate, max_norm, self._fused,
        )  # fmt: skip
        return self._fused_outcome(r, x, None)

    def _fused_rates(self, learning_rate: float, max_norm: float) -> bool:
        """Whether the rated paths' kernels take these rates as they are, with no gradient
        pending (``step`` takes anything else through its general path)."""
        return (
            not self._pending
            and type(learning_rate) is float
            and 0.0 < learning_rate < _INF
            and type(max_norm) is float
            and 0.0 < max_norm < _INF
        )

    def _fused_outcome(self, r: float, x: np.ndarray, rated: float | None) -> bool | None:
        """What a fused step's kernel result ``r`` means: the step's result, or None (nothing
        written) when the general path must decide or raise. ``rated`` is the rating of
        rated-output feedback, which enters the running baseline once the step is decided."""
        if r >= 0.0:
            if r == 0.0 and not x.any():  # the kernel wrote a zero update
                return self._zero_input()
            if rated is not None:
                self._baseline.update(rated)
            return self._stepped(r)
        status = int(-r)
        if status not in _STEP_REJECTIONS:
            return None  # x or the gradient not finite, or unsupported: nothing written
        if rated is not None:
            self._baseline.update(rated)
        return self._reject(_STEP_REJECTIONS[status])

    def _step_modules(
        self,
        states: list[_Module],
        x: np.ndarray,
        feedback: AdaptFeedback,
        vec: np.ndarray | None,
        w: float,
        mode: int,
        learning_rate: float,
        max_norm: float | None,
        offsets: Mapping[TargetModule, np.ndarray] | None,
    ) -> bool | None:
        """``step``'s fast path over several modules: its result, or None (nothing changed)
        when the general path must decide or raise. The clip uses the joint norm of every
        module's gradient, and every module's guards pass before any weight is written."""
        offs = [vec] * len(states)
        modes = [mode] * len(states)
        if offsets is not None and mode == _MODE_REGRESS:
            for i, st in enumerate(states):
                try:
                    o = offsets.get(st.module)
                except Exception:  # not a mapping: the general path raises, in its own order
                    return None
                if o is None:
                    continue
                if type(o) is not _ND or o.dtype is not _F32 or o.ndim != 1:
                    return None  # converted and checked by the general path
                offs[i] = o
                modes[i] = _MODE_RESIDUAL
        rated = feedback._quality if feedback._kind is _OUTPUT else None
        mn = -1.0 if max_norm is None else max_norm
        return self._step_states(states, x, vec, offs, modes, w, learning_rate, mn, rated)

    def _step_states(
        self,
        states: list[_Module],
        x: np.ndarray,
        vec: np.ndarray | None,
        offs: Sequence[np.ndarray | None],
        modes: Sequence[int],
        w: float,
        learning_rate: float,
        mn: float,
        rated: float | None,
    ) -> bool | None:
        """The kernels of a multi-module fused step, then ``_fused_outcome``."""
        s = self._scale
        if len(states) == 2:  # the default configuration: all three phases in one call
            q, v = states
            r = fast.step_fused_pair(
                q.a, q.bt, offs[0], modes[0], v.a, v.bt, offs[1], modes[1],
                s, x, vec, w, learning_rate, mn, self._fused,
            )  # fmt: skip
        else:
            grad = fast.step_fused_grad
            for st, off, md in zip(states, offs, modes, strict=True):
                r = -grad(st.a, st.bt, s, x, vec, off, w, md, st.fused)
                if r:
                    break
            else:
                r = fast.step_fused_decide(self._fused, s, learning_rate, mn)
                if r >= 0.0:
                    apply = fast.step_fused_apply
                    for st, off, md in zip(states, offs, modes, strict=True):
                        apply(st.a, st.bt, x, vec, off, md, st.fused)
        return self._fused_outcome(r, x, rated)

    def _stepped(self, norm: float) -> bool:
        """Record an applied step of gradient norm ``norm`` (after clipping, per unit of rate)."""
        self.version += 1
        self.last_update_norm = norm
        self.last_note = None
        return True

    def _step_general(
        self,
        x: Any,
        feedback: AdaptFeedback,
        learning_rate: float,
        max_norm: float | None,
        module: TargetModule | None,
        weight: float,
        offsets: Mapping[TargetModule, np.ndarray] | None,
    ) -> bool:
        if type(feedback) is not AdaptFeedback and not isinstance(feedback, AdaptFeedback):
            raise TypeError(f"feedback must be an AdaptFeedback, got {type(feedback).__name__}")
        if self._pending or feedback.kind is FeedbackKind.QUALITY:
            if not self.adapt(x, feedback, module, weight=weight, offsets=offsets):
                return False
            return self.apply_updates(learning_rate, max_norm=max_norm)
        lr, max_norm = self._check_step_args(learning_rate, max_norm)
        checked = self._validate(x, feedback, module, weight, offsets, one_kernel=True)
        assert checked is not None
        states, xu, targets, w, mode = checked
        if len(states) == 1:  # the common case: everything in one kernel call
            st = states[0]
            status = fast.step_one(
                st.a, st.bt, self._scale, xu, targets[0], w, mode, lr,
                -1.0 if max_norm is None else max_norm, st.h, st.u, st.g, st.sums,
            )  # fmt: skip
            if status == 1:
                raise _not_finite_error(xu, _GRADIENT_OVERFLOW)
            if status == k_lora.STEP_INPUT_NORM:
                raise InvalidInputError(_INPUT_TOO_LARGE)
            if status == 0 and st.sums[7] == 0.0 and not xu.any():  # a zero update was written
                return self._zero_input()
            self._after(feedback)
            if status:
                return self._reject(_STEP_REJECTIONS[status])
            return self._stepped(float(st.sums[7]))
        self._kernels(states, xu, targets, w, mode, with_sums=True)
        s = self._scale
        total = 0.0
        for st in states:
            sums = st.sums
            total += sums[4] * sums[0] + sums[5] * sums[1]
        norm = math.sqrt(total)
        if not math.isfinite(norm):
            self._after(feedback)
            return self._reject(_STEP_REJECTIONS[2])
        if st.sums[0] == 0.0:  # ‖x‖², the same for every module
            return self._zero_input()
        c = lr * (1.0 if max_norm is None or norm <= max_norm else max_norm / norm)
        for st in states:
            xx, gg, aa, bb, uu, hh, uh = st.sums[:7]
            cross = 2.0 * c * uh / s
            na = aa - cross + c * c * uu * xx
            nb = bb - cross + c * c * hh * gg
            finite_factors = math.isfinite(c * math.sqrt(uu)) and math.isfinite(c * math.sqrt(hh))
            if (
                not (math.isfinite(na) and math.isfinite(nb) and max(na, nb) < _F32_MAX_SQ)
                or not finite_factors
            ):
                self._after(feedback)
                return self._reject(_STEP_REJECTIONS[3])
            if s * math.sqrt(max(na, 0.0)) * math.sqrt(max(nb, 0.0)) >= _F32_MAX:
                self._after(feedback)
                return self._reject(_STEP_REJECTIONS[4])
        for st in states:
            fast.apply_rank_one(st.a, st.bt, xu, st.h, st.u, st.g, c)
        self._after(feedback)
        return self._stepped(norm * (c / lr))

    def _prepare(
        self,
        x: Any,
        feedback: AdaptFeedback,
        module: TargetModule | None,
        weight: float,
        offsets: Mapping[TargetModule, np.ndarray] | None,
        *,
        with_sums: bool,
    ) -> tuple[list[_Module], np.ndarray] | None:
        """Validate, then fill every module's scratch (h, g, u); None for quality-only
        feedback, which takes its own path. Raises before any state changes."""
        checked = self._validate(x, feedback, module, weight, offsets)
        if checked is None:
            return None
        states, xu, targets, w, mode = checked
        self._kernels(states, xu, targets, w, mode, with_sums=with_sums)
        return states, xu

    def _validate(
        self,
        x: Any,
        feedback: AdaptFeedback,
        module: TargetModule | None,
        weight: float,
        offsets: Mapping[TargetModule, np.ndarray] | None,
        *,
        one_kernel: bool = False,
    ) -> tuple[list[_Module], np.ndarray, list[np.ndarray], float, int] | None:
        """Checked inputs for a gradient step: the modules, x (after dropout), each module's
        regression target, the sample's weight and the kernel mode; None for quality-only.

        ``one_kernel``: a single module's step goes to ``step_one``, which refuses an input
        beyond ``MAX_INPUT_SQ_NORM`` from the ‖x‖² it computes anyway; otherwise that is checked
        here, on x as the kernels see it (dropout scales the kept entries up)."""
        if not isinstance(feedback, AdaptFeedback):
            raise TypeError(f"feedback must be an AdaptFeedback, got {type(feedback).__name__}")
        if type(weight) is float and weight == 1.0:
            sample_weight = 1.0
        else:
            sample_weight = check_positive(weight, "weight", allow_zero=True)
        states = self._states if module is None else [self._state(module)]
        x = as_f32(x, "x")
        if x.ndim != 1 or x.shape[0] != self._in:
            raise InvalidInputError(f"x must have shape ({self._in},), got {x.shape}")
        kind = feedback.kind
        vec = feedback.vector
        if vec is not None and vec.shape[0] != self._out:
            name = "grad" if kind is FeedbackKind.GRADIENT else kind.value
            raise InvalidInputError(
                f"feedback {name} must have shape ({self._out},), got {vec.shape}"
            )
        if kind is FeedbackKind.QUALITY:
            _check_input(x)
            return None
        assert vec is not None
        p = self.config.dropout
        xu = x
        if p > 0.0:
            k_lora.apply_dropout(x, p, self._key, np.uint64(self._dropout_counter), self._xd)
            xu = self._xd
        if not (one_kernel and len(states) == 1):
            _check_input(xu)
        if kind is FeedbackKind.GRADIENT:
            mode, w = k_lora.MODE_GRADIENT, 1.0
        elif kind is FeedbackKind.TARGET:
            mode, w = k_lora.MODE_REGRESS, feedback.quality
        elif kind is FeedbackKind.OUTPUT:
            mode, w = k_lora.MODE_REGRESS, self._output_weight(feedback.quality)
        else:  # GROUP: the pull target already carries the advantage weighting
            mode, w = k_lora.MODE_REGRESS, 1.0
        w *= sample_weight
        targets = [vec] * len(states)
        if offsets is not None and mode == k_lora.MODE_REGRESS:
            targets = [self._residual_target(st, vec, offsets) for st in states]
        return states, xu, targets, w, mode

    def _output_weight(self, quality: float) -> float:
        """Rated-output feedback's regression weight: exp(advantage / temperature), capped."""
        c = self.config
        return self._baseline.weight(quality, c.advantage_temperature, c.advantage_cap)

    def _kernels(
        self,
        states: list[_Module],
        xu: np.ndarray,
        targets: list[np.ndarray],
        w: float,
        mode: int,
        *,
        with_sums: bool,
    ) -> None:
        for st, target in zip(states, targets, strict=True):
            if not fast.prepare_grad(
                st.a, st.bt, self._scale, xu, target, w, mode, _NO_KEY, st.h, st.u, st.g
            ):
                raise _not_finite_error(xu, _GRADIENT_OVERFLOW)
            if with_sums:
                fast.step_sums(st.a, st.bt, xu, st.h, st.u, st.g, st.sums)

    def _residual_target(
        self, st: _Module, vec: np.ndarray, offsets: Mapping[TargetModule, np.ndarray]
    ) -> np.ndarray:
        """vec − offset for this module, in the module's scratch (vec itself without one)."""
        off = offsets.get(st.module)
        if off is None:
            return vec
        if type(off) is not np.ndarray or off.dtype is not _F32 or off.shape != (self._out,):
            off = as_f32(off, "offsets")
            if off.shape != (self._out,):
                raise InvalidInputError(
                    f"offsets[{st.module.value}] must have shape ({self._out},), got {off.shape}"
                )
        if not fast.all_finite_vec(np.ascontiguousarray(off)):
            raise InvalidInputError(f"offsets[{st.module.value}] contains NaN or inf")
        with np.errstate(over="ignore"):  # an inf residual is refused as a non-finite gradient
            np.subtract(vec, off, out=st.target)
        return st.target

    def _after(self, feedback: AdaptFeedback) -> None:
        """Advance what a consumed sample advances: the rating baseline, the dropout stream."""
        if feedback.kind is FeedbackKind.OUTPUT:
            self._baseline.update(feedback.quality)
        if self.config.dropout > 0.0:
            self._dropout_counter += 1

    def _adapt_quality(
        self, feedback: AdaptFeedback, x_in: Any, module: TargetModule | None, weight: float
    ) -> bool:
        states = self._states if module is None else [self._state(module)]
        x = as_f32(x_in, "x")
        if not x.any():
            return self._zero_input()
        quality = feedback.quality
        sample_weight = weight
        found = []
        for st in states:
            key = self._explore_key(st, x)
            sigma = self._explored.get((st.index, key))
            if sigma is not None:
                found.append((st, key, sigma))
        if not found:
            self.last_note = _UNEXPLORED
            return False
        if self._baseline.count == 0:
            for st, key, _ in found:
                del self._explored[(st.index, key)]
            self._baseline.update(quality)
            self.last_note = "declined: first rating only initialises the quality baseline"
            return False
        adv = self._baseline.advantage(quality)
        # REINFORCE with a baseline: the log-likelihood gradient of the explored output is
        # ε/σ; scaled by σ² (absorbed into the step size) the loss gradient is −adv·σ·ε.
        for st, key, sigma in found:
            if not fast.prepare_grad(
                st.a,
                st.bt,
                self._scale,
                x,
                st.g,
                -adv * sigma * sample_weight,
                k_lora.MODE_NOISE,
                np.uint64(key),
                st.h,
                st.u,
                st.g,
            ):
                raise _not_finite_error(x, _GRADIENT_OVERFLOW)
        self._commit([st for st, _, _ in found], x)
        for st, key, _ in found:
            del self._explored[(st.index, key)]
        self._baseline.update(quality)
        return True

    def _commit(self, states: list[_Module], x: np.ndarray) -> None:
        recompute = self.config.gradient_checkpointing
        for st in states:
            fast.commit_grad(
                st.a, self._scale, x, st.h, st.u, st.g, st.grad_a, st.grad_bt, recompute
            )
        self._pending += 1
        self.last_note = None

    def apply_updates(self, learning_rate: float, *, max_norm: float | None = 1.0) -> bool:
        """Apply the mean accumulated gradient, norm-clipped to ``max_norm``, and clear it.

        Returns False, keeps every weight bit-identical and says why in ``last_note`` when there
        is nothing to apply, or when the result would be non-finite or would make delta_weight
        overflow (the rejected gradient is discarded).
        """
        lr, max_norm = self._check_step_args(learning_rate, max_norm)
        n = self._pending
        if n == 0:
            self.last_note = "nothing to apply: no accumulated updates"
            return False
        states = self._states
        sq = 0.0
        for st in states:
            sq += fast.grad_sq_norm(st.grad_a, st.grad_bt)
        norm = math.sqrt(sq) / n
        if not math.isfinite(norm):
            return self._reject(_BATCH_REJECTIONS[k_replay.BATCH_NOT_FINITE])
        clip = 1.0 if max_norm is None or norm <= max_norm else max_norm / norm
        step = lr * clip / n
        for st in states:
            na, nb = fast.candidate_sq_norms(st.a, st.grad_a, st.bt, st.grad_bt, step)
            if not (math.isfinite(na) and math.isfinite(nb)):
                return self._reject(_BATCH_REJECTIONS[k_replay.BATCH_WEIGHTS])
            if _bound_from_sq_norms(self._scale, na, nb) >= _F32_MAX:
                return self._reject(_BATCH_REJECTIONS[k_replay.BATCH_OVERFLOW])
        for st in states:
            fast.apply_step(st.a, st.grad_a, st.bt, st.grad_bt, step)
        self._pending = 0
        self.version += 1
        self.last_update_norm = norm * clip
        self.last_note = None
        return True

    def replay(
        self,
        batch: ReplayBatch,
        rows: np.ndarray,
        learning_rate: float,
        *,
        max_norm: float | None,
        ewc: k_replay.EwcArrays | None = None,
        ewc_every: int = 1,
        ewc_lambda: float = 0.0,
    ) -> bool:
        """``step`` on each of ``batch``'s samples ``rows`` in turn, in one GIL-free call.

        Samples whose step ``step`` would refuse as non-finite are skipped, as the Deep loop
        skips them, and so are those it declines (zero inputs, quality-only ratings).
        With ``ewc`` (from ``TrainingPipeline.replay_ewc``) and ``ewc_lambda`` > 0,
        an EWC++ proximal step of strength 2·lr·λ·k follows every ``ewc_every`` applied steps
        (k = steps since the last one) and the last applied step. The weights, the rating
        baseline, ``version``, ``last_update_norm`` and ``last_note`` end as the per-sample loop
        leaves them. Returns False, changing nothing, when this adapter's steps take a path the
        replay kernel does not cover: rank 1-2 without dropout (the fused kernels), dropout, or
        gradients already accumulated.

        The kernel steps copies of the factors and they are written back module by module, so
        this is for adapters no other thread reads meanwhile (the Deep loop's private copies);
        ``step`` updates in place under the GIL instead.
        """
        cfg = self.config
        if self._fused_by_id or cfg.dropout > 0.0 or self._pending:
            return False
        lr, max_norm = self._check_step_args(learning_rate, max_norm)
        rows = self._replay_rows(batch, rows)
        a, bt, baseline = self._replay_state()
        m, rank, n_out = bt.shape
        out = np.zeros(3)
        lam = ewc_lambda if ewc is not None else 0.0
        k_replay.replay_epoch(
            a, bt, self._scale, batch.xs, batch.vecs, rows,
            batch.modes, batch.targets, batch.weights, batch.qualities, batch.rating_only,
            baseline, cfg.baseline_decay, cfg.advantage_temperature, cfg.advantage_cap,
            lr, -1.0 if max_norm is None else max_norm,
            np.zeros((m, rank), np.float32), np.zeros((m, rank), np.float32),
            np.zeros((m, n_out), np.float32), np.zeros((m, 8)),
            ewc_every, lam, *(ewc if ewc is not None else k_replay.no_ewc(m, rank, n_out)), out,
        )  # fmt: skip
        self._set_replay_state(a, bt, baseline, out, _STEP_OUTCOMES)
        return True

    def relearn(
        self,
        batch: ReplayBatch,
        rows: np.ndarray,
        sample_weights: np.ndarray,
        learning_rate: float,
        *,
        max_norm: float,
        mini_batch: int,
        ewc: k_replay.EwcArrays | None = None,
        ewc_lambda: float = 0.0,
    ) -> list[str] | None:
        """``adapt`` on each of ``batch``'s samples ``rows`` (weighted by ``sample_weights``;
        those ``adapt`` declines, zero inputs and quality-only ratings, are passed over) and
        ``apply_updates`` after every ``mini_batch`` of them and after the last, in one
        GIL-free call: a mini-batch of k samples at ``learning_rate``·k with its mean gradient
        clipped at ``max_norm`` (so it moves no further than k clipped steps could), each
        applied one followed by an EWC++ step of 2·lr·k·λ when ``ewc`` is given. Returns the
        rejection notes (one per rejected mini-batch, and one for the samples passed over), or
        None, changing nothing, for adapters with dropout or gradients already accumulated.

        A finite sample whose gradient overflows float32 (where ``adapt`` raises) is passed
        over: whether it overflows depends on what the adapter has become, and one such sample
        must not keep a consolidation from learning the rest. An x that ``adapt`` refuses
        (NaN, inf, ‖x‖² beyond the limit) raises ``InvalidInputError``, with the mini-batches
        before it applied and the unfinished one discarded. Like :meth:`replay`, it is for
        adapters no other thread reads meanwhile.
        """
        cfg = self.config
        if cfg.dropout > 0.0 or self._pending:
            return None
        lr, clip_at = self._check_step_args(learning_rate, max_norm)
        if clip_at is None or type(mini_batch) is not int or mini_batch < 1:
            raise InvalidInputError("relearn needs a max_norm and a mini_batch >= 1")
        rows = self._replay_rows(batch, rows)
        weights = np.ascontiguousarray(sample_weights, np.float64)
        if weights.shape != rows.shape or not ((weights >= 0.0) & (weights < np.inf)).all():
            raise InvalidInputError("sample_weights must be finite, >= 0, one per row")
        a, bt, baseline = self._replay_state()
        m, rank, n_out = bt.shape
        codes = np.full(rows.shape[0] // mini_batch + 1, -1, np.int64)
        out = np.zeros(k_replay.RE_SLOTS)
        failed = k_replay.relearn(
            a, bt, self._scale, batch.xs, batch.vecs, rows, batch.modes, batch.targets,
            batch.weights, batch.qualities, batch.rating_only, weights, baseline,
            cfg.baseline_decay, cfg.advantage_temperature, cfg.advantage_cap,
            lr, clip_at, mini_batch, cfg.gradient_checkpointing,
            np.zeros((m, rank), np.float32), np.zeros((m, rank), np.float32),
            np.zeros((m, n_out), np.float32), np.zeros_like(a), np.zeros_like(bt),
            ewc_lambda if ewc is not None else 0.0,
            *(ewc if ewc is not None else k_replay.no_ewc(m, rank, n_out)), codes, out,
        )  # fmt: skip
        self._set_replay_state(a, bt, baseline, out, _BATCH_OUTCOMES)
        notes = [_BATCH_REJECTIONS[int(c)] for c in codes if c > 0]
        passed = int(out[k_replay.RE_PASSED])
        if passed:
            notes.append(passed_over_note(passed))
        if failed >= 0:
            # the kernel stops only at an x adapt refuses: NaN, inf or ‖x‖² beyond the limit
            _check_input(batch.xs[rows[failed]])
            raise InvalidInputError(_INPUT_TOO_LARGE)
        return notes

    def _replay_rows(self, batch: ReplayBatch, rows: np.ndarray) -> np.ndarray:
        """``rows`` checked against ``batch`` and this adapter, as int64."""
        if batch.vecs.shape[1] != self._out or batch.xs.shape[1] != self._in:
            raise InvalidInputError(
                f"replay batch has widths ({batch.xs.shape[1]}, {batch.vecs.shape[1]}), this "
                f"adapter ({self._in}, {self._out})"
            )
        rows = np.ascontiguousarray(rows)
        if rows.ndim != 1 or rows.dtype.kind not in "iu":
            got = f"{rows.dtype} of shape {rows.shape}"
            raise InvalidInputError(f"rows must be a 1-d integer array, got {got}")
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= len(batch)):
            raise InvalidInputError(f"rows must index the batch's {len(batch)} samples")
        if (batch.targets >= 0).any() and batch.modules != self.config.target_modules:
            raise InvalidInputError(
                "the replay batch names modules in another order than this adapter's"
            )
        return rows.astype(np.int64, copy=False)

    def _replay_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of every module's factors, stacked, and the rating baseline as an array."""
        a = np.stack([st.a for st in self._states])
        bt = np.stack([st.bt for st in self._states])
        return a, bt, self._baseline.values.copy()

    def _set_replay_state(
        self,
        a: np.ndarray,
        bt: np.ndarray,
        baseline: np.ndarray,
        out: np.ndarray,
        rejections: Mapping[int, str],
    ) -> None:
        """Write back what a replay kernel left: the weights, the baseline and, from ``out``
        (``OUT_*`` layout, shared by both kernels), the version, the last norm and the note of
        its last rejection or decline (``rejections`` maps the kernel's codes to notes)."""
        for st, ai, bi in zip(self._states, a, bt, strict=True):
            st.a[...] = ai
            st.bt[...] = bi
        self._baseline.values[:] = baseline
        applied = int(out[k_replay.OUT_APPLIED])
        if applied:
            self.version += applied
            self.last_update_norm = float(out[k_replay.OUT_NORM])
        last = int(out[k_replay.OUT_LAST])
        if last >= 0:
            self.last_note = rejections.get(last)

    @staticmethod
    def _check_step_args(
        learning_rate: float, max_norm: float | None
    ) -> tuple[float, float | None]:
        if type(learning_rate) is float and 0.0 < learning_rate < math.inf:
            lr = learning_rate  # the hot path's common case, without the general checks
        else:
            lr = check_positive(learning_rate, "learning_rate")
        if max_norm is not None and not (type(max_norm) is float and 0.0 < max_norm < math.inf):
            max_norm = check_positive(max_norm, "max_norm")
        return lr, max_norm

    def _reject(self, note: str) -> bool:
        self.clear_gradients()
        self.last_note = note
        _log.debug("update_rejected", note=note)
        return False

    def clear_gradients(self) -> None:
        """Discard accumulated gradients without touching the weights."""
        for st in self._modules.values():
            st.grad_a.fill(0.0)
            st.grad_bt.fill(0.0)
        self._pending = 0

    # ------------------------------------------------------------------ copies and state
    def clone(self, *, into: MicroLoRA | None = None) -> MicroLoRA:
        """An independent copy: weights, baseline and RNG position (not pending gradients).

        ``into``: an earlier clone of this adapter that nothing uses any more. When its
        configuration and seed still match, it becomes the copy, in the memory it already has:
        a new adapter's arrays are fresh pages, and faulting them in costs more than the copy.
        """
        twin = into
        if twin is None or twin.seed != self.seed or twin.config != self.config:
            twin = MicroLoRA._blank(self.config, self.seed)
        else:
            if twin._pending:  # gradients are zero whenever none is pending
                twin.clear_gradients()
            twin._explored.clear()
            twin.last_note = None
            twin.last_update_norm = None
        twin._copy_state_from(self)
        return twin

    def _copy_state_from(self, other: MicroLoRA) -> None:
        for m, st in self._modules.items():
            src = other._modules[m]
            np.copyto(st.a, src.a)
            np.copyto(st.bt, src.bt)
        np.copyto(self._baseline.values, other._baseline.values)
        self._dropout_counter = other._dropout_counter
        self.version = other.version

    def reset_b(self) -> None:
        """Start afresh from the current A with B = 0 (delta zero), as after a hand-over."""
        for st in self._modules.values():
            st.bt.fill(0.0)
        self.clear_gradients()
        self.version += 1

    def set_factors(self, module: TargetModule, a: Any, bt: Any) -> None:
        """Replace one module's (A, Bᵀ); shapes must match, values be finite and s·‖A‖·‖B‖ stay
        below float32's max (:func:`delta_bound`), the invariant every update keeps."""
        st = self._state(module)
        a_arr = as_f32(a, "a")
        bt_arr = as_f32(bt, "bt")
        if a_arr.shape != st.a.shape or bt_arr.shape != st.bt.shape:
            raise InvalidInputError(
                f"factors must have shapes {st.a.shape} and {st.bt.shape}, "
                f"got {a_arr.shape} and {bt_arr.shape}"
            )
        # one pass each: float32 entries square to at most ~1e77, so a float64 sum of squares
        # is finite exactly when every entry is
        na = k_update.sq_norm(a_arr)
        nb = k_update.sq_norm(bt_arr)
        if not (math.isfinite(na) and math.isfinite(nb)):
            raise InvalidInputError("factors contain NaN or inf")
        _refuse_beyond_f32(
            _bound_from_sq_norms(self._scale, na, nb),
            f"factors for {st.module.value}",
            InvalidInputError,
        )
        np.copyto(st.a, a_arr)
        np.copyto(st.bt, bt_arr)
        self.version += 1

    def factor_buffers(self) -> list[np.ndarray]:
        """The arrays that hold the factors (one per module where A and Bᵀ are packed, else
        both), in module order. Every update writes them in place, so copying them copies the
        weights."""
        out: list[np.ndarray] = []
        for st in self._modules.values():
            out.extend((st.w,) if st.w is not None else (st.a, st.bt))
        return out

    def iter_factors(self) -> Iterator[tuple[TargetModule, np.ndarray, np.ndarray]]:
        for m, st in self._modules.items():
            yield m, st.a, st.bt

    # ------------------------------------------------------------------ serialisation
    def export_weights(self) -> bytes:
        """Versioned, checksummed bytes holding the config, the factors and the baseline."""
        arrays: dict[str, np.ndarray] = {}
        for m, st in self._modules.items():
            arrays[f"{m.value}.A"] = st.a
            arrays[f"{m.value}.Bt"] = st.bt
        meta = {
            "config": self.config.to_dict(),
            "seed": self.seed,
            "version": self.version,
            "dropout_counter": self._dropout_counter,
            "baseline": self._baseline.state(),
        }
        return container.encode(_MAGIC, _KIND, meta, arrays)

    def import_weights(self, data: bytes) -> None:
        """Load bytes from :meth:`export_weights`; refuses corrupt data or another config."""
        state = _decode(data, "adapter bytes")
        if state.config != self.config:
            raise ConfigMismatchError(
                f"adapter bytes hold config {state.config}, this adapter has {self.config}"
            )
        self._install(state)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the adapter atomically: the file holds the old or the new adapter, never a mix.

        An empty path or a directory is refused with an InvalidInputError naming ``path``.
        """
        container.write_atomic(container.file_target(path), self.export_weights())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MicroLoRA:
        state = _decode(container.read_file(path), str(path))
        lora = cls(state.config, seed=state.seed)
        lora._install(state)
        return lora

    def export_peft(
        self,
        directory: str | os.PathLike[str],
        *,
        layers: Sequence[int] = (0,),
        base_model_name_or_path: str | None = None,
        naming: PeftNaming | None = None,
        task_type: str | None = "CAUSAL_LM",
    ) -> Path:
        """Write a Hugging Face PEFT adapter directory, the same factors in each of ``layers``.

        ``naming`` defaults to the Llama family's module paths; see :mod:`sona.peft_format`.
        """
        from sona.peft_format import LLAMA, export_peft

        return export_peft(
            self,
            directory,
            layers=layers,
            base_model_name_or_path=base_model_name_or_path,
            naming=LLAMA if naming is None else naming,
            task_type=task_type,
        )

    @classmethod
    def from_peft(
        cls,
        directory: str | os.PathLike[str],
        *,
        layer: int = 0,
        naming: PeftNaming | None = None,
        seed: int | None = None,
    ) -> MicroLoRA:
        """Read one layer of a PEFT LoRA adapter directory; refuses what it cannot represent."""
        from sona.peft_format import LLAMA, from_peft

        naming = LLAMA if naming is None else naming
        return from_peft(directory, layer=layer, naming=naming, seed=seed, cls=cls)

    def _install(self, state: _Decoded) -> None:
        for m, st in self._modules.items():
            np.copyto(st.a, state.arrays[f"{m.value}.A"])
            np.copyto(st.bt, state.arrays[f"{m.value}.Bt"])
        self.seed = state.seed
        self._key = np.uint64(self.seed & 0xFFFFFFFFFFFFFFFF)
        self._baseline.load(state.baseline)
        self._dropout_counter = state.dropout_counter
        self.version = state.version
        self.clear_gradients()
        self._explored.clear()

    # ------------------------------------------------------------------ combining adapters
    @staticmethod
    def merge_adapters(
        adapters: Sequence[tuple[MicroLoRA, float]], *, rank: int | None = None
    ) -> MicroLoRA:
        """An adapter whose delta_weight is Σ wᵢ·delta_weightᵢ.

        Exact when ``rank`` is None: the ranks are concatenated (A stacked, each B scaled by its
        weight and scale), never A and B averaged separately, which would add cross terms. With
        ``rank``, the best rank-``rank`` approximation of the exact sum (truncated SVD).
        """
        from sona.merge import merge_adapters

        return merge_adapters(adapters, rank=rank)

    @staticmethod
    def compose_sequential(adapters: Sequence[MicroLoRA]) -> ComposedAdapter:
        """x → x + Δ₁(x) → x + Δ₁(x) + Δ₂(x + Δ₁(x)) → …; requires in == out."""
        return ComposedAdapter(adapters, "sequential")

    @staticmethod
    def compose_parallel(adapters: Sequence[MicroLoRA]) -> ComposedAdapter:
        """The mean of the adapters' deltas."""
        return ComposedAdapter(adapters, "parallel")

    # ------------------------------------------------------------------ helpers
    def _state(self, module: object) -> _Module:
        m = TargetModule.parse(module)
        st = self._modules.get(m)
        if st is None:
            targets = ", ".join(t.value for t in self._modules)
            raise UnknownModuleError(
                f"module {m.value!r} is not targeted by this adapter ({targets})"
            )
        return st


class ComposedAdapter:
    """Several adapters applied in sequence or in parallel (see ``MicroLoRA.compose_*``).

    It holds the adapters themselves, not copies, so it is a live view: what they learn after
    the composition is made shows in its ``forward``. Compose clones (``MicroLoRA.clone``) to
    keep a snapshot.
    """

    def __init__(self, adapters: Sequence[MicroLoRA], mode: str) -> None:
        items: list[MicroLoRA] = as_list(adapters, "adapters", "MicroLoRA instances")
        if not items:
            raise InvalidInputError("adapters must not be empty")
        for a in items:
            if not isinstance(a, MicroLoRA):
                raise TypeError(f"adapters must be MicroLoRA instances, got {type(a).__name__}")
        c0 = items[0].config
        if any(
            (a.config.in_features, a.config.out_features) != (c0.in_features, c0.out_features)
            for a in items
        ):
            raise InvalidInputError("composed adapters must share in_features and out_features")
        if mode == "sequential" and c0.in_features != c0.out_features:
            raise InvalidInputError("sequential composition needs in_features == out_features")
        if mode not in ("sequential", "parallel"):
            raise InvalidInputError(f"unknown composition mode {mode!r}")
        self.adapters = tuple(items)
        self.mode = mode

    def forward(self, x: Any, module: TargetModule) -> np.ndarray:
        """The total delta the composition adds to x's base output.

        Each adapter keeps its own delta_weight within float32, but not ΔW·x for every finite
        x, nor a sum of deltas or the input x + Δ(x) a sequence hands on: any of them reaching
        inf raises an InvalidInputError saying so, instead of returning inf or blaming x for
        NaN it does not hold.
        """
        x = as_f32(x, "x")
        if self.mode == "parallel":
            total = self.adapters[0].forward(x, module).astype(np.float64)
            for a in self.adapters[1:]:
                total += a.forward(x, module)
            mean = (total / len(self.adapters)).astype(np.float32)
            if not np.isfinite(mean).all():
                raise InvalidInputError(
                    "x is finite but so large that an adapter's delta overflows float32"
                )
            return mean
        total = np.zeros((*x.shape[:-1], self.adapters[0].config.out_features), np.float32)
        cur = x
        with np.errstate(over="ignore", invalid="ignore"):
            for i, a in enumerate(self.adapters):
                try:
                    d = a.forward(cur, module)
                except UnknownModuleError:
                    raise
                except InvalidInputError:
                    if i == 0:
                        raise
                    # cur is finite here: only its hidden value s·A·cur can have overflowed
                    raise InvalidInputError(
                        f"x is finite but the input adapters[{i}] receives (x plus the deltas "
                        "before it) is so large that s·A·x overflows float32"
                    ) from None
                total += d
                cur = x + total
                if not (np.isfinite(total).all() and np.isfinite(cur).all()):
                    raise InvalidInputError(
                        f"x is finite but so large that the composed delta overflows float32 "
                        f"at adapters[{i}]"
                    )
        return total


class _Decoded:
    __slots__ = ("arrays", "baseline", "config", "dropout_counter", "seed", "version")

    def __init__(self, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(self, k, v)

    config: MicroLoraConfig
    arrays: dict[str, np.ndarray]
    seed: int
    version: int
    dropout_counter: int
    baseline: dict[str, float]


def _meta_int(meta: Mapping[str, Any], name: str) -> int:
    """An int field of the metadata in [0, 2**63), the range the adapter itself produces (seeds
    are drawn below 2**63, counters count up from 0). Exact ints only: JSON floats, strings and
    bools would otherwise be truncated or coerced into some other value without a word."""
    value = meta[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {value!r}")
    return value


def _decode(data: bytes, what: str) -> _Decoded:
    meta, arrays = container.decode(data, _MAGIC, _KIND, what=what)
    try:
        config = MicroLoraConfig.from_dict(meta["config"])
        seed = _meta_int(meta, "seed")
        version = _meta_int(meta, "version")
        dropout_counter = _meta_int(meta, "dropout_counter")
        baseline = meta["baseline"]
        if not isinstance(baseline, dict):
            raise ValueError(f"baseline must be an object, got {type(baseline).__name__}")
        probe = RunningBaseline(config.baseline_decay)
        probe.load(baseline)
    except KeyError as exc:
        raise FormatError(f"{what}: invalid adapter metadata: missing field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{what}: invalid adapter metadata: {exc}") from None
    expected = {}
    for m in config.target_modules:
        expected[f"{m.value}.A"] = (config.rank, config.in_features)
        expected[f"{m.value}.Bt"] = (config.rank, config.out_features)
    if set(arrays) != set(expected):
        raise FormatError(f"{what}: tensors {sorted(arrays)} do not match the config's modules")
    for name, shape in expected.items():
        arr = arrays[name]
        if arr.dtype != _F32:
            raise FormatError(f"{what}: tensor {name} has dtype {arr.dtype}, expected float32")
        if arr.shape != shape:
            raise FormatError(f"{what}: tensor {name} has shape {arr.shape}, expected {shape}")
        if not np.isfinite(arr).all():
            raise FormatError(f"{what}: tensor {name} holds NaN or inf")
    for m in config.target_modules:
        a, bt = arrays[f"{m.value}.A"], arrays[f"{m.value}.Bt"]
        check_delta_fits(config.scaling, a, bt, f"{what}: tensors {m.value}.A and {m.value}.Bt")
    return _Decoded(
        config=config,
        arrays=arrays,
        seed=seed,
        version=version,
        dropout_counter=dropout_counter,
        baseline=baseline,
    )
