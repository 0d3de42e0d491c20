"""The Background loop's logic: consolidation, EWC++ importance, pattern bank, replay buffer.

It owns the consolidated adapter(s), the training pipeline (importance, anchors, task
boundaries), the pattern bank and the replay buffer. It never touches the live adapter: it gets
a snapshot in a :class:`~sona.instant.HandOver` and publishes its result as a new
:class:`~sona.published.Published`.

Every run holds back its newest measurable samples and measures ``quality_delta`` on them: how
much the consolidated state improved its objective on samples it has not consolidated yet
(their own consolidation comes with the next run, so every sample is consolidated once). Under
EWC_MERGE the live adapter did learn from them; the figure then says how much of that learning
the fold kept, which is what a consolidation should preserve.
"""

from __future__ import annotations

import math
import operator
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sona.config import ConsolidationStrategy, SonaLlmConfig
from sona.deep import DeepOutcome
from sona.errors import InvalidInputError
from sona.instant import HandOver
from sona.live_copies import SNAPSHOT_EVERY
from sona.lora import MicroLoRA, passed_over_note
from sona.lora_config import TargetModule
from sona.objective import (
    MAX_EVAL,
    Predictor,
    held_out_count,
    hold_out_newest,
    measurable,
)
from sona.objective import quality_delta as measured_delta
from sona.pattern_bank import PatternBank
from sona.published import Published
from sona.replay import ReplayPool, rating_only
from sona.results import BackgroundResult
from sona.row_scan import Labelled, Projected, scan_rows
from sona.sample import TrainingSample
from sona.stacking import stack_rows
from sona.training import TrainingPipeline

MINI_BATCH = 16


def mini_batch(instant_lr: float) -> int:
    """Samples per re-learning step: ``MINI_BATCH``, fewer at a high rate.

    A mini-batch of k samples is applied as k steps' worth, lr·k times the mean gradient
    (clipped at max_grad_norm, as one step's), with no feedback in between; per-sample steps
    are scaled to a curvature of at most 1 (x over max(‖x‖², 1)), so lr·k must stay below 2
    or correlated samples make it overshoot and diverge (measured: AVERAGE held at lr 0.1 and
    diverged at 0.15 with k = 16). k <= 1/lr keeps it at 1 or less; at the default rates k
    stays 16."""
    return max(1, min(MINI_BATCH, int(1.0 / instant_lr)))


BEST_FRACTION = 0.2
MAX_HELD = MAX_EVAL + SNAPSHOT_EVERY // 2  # EWC_MERGE: up to half a gap between copies more
_PREALLOCATE = 64 << 20  # bytes of input rows kept ready at construction, at most
_FOLD_OVERFLOW = (
    "rejected: folding the live adapter into the consolidated one would make delta_weight "
    "overflow; the consolidated adapter was kept"
)
_first = operator.itemgetter(0)
_second = operator.itemgetter(1)
_input_embedding = operator.attrgetter("input_embedding")


@dataclass(slots=True)
class Consolidation:
    result: BackgroundResult
    consumed: list[int]  # sample ids consolidated by this run
    boundaries: int = 0
    rejected: list[str] = field(default_factory=list)
    published: Published | None = None  # what commit() installs
    carry: list[tuple[int, TrainingSample]] = field(default_factory=list)
    bank: PatternBank | None = None  # the pattern bank with this run's inputs, for commit()


