"""In-place weight updates hold the GIL (a reader in another thread never sees half of one), and
so do the vector kernels of the request path (a worker thread must not take the GIL from the
event loop for a switch interval); the others release it (the Deep loop's worker thread leaves
the event loop running)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numba
import numpy as np
import pytest
from sona.kernels import lora, update
from sona.kernels.jit import gil_kernel
from sona.kernels.warmup import warm_up

from sona.config import SonaLlmConfig
from sona.feedback import AdaptFeedback
from sona.instant import InstantLoop
from sona.lora_config import MicroLoraConfig, TargetModule

Q = TargetModule.Q_PROJ

N = 8_000_000  # one call takes long enough for the other thread to try many times


def _progress_during(call: Callable[[], object]) -> int:
    """How often another Python thread ran while ``call`` was computing.

    The window is the call's own duration measured alone: after a GIL-holding call returns,
    the waiting thread takes the GIL at once, so the time until the caller can read the clock
    again is not part of the call.
    """
    alone = []
    for _ in range(3):
        t = time.perf_counter()
        call()
        alone.append(time.perf_counter() - t)
    duration = min(alone)
    stop = threading.Event()
    stamps: list[float] = []

    def spin() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.01)
    t0 = time.perf_counter()
    call()
    stop.set()
    t.join()
    # The middle of the fastest call's duration: even a measured call 40 % faster than that
    # still covers the window, so no stamp taken after it returned can fall inside.
    return sum(1 for s in stamps if t0 + 0.2 * duration < s < t0 + 0.6 * duration)


def _seen(call: Callable[[], object], *, holds_gil: bool, attempts: int = 20) -> bool:
    """Whether ``call`` holds the GIL (the other thread never runs in the window) or releases
    it (the other thread runs in at least one of ``attempts`` windows: on a loaded machine it
    may get no core during several of them; seen with three). A kernel that holds it never
    lets the other thread in, so one window in which it ran proves a release."""
    if holds_gil:
        return _progress_during(call) == 0
    return any(_progress_during(call) > 0 for _ in range(attempts))


def test_update_and_request_path_kernels_hold_the_gil_and_the_others_release_it() -> None:
    warm_up()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, N), dtype=np.float32)
    bt = rng.standard_normal((2, N), dtype=np.float32)
    x = rng.standard_normal(N, dtype=np.float32)
    g = rng.standard_normal(N, dtype=np.float32)
    h = np.ones(2, np.float32)
    u = np.ones(2, np.float32)
    out = np.full(N, 1.0, np.float32)  # touched now: no page faults in a timed call

    def apply() -> None:  # one call: the GIL may change hands between calls
        lora.apply_rank_one(a, bt, x, h, u, g, 1e-6)

    def forward() -> None:
        lora.forward_into(a, bt, 0.5, x, out)

    def vector_check() -> None:
        update.vec_all_finite(x)
        update.vec_sq_norm_finite(x)
        update.vectors_equal(x, x)

    def check() -> None:
        update.all_finite(a)

    assert _seen(apply, holds_gil=True)
    assert _seen(forward, holds_gil=True)
    assert _seen(vector_check, holds_gil=True)
    assert _seen(check, holds_gil=False)


def test_held_twins_hold_the_gil_their_originals_release_it() -> None:
    """``MicroLoRA.step``'s single-module step writes the adapter in place, and a live
    adapter's batch forward reads one that the event loop writes: both must hold the GIL,
    while the originals, which worker threads run on private copies, release it."""
    warm_up()
    rng = np.random.default_rng(1)
    a = 1e-3 * rng.standard_normal((2, N), dtype=np.float32)
    bt = 1e-3 * rng.standard_normal((2, N), dtype=np.float32)
    x = rng.standard_normal(N, dtype=np.float32) / np.float32(np.sqrt(N))
    vec = rng.standard_normal(N, dtype=np.float32)
    h, u, g, sums = np.zeros(2, np.float32), np.zeros(2, np.float32), np.zeros_like(x), np.zeros(8)
    xs = np.ascontiguousarray(np.stack([x, x]))
    hb, outb = np.zeros((2, 2), np.float32), np.zeros((2, N), np.float32)
    step_args = (a, bt, 1.0, x, vec, 1.0, lora.MODE_REGRESS, 1e-9, 1.0, h, u, g, sums)

    assert _seen(lambda: lora.step_one_held(*step_args), holds_gil=True)
    assert _seen(lambda: lora.step_one(*step_args), holds_gil=False)
    assert _seen(lambda: lora.forward_batch_held(a, bt, 1.0, xs, hb, outb, False), holds_gil=True)
    assert _seen(lambda: lora.forward_batch(a, bt, 1.0, xs, hb, outb, False), holds_gil=False)


def test_gil_kernels_cannot_allocate() -> None:
    """Compiled without Numba's runtime: an allocation on the request path is a compile error."""

    def allocates(n: int) -> float:
        return float(np.zeros(n).sum())

    with pytest.raises(numba.core.errors.TypingError, match="zeros"):
        gil_kernel(allocates)(3)


def test_a_live_adapter_is_stepped_and_read_in_batches_holding_the_gil() -> None:
    """End to end, through ``MicroLoRA``: the Instant loop's adapter (``written_in_place``)
    reads a batch holding the GIL, and ``step`` on one module (rank 4 takes ``step_one``)
    always holds it; a snapshot handed over for consolidation reads without it."""
    width = 1 << 20  # the widest MicroLoRA: each call lasts long enough to be seen
    config = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(width, rank=4, target_modules=(Q,))
    )
    loop = InstantLoop(config, seed=0)
    live = loop.live
    rng = np.random.default_rng(2)
    x = rng.standard_normal(width, dtype=np.float32) / np.float32(1024.0)
    xs = np.ascontiguousarray(np.stack([x] * 8))
    target = AdaptFeedback.from_quality(1.0).with_target(rng.standard_normal(width))
    assert live.written_in_place
    assert _seen(lambda: live.step(x, target, 0.01, module=Q), holds_gil=True)
    assert _seen(lambda: live.forward(xs, Q), holds_gil=True)
    snapshot = loop.hand_over().live
    assert not snapshot.written_in_place
    assert _seen(lambda: snapshot.forward(xs, Q), holds_gil=False)
