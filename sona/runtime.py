"""``SonaRuntime``: the three loops as supervised async actors inside the host's event loop.

- **instant** owns the live adapter: it learns from each accepted sample and answers the caller.
  While it is idle, a sample is handled in the submitting task itself (``call_inline``): same
  order, same crash semantics, without the two task switches of a mailbox hop, and without the
  message and ticket a queued sample needs.
- **background** owns the consolidated state: every ``background_interval_ms``, and at once when
  pending samples come within a quarter of ``max_pending_samples``, it takes the live adapter and
  the samples behind it (a hand-over), consolidates in a worker thread and publishes the result
  by swapping one reference.
- **deep** replays kept samples on copies in a worker thread (GIL-releasing kernels, short
  Python steps) and hands a replacement back to background.

Ingress applies ``max_pending_samples`` (accepted but not yet consolidated) with the configured
overflow policy. Every accepted sample ends as exactly one of applied, skipped, dropped or
dead-lettered, and until then it is in flight; ``stats()`` keeps the identities at all times.
If the supervisor gives up, nothing is raised into the host's tasks: ``forward`` keeps serving
the last published adapters and ``submit`` raises :class:`SupervisorGaveUp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import numpy as np

from sona.actors import (
    DECLINED,
    Actor,
    ActorRef,
    Backoff,
    Backpressure,
    EventBus,
    OverflowPolicy,
    SamplesDropped,
    Subscription,
    Supervisor,
    SupervisorGaveUp,
    SupervisorGaveUpEvent,
)
from sona.background import BackgroundLoop, Consolidation
from sona.checkpoint import CaptureState, SampleIds
from sona.config import Chaos, SonaLlmConfig
from sona.deep import DeepJob, DeepOutcome, run_deep, snapshot
from sona.durability import Durability, RestoreInfo, restore_runtime
from sona.embedding import Embedder
from sona.events import (
    BackgroundCompleted,
    DeepCompleted,
    InstantApplied,
    InstantSkipped,
    TaskBoundary,
    UpdateRejected,
)
from sona.feedback import AdaptFeedback
from sona.ingest import SampleFactory
from sona.instant import HandOver, InstantLoop, InstantOutcome
from sona.log import get_logger
from sona.lora_config import TargetModule
from sona.messages import (
    DeepSnapshot,
    HandOverRequest,
    InstallDeep,
    NewTask,
    Process,
    RunDeep,
    Tick,
)
from sona.results import AdaptationResult, BackgroundResult, DeepResult, LearningStats
from sona.sample import TrainingSample
from sona.validation import RUN_SEED_BITS, as_f32, check_seed
from sona.worker_threads import LoopThread, find_blas, release_free_memory, single_blas

_thread_id = threading.get_ident
_running_loop = asyncio._get_running_loop  # None outside a running loop, without raising
_log = get_logger("sona.runtime")

# Samples handled inline per turn of the event loop before submit() yields anyway, like tokio's
# cooperative budget: producers that never wait would otherwise starve every other task, the
# Background loop's included. The budget is shared by all submitters, so a turn stays short
# however many there are; sending the Background loop work spends it at once.
_INLINE_BUDGET = 128
# How long a submitter's turn lasts at a full buffer while a consolidation runs in its worker
# thread (see SonaRuntime._next_turn)
_WORKER_TURN_S = 0.001


class InjectedCrash(RuntimeError):
    """Raised by fault injection (``Chaos``) inside a loop's handler."""


class Ticket:
    """One accepted sample's way back to its caller.

    On asyncio it waits on a bare future (a fraction of the cost of an ``anyio.Event``, which
    matters on a path budgeted in microseconds); on other backends on an ``anyio.Event``. Either
    is made only when a caller has to wait: a sample handled inline is settled before anyone
    asks. Tickets are settled on the event loop's thread.
    """

    __slots__ = (
        "done",
        "error",
        "event",
        "future",
        "loop",
        "module",
        "result",
        "sample",
        "sample_id",
    )

    def __init__(
        self,
        sample_id: int,
        loop: asyncio.AbstractEventLoop | None,
        sample: TrainingSample | None = None,
        module: TargetModule | None = None,
    ) -> None:
        self.sample_id = sample_id
        self.sample = sample  # kept until handled: checkpoints store accepted, unhandled samples
        self.module = module
        self.loop = loop
        self.future: asyncio.Future[None] | None = None
        self.event: anyio.Event | None = None
        self.result: AdaptationResult | None = None
        self.error: BaseException | None = None
        self.done = False

    async def wait(self) -> AdaptationResult:
        if not self.done:
            if self.loop is not None:
                if self.future is None:
                    self.future = self.loop.create_future()
                await self.future
            else:
                if self.event is None:
                    self.event = anyio.Event()
                await self.event.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def _wake(self) -> None:
        self.done = True
        future = self.future
        if future is not None:
            if not future.done():
                future.set_result(None)
        elif self.event is not None:
            self.event.set()

    def resolve(self, result: AdaptationResult) -> None:
        self.result = result
        self._wake()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake()


def _unhandled(sample_id: int, note: str) -> AdaptationResult:
    """The answer to a caller whose sample the Instant loop did not (and will not) handle."""
    return AdaptationResult(
        applied=False, loop="instant", latency_us=0.0, notes=[note], sample_id=sample_id
    )