class BackgroundLoop:
    """Folds handed-over learning into the consolidated state with the configured strategy."""

    def __init__(self, config: SonaLlmConfig, *, seed: int) -> None:
        self.config = config
        self.strategy = config.consolidation_strategy
        base = MicroLoRA(config.consolidated_lora, seed=seed)
        self.pipeline = TrainingPipeline(config.training)
        self.pipeline.init_for_lora(base)
        self.bank = PatternBank(config.pattern_clusters, config.micro_lora.in_features)
        self._bank_spare: PatternBank | None = None  # the bank a consolidation updates
        # the hand-over the pipeline last read the inputs of, how many, and the boundaries it
        # found, until that hand-over's consolidation commits
        self._tracked: tuple[HandOver, int, list[int]] | None = None
        self.replay: deque[TrainingSample] = deque(maxlen=config.replay_capacity)
        self.carry: list[tuple[int, TrainingSample]] = []
        # a full hand-over (the pending bound) plus the held-back carry
        self._rows = _RowBuffer(
            config.micro_lora.in_features, config.max_pending_samples + MAX_HELD
        )
        self.version = 0
        self.runs = 0
        self.consolidated = 0
        self.published = Published(base)
        self._seed = seed

    # ------------------------------------------------------------------ reading
    @property
    def base(self) -> MicroLoRA:
        return self.published.base

    @property
    def held_back(self) -> int:
        return len(self.carry)

    def held_out(self, pending: int) -> int:
        """How many samples a consolidation of ``pending`` handed-over ones holds back to
        measure itself on (what :meth:`InstantLoop.hand_over` is asked to leave after the
        live adapter's copy)."""
        return held_out_count(len(self.carry) + pending)

    def ready(self, pending: int) -> bool:
        """Enough samples to run: never on an empty or under-filled buffer."""
        return pending + len(self.carry) >= self.config.background_min_samples

    # ------------------------------------------------------------------ consolidation
    def consolidate(self, hand: HandOver, *, hold_back: bool = True) -> Consolidation:
        """:meth:`prepare` then :meth:`commit`."""
        outcome = self.prepare(hand, hold_back=hold_back)
        self.commit(outcome)
        return outcome

    def commit(self, outcome: Consolidation) -> None:
        """Make a prepared consolidation visible: the new published state, the held-back
        samples and the counters change together, so readers on another thread see all of it
        or none (the runtime prepares in a worker thread and commits on the event loop)."""
        assert outcome.published is not None
        self.version += 1
        outcome.published.version = self.version
        self.published = outcome.published
        self.carry = outcome.carry
        if outcome.bank is not None:
            self._bank_spare, self.bank = self.bank, outcome.bank
        self._tracked = None
        self.runs += 1
        self.consolidated += len(outcome.consumed)

    def prepare(self, hand: HandOver, hold_back: bool = True) -> Consolidation:
        """Compute a consolidation of ``hand`` without publishing it (see :meth:`commit`).

        ``hold_back=False`` (the consolidation that closes a task) consumes every sample,
        those held back earlier included: they belong to the task that ends, and held back
        they would be tracked and consolidated as the next task's. Nothing is left to measure
        on, so its ``quality_delta`` is None, with a note.

        ``EWC_MERGE`` folds in the live adapter, which has learned every handed-over sample:
        it holds back the samples after the hand-over's copy of the live adapter
        (``before_held``) and measures on them the published state less what the live adapter
        learned from them, so the measured state never learned them; without a copy it holds
        nothing back and says why."""
        t0 = time.perf_counter()
        notes: list[str] = []
        samples = [*self.carry, *hand.samples]
        folds_live = self.strategy is ConsolidationStrategy.EWC_MERGE
        unmeasured = self._unmeasured(hand, hold_back)
        if unmeasured is not None:
            train, held = samples, []
            notes.append(unmeasured)
        elif folds_live:  # measured on the samples the live adapter's copy had not learned
            cut = len(self.carry) + hand.learned
            train, held = samples[:cut], samples[cut:]
            if not any(measurable(s) for _, s in held):  # nothing to measure on: keep none
                train, held = samples, []
        else:
            train, held = _split_eval(samples)
        old = self.published
        # C-level loops (map with operator getters): these run once per sample
        train_samples: list[TrainingSample] = list(map(_second, train))
        eval_samples: list[TrainingSample] = list(map(_second, held))
        # updated here, installed by commit: a run that fails half-way leaves the bank as it
        # was, and its retry reads its inputs into the bank once
        bank = self._bank_spare = self.bank.clone(into=self._bank_spare)
        # every input row once, training rows first: later passes take views
        basis, centroids = self.pipeline.scan_basis(), bank.scan_centroids()
        kept_from = 0
        if folds_live and basis is not None and centroids is not None:
            # the scan gives the detector and the bank all they read; the fold reads no row,
            # the importance window the last fisher_samples and quality_delta the held-back
            kept_from = max(0, len(train_samples) - self.config.training.fisher_samples)
        rows, projected, labelled = self._rows.scan(
            train_samples + eval_samples, len(train_samples), basis, centroids, kept_from
        )
        xs = rows[: len(train_samples)] if train_samples else None
        fired = self._track(hand, xs, notes, projected)
        published, rejected = self._fold(old, hand.live, train_samples, xs, notes, labelled, bank)
        self._rows.release()  # no row before the held-back ones is read from here on
        notes.extend(rejected)  # also announced (UpdateRejected) by the runtime
        eval_rows = rows[len(train_samples) :]
        quality_delta = None
        if unmeasured is None:
            after: Predictor = published.predict
            if folds_live and eval_samples and not rejected:  # (refused: the state stayed)
                assert hand.before_held is not None
                after = _without_held(published, hand.live, hand.before_held)
            quality_delta = measured_delta(
                eval_samples,
                old.predict,
                after,
                self.config.micro_lora.target_modules,
                notes,
                rows=eval_rows,
            )
        self.replay.extend(train_samples)
        result = BackgroundResult(
            samples_used=len(train),
            strategy=self.strategy,
            quality_delta=quality_delta,
            latency_ms=(time.perf_counter() - t0) * 1e3,
            notes=notes,
            task_boundary=bool(fired),
            evaluated_on=len(eval_samples),
        )
        consumed: list[int] = list(map(_first, train))
        return Consolidation(result, consumed, len(fired), rejected, published, held, bank)

    def _track(
        self, hand: HandOver, xs: np.ndarray | None, notes: list[str], projected: Projected | None
    ) -> list[int]:
        """Feed importance and boundary detection; a detected shift re-anchors EWC++ on the
        consolidated state as it was before this batch's learning is folded in.

        Once per hand-over: a run that failed after this step (the runtime retries it after
        restarting the loop) has left the pipeline as a run that went on would, so its retry
        takes the boundaries found then instead of reading the inputs a second time."""
        if xs is None:
            return []
        tracked = self._tracked
        if tracked is not None and tracked[0] is hand and tracked[1] == len(xs):
            fired = tracked[2]
        else:
            base = self.published.base
            fired = self.pipeline.track_many(
                base, xs, validated=True, projected=projected, complete=self._rows.complete
            )
            self._tracked = (hand, len(xs), fired)
        for i in fired:
            notes.append(f"task boundary detected at sample {i} of the batch")
        return fired

    def _fold(
        self,
        old: Published,
        live: MicroLoRA,
        samples: Sequence[TrainingSample],
        xs: np.ndarray | None,
        notes: list[str],
        labelled: Labelled | None,
        bank: PatternBank,
    ) -> tuple[Published, list[str]]:
        cfg = self.config
        rejected: list[str] = []
        if xs is None:
            labels = np.empty(0, np.intp)
        else:
            if labelled is None or not bank.takes(labelled, len(xs)):
                self._rows.complete()  # the bank reads the rows themselves
            labels = bank.update(xs, labelled)
        centroids = bank.centroids[: len(bank)].copy()
        strategy = self.strategy
        if strategy is ConsolidationStrategy.EWC_MERGE:
            try:
                base = MicroLoRA.merge_adapters(
                    [(old.base, 1.0), (live, 1.0)], rank=old.base.config.rank
                )
            except InvalidInputError:
                # Two valid adapters can sum beyond float32 (deltas near its max, learned from
                # targets near it): refused like an update that would overflow, the
                # consolidated adapter stays as it was.
                rejected.append(_FOLD_OVERFLOW)
                notes.append(_FOLD_OVERFLOW)
                return Published(old.base, dict(old.ensemble), None), rejected
            base.baseline.load(live.baseline.state())
            self._prox(base, cfg.instant_lr * max(len(samples), 1), notes)
            return Published(base, dict(old.ensemble), None), rejected
        pool = ReplayPool(samples, xs, cfg.micro_lora.out_features, cfg.micro_lora.target_modules)
        if strategy is ConsolidationStrategy.ENSEMBLE:
            ensemble = dict(old.ensemble)
            trained = [int(v) for v in np.unique(labels) if v >= 0]  # -1: zero inputs only
            for label in trained:
                members = np.flatnonzero(labels == label)
                adapter = ensemble.get(label)
                adapter = adapter.clone() if adapter is not None else _zero_like(old.base, label)
                # without EWC++'s pull: its anchor is the shared adapter's, which ENSEMBLE leaves
                # alone; routing keeps the clusters' adapters apart instead
                self._relearn(
                    adapter, pool, members, np.ones(len(members)), rejected, protect=False
                )
                ensemble[int(label)] = adapter
            notes.append(f"trained {len(trained)} cluster adapters")
            _note_rating_only(samples, strategy, notes)
            return Published(old.base, ensemble, centroids), rejected
        weights = _strategy_weights(strategy, samples)
        _note_rating_only(samples, strategy, notes)
        base = old.base.clone()
        used = sum(1 for w in weights if w > 0)
        if strategy is ConsolidationStrategy.BEST_ONLY:
            notes.append(f"best_only: learned from the top {used} of {len(samples)} samples")
        self._relearn(base, pool, np.arange(len(samples)), np.array(weights), rejected)
        return Published(base, dict(old.ensemble), None), rejected

    def _relearn(
        self,
        adapter: MicroLoRA,
        pool: ReplayPool,
        idx: np.ndarray,
        weights: np.ndarray,
        rejected: list[str],
        *,
        protect: bool = True,
    ) -> None:
        """Mini-batch steps at instant_lr per sample on the pool's samples ``idx``: the weighted
        mean gradient of each batch, applied once per sample it holds, then an EWC++ proximal
        step of the same strength. One kernel call when the pool allows it
        (``MicroLoRA.relearn``), else sample by sample (the same steps)."""
        cfg = self.config
        threshold = cfg.training.quality_threshold
        batch_of = pool.batch
        k = mini_batch(cfg.instant_lr)
        if batch_of is not None:
            keep = (weights > 0.0) & ~(batch_of.gated[idx] & (batch_of.qualities[idx] < threshold))
            lam = cfg.training.ewc_lambda if protect else 0.0
            notes = adapter.relearn(
                batch_of, idx[keep], weights[keep], cfg.instant_lr,
                max_norm=cfg.training.max_grad_norm, mini_batch=k,
                ewc=self.pipeline.replay_ewc(adapter) if lam > 0.0 else None, ewc_lambda=lam,
            )  # fmt: skip
            if notes is not None:
                rejected.extend(notes)
                return
        batch = passed = 0
        for i, w in zip(idx.tolist(), weights.tolist(), strict=True):
            s = pool.samples[i]
            if w <= 0.0:
                continue
            fb = s.to_feedback()
            if fb.kind.value in ("target", "gradient") and fb.quality < threshold:
                continue
            try:
                if adapter.adapt(s.input_embedding, fb, s.module, weight=w):
                    batch += 1
            except InvalidInputError:  # finite, but its gradient overflows: as relearn does
                passed += 1
            if batch == k:
                self._apply(adapter, batch, rejected, protect)
                batch = 0
        if batch:
            self._apply(adapter, batch, rejected, protect)
        if passed:
            rejected.append(passed_over_note(passed))

    def _apply(self, adapter: MicroLoRA, batch: int, rejected: list[str], protect: bool) -> None:
        cfg = self.config
        # the mean gradient clipped as one step's: k steps' worth moves at most k clipped steps
        if not adapter.apply_updates(cfg.instant_lr * batch, max_norm=cfg.training.max_grad_norm):
            rejected.append(adapter.last_note or "update rejected")
            return
        if protect:
            self._prox(adapter, cfg.instant_lr * batch, [])

    def _unmeasured(self, hand: HandOver, hold_back: bool) -> str | None:
        """Why this consolidation cannot measure its ``quality_delta``, if it cannot."""
        if not hold_back:
            return (
                "quality_delta: not measured: the consolidation that closes a task keeps no "
                "sample back"
            )
        if self.strategy is ConsolidationStrategy.EWC_MERGE and hand.before_held is None:
            return (
                "quality_delta: not measured: the Instant loop kept no copy of its live "
                "adapter from before the newest samples (one sample, evictions past every "
                "copy, or a checkpoint that kept none), and the live adapter has learned every "
                "sample it handed over"
            )
        return None

    def _prox(self, adapter: MicroLoRA, lr_total: float, notes: list[str]) -> None:
        lam = self.config.training.ewc_lambda
        if lam <= 0.0:
            return
        if self.pipeline.prox_step(adapter, 2.0 * lr_total * lam) < 0.0:
            notes.append("EWC++ step skipped: it would not have been finite")

    # ------------------------------------------------------------------ tasks and deep
    def start_new_task(self) -> None:
        self.pipeline.start_new_task(self.published.base)

    def install(self, outcome: DeepOutcome, notes: list[str]) -> bool:
        """Install a Deep result; True when it replaced the state it was computed from.

        If consolidation moved on meanwhile, the Deep run's change to the shared adapter
        (result − its starting point) is re-applied on top of the current one, exactly in ΔW
        space, and its cluster-adapter and pattern-bank changes are discarded (both moved too).
        Either way, a task boundary passed meanwhile has its anchor moved by the run's change
        (see ``_follow_boundaries``).

        A result that made the objective worse on the samples it held out (a negative
        ``quality_delta``) changes nothing: replaying a mix of tasks whose corrections conflict
        gives their average, and installing it undid what consolidation had kept of each.
        """
        if outcome.installed:
            raise InvalidInputError(
                "this Deep outcome was already installed; installing it again would apply its "
                "change twice"
            )
        if outcome.epochs == 0:  # nothing was replayed: the result is the state it started from
            outcome.installed = True
            notes.append("nothing installed: the deep run replayed no sample")
            return False
        delta = outcome.quality_delta
        if delta is not None and delta < 0.0:
            outcome.installed = True  # consumed: it is never applied later either
            notes.append(
                f"deep result discarded: it made the objective on its held-out samples worse "
                f"(quality_delta {delta:.4f})"
            )
            return False
        if delta is None:
            notes.append("installed unchecked: no held-out sample had a measurable objective")
        current = self.published
        if outcome.version == self.version:
            self._follow_boundaries(outcome, notes)
            self.bank = outcome.bank
            self.version += 1
            outcome.published.version = self.version
            self.published = outcome.published
            outcome.installed = True
            return True
        rank = current.base.config.rank
        try:
            base = MicroLoRA.merge_adapters(
                [(current.base, 1.0), (outcome.published.base, 1.0), (outcome.start, -1.0)],
                rank=rank,
            )
        except InvalidInputError:
            outcome.installed = True  # consumed, as a result that made things worse is
            notes.append(
                "deep result discarded: the consolidated state moved during the deep run, and "
                "re-applying its change on top would make delta_weight overflow"
            )
            return False
        base.baseline.load(current.base.baseline.state())  # the merge is built blank
        self._follow_boundaries(outcome, notes)
        self.version += 1
        self.published = Published(base, current.ensemble, current.centroids, self.version)
        outcome.installed = True
        notes.append(
            "consolidated state moved during the deep run: its change to the shared adapter was "
            "re-applied on top; cluster adapters and pattern bank changes were discarded"
        )
        return False

    def _follow_boundaries(self, outcome: DeepOutcome, notes: list[str]) -> None:
        """A task ended while the run replayed its samples: its anchor was taken before the
        run's change, which belongs to it. Installed as it is, the change would start the new
        task under an EWC++ penalty that pulls it back out; the anchor moves with it instead,
        as if the run had ended before the boundary."""
        if self.pipeline.task_count == outcome.task_count:
            return
        self.pipeline.shift_anchor(outcome.start, outcome.published.base)
        notes.append(
            "a task boundary passed during the deep run: the ended task's EWC++ anchor was "
            "moved by the run's change to the shared adapter"
        )

    @property
    def task_count(self) -> int:
        return self.pipeline.task_count


