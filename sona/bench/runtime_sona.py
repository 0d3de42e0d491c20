"""SonaRuntime's own numbers: instant latency through the actors (alone and while a Deep run
replays in a worker thread), sustained accepted throughput under backpressure (with the Deep
loop held off, and firing as configured), and the cost of one Background consolidation.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import numpy as np

from sona.background import BackgroundLoop
from sona.bench.timing import summarize_ns
from sona.config import SonaLlmConfig
from sona.instant import InstantLoop
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.results import LearningStats
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample

Q, V = TargetModule.Q_PROJ, TargetModule.V_PROJ


def _config(dim: int, modules: tuple[TargetModule, ...], **kw: Any) -> SonaLlmConfig:
    micro = MicroLoraConfig.for_hidden_dim(dim, rank=2, target_modules=modules)
    return SonaLlmConfig(micro_lora=micro, **kw)


def _samples(dim: int, n: int, seed: int = 0) -> list[TrainingSample]:
    """Rated samples with distinct unit inputs, built before timing starts."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = (0.1 * rng.standard_normal((n, dim))).astype(np.float32)
    q = rng.uniform(0.3, 1.0, n)
    return [TrainingSample(x[i], y[i], float(q[i])) for i in range(n)]


async def _latency(dim: int, n: int, with_deep: bool) -> dict[str, Any]:
    """``instant_adapt`` timed end to end (sample built from the embeddings, accepted, handled,
    result back), in steady state: first the replay buffer is filled through the same path, so
    every kept sample is a copy the runtime owns and evicting one frees memory for the next.
    Warming up with shared samples instead would keep the evicted ones alive and charge every
    timed call for fresh pages.

    With Deep running, timing starts once a first Deep run has completed under traffic. A run
    keeps the replay buffer's samples alive until it ends, so while the first one runs the
    samples it evicts cannot be reused and new ones take fresh pages (measured: half the
    requests fault, p50 ~34 µs); from the second run on, the memory the first one released
    serves them."""
    cfg = _config(dim, (Q,), deep_trigger_threshold=1e12)
    pool = _samples(dim, 4096)
    warm = cfg.replay_capacity + 2000
    async with SonaRuntime(cfg, seed=0) as rt:
        for i in range(warm):
            s = pool[i % len(pool)]
            await rt.instant_adapt(s.input_embedding, s.output_embedding, s.quality)
        await rt.consolidate()
        started = finished = 0
        lat = np.empty(n, np.int64)
        async with anyio.create_task_group() as tg:
            if with_deep:

                async def deep_forever() -> None:
                    nonlocal started, finished
                    while True:
                        started += 1
                        await rt.deep_optimize()
                        finished += 1

                tg.start_soon(deep_forever)
                while finished == 0:
                    s = pool[warm % len(pool)]
                    warm += 1
                    await rt.instant_adapt(s.input_embedding, s.output_embedding, s.quality)
            # with Deep: at least n requests, and until a run started while timing has ended
            first_timed = started + 1
            done_before = finished
            before = rt.stats()
            clock = time.perf_counter_ns
            i = 0
            while i < n or (with_deep and finished < first_timed):
                s = pool[(warm + i) % len(pool)]
                t0 = clock()
                await rt.instant_adapt(s.input_embedding, s.output_embedding, s.quality)
                t1 = clock()
                if i == len(lat):
                    lat = np.concatenate([lat, np.empty(n, np.int64)])
                lat[i] = t1 - t0
                i += 1
            lat = lat[:i]
            after = rt.stats()
            deep_runs = started - done_before  # runs in flight at some point while timing
            tg.cancel_scope.cancel()
    t = summarize_ns(lat)
    handler_us, handled = handler_average(before, after)
    case = "instant_adapt, deep running" if with_deep else "instant_adapt"
    return {
        "case": case,
        "dim": dim,
        "modules": 1,
        "p50_us": t.median_us,
        "p99_us": t.p99_us,
        "samples_per_s": float("nan"),
        "handler_avg_us": handler_us,
        "deep_runs": deep_runs,
        "max_pending": float("nan"),
        "handler_samples": handled,
        "timed_samples": len(lat),
    }


def handler_average(before: LearningStats, after: LearningStats) -> tuple[float, int]:
    """The Instant handler's mean time (µs) over the samples applied between two ``stats()``
    snapshots, and how many those were. ``instant_avg_latency_us`` averages over every sample
    since start, the ~12,000 warm-up requests of a latency case included; the totals behind
    it (mean × count) difference out to the timed requests alone."""
    handled = after.instant_count - before.instant_count
    if handled <= 0:
        return float("nan"), 0
    total = (
        after.instant_avg_latency_us * after.instant_count
        - before.instant_avg_latency_us * before.instant_count
    )
    return total / handled, handled


