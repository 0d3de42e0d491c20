"""The Instant loop's logic: one MicroLoRA step per sample, on the request path.

It owns the live adapter and the samples it applied that the Background loop has not taken yet
(``pending``). Handing over gives Background a snapshot of the live adapter together with
exactly the samples that shaped it, and starts the live adapter afresh (B = 0), so nothing is
folded twice and nothing is lost between the two.

Under ``EWC_MERGE`` a hand-over also brings a copy of the live adapter from before the samples
Background holds back, to measure the fold on (see :mod:`sona.live_copies`).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np

from sona.config import ConsolidationStrategy, SonaLlmConfig
from sona.errors import InvalidInputError
from sona.feedback import FeedbackKind
from sona.live_copies import LiveCopies, next_copy
from sona.lora import _UNHELD, MicroLoRA
from sona.lora_config import TargetModule
from sona.objective import held_out_count
from sona.published import Published
from sona.sample import TrainingSample

_clock = time.perf_counter_ns
_refcount = sys.getrefcount
_GATED = (FeedbackKind.TARGET, FeedbackKind.GRADIENT)
_REGRESSION = (FeedbackKind.TARGET, FeedbackKind.OUTPUT, FeedbackKind.GROUP)


class InstantOutcome(msgspec.Struct, frozen=True, gc=False):
    """One sample's fate in the Instant loop: built per request, cheaply, and untracked by
    the cyclic garbage collector (it never holds a cycle)."""

    applied: bool
    latency_us: float
    notes: list[str] = msgspec.field(default_factory=list)
    reason: str | None = None  # short key for skip statistics
    rejected: bool = False  # the adapter refused the update as non-finite


@dataclass(slots=True)
class HandOver:
    """What Background receives: the live adapter as it was, and the samples behind it."""

    live: MicroLoRA
    samples: Sequence[tuple[int, TrainingSample]]
    redrew_a: bool = False  # the live adapter started the new task's fresh A at this hand-over
    # The live adapter's factors as they were after only the first ``learned`` samples
    # (EWC_MERGE), or None when no copy was kept that leaves samples after it.
    before_held: MicroLoRA | None = None
    learned: int = 0


class InstantLoop:
    """Applies each sample to the live adapter at ``instant_lr`` and keeps it for Background."""

    def __init__(
        self,
        config: SonaLlmConfig,
        *,
        seed: int,
        consolidated: Callable[[], Published] | None = None,
    ) -> None:
        self.config = config
        # Copies of the live adapter since the last hand-over (EWC_MERGE), taken at positions
        # in ``pending`` that count its evicted samples too
        self._copies = LiveCopies()
        self._copying = config.consolidation_strategy is ConsolidationStrategy.EWC_MERGE
        self._appended = 0  # samples appended since the copies restarted
        self._evicted_since = 0  # of pending's samples since the copies restarted
        self._next_copy = 1 if self._copying else 0  # 0: never (counts start at 1)
        self._before_spare: MicroLoRA | None = None  # the last hand-over's copy, reused
        self.live = MicroLoRA(config.micro_lora, seed=seed)
        # The live adapter learns what the consolidated state still gets wrong: regression
        # feedback is taken relative to the consolidated output (reused buffers, per module).
        self._consolidated = consolidated
        # The adapter handed over to a consolidation that has not committed yet (set by the
        # runtime, whose consolidations run in a worker thread). Until the commit it is part
        # of the effective delta, so the live adapter learns relative to it too: otherwise the
        # live adapter re-learns what is in transit, and the commit then counts it twice.
        self.in_transit: MicroLoRA | None = None
        # The hand-over behind ``in_transit``, kept until its consolidation commits or is
        # given up (a consolidation that raised is retried on it), and how often it raised.
        self.unfinished: HandOver | None = None
        self.unfinished_failures = 0
        self._modules = config.micro_lora.target_modules
        self._only = self._modules[0] if len(self._modules) == 1 else None
        self._offsets = {
            m: np.zeros(config.micro_lora.out_features, np.float32) for m in self._modules
        }
        self._offset_pairs = tuple(self._offsets.items())  # iterated per sample: no new tuples
        self._offset_list = list(self._offsets.values())
        self.pending: deque[tuple[int, TrainingSample]] = deque()
        self.applied = 0
        self.skipped = 0
        self.rejected = 0
        self.evicted = 0
        self.skip_reasons: dict[str, int] = {}
        self.latency_sum_us = 0.0
        self.accumulated_quality = 0.0
        self._lr = config.instant_lr
        self._max_norm = config.training.max_grad_norm
        # Whether _step_rated can apply: the fused step covers every module and takes these
        # rates as they are (a config keeps an int it was given, which step takes through its
        # general path); otherwise the offsets it computes would be computed again.
        self._rated = (
            self._live._fused_step_covers_all
            and type(self._lr) is float
            and type(self._max_norm) is float
        )
        self._threshold = config.training.quality_threshold
        self._fresh_start = False
        self._restarts = 0
        # The last hand-over's snapshot: the next hand-over copies into it once nothing else
        # holds it (its consolidation has committed), instead of allocating a new adapter.
        self._spare: MicroLoRA | None = None

    @property
    def live(self) -> MicroLoRA:
        """The live adapter, stepped in place on the request path."""
        return self._live

    @live.setter
    def live(self, adapter: MicroLoRA) -> None:
        adapter.written_in_place = True
        self._live = adapter
        if self._copying:
            self._copies.follow(adapter)
        self._restart_copies()

    def process(
        self, sample_id: int, sample: TrainingSample, module: TargetModule | None = None
    ) -> InstantOutcome:
        """One update; a sample that changes nothing is counted as skipped with its reason."""
        t0 = _clock()
        live = self._live
        stepped = None
        if sample.feedback is None and self._rated and (module is None or module is self._only):
            stepped = self._step_rated(sample)
        if stepped is None:
            fb = sample.to_feedback()
            kind = fb.kind
            if kind in _GATED and fb.quality < self._threshold:
                return self._skip(t0, "below_quality_threshold", (
                    f"skipped: {fb.kind.value} feedback quality {fb.quality:.3f} is below "
                    f"quality_threshold {self._threshold:.3f}"
                ))  # fmt: skip
            try:
                offsets = None
                if self._consolidated is not None and kind in _REGRESSION:
                    offsets = self._consolidated_outputs(sample.input_embedding, module)
                stepped = live.step(
                    sample.input_embedding,
                    fb,
                    self._lr,
                    max_norm=self._max_norm,
                    module=module,
                    offsets=offsets,
                )
            except InvalidInputError as exc:  # finite values whose outputs or gradient overflow
                self.rejected += 1
                return self._skip(t0, "update_rejected", f"rejected: {exc}", rejected=True)
        if not stepped:
            note = live.last_note or "declined by the adapter"
            if note.startswith("rejected"):
                self.rejected += 1
                return self._skip(t0, "update_rejected", note, rejected=True)
            return self._skip(t0, "no_direction", note)
        self.pending.append((sample_id, sample))
        self.applied += 1
        self.accumulated_quality += sample.quality
        self._appended += 1
        if self._appended == self._next_copy:
            self._copy_live()
        dt = (_clock() - t0) / 1e3
        self.latency_sum_us += dt
        return InstantOutcome(True, dt)

    def _step_rated(self, sample: TrainingSample) -> bool | None:
        """The common case, a rated sample for every module over one consolidated adapter,
        without the feedback object and the offsets mapping: the same kernels as the general
        path (``_consolidated_outputs``, then ``step``), into buffers of this loop's. None,
        with nothing changed, where a kernel refused: the general path then repeats the work
        and decides or raises."""
        if self._consolidated is None:
            return None
        published = self._consolidated()
        if published.ensemble:
            return None
        x = sample.input_embedding
        base = published.base
        transit = self.in_transit
        if len(self._offset_list) <= 2:  # offsets and step in one kernel call
            return self._live._step_rated_over(
                base, transit, x, sample.output_embedding, sample.quality, self._lr,
                self._max_norm, self._offset_list,
            )  # fmt: skip
        for module, offset in self._offset_pairs:
            if not base._delta_into(x, module, offset, False):
                return None
            if transit is not None and not transit._delta_into(x, module, offset, True):
                return None
        return self._live._step_rated(
            x, sample.output_embedding, sample.quality, self._lr, self._max_norm, self._offset_list
        )

    def _consolidated_outputs(
        self, x: np.ndarray, module: TargetModule | None
    ) -> dict[TargetModule, np.ndarray]:
        assert self._consolidated is not None
        published = self._consolidated()
        transit = self.in_transit
        if not published.ensemble:  # one adapter: its forward writes the delta, no zeroing
            base = published.base
            offsets = {
                m: base.forward(x, m) for m in self._modules if module is None or m is module
            }
            if transit is not None:  # into the buffers forward returned: held, never reused
                for m, out in offsets.items():
                    transit._add_delta(x, m, out)
            return offsets
        for m, buf in self._offsets.items():
            if module is None or m is module:
                buf.fill(0.0)
                published.add_into(x, m, buf)
                if transit is not None:
                    transit._add_delta(x, m, buf)
        return self._offsets

    def _skip(self, t0: int, reason: str, note: str, *, rejected: bool = False) -> InstantOutcome:
        self.skipped += 1
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1
        dt = (_clock() - t0) / 1e3
        return InstantOutcome(False, dt, [note], reason, rejected)

    def hand_over(self, hold_back: int | None = None) -> HandOver:
        """Snapshot the live adapter with its pending samples, then start afresh (B = 0).

        ``hold_back``: how many of the newest samples Background will hold back to measure the
        fold on (default: as many as it holds back of the pending samples alone); the copy of
        the live adapter that leaves nearest that many after it goes along (``before_held``,
        ``learned``).

        After a new task began (:meth:`new_task`), A is drawn afresh too: its rows still point
        at the old task's input directions, and with B restarting at zero at every hand-over
        they would rotate only slowly, so the new task would be learned through the old one's
        inputs (and overwrite them). With B = 0 the effective delta is unchanged either way.
        """
        spare = self._spare
        if spare is not None and _refcount(spare) != _UNHELD:  # still held: a new one
            spare = None
        snapshot = self._spare = self._live.clone(into=spare)
        want = held_out_count(len(self.pending)) if hold_back is None else hold_back
        before, learned = self._copy_before(want)
        self._restart_copies()
        # The queue itself is handed over: copying it would touch every entry, cold by now,
        # on the request path; the consolidation goes through them anyway.
        samples = self.pending
        self.pending = deque()
        self._live.reset_b()
        redraw = self._fresh_start
        if redraw:
            self._fresh_start = False
            self._restarts += 1
            fresh = MicroLoRA(self.config.micro_lora, seed=self._live.seed + self._restarts)
            for module, a, bt in fresh.iter_factors():
                self._live.set_factors(module, a, bt)
        return HandOver(snapshot, samples, redraw, before, learned)

    def _copy_live(self) -> None:
        """Copy the live adapter, noting how many pending samples it has learned."""
        self._next_copy = next_copy(self._appended, in_transit=self.in_transit is not None)
        self._copies.take(len(self.pending) + self._evicted_since)

    def set_unfinished(self, hand: HandOver | None) -> None:
        """Record the hand-over a consolidation works on, or None once it committed (or was
        given up), when a hand-over can come again and copies catch up at the next sample.
        Until then its adapter is ``in_transit``: the live adapter learns relative to it as
        well as to the published state, and its samples still count as pending."""
        if hand is None and self.in_transit is not None and self._copying:
            self._next_copy = min(self._next_copy, self._appended + 1)
        self.unfinished = hand
        self.unfinished_failures = 0
        self.in_transit = hand.live if hand is not None else None

    @property
    def unfinished_count(self) -> int:
        """The unfinished hand-over's samples."""
        return len(self.unfinished.samples) if self.unfinished is not None else 0

    def unfinished_failed(self, carried: int) -> int | None:
        """Count a failure of the unfinished hand-over's consolidation. The first time it is
        kept for a retry (None); the second it is given up, as the same samples would fail
        again: its samples, and the ``carried`` ones the consolidations held back before it,
        stay applied but are never consolidated, counted as evicted. Returns how many."""
        self.unfinished_failures += 1
        if self.unfinished_failures < 2:
            return None
        n = self.unfinished_count + carried
        self.set_unfinished(None)
        self.evicted += n
        return n

    @property
    def copies(self) -> list[tuple[int, MicroLoRA]]:
        """The kept copies of the live adapter, oldest first, each with the number of samples
        appended to ``pending`` (evicted ones included) before it was taken."""
        return self._copies.listed(self._live)

    @copies.setter
    def copies(self, kept: Sequence[tuple[int, MicroLoRA]]) -> None:
        self._copies.restore(kept)

    def _copy_before(self, want: int) -> tuple[MicroLoRA | None, int]:
        """The live adapter as it was before about ``want`` of the newest pending samples (its
        copy nearest that), and how many samples it had learned: at least one, the oldest
        sample is never held back."""
        if want <= 0:
            return None, 0
        found = self._copies.before(want, len(self.pending), self._evicted_since)
        if found is None:
            return None, 0
        slot, learned = found
        spare = self._before_spare
        if spare is not None and _refcount(spare) != _UNHELD:  # still held: a new one
            spare = None
        before = self._before_spare = self._copies.write(slot, self._live.clone(into=spare))
        return before, learned

    def _restart_copies(self) -> None:
        """Forget the copies: the live adapter no longer follows from them and the pending
        samples."""
        self._copies.clear()
        self._appended = 0
        self._evicted_since = 0
        self._next_copy = 1 if self._copying else 0

    def new_task(self) -> None:
        """A new task began: the live adapter restarts from fresh A at the next hand-over."""
        self._fresh_start = True

    def evict_oldest(self) -> int | None:
        """Drop the oldest sample waiting for consolidation (it stays applied); its id."""
        if not self.pending:
            return None
        sid, _ = self.pending.popleft()
        self.evicted += 1
        self._evicted_since += 1
        return sid

    def take_deep_quality(self) -> float:
        """The quality accumulated since the last Deep run, reset to zero."""
        q = self.accumulated_quality
        self.accumulated_quality = 0.0
        return q

    @property
    def avg_latency_us(self) -> float:
        return self.latency_sum_us / self.applied if self.applied else 0.0