class SonaRuntime:
    """The SONA engine as supervised actors; use as ``async with SonaRuntime(cfg) as rt``."""

    def __init__(
        self,
        config: SonaLlmConfig | None = None,
        *,
        embedder: Embedder | None = None,
        seed: int | None = None,
        checkpoint_dir: Any = None,
        chaos: Chaos | None = None,
    ) -> None:
        self.config = config if config is not None else SonaLlmConfig()
        if not isinstance(self.config, SonaLlmConfig):
            raise TypeError(f"config must be a SonaLlmConfig, got {type(config).__name__}")
        if chaos is not None and not isinstance(chaos, Chaos):
            raise TypeError(f"chaos must be a Chaos or None, got {type(chaos).__name__}")
        checked = check_seed(seed, bits=RUN_SEED_BITS)
        self.seed = checked if checked is not None else secrets.randbits(RUN_SEED_BITS)
        self._factory = SampleFactory(self.config, embedder)
        self.checkpoint_dir = checkpoint_dir
        self._durable = Durability(self, checkpoint_dir)  # checkpoints, sample log, replay
        self.restored: RestoreInfo | None = None  # set by restore()
        self._chaos = chaos
        self._chaos_rng = random.Random(chaos.seed if chaos is not None else None)
        self._background = BackgroundLoop(self.config, seed=self.seed + 1)
        self._instant = InstantLoop(
            self.config, seed=self.seed, consolidated=lambda: self._background.published
        )
        sup = self.config.supervision
        self.events = EventBus()
        self._supervisor = Supervisor(
            max_restarts=sup.max_restarts,
            within_s=sup.within_s,
            backoff=Backoff(min_s=sup.backoff_min_s, max_s=sup.backoff_max_s, jitter=sup.jitter),
            shutdown_timeout_s=sup.shutdown_timeout_s,
            events=self.events,
            raise_on_give_up=False,
            name="sona",
            seed=self.seed,
        )
        self._ids = SampleIds(1)
        bound = self.config.max_pending_samples
        self._pressure = max(self.config.background_min_samples, bound - bound // 4)
        self._queued: OrderedDict[int, Ticket] = OrderedDict()  # accepted, not yet handled
        self._pending = 0  # accepted and not yet consolidated, evicted, dropped or skipped
        self._inline_budget = _INLINE_BUDGET
        self._inline_turn = 0
        self._room: anyio.Event | None = None  # created only while a submitter waits
        self._idle: anyio.Event | None = None  # created only while drain() waits
        # threads of the loops' own, never slots of the host's default thread limiter
        self._background_thread = LoopThread("sona-background")
        self._deep_thread = LoopThread("sona-deep")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._thread = 0  # the event loop's thread, the only one that may change the state
        self._new_task_queued = False
        self.submitted = 0
        self.dropped = 0
        self.dead_lettered = 0
        self.deep_runs = 0
        self._deep_requested = False
        # quality a Deep run took when it started, until its result is installed: a checkpoint
        # taken meanwhile stores it as still accumulated, so a restore runs it again
        self._deep_taken = 0.0
        # odd while the hand-over or its commit is changing what forward reads; counts changes
        self._view = 0
        self._last_background = time.monotonic()
        self._stack: contextlib.AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._started = False
        self._stopped = False
        self._instant_ref: ActorRef | None = None
        self._background_ref: ActorRef | None = None
        self._deep_ref: ActorRef | None = None

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> SonaRuntime:
        if self._started:
            raise RuntimeError("a SonaRuntime can only be started once")
        self._started = True
        self._loop = _asyncio_loop()
        self._token = anyio.lowlevel.current_token()
        self._thread = _thread_id()
        find_blas()
        await self._durable.open()  # checkpoint_dir: lock, sample log, first checkpoint
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            sup = self._supervisor
            margin = 64
            self._instant_ref = sup.spawn(
                lambda: _InstantActor(self),
                name="instant",
                mailbox_size=self.config.max_pending_samples + margin,
                on_dead_letter=self._instant_dead_letter,
            )
            self._background_ref = sup.spawn(
                lambda: _BackgroundActor(self), name="background", mailbox_size=64
            )
            self._deep_ref = sup.spawn(
                lambda: _DeepActor(self),
                name="deep",
                mailbox_size=16,
                on_dead_letter=self._deep_dead_letter,
            )
            await stack.enter_async_context(sup)
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            watcher = self.events.subscribe(buffer=16, kinds=(SupervisorGaveUpEvent,))
            await stack.enter_async_context(watcher)
            self._tg = tg
            tg.start_soon(self._ticker)
            tg.start_soon(self._watch_give_up, watcher)
            self._durable.start(tg)  # sample-log writer, periodic checkpoints
            await self._durable.replay()  # restored samples go first, in id order
        except BaseException:
            await stack.__aexit__(None, None, None)
            await self._durable.abort()
            raise
        self._stack = stack
        _log.info("runtime_started", seed=self.seed)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Graceful stop: drain accepted samples, let the supervisor drain and stop the loops.

        A host that cancels meanwhile (its own shutdown timeout, say) cuts the drain short, but
        the loops are still stopped in this task, the final checkpoint is still written and the
        directory released, and the cancellation then goes on."""
        stack = self._stack
        if stack is None:
            return
        self._stack = None
        # the loops' mailboxes then drain in what is left of the same budget
        budget = self.config.supervision.shutdown_timeout_s
        deadline = time.monotonic() + budget
        try:
            if exc_type is None and not self._supervisor.gave_up:
                with anyio.move_on_after(budget):
                    await self.drain()
        except BaseException as error:
            self._supervisor.shorten_drain(deadline - time.monotonic())
            await self._stop(stack, type(error), error, error.__traceback__)
            raise
        self._supervisor.shorten_drain(deadline - time.monotonic())
        await self._stop(stack, exc_type, exc, tb)

    async def _stop(
        self,
        stack: contextlib.AsyncExitStack,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopped = True
        try:
            try:
                await stack.__aexit__(exc_type, exc, tb)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._durable.close(raise_errors=False)
                raise
            with anyio.CancelScope(shield=True):
                await self._durable.close(raise_errors=exc_type is None)  # the final checkpoint
        finally:
            self._background_thread.close()
            self._deep_thread.close()
            self._settle_at_stop()
            self.events.close()  # every subscription ends once it has read what is buffered
        _log.info("runtime_stopped", gave_up=self._supervisor.gave_up)

    def _settle_at_stop(self) -> None:
        """Answer every caller still waiting once the loops have stopped (the drain timed out,
        the host cancelled, the body raised): nobody waits forever on a stopped runtime.

        Samples accepted and not handled are, without a checkpoint_dir, dropped (counted and
        announced); with one, the final checkpoint stores them as queued, so they stay in
        flight here and a restored runtime handles them. Submitters waiting for room get the
        not-running error."""
        if self._durable.dir is None:
            note = "dropped: the runtime stopped before handling it"
            self._drop_queued("shutdown", lambda t: t.resolve(_unhandled(t.sample_id, note)))
            return
        note = (
            "not handled before the runtime stopped: the final checkpoint keeps it as queued, "
            "and a runtime restored from checkpoint_dir handles it"
        )
        for t in self._queued.values():
            if not t.done:
                t.resolve(_unhandled(t.sample_id, note))
        self._signal()
        if self._idle is not None:  # they stay queued, so _signal cannot wake a drain()
            self._idle.set()
            self._idle = None

    async def _ticker(self) -> None:
        interval = self.config.background_interval_ms / 1e3
        ref = self._background_ref
        assert ref is not None
        while True:
            await anyio.sleep(interval)
            if ref.qsize() == 0 and not self._supervisor.gave_up:
                with contextlib.suppress(Exception):
                    ref.tell_nowait(Tick())

    async def _watch_give_up(self, sub: Subscription) -> None:
        async for event in sub:
            if isinstance(event, SupervisorGaveUpEvent):
                self._drop_queued(
                    "gave_up", functools.partial(Ticket.fail, error=self._gave_up_error())
                )
                return

    def _gave_up_error(self) -> SupervisorGaveUp:
        cause = self._supervisor.cause
        if cause is not None:
            return cause.copy()
        return SupervisorGaveUp("the supervisor gave up: the learning loops are stopped")

    def _drop_queued(self, stage: str, answer: Callable[[Ticket], None]) -> None:
        """Samples accepted that nobody will handle any more (after a give-up, or at stop
        without a checkpoint_dir): dropped, counted and announced, each caller answered."""
        tickets = list(self._queued.values())
        self._queued.clear()
        for t in tickets:
            self.dropped += 1
            self._pending -= 1
            answer(t)
        if tickets:
            self.events.publish(SamplesDropped(count=len(tickets), stage=stage, policy=""))
        self._signal()

    def _check_running(self) -> None:
        if self._supervisor.gave_up:
            raise self._gave_up_error()
        if not self._started or self._stack is None or self._stopped:
            raise RuntimeError("SonaRuntime is not running: use `async with SonaRuntime(...)`")
        self._check_thread()

    def _check_thread(self) -> None:
        if _thread_id() != self._thread:  # its state is the event loop's, unlocked
            raise RuntimeError(
                "SonaRuntime was called from another thread than its event loop's: from a "
                "worker thread use asyncio.run_coroutine_threadsafe(rt.submit(sample), loop) "
                "(or anyio.from_thread.run(rt.submit, sample) in a thread anyio started)"
            )
        running = _running_loop()
        if running is not None and self._loop is not None and running is not self._loop:
            # its tickets and events belong to the loop it started in: awaited here they
            # fail, or wait for ever
            raise RuntimeError(
                "SonaRuntime was called from another event loop than the one it started in "
                "(leave `async with SonaRuntime(...)` before that loop ends)"
            )

    # ------------------------------------------------------------------ ingress
    async def instant_adapt(self, query: Any, response: Any, quality: float) -> AdaptationResult:
        """Learn from a rated (query, response) pair: text or embeddings."""
        sample = self._factory.rated(query, response, quality)
        self._check_running()
        return await self._submit_checked(sample, None)

    async def adapt(
        self, x: Any, feedback: AdaptFeedback, module: TargetModule | None = None
    ) -> AdaptationResult:
        """Learn from explicit feedback on input ``x``."""
        return await self.submit(self._factory.with_feedback(x, feedback), module=module)

    async def submit(
        self, sample: TrainingSample, *, module: TargetModule | None = None
    ) -> AdaptationResult:
        """Returns once the Instant loop has handled the sample: an idle loop handles it in
        this task, without a task switch (submitters yield once per 128 such samples, or
        samples dropped or refused at a full buffer); a busy one takes it from its mailbox.
        Ingress applies ``overflow`` first."""
        self._check_running()
        sample = self._factory.check(sample, module)
        return await self._submit_checked(sample, sample.module)

    async def _submit_checked(
        self, sample: TrainingSample, module: TargetModule | None
    ) -> AdaptationResult:
        """Ingress for a valid sample, once the caller checked that the runtime runs."""
        policy = self.config.overflow
        answer: AdaptationResult | None = None
        full = False
        while self._pending >= self.config.max_pending_samples:
            if policy is OverflowPolicy.BLOCK:
                await self._wait_for_room()
                self._check_running()
                continue
            full = True
            try:
                answer = self._overflow(policy)  # the sample's result if it was dropped
            except Backpressure:  # REJECT: refused here, so it spends the budget too
                if self._inline_budget:
                    self._inline_budget -= 1
                else:
                    await self._next_turn(full)
                raise
            break
        if answer is None:
            handled = self._accept(sample, module)
            if not isinstance(handled, AdaptationResult):  # queued, logged first, or crashed
                return await handled.wait()
            answer = handled
        # answered in this task, handled or dropped: no task switch happened. A producer
        # that never waits must still let the event loop run, or nothing ever makes room.
        if self._inline_budget:
            self._inline_budget -= 1
        else:
            await self._next_turn(full)
        return answer

    async def _next_turn(self, full: bool) -> None:
        """The budget is spent: every submitter answered in its own task yields; the first
        back, a turn later, refills it.

        At a full buffer while a consolidation runs in its worker thread, the turn lasts
        ``_WORKER_TURN_S`` instead: the worker takes the GIL only when this thread gives it
        up, and a checkpoint gives it up for an instant, which the worker seldom catches
        before this thread takes it back. Producers that never wait for anything else then
        kept the consolidation, and so any room, off for seconds (measured: 0.25 to over 12 s
        per consolidation while one producer kept submitting into a full DROP_NEWEST buffer)."""
        turn = self._inline_turn
        if full and self._instant.unfinished is not None:
            await anyio.sleep(_WORKER_TURN_S)
        else:
            await anyio.lowlevel.checkpoint()
        if self._inline_turn == turn:
            self._inline_turn = turn + 1
            self._inline_budget = _INLINE_BUDGET

    def submit_nowait(self, sample: TrainingSample, *, module: TargetModule | None = None) -> None:
        """Accept without waiting for the Instant loop (an idle one handles the sample right
        here); raises Backpressure under BLOCK and REJECT when full, never under DROP_*."""
        self._check_running()
        sample = self._factory.check(sample, module)
        module = sample.module
        policy = self.config.overflow
        if self._pending >= self.config.max_pending_samples:
            if policy in (OverflowPolicy.BLOCK, OverflowPolicy.REJECT):
                raise Backpressure(
                    f"pending buffer full ({self.config.max_pending_samples} samples)"
                )
            if self._overflow(policy) is not None:
                return
        self._accept(sample, module)

    def _overflow(self, policy: OverflowPolicy) -> AdaptationResult | None:
        """REJECT raises; DROP_NEWEST returns the dropped result; DROP_OLDEST makes room, or
        returns the dropped result when there is nothing it may drop (see below)."""
        if policy is OverflowPolicy.REJECT:
            raise Backpressure(
                f"pending buffer full ({self.config.max_pending_samples} samples); "
                "the Background loop has not caught up"
            )
        if policy is OverflowPolicy.DROP_NEWEST:
            return self._drop_incoming(policy, "dropped: pending buffer full (DROP_NEWEST)")
        # DROP_OLDEST: the oldest sample not yet handled, else the oldest awaiting consolidation
        if self._queued:
            sid, victim = self._queued.popitem(last=False)
            ref = self._instant_ref
            if ref is not None:  # its message too, or dropped samples fill the mailbox
                ref.withdraw(lambda m: type(m) is Process and m.sample_id == sid)
            self.dropped += 1
            self._pending -= 1
            victim.resolve(
                _unhandled(
                    victim.sample_id,
                    "dropped: pending buffer full (DROP_OLDEST) before it was handled",
                )
            )
            self._durable.settled(victim.sample_id, "dropped")
            self.events.publish(SamplesDropped(count=1, stage="ingress", policy=policy.name))
            self._check_idle()
        elif self._instant.evict_oldest() is not None:
            self._pending -= 1
            self.events.publish(SamplesDropped(count=1, stage="consolidation", policy=policy.name))
        else:  # every pending sample is in a consolidation under way: the bound still holds
            return self._drop_incoming(
                policy,
                "dropped: pending buffer full (DROP_OLDEST) and every pending sample is in a "
                "consolidation under way, where none can be evicted",
            )
        return None

    def _drop_incoming(self, policy: OverflowPolicy, note: str) -> AdaptationResult:
        sid = next(self._ids)
        self.submitted += 1
        self.dropped += 1
        # with a sample log, recorded too: a restore counts it (and never reuses its id)
        self._durable.settled(sid, "dropped")
        self.events.publish(SamplesDropped(count=1, stage="ingress", policy=policy.name))
        return _unhandled(sid, note)

    def _accept(
        self, sample: TrainingSample, module: TargetModule | None
    ) -> Ticket | AdaptationResult:
        """Count the sample in and deliver it: handled right here when the Instant loop is idle
        (its result), queued otherwise, or, with a sample log, delivered once committed (a
        ticket to follow it by).

        Handled here, a sample needs no ticket and no message (``call_inline``): building
        them, filing and settling the ticket and dispatching the message took ~0.5 µs of a
        ~10.2 µs submit (width 4096, one module, samples in cache). A crash builds both then,
        and the message takes the loop's usual crash path (:meth:`_crashed_here`)."""
        sid = next(self._ids)
        ref = self._instant_ref
        assert ref is not None
        if self._durable.writer is None:
            handled = ref.call_inline(self._handle_here, (sid, sample, module), self._crashed_here)
            if handled is not None:
                return handled
        ticket = Ticket(sid, self._loop, sample, module)
        if self._durable.log_step(ticket):
            self._count_in(sid, ticket)
            return ticket
        self._count_in(sid, ticket)
        try:
            ref.tell_nowait(Process(sid, sample, module, ticket))
        except BaseException:
            if self._queued.pop(sid, None) is not None:  # refused (full or stopped): not in
                self.submitted -= 1
                self._pending -= 1
            raise
        return ticket

    def _count_in(self, sid: int, ticket: Ticket) -> None:
        self.submitted += 1
        self._pending += 1
        self._queued[sid] = ticket

    async def _wait_for_room(self) -> None:
        if self._room is None:
            self._room = anyio.Event()
        await self._room.wait()

    def _signal(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._queued and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def drain(self) -> None:
        """Wait until every accepted sample has been handled by the Instant loop (returns at
        once on a stopped runtime, whose loops handle nothing more)."""
        if self._started and not self._stopped:  # waits on events only its loop sets
            self._check_thread()
        while self._queued and not self._supervisor.gave_up and not self._stopped:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    # ------------------------------------------------------------------ instant (actor side)
    def _chaos_check(self, loop: str) -> None:
        chaos = self._chaos
        if (
            chaos is not None
            and loop in chaos.loops
            and self._chaos_rng.random() < chaos.crash_probability
        ):
            raise InjectedCrash(f"injected crash in the {loop} loop")

    def _handle_process(self, msg: Process) -> None:
        ticket: Ticket = msg.ticket
        if ticket.done:  # dropped (DROP_OLDEST) or failed while it waited in the mailbox
            return
        if self._chaos is not None:
            self._chaos_check("instant")
        ticket.resolve(self._handled(msg.sample_id, msg.sample, msg.module, queued=True))
        self._check_idle()

    def _handle_here(
        self, sid: int, sample: TrainingSample, module: TargetModule | None
    ) -> AdaptationResult:
        """What :meth:`_handle_process` does, for a sample handled in its submitter's task
        without a ticket (``call_inline``); it is counted in here, so a crash finds it counted
        (:meth:`_crashed_here`)."""
        self.submitted += 1
        self._pending += 1
        if self._chaos is not None:
            self._chaos_check("instant")
        return self._handled(sid, sample, module, queued=False)

    def _crashed_here(
        self, sid: int, sample: TrainingSample, module: TargetModule | None
    ) -> tuple[Process, Ticket]:
        """The message and ticket of a sample whose handling in its submitter's task raised:
        the ticket is filed as if the sample had been queued, and the message is retried by
        the Instant loop's own task (or dead-lettered), which settles the ticket."""
        ticket = Ticket(sid, self._loop, sample, module)
        self._queued[sid] = ticket
        return Process(sid, sample, module, ticket), ticket

    def _handled(
        self, sid: int, sample: TrainingSample, module: TargetModule | None, *, queued: bool
    ) -> AdaptationResult:
        """The Instant loop's handling of one counted-in sample; ``queued``: it has a ticket
        in ``_queued``, which it leaves once handled."""
        out = self._instant.process(sid, sample, module)
        if queued:
            self._queued.pop(sid, None)
        if out.applied:
            if self._pending >= self._pressure:
                self._consolidate_early()
            if self.events.wants(InstantApplied):  # one per sample: build it only if read
                self.events.publish(
                    InstantApplied(sample_id=sid, latency_us=out.latency_us, quality=sample.quality)
                )
        else:
            self._pending -= 1
            self._on_skipped(sid, out)
            self._signal()
        if (
            not self._deep_requested
            and self._instant.accumulated_quality >= self.config.deep_trigger_threshold
        ):
            self._request_deep()
        return AdaptationResult(
            applied=out.applied,
            loop="instant",
            latency_us=out.latency_us,
            notes=out.notes,
            sample_id=sid,
        )

    def _consolidate_early(self) -> None:
        """Pending samples came within a quarter of the bound: consolidate now rather than at
        the next tick, before the bound stops ingress.

        The consolidation's worker thread is handed the GIL as it starts (unless a Deep run
        keeps the other core busy), and its first kernel, about two thirds of the work, runs
        beside ingress; the rest needs the GIL several times and gets it mostly once producers
        wait at the bound. A quarter of the bound leaves room for that first kernel at full
        ingress (sustained throughput at a 1,000-sample bound, means of three 10 s runs each,
        in turn: 29.2 k/s handing over at half the bound, 32.3 at two thirds, 33.5 at four
        fifths, 31.4 at nine tenths). Without the hand-off the thread waited for the loop to
        idle wherever it started, and handing over at half the bound only split the same
        samples over twice as many consolidations, each with its fixed cost."""
        ref = self._background_ref
        if ref is not None and ref.idle and not self._supervisor.gave_up:
            with contextlib.suppress(Exception):
                ref.tell_nowait(Tick())
                self._inline_budget = 0  # let the Background loop start at the next turn

    def _on_skipped(self, sample_id: int, out: InstantOutcome) -> None:
        self.events.publish(InstantSkipped(sample_id=sample_id, reason=out.reason or "skipped"))
        if out.rejected:
            self.events.publish(UpdateRejected(loop="instant", reason=out.notes[0]))

    def _instant_dead_letter(self, message: Any, error: BaseException) -> None:
        if isinstance(message, Process):
            ticket: Ticket = message.ticket
            if self._queued.pop(message.sample_id, None) is not None:
                self.dead_lettered += 1
                self._pending -= 1
                ticket.resolve(
                    _unhandled(
                        message.sample_id,
                        f"dead-lettered: the Instant loop failed twice on it ({error!r})",
                    )
                )
                self._durable.settled(message.sample_id, "dead_lettered")
                self._signal()

    def _deep_dead_letter(self, message: Any, error: BaseException) -> None:
        """An automatic Deep run that failed twice is given up: the next threshold crossing
        must be able to request another one."""
        if isinstance(message, RunDeep):
            self._deep_taken = 0.0  # given up: not due again until the quality builds up again
            if not message.on_demand:
                self._deep_requested = False

    def _request_deep(self) -> None:
        """An automatic Deep run, once something is kept to replay: samples reach the replay
        buffer when they are consolidated, and the first consolidation asks again."""
        ref = self._deep_ref
        if ref is None or self._supervisor.gave_up or not self._background.replay:
            return
        with contextlib.suppress(Exception):
            if ref.tell_nowait(RunDeep()):
                self._deep_requested = True

    # ------------------------------------------------------------------ background (actor side)
    async def _handle_tick(self, msg: Tick | NewTask) -> BackgroundResult | None:
        """Consolidate when due (or forced), then, for NewTask, start the new task."""
        new_task = isinstance(msg, NewTask)
        if new_task:
            self._new_task_queued = False  # a call from here on marks a later shift
        self._chaos_check("background")
        bg = self._background
        res: BackgroundResult | None = None
        live_pending = len(self._instant.pending)
        forced = new_task or (isinstance(msg, Tick) and msg.force)
        if self._instant.unfinished is not None or (
            live_pending + bg.held_back > 0 and (forced or bg.ready(live_pending))
        ):
            res = await self._consolidate(hold_back=not new_task)
        if new_task:
            bg.start_new_task()
            self.events.publish(TaskBoundary(task_count=bg.task_count, reason="requested"))
        return res

    async def _consolidate(self, *, hold_back: bool = True) -> BackgroundResult:
        """Hand-over, consolidation in a worker thread, publication. A hand-over whose
        consolidation crashed is kept and finished first by the restarted loop, so its samples
        are never lost. ``hold_back=False`` closes a task (see ``BackgroundLoop.prepare``)."""
        bg = self._background
        if self._instant.unfinished is None:
            ref = self._instant_ref
            assert ref is not None
            # the Instant loop records it (_take_hand_over), in this task when it is idle
            await ref.ask_inline(HandOverRequest())
        hand = self._instant.unfinished
        assert hand is not None
        try:
            # handed the GIL at once, to overlap ingress (see LoopThread), unless a Deep run
            # keeps the other core busy: three threads on two cores made requests wait for one
            # (instant_adapt p99 while Deep ran: ~150-165 µs instead of ~110 µs)
            with single_blas():  # set here, not in the thread (see sona.worker_threads)
                outcome: Consolidation = await self._background_thread.run(
                    bg.prepare, hand, hold_back, hand_off=not self._deep_thread.busy
                )
        except Exception as exc:
            self._consolidation_failed(hand, exc)
            raise
        with self._changing_view():
            bg.commit(outcome)  # on the event loop: stats and forward see it all at once
            self._instant.set_unfinished(None)
        if outcome.boundaries:  # a flag the Instant loop reads at its next hand-over
            self._instant.new_task()
        self._last_background = time.monotonic()
        self._pending -= len(outcome.consumed)
        self._signal()
        if (
            not self._deep_requested
            and self._instant.accumulated_quality >= self.config.deep_trigger_threshold
        ):
            self._request_deep()
        res = outcome.result
        self.events.publish(
            BackgroundCompleted(
                samples_used=res.samples_used,
                strategy=res.strategy.value,
                quality_delta=res.quality_delta,
                latency_ms=res.latency_ms,
                notes=list(res.notes),
            )
        )
        # each boundary began one task: the count each of them reached, in order
        first = bg.task_count - outcome.boundaries
        for i in range(1, outcome.boundaries + 1):
            self.events.publish(TaskBoundary(task_count=first + i, reason="detected"))
        for note in outcome.rejected:
            self.events.publish(UpdateRejected(loop="background", reason=note))
        return res

    # ------------------------------------------------------------------ deep (actor side)
    async def _handle_deep(self, msg: RunDeep) -> DeepResult:
        self._chaos_check("deep")
        bg_ref = self._background_ref
        assert bg_ref is not None
        try:
            job = cast(DeepJob, await bg_ref.ask(DeepSnapshot(msg.samples)))
            if job.train or job.held:  # a run with nothing to look at leaves the trigger's count
                self._deep_taken += self._instant.take_deep_quality()
            # a cancelled wait (shutdown, host timeout) drops the run; its thread finishes it
            outcome = await self._deep_thread.run(_deep_in_thread, job, shield=False)
            notes = list(outcome.notes)
            installed = await bg_ref.ask(InstallDeep((outcome, notes)))
        finally:
            if not msg.on_demand:
                self._deep_requested = False
        self.events.publish(
            DeepCompleted(
                samples_used=outcome.samples_used,
                epochs=outcome.epochs,
                quality_delta=outcome.quality_delta,
                latency_ms=outcome.latency_ms,
                installed=bool(installed),
                notes=list(notes),
            )
        )
        return DeepResult(
            samples_used=outcome.samples_used,
            epochs=outcome.epochs,
            quality_delta=outcome.quality_delta,
            latency_ms=outcome.latency_ms,
            notes=notes,
            installed=bool(installed),
            evaluated_on=outcome.evaluated_on,
        )

    def _install_deep(self, outcome: DeepOutcome, notes: list[str]) -> bool:
        """Install a Deep run's result and count the run, in one Background turn: a checkpoint
        (captured in another) sees the run either still due or done, never installed but
        uncounted, nor started but forgotten."""
        installed = self._background.install(outcome, notes)
        self._deep_taken = 0.0
        if outcome.epochs:  # a run that replayed nothing is reported, not counted
            self.deep_runs += 1
        return installed

    def _deep_snapshot(self, samples: Any) -> DeepJob:
        bg = self._background
        kept = list(bg.replay) if samples is None else self._factory.check_all(samples)
        return snapshot(
            self.config,
            bg.published,
            kept,
            bg.pipeline,
            bg.bank,
            bg.version,
            self.seed + 1000 + self.deep_runs,
        )

    async def deep_optimize(self, samples: list[TrainingSample] | None = None) -> DeepResult:
        """Run the Deep loop now (on the kept samples, or on ``samples``) and wait for it."""
        self._check_running()
        if samples is not None:
            samples = self._factory.check_all(samples)
        ref = self._deep_ref
        assert ref is not None
        result = await ref.ask(RunDeep(samples, on_demand=True))
        assert isinstance(result, DeepResult)
        return result

    async def consolidate(self) -> BackgroundResult | None:
        """Run the Background loop now, whatever its interval; None if nothing was pending."""
        self._check_running()
        ref = self._background_ref
        assert ref is not None
        result = await ref.ask(Tick(force=True))
        assert result is None or isinstance(result, BackgroundResult)
        return result

    def start_new_task(self) -> None:
        """Fold what is pending into the current task, then start a new one (EWC++).

        The Background loop does it at its next turn; calls made before it has begun on an
        earlier one mark the same shift (a burst of calls cannot fill its mailbox). A mailbox
        full of the host's own requests (consolidate, checkpoint) holds the shift back until
        there is room, as it holds those requests, rather than failing the call."""
        self._check_running()
        if self._new_task_queued:
            return
        ref = self._background_ref
        assert ref is not None and self._tg is not None
        try:
            ref.tell_nowait(NewTask())
        except Backpressure:
            self._tg.start_soon(self._tell_new_task, ref)
        self._new_task_queued = True

    async def _tell_new_task(self, ref: ActorRef) -> None:
        with contextlib.suppress(Exception):  # stopped or gave up meanwhile: nothing to mark
            await ref.tell(NewTask())

    # ------------------------------------------------------------------ checkpoints
    async def checkpoint(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write a checkpoint (atomically) and return its path; see :mod:`sona.durability`.

        ``path`` None writes the next numbered checkpoint into ``checkpoint_dir``, prunes older
        ones and truncates the sample log; a path writes exactly there. Works before start,
        while running (captured between two Background turns, so only from the event loop's
        thread) and after stop. Before start
        and after stop the runtime does not hold ``checkpoint_dir``: a checkpoint into it takes
        the directory's lock for the write, and raises CheckpointDirError if another runtime
        holds the directory or has continued it since (pruning would delete its checkpoints).
        """
        if self._started and not self._stopped:  # the capture is an ask to the Background loop
            self._check_thread()
        return await self._durable.checkpoint(path)

    @classmethod
    def restore(
        cls,
        path: str | os.PathLike[str],
        *,
        config: SonaLlmConfig | None = None,
        embedder: Embedder | None = None,
        chaos: Chaos | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
    ) -> SonaRuntime:
        """A runtime, not yet started, continuing from a checkpoint file or ``checkpoint_dir``.

        From a directory: the newest checkpoint that reads back intact, plus every logged
        sample after its log sequence number, replayed with its original id when the runtime
        starts (before it accepts new samples); the runtime keeps using that directory unless
        ``checkpoint_dir`` names another, empty one. From a file alone, samples accepted after
        it was written are not recovered. ``config`` may change everything except the fields
        that shape the stored state. ``restored`` describes what was loaded. A bad file raises
        FormatError naming it and builds nothing; a directory whose sample log is missing
        raises CheckpointDirError naming it (the samples acknowledged after the checkpoint were
        only there). Restoring writes nothing: the runtime writes into its ``checkpoint_dir``
        once started, and a directory restored into another one is left as it was.
        """
        extra = {} if checkpoint_dir is None else {"checkpoint_dir": checkpoint_dir}
        return restore_runtime(cls, path, config=config, embedder=embedder, chaos=chaos, **extra)

    # ------------------------------------------------------------------ reading
    def forward(self, x: Any, module: TargetModule, *, explore: bool = False) -> np.ndarray:
        """The effective delta: the last published consolidated state, the adapter handed
        over to a consolidation still running, and the live adapter, which learns relative to
        the other two (``InstantLoop.in_transit``).

        The hand-over restarts the live adapter before its consolidation is published: without
        the handed-over adapter, everything learned since the previous consolidation would
        vanish from forward while the next one runs. The hand-over and the commit each change
        two of these on the event loop; a reader on another thread that overlapped one of
        them (``_view`` odd, or changed) reads again."""
        while True:
            view = self._view
            out = self._instant.live.forward(x, module, explore=explore)
            xa = x if type(x) is np.ndarray and x.dtype == np.float32 else as_f32(x, "x")
            self._background.published.add_into(xa, module, out)
            transit = self._instant.in_transit
            if transit is not None:
                transit.forward_add(xa, module, out)
            if view == self._view and not view & 1:
                return out

    def subscribe(
        self, kinds: Any = None, *, buffer: int = 256
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Any]]:
        """An async context manager yielding an iterator of events (``kinds``: an event class
        or an iterable of them; see ``EventBus.subscribe``).

        While the runtime runs, only from its event loop's thread: the loop wakes a waiting
        subscriber through an event of its own loop, which another thread's loop never sees.
        """
        if self._started and not self._stopped:
            self._check_thread()
        return self.events.subscribe(buffer=buffer, kinds=kinds)

    @property
    def gave_up(self) -> bool:
        return self._supervisor.gave_up

    def stats(self) -> LearningStats:
        """The counters, as one snapshot in which the accounting identities hold.

        From another thread while the runtime runs, the snapshot is taken on the event loop,
        between two of its steps (the call waits for the loop's next turn): read from there
        directly, a commit or a sample handled meanwhile could land between two counters."""
        token = self._token
        if token is not None and not self._stopped and _thread_id() != self._thread:
            try:
                return anyio.from_thread.run_sync(self._stats, token=token)
            except RuntimeError:  # the loop has ended: nothing changes the counters now
                pass
        return self._stats()

    def _stats(self) -> LearningStats:
        inst = self._instant
        bg = self._background
        sup = self._supervisor.stats()
        restarts = sum(child.get("restarts", 0) for child in sup.values())
        return LearningStats(
            submitted_count=self.submitted,
            instant_count=inst.applied,
            skipped_count=inst.skipped,
            dropped_samples=self.dropped,
            dead_lettered=self.dead_lettered,
            in_flight=len(self._queued),
            instant_avg_latency_us=inst.avg_latency_us,
            background_count=bg.runs,
            deep_count=self.deep_runs,
            pending_samples=len(inst.pending) + bg.held_back + inst.unfinished_count,
            accumulated_quality=inst.accumulated_quality,
            restarts=restarts,
            gave_up=self._supervisor.gave_up,
            evicted_samples=inst.evicted,
            consolidated_count=bg.consolidated,
            task_count=bg.task_count,
            updates_rejected=inst.rejected,
            replay_size=len(bg.replay),
            pattern_clusters=len(bg.bank),
            skip_reasons=dict(inst.skip_reasons),
        )

    def _take_hand_over(self) -> HandOver:
        """The Instant loop's hand-over, recorded as unfinished in the same step: from then
        until its consolidation commits, ``stats()``, checkpoints and a restarted Background
        loop all count it, whatever becomes of the task that asked for it. A request that finds
        one unfinished (asked by a run that was interrupted) gets that one."""
        inst = self._instant
        hand = inst.unfinished
        if hand is None:
            with self._changing_view():
                hand = inst.hand_over(self._background.held_out(len(inst.pending)))
                inst.set_unfinished(hand)
        return hand

    @contextlib.contextmanager
    def _changing_view(self) -> Iterator[None]:
        """Marks what ``forward`` reads as changing (``_view`` odd) for the duration, so that
        a reader on another thread that overlaps it reads again."""
        self._view += 1
        try:
            yield
        finally:
            self._view += 1

    def _consolidation_failed(self, hand: HandOver, exc: Exception) -> None:
        """The first time a hand-over's consolidation raises, it is kept for the restarted
        Background loop to finish, so a crash loses none of its samples. The second time it is
        given up on, as a message is dead-lettered after its retry: consolidating the same
        samples again would fail again, and meanwhile pending samples stay at the bound and
        BLOCK would hold every submitter forever. Its samples, and those held back from the
        consolidation before, stay applied but are never consolidated: counted as evicted and
        announced (``SamplesDropped``, stage "consolidation", policy "failed")."""
        inst = self._instant
        if inst.unfinished is not hand:
            return
        bg = self._background
        with self._changing_view():
            n = inst.unfinished_failed(len(bg.carry))
            if n is None:
                return
            bg.carry = []
        self._pending -= n
        self._signal()
        _log.error("consolidation_given_up", samples=n, error=repr(exc))
        self.events.publish(SamplesDropped(count=n, stage="consolidation", policy="failed"))

    def supervisor_stats(self) -> dict[str, dict[str, int]]:
        return self._supervisor.stats()


class _InstantActor(Actor):
    def __init__(self, rt: SonaRuntime) -> None:
        self.rt = rt

    def answer_inline(self, message: Any) -> object:
        if type(message) is HandOverRequest:
            return self._hand_over()
        return DECLINED

    async def handle(self, message: Any) -> object | None:
        if type(message) is Process:
            self.rt._handle_process(message)
            return None
        if type(message) is HandOverRequest:
            return self._hand_over()
        raise TypeError(f"instant loop got an unknown message {type(message).__name__}")

    def _hand_over(self) -> HandOver:
        self.rt._chaos_check("instant")
        return self.rt._take_hand_over()


class _BackgroundActor(Actor):
    def __init__(self, rt: SonaRuntime) -> None:
        self.rt = rt

    async def on_start(self) -> None:
        """A restarted loop takes up the consolidation that ingress asked for while it was
        down: pending samples reached the pressure mark then, and with every submitter waiting
        at the bound, no applied sample would ask again before the next tick."""
        rt = self.rt
        ref = rt._background_ref
        if ref is not None and rt._pending >= rt._pressure and not ref.gave_up:
            with contextlib.suppress(Backpressure):  # a full mailbox has work queued already
                ref.tell_nowait(Tick())

    async def handle(self, message: Any) -> object | None:
        rt = self.rt
        if isinstance(message, (Tick, NewTask)):
            return await rt._handle_tick(message)
        if isinstance(message, DeepSnapshot):
            job: DeepJob = rt._deep_snapshot(message.samples)
            return job
        if isinstance(message, InstallDeep):
            outcome, notes = message.outcome
            return rt._install_deep(outcome, notes)
        if isinstance(message, CaptureState):  # a consistent moment: no loop is mid-turn
            return rt._durable.capture_now()
        raise TypeError(f"background loop got an unknown message {type(message).__name__}")


class _DeepActor(Actor):
    def __init__(self, rt: SonaRuntime) -> None:
        self.rt = rt

    async def handle(self, message: Any) -> object | None:
        if isinstance(message, RunDeep):
            return await self.rt._handle_deep(message)
        raise TypeError(f"deep loop got an unknown message {type(message).__name__}")


def _deep_in_thread(job: DeepJob) -> DeepOutcome:
    """A Deep run in its worker thread, then its scratch memory handed back to the system.

    The BLAS limit is set here, not around the wait on the event loop as for a consolidation:
    a dropped run (see ``_handle_deep``) goes on after nobody waits for it, and keeps the limit
    until it ends; the few foreign calls that set it are nothing beside a run."""
    try:
        with single_blas():
            return run_deep(job)
    finally:
        release_free_memory()


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or None under another anyio backend."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