async def _throughput(
    dim: int, modules: tuple[TargetModule, ...], seconds: float, *, deep: bool = False
) -> dict[str, Any]:
    """Producers submit as fast as BLOCK backpressure lets them for ``seconds``.

    With ``deep`` the Deep loop fires as the default ``deep_trigger_threshold`` has it: at
    this rate that is back to back, a third busy thread on the machine, as in a deployment
    with default settings under full load; without, it never fires."""
    bound = 1000
    trigger = {} if deep else {"deep_trigger_threshold": 1e12}
    cfg = _config(dim, modules, max_pending_samples=bound, **trigger)
    pool = _samples(dim, 4096, seed=1)
    accepted = 0
    max_pending = 0
    async with SonaRuntime(cfg, seed=1) as rt:
        stop = time.perf_counter() + seconds

        async def producer(offset: int) -> None:
            nonlocal accepted
            i = offset
            while time.perf_counter() < stop:
                await rt.submit(pool[i % len(pool)])
                accepted += 1
                i += 7

        async def watch() -> None:
            nonlocal max_pending
            while time.perf_counter() < stop:
                max_pending = max(max_pending, rt.stats().pending_samples)
                await anyio.sleep(0.01)

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for k in range(8):
                tg.start_soon(producer, k)
            tg.start_soon(watch)
        elapsed = time.perf_counter() - t0
        st = rt.stats()
    deep_label = "Deep on" if deep else "Deep off"
    return {
        "case": f"sustained submit, {deep_label} ({elapsed:.3g} s, bound {bound})",
        "dim": dim,
        "modules": len(modules),
        "p50_us": float("nan"),
        "p99_us": float("nan"),
        "samples_per_s": accepted / elapsed,
        "handler_avg_us": st.instant_avg_latency_us,
        "deep_runs": st.deep_count,
        "max_pending": max_pending,
        "handler_samples": st.instant_count,
    }


def _consolidation(dim: int, n: int, repeats: int = 5) -> list[dict[str, Any]]:
    """Background runs over ``n`` handed-over samples (the loop logic, no actors).

    The first run of a task also learns the boundary detector's reference subspace; later runs
    are the steady state. Both are reported.
    """
    cfg = _config(dim, (Q,))
    first: list[int] = []
    steady: list[int] = []
    for r in range(repeats):
        bg = BackgroundLoop(cfg, seed=r)
        inst = InstantLoop(cfg, seed=r, consolidated=lambda bg=bg: bg.published)  # type: ignore[misc]
        batches = _samples(dim, 2 * n, seed=10 + r)
        for k, times in ((0, first), (1, steady)):
            for i, s in enumerate(batches[k * n : (k + 1) * n]):
                inst.process(k * n + i, s)
            hand = inst.hand_over()
            t0 = time.perf_counter_ns()
            bg.consolidate(hand)
            times.append(time.perf_counter_ns() - t0)
    rows = []
    for label, times in (("first of a task", first), ("steady state", steady)):
        t = summarize_ns(times)
        rows.append(
            {
                "case": f"background consolidation of {n} samples ({label})",
                "dim": dim,
                "modules": 1,
                "p50_us": t.median_us,
                "p99_us": t.p99_us,
                "samples_per_s": float("nan"),
                "handler_avg_us": float("nan"),
                "deep_runs": 0,
                "max_pending": float("nan"),
                "handler_samples": 0,
            }
        )
    return rows


def bench_sona(
    *, dim: int = 4096, latency_samples: int = 20_000, seconds: float = 60.0, uvloop: bool = False
) -> list[dict[str, Any]]:
    """The rows of the SonaRuntime part; ``uvloop`` runs them on uvloop's event loop (what
    uvicorn and many LLM servers use when it is installed) instead of asyncio's."""

    async def main() -> list[dict[str, Any]]:
        rows = [await _latency(dim, latency_samples, False)]
        rows.append(await _latency(dim, latency_samples, True))
        rows.append(await _throughput(dim, (Q,), seconds))
        rows.append(await _throughput(dim, (Q, V), seconds))
        rows.append(await _throughput(dim, (Q,), seconds, deep=True))
        return rows

    rows: list[dict[str, Any]] = anyio.run(main, backend_options={"use_uvloop": uvloop})
    rows.extend(_consolidation(dim, 1000))
    return rows
