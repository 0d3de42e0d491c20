"""``SonaLlm``: the synchronous engine, the three loops driven directly by the caller.

Deterministic given a seed and a clock: the same calls produce the same weights. This is the
seed design's API; :class:`sona.runtime.SonaRuntime` runs the same loop logic as supervised
actors. Backpressure here is synchronous: under BLOCK a full pending buffer makes ``submit``
run the Background loop first, so the caller waits while room is made.
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from sona.actors.errors import Backpressure
from sona.actors.mailbox import OverflowPolicy
from sona.background import BackgroundLoop
from sona.config import SonaLlmConfig
from sona.deep import DeepJob, DeepOutcome, run_deep, snapshot
from sona.embedding import Embedder
from sona.errors import InvalidInputError
from sona.feedback import AdaptFeedback
from sona.ingest import SampleFactory
from sona.instant import InstantLoop
from sona.log import get_logger
from sona.lora_config import TargetModule
from sona.results import AdaptationResult, BackgroundResult, DeepResult, LearningStats
from sona.sample import TrainingSample
from sona.validation import RUN_SEED_BITS, as_f32, check_seed, real_number

_log = get_logger("sona.engine")
_DROPPED_NEWEST = "dropped: pending buffer full (DROP_NEWEST)"
_DROPPED_HELD = (
    "dropped: pending buffer full (DROP_OLDEST) and every pending sample is in a "
    "consolidation that failed, where none can be evicted"
)


class SonaLlm:
    """Instant, Background and Deep loops in one object, for synchronous hosts and tests."""

    def __init__(
        self,
        config: SonaLlmConfig | None = None,
        *,
        embedder: Embedder | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config if config is not None else SonaLlmConfig()
        if not isinstance(self.config, SonaLlmConfig):
            raise TypeError(f"config must be a SonaLlmConfig, got {type(config).__name__}")
        self._factory = SampleFactory(self.config, embedder)
        self.embedder = self._factory.embedder
        checked = check_seed(seed, bits=RUN_SEED_BITS)
        self.seed = checked if checked is not None else secrets.randbits(RUN_SEED_BITS)
        if not callable(clock):
            raise TypeError(
                f"clock must be a callable returning seconds, got {type(clock).__name__}"
            )
        self.clock = clock
        self._last_background = self._now()
        self.background = BackgroundLoop(self.config, seed=self.seed + 1)
        self.instant = InstantLoop(
            self.config, seed=self.seed, consolidated=lambda: self.background.published
        )
        # whether the consolidation of the unfinished hand-over (instant.unfinished) holds
        # samples back
        self._unfinished_hold_back = True
        self._ids = itertools.count(1)
        self.submitted = 0
        self.dropped = 0
        self.deep_runs = 0
        self.background_skipped = 0

    # ------------------------------------------------------------------ input
    def make_sample(self, query: Any, response: Any, quality: float) -> TrainingSample:
        """A sample from text (embedded by the embedder) or embeddings."""
        return self._factory.rated(query, response, quality)

    def feedback_sample(self, x: Any, feedback: AdaptFeedback) -> TrainingSample:
        return self._factory.with_feedback(x, feedback)

    # ------------------------------------------------------------------ instant loop
    def instant_adapt(self, query: Any, response: Any, quality: float) -> AdaptationResult:
        """Learn from a rated (query, response) pair now; text or embeddings."""
        return self.submit(self.make_sample(query, response, quality))

    def adapt(
        self, x: Any, feedback: AdaptFeedback, module: TargetModule | None = None
    ) -> AdaptationResult:
        """Learn from explicit feedback on input ``x`` (target, gradient, group, ...)."""
        sample = self.feedback_sample(x, feedback)
        return self.submit(sample, module=module)

    def submit(
        self, sample: TrainingSample, *, module: TargetModule | None = None
    ) -> AdaptationResult:
        sample = self._factory.check(sample, module)
        module = sample.module
        room: str | None = None
        if self.pending_samples() >= self.config.max_pending_samples:
            room = self._make_room()  # before the sample is counted: REJECT leaves no trace
        sid = next(self._ids)
        self.submitted += 1
        if room is _DROPPED_NEWEST or room is _DROPPED_HELD:
            self.dropped += 1
            return AdaptationResult(
                applied=False, loop="instant", latency_us=0.0, notes=[room], sample_id=sid
            )
        out = self.instant.process(sid, sample, module)
        notes = list(out.notes)
        if room is not None:
            notes.append(room)
        return AdaptationResult(
            applied=out.applied, loop="instant", latency_us=out.latency_us,
            notes=notes, sample_id=sid,
        )  # fmt: skip

    def _make_room(self) -> str | None:
        """Apply the overflow policy to a full pending buffer, before the new sample is counted
        or given an id, so a REJECT (or a BLOCK whose consolidation raised) changes nothing.
        Returns what the new sample's result should say: ``_DROPPED_NEWEST`` and
        ``_DROPPED_HELD`` drop it; the eviction note announces a DROP_OLDEST eviction, as the
        runtime's SamplesDropped does."""
        policy = self.config.overflow
        if policy is OverflowPolicy.REJECT:
            raise Backpressure(
                f"pending buffer full ({self.config.max_pending_samples} samples); "
                "call maybe_background() or raise max_pending_samples"
            )
        if policy is OverflowPolicy.DROP_NEWEST:
            return _DROPPED_NEWEST
        if policy is OverflowPolicy.DROP_OLDEST:
            victim = self.instant.evict_oldest()
            if victim is None:  # all held by a failed consolidation: the bound still holds
                return _DROPPED_HELD
            return (
                f"evicted sample {victim} (DROP_OLDEST): pending buffer full; it stays applied "
                "but is never consolidated"
            )
        self.run_background()  # BLOCK: make room synchronously
        return None

    def pending_samples(self) -> int:
        inst = self.instant
        return len(inst.pending) + self.background.held_back + inst.unfinished_count

    # ------------------------------------------------------------------ background loop
    def maybe_background(self) -> BackgroundResult | None:
        """Consolidate if the interval has passed and enough samples are pending."""
        now = self._now()
        if now < self._last_background:
            # The clock went back (a wall clock set back, a test clock reset): the time since
            # the last run is unknown, so the interval starts again now rather than waiting
            # until the clock regains its old reading.
            self._last_background = now
        interval = self.config.background_interval_ms / 1e3
        # 1 ns slack: 0.3 - 0.2 < 0.1 in floats, so a timer ticking at exactly the interval
        # would otherwise skip every other run.
        if now - self._last_background < interval - 1e-9:
            return None
        if self.instant.unfinished is None and not self.background.ready(len(self.instant.pending)):
            self.background_skipped += 1
            return None
        return self.run_background()

    def run_background(self) -> BackgroundResult:
        """Consolidate now, whatever the interval (used by BLOCK backpressure)."""
        return self._consolidate(hold_back=True)

    def _consolidate(self, *, hold_back: bool) -> BackgroundResult:
        """A hand-over whose consolidation raised is kept, its learning still part of the
        effective delta, and consolidated first by the next call, so none of its samples is
        lost and none of its inputs is read into the importance, the shift detector or the
        pattern bank twice: the retry learns what a consolidation that never failed would (as
        the runtime's restarted Background loop does). A second failure gives it up (see
        :meth:`_consolidation_failed`)."""
        self._last_background = self._now()
        inst = self.instant
        hand = inst.unfinished
        if hand is None:
            hand = inst.hand_over(self.background.held_out(len(inst.pending)))
            inst.set_unfinished(hand)
            self._unfinished_hold_back = hold_back
        else:  # retried as first asked: a retry on other rows would track its inputs again
            hold_back = self._unfinished_hold_back
        try:
            outcome = self.background.consolidate(hand, hold_back=hold_back)
        except Exception as exc:
            self._consolidation_failed(exc)
            raise
        inst.set_unfinished(None)
        if outcome.boundaries:
            inst.new_task()
        return outcome.result

    def _consolidation_failed(self, exc: Exception) -> None:
        """The second time a hand-over's consolidation raises it is given up on, as the
        runtime does: the same samples would fail again, and under BLOCK every submit would
        raise with them. Its samples, and those held back before, stay applied but are never
        consolidated: counted as evicted. An interruption (KeyboardInterrupt) is no failure
        of the hand-over and is not counted."""
        n = self.instant.unfinished_failed(self.background.held_back)
        if n is None:
            return
        self.background.carry = []
        _log.error("consolidation_given_up", samples=n, error=repr(exc))

    def _now(self) -> float:
        """The clock's reading, checked: a NaN would compare false with everything and make
        every later maybe_background run regardless of the interval."""
        t = self.clock()
        if type(t) is not float:
            t = real_number(t, "clock()", "a real number of seconds")
        if not math.isfinite(t):
            raise InvalidInputError(f"clock() must return finite seconds, got {t!r}")
        return t

    # ------------------------------------------------------------------ deep loop
    def should_trigger_deep(self) -> bool:
        """Accumulated quality passed ``deep_trigger_threshold`` and there is something to
        replay: samples reach the replay buffer when they are consolidated, so until the first
        consolidation the quality keeps accumulating."""
        return (
            self.instant.accumulated_quality >= self.config.deep_trigger_threshold
            and len(self.background.replay) > 0
        )

    def deep_optimize(self, samples: Iterable[TrainingSample] | None = None) -> DeepResult:
        """Replay kept samples (or ``samples``) under EWC++ and install the result."""
        job = self.deep_job(samples)
        return self.install_deep(run_deep(job))

    def deep_job(self, samples: Iterable[TrainingSample] | None = None) -> DeepJob:
        """The copies a Deep run works on. It consumes the accumulated quality only when it
        has samples to look at: a call on an empty list, or before anything was consolidated,
        runs nothing and must not reset the trigger that was counting toward a real run."""
        bg = self.background
        kept = list(bg.replay) if samples is None else self._factory.check_all(samples)
        job = snapshot(
            self.config, bg.published, kept, bg.pipeline, bg.bank, bg.version,
            self.seed + 1000 + self.deep_runs,
        )  # fmt: skip
        if kept:
            self.instant.take_deep_quality()
        return job

    def install_deep(self, outcome: DeepOutcome) -> DeepResult:
        if not isinstance(outcome, DeepOutcome):
            raise TypeError(f"outcome must be a DeepOutcome, got {type(outcome).__name__}")
        notes = list(outcome.notes)
        installed = self.background.install(outcome, notes)
        if outcome.epochs:  # a run that replayed nothing is reported, not counted
            self.deep_runs += 1
        return DeepResult(
            samples_used=outcome.samples_used, epochs=outcome.epochs,
            quality_delta=outcome.quality_delta, latency_ms=outcome.latency_ms,
            notes=notes, installed=installed, evaluated_on=outcome.evaluated_on,
        )  # fmt: skip

    # ------------------------------------------------------------------ inference
    def forward(self, x: Any, module: TargetModule, *, explore: bool = False) -> np.ndarray:
        """The effective delta: consolidated adapter(s), the live adapter, and the adapter
        handed over to a consolidation that raised and has not been retried yet."""
        out = self.instant.live.forward(x, module, explore=explore)
        xa = x if type(x) is np.ndarray and x.dtype == np.float32 else as_f32(x, "x")
        self.background.published.add_into(xa, module, out)
        transit = self.instant.in_transit
        if transit is not None:
            transit.forward_add(xa, module, out)
        return out

    def start_new_task(self) -> None:
        """Consolidate what is pending into the old task, held-back samples included, then
        fold its importance (EWC++). A consolidation that raised is finished first, as it was
        asked, as if it had never failed."""
        if self.instant.unfinished is not None:
            self._consolidate(hold_back=self._unfinished_hold_back)
        if self.instant.pending or self.background.carry:
            self._consolidate(hold_back=False)
        self.background.start_new_task()

    # ------------------------------------------------------------------ statistics
    def stats(self) -> LearningStats:
        inst = self.instant
        bg = self.background
        return LearningStats(
            submitted_count=self.submitted,
            instant_count=inst.applied,
            skipped_count=inst.skipped,
            dropped_samples=self.dropped,
            dead_lettered=0,
            in_flight=0,
            instant_avg_latency_us=inst.avg_latency_us,
            background_count=bg.runs,
            deep_count=self.deep_runs,
            pending_samples=self.pending_samples(),
            accumulated_quality=inst.accumulated_quality,
            evicted_samples=inst.evicted,
            consolidated_count=bg.consolidated,
            task_count=bg.task_count,
            updates_rejected=inst.rejected,
            replay_size=len(bg.replay),
            pattern_clusters=len(bg.bank),
            skip_reasons=dict(inst.skip_reasons),
        )