def _without_held(published: Published, live: MicroLoRA, before_held: MicroLoRA) -> Predictor:
    """What ``published`` predicts less what ``live`` learned from the held-back samples
    (its change since ``before_held``, its copy from before them): the fold as measured on
    them, rank truncation and EWC++'s pull included."""

    def predict(x: np.ndarray, module: TargetModule) -> np.ndarray:
        out = published.predict(x, module)
        # added into it in place: each adapter's own prediction would be another (n, out)
        # array, and each further pass over them a third of this step's time (measured:
        # quality_delta 1.12 ms instead of 1.52 ms per steady consolidation of 1,000 samples)
        live._add_batch(x, module, out, -1.0)
        before_held._add_batch(x, module, out, 1.0)  # raises where the sum leaves float32
        return out

    return predict


def _split_eval(
    samples: list[tuple[int, TrainingSample]],
) -> tuple[list[tuple[int, TrainingSample]], list[tuple[int, TrainingSample]]]:
    """Hold back the newest measurable samples (about 10 %, at most 64) for evaluation."""
    want = held_out_count(len(samples))
    return hold_out_newest(samples, want, _second) if want else (samples, [])


class _RowBuffer:
    """A reused float32 array the batch's input rows are gathered into.

    A fresh 16 MB array per consolidation costs its page faults on top of the copy: about a
    millisecond, and up to 20 ms measured on a virtual machine slow to fault in fresh pages.
    The rows are only read during :meth:`BackgroundLoop.prepare`, so one buffer serves every
    run; it is sized for a full hand-over and touched once at construction (bounded by
    ``_PREALLOCATE``), and grows if a larger batch ever comes.

    A scan may leave the rows before ``kept_from`` unwritten (see :func:`scan_rows`) when the
    run reads only the last ones; :meth:`complete` writes them should it need them after all.
    """

    def __init__(self, dim: int, rows: int) -> None:
        self.dim = dim
        rows = max(0, min(rows, _PREALLOCATE // (4 * dim)))
        self._flat = np.empty(rows * dim, np.float32)
        self._flat.fill(0.0)  # touch every page now, not during the first consolidation
        self._unwritten: tuple[list[np.ndarray], np.ndarray] | None = None

    def scan(
        self,
        samples: Sequence[TrainingSample],
        scanned: int,
        basis: np.ndarray | None,
        centroids: np.ndarray | None,
        kept_from: int = 0,
    ) -> tuple[np.ndarray, Projected | None, Labelled | None]:
        """The samples' input embeddings as rows of an (n, dim) view of the buffer, and what
        the first ``scanned`` rows give the detector and the bank (:func:`scan_rows`); rows
        before ``kept_from`` are written only once :meth:`complete` is called."""
        dim = self.dim
        n = len(samples)
        if n * dim > self._flat.shape[0]:
            self._flat = np.empty(n * dim + n * dim // 4, np.float32)
        rows = self._flat[: n * dim].reshape(n, dim)
        inputs = list(map(_input_embedding, samples))
        scanned_parts = scan_rows(inputs, rows, scanned, basis, centroids, kept_from)
        self._unwritten = (inputs[:kept_from], rows[:kept_from]) if kept_from else None
        return rows, *scanned_parts

    def complete(self) -> None:
        """Write the rows the last scan left unwritten, if any."""
        if self._unwritten is not None:
            inputs, rows = self._unwritten
            self._unwritten = None
            stack_rows(inputs, self.dim, out=rows)

    def release(self) -> None:
        """Let go of the rows the last scan left unwritten (their samples' inputs): the run
        will not read them."""
        self._unwritten = None


def _strategy_weights(
    strategy: ConsolidationStrategy, samples: Sequence[TrainingSample]
) -> list[float]:
    n = len(samples)
    if n == 0:
        return []
    q = np.array([s.quality for s in samples], np.float64)
    if strategy is ConsolidationStrategy.QUALITY_WEIGHTED:
        mean = float(q.mean())
        return [float(v / mean) if mean > 0 else 0.0 for v in q]
    if strategy is ConsolidationStrategy.BEST_ONLY:
        k = max(1, math.ceil(BEST_FRACTION * n))
        weights = np.zeros(n)
        weights[np.lexsort((-np.arange(n), -q))[:k]] = 1.0  # equal ratings: the newest first
        return [float(w) for w in weights]
    return [1.0] * n


def _note_rating_only(
    samples: Sequence[TrainingSample], strategy: ConsolidationStrategy, notes: list[str]
) -> None:
    """Quality-only samples rate noise the live adapter explored; a strategy that re-learns
    from the samples on another adapter cannot step on them, so what the Instant loop learned
    from them is not carried into the consolidated state (EWC_MERGE folds it in)."""
    n = sum(map(rating_only, samples))
    if n:
        notes.append(
            f"{strategy.value}: {n} quality-only samples cannot be re-learned (their exploration "
            "belonged to the live adapter); what the Instant loop learned from them is not kept"
        )


def _zero_like(template: MicroLoRA, label: int) -> MicroLoRA:
    fresh = MicroLoRA(template.config, seed=(template.seed + 7919 * (label + 1)) % (1 << 63))
    return fresh
