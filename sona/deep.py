"""The Deep loop's logic: replay under EWC++, an ensemble distilled into one adapter, and
pattern-bank maintenance.

It works only on copies taken from the Background loop (a :class:`DeepJob`) and returns a
replacement; Background installs it if its own state has not moved meanwhile, else re-applies
the change on top. Each epoch is one GIL-releasing kernel call (``MicroLoRA.replay``), so it
runs in a worker thread beside a busy event loop without waiting for the GIL once per sample.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sona.config import ConsolidationStrategy, SonaLlmConfig
from sona.errors import InvalidInputError
from sona.kernels.update import vec_sq_norm_finite, vectors_equal
from sona.lora import MicroLoRA
from sona.objective import hold_out_newest, quality_delta
from sona.pattern_bank import PatternBank
from sona.published import Published
from sona.replay import ReplayPool, rating_only
from sona.sample import TrainingSample
from sona.stacking import stack_rows
from sona.training import TrainingPipeline

MEMBERS = 3
MAX_REPLAY = 2048  # samples replayed per run, drawn at random from the older kept ones
LR_DECAY = 0.95
EVAL_FRACTION = 0.1
MAX_EVAL = 256
EWC_EVERY = 16


@dataclass(slots=True)
class DeepJob:
    """Everything a Deep run needs, copied so the caller's state can move on meanwhile.

    Only the samples the run will use are referenced (at most ``MAX_REPLAY`` to train on and
    ``MAX_EVAL`` held out): the job keeps them alive until it ends, and a whole replay buffer
    kept alive would stop the memory of every sample evicted meanwhile from being reused.
    """

    config: SonaLlmConfig
    published: Published  # adapters are clones
    train: list[TrainingSample]
    held: list[TrainingSample]
    pipeline_state: tuple[dict[str, Any], dict[str, np.ndarray]]
    bank_state: tuple[dict[str, Any], dict[str, np.ndarray]]
    version: int
    rng_state: Mapping[str, Any]  # the run's random stream, after drawing ``train``
    task_count: int = 0  # the pipeline's, at the snapshot


@dataclass(slots=True)
class DeepOutcome:
    published: Published
    bank: PatternBank
    samples_used: int
    epochs: int
    quality_delta: float | None
    latency_ms: float
    version: int
    start: MicroLoRA  # the shared adapter the run started from
    task_count: int = 0  # tasks ended before the run began (the snapshot's)
    evaluated_on: int = 0
    notes: list[str] = field(default_factory=list)
    installed: bool = False  # set by the Background loop: an outcome is installed at most once


def snapshot(
    config: SonaLlmConfig,
    published: Published,
    samples: Sequence[TrainingSample],
    pipeline: TrainingPipeline,
    bank: PatternBank,
    version: int,
    seed: int,
) -> DeepJob:
    """The job for a Deep run over ``samples`` (oldest first): the newest measurable ones held
    out, at most ``MAX_REPLAY`` of the others drawn at random to train on."""
    copy = Published(
        published.base.clone(),
        {k: v.clone() for k, v in published.ensemble.items()},
        None if published.centroids is None else published.centroids.copy(),
        published.version,
    )
    rng = np.random.default_rng(seed)
    train, held = _split(list(samples))
    if len(train) > MAX_REPLAY:
        keep = np.sort(rng.choice(len(train), MAX_REPLAY, replace=False)).tolist()
        train = [train[i] for i in keep]
    return DeepJob(
        config, copy, train, held, pipeline.state_dict(), bank.state(), version,
        rng.bit_generator.state, pipeline.task_count,
    )  # fmt: skip


def _without_repeats_of(
    train: list[TrainingSample], held: Sequence[TrainingSample]
) -> list[TrainingSample]:
    """``train`` without the samples equal to a held-out one (same input, feedback and module).

    A sample the host submitted twice is kept twice; held out as one of the newest and replayed
    as an older one, it would make ``quality_delta`` partly a training loss. A fingerprint of
    three input elements finds the candidates, so only they are compared in full."""
    if not held:
        return train
    by_print: dict[tuple[float, float, float], list[TrainingSample]] = {}
    for h in held:
        by_print.setdefault(_fingerprint(h), []).append(h)
    out = []
    for s in train:
        near = by_print.get(_fingerprint(s))
        if near is None or not any(_same(s, h) for h in near):
            out.append(s)
    return out


def _fingerprint(sample: TrainingSample) -> tuple[float, float, float]:
    x = sample.input_embedding
    return float(x[0]), float(x[x.shape[0] // 2]), float(x[-1])


def _same(a: TrainingSample, b: TrainingSample) -> bool:
    """The same objective term: equal input, feedback and module."""
    if a is b:
        return True
    if a.module is not b.module or not vectors_equal(a.input_embedding, b.input_embedding):
        return False
    fa, fb = a.to_feedback(), b.to_feedback()
    if fa.kind is not fb.kind or fa.quality != fb.quality:
        return False
    if fa.vector is None or fb.vector is None:
        return fa.vector is fb.vector
    return bool(vectors_equal(fa.vector, fb.vector))


def run_deep(job: DeepJob) -> DeepOutcome:
    """Replay the kept samples for ``deep_epochs`` epochs in ``MEMBERS`` shuffled orders under
    EWC++, merge the members exactly (their mean, truncated to the adapter's rank), refine,
    merge and prune the pattern bank, and measure the result on held-out newest samples."""
    t0 = time.perf_counter()
    cfg = job.config
    notes: list[str] = []
    # here, in the run's own thread, not in the snapshot the event loop takes
    fresh = _without_repeats_of(job.train, job.held)
    if len(fresh) < len(job.train):
        notes.append(f"{len(job.train) - len(fresh)} training copies of held-out samples left out")
    train = [s for s in fresh if _within_float32(s)]
    held = [s for s in job.held if _within_float32(s)]
    skipped = len(fresh) + len(job.held) - len(train) - len(held)
    if skipped:
        notes.append(f"{skipped} samples too large for float32 arithmetic skipped")
    pipeline = TrainingPipeline(cfg.training)
    pipeline.load_state_dict(*job.pipeline_state)
    bank = PatternBank(cfg.pattern_clusters, cfg.micro_lora.in_features)
    bank.load(*job.bank_state)
    rng = np.random.default_rng()
    rng.bit_generator.state = job.rng_state
    old = job.published
    xs = stack_rows([s.input_embedding for s in train], cfg.micro_lora.in_features)
    pool = ReplayPool(train, xs, cfg.micro_lora.out_features, cfg.micro_lora.target_modules)
    threshold = cfg.training.quality_threshold
    good = [i for i, s in enumerate(train) if s.quality >= threshold]
    if len(good) < len(train):
        notes.append(f"{len(train) - len(good)} kept samples below quality_threshold skipped")
    usable = np.array([i for i in good if not rating_only(train[i])], np.int64)
    if len(usable) < len(good):
        notes.append(
            f"{len(good) - len(usable)} quality-only samples cannot be replayed: the exploration "
            "they rate belonged to the live adapter"
        )
    ensemble: dict[int, MicroLoRA] = {}
    centroids = old.centroids
    if cfg.consolidation_strategy is ConsolidationStrategy.ENSEMBLE:
        # Inference adds the shared adapter and an input's cluster adapter; under ENSEMBLE the
        # cluster adapters carry what was learned, so the shared one is left as it is (trained
        # toward the same targets, the two would add up to twice the correction). EWC++'s
        # anchor is the shared adapter's: cluster adapters, which routing keeps apart, are
        # replayed without the proximal pull toward it.
        base = old.base.clone()
        labels = bank.assign_many(xs[usable]) if len(usable) else np.empty(0, np.intp)
        replayed = 0
        for label, adapter in old.ensemble.items():
            rows = usable[labels == label]
            ensemble[label] = _train_members(adapter, pool, rows, cfg, None, rng)
            replayed += len(rows)
    else:
        base = _train_members(old.base, pool, usable, cfg, pipeline, rng)
        replayed = len(usable)
    if train:
        bank.refine(xs)
        counts = bank.counts[: len(bank)].copy()  # merge_and_prune replaces them
        mapping = bank.merge_and_prune()
        ensemble = _remap(ensemble, mapping, counts)
        centroids = bank.centroids[: len(bank)].copy() if ensemble else None
        merged = sum(1 for i, j in enumerate(mapping) if j >= 0 and mapping.index(j) != i)
        pruned = sum(1 for j in mapping if j < 0)
        if merged or pruned:
            notes.append(f"pattern bank: merged {merged}, pruned {pruned} clusters")
    result = Published(base, ensemble, centroids)
    if not replayed:
        notes.append("nothing to replay: no kept sample an adapter here can step on")
    modules = cfg.micro_lora.target_modules
    delta = None
    if replayed:  # measured on samples the run held out of its replay
        delta = quality_delta(held, old.predict, result.predict, modules, notes, kept="held-out")
    return DeepOutcome(
        result,
        bank,
        samples_used=replayed,
        epochs=cfg.deep_epochs if replayed else 0,
        quality_delta=delta,
        latency_ms=(time.perf_counter() - t0) * 1e3,
        version=job.version,
        start=old.base,
        task_count=job.task_count,
        evaluated_on=len(held),
        notes=notes,
    )


def _train_members(
    start: MicroLoRA,
    pool: ReplayPool,
    rows: np.ndarray,
    cfg: SonaLlmConfig,
    pipeline: TrainingPipeline | None,
    rng: np.random.Generator,
) -> MicroLoRA:
    """``MEMBERS`` copies of ``start`` trained on the pool's ``rows`` in their own shuffled
    orders (under EWC++ when ``pipeline`` is given), merged exactly."""
    if not len(rows):
        return start.clone()
    members = []
    for _ in range(MEMBERS):
        member = start.clone()
        for epoch in range(cfg.deep_epochs):
            lr = cfg.instant_lr * LR_DECAY**epoch
            order = rng.permutation(len(rows))
            _epoch(member, pool, rows[order], lr, cfg, pipeline)
        members.append(member)
    weight = 1.0 / len(members)
    merged = MicroLoRA.merge_adapters([(m, weight) for m in members], rank=start.config.rank)
    # The merge is built blank. Its rating baseline stays the starting one: the members only
    # re-counted ratings it has already seen, and a blank one would weigh the next rated
    # outputs re-learned from it as if no rating had ever been seen.
    merged.baseline.load(start.baseline.state())
    return merged


def _epoch(
    adapter: MicroLoRA,
    pool: ReplayPool,
    rows: np.ndarray,
    lr: float,
    cfg: SonaLlmConfig,
    pipeline: TrainingPipeline | None,
) -> None:
    """One pass over the pool's ``rows`` in that order: one kernel call when the adapter and
    the samples allow it, else sample by sample (the same steps)."""
    lam = cfg.training.ewc_lambda if pipeline is not None else 0.0
    max_norm = cfg.training.max_grad_norm
    if pool.batch is not None:
        ewc = pipeline.replay_ewc(adapter) if pipeline is not None and lam > 0.0 else None
        if adapter.replay(
            pool.batch, rows, lr, max_norm=max_norm, ewc=ewc, ewc_every=EWC_EVERY, ewc_lambda=lam
        ):
            return
    since = 0
    for i in rows.tolist():
        s = pool.samples[i]
        try:  # one sample's fused, clipped, finiteness-checked step (adapt + apply_updates)
            fb = s.to_feedback()
            if not adapter.step(s.input_embedding, fb, lr, max_norm=max_norm, module=s.module):
                continue
        except InvalidInputError:  # finite values whose gradient overflows float32: no step
            continue
        since += 1
        if since == EWC_EVERY:
            if pipeline is not None and lam > 0.0:
                pipeline.prox_step(adapter, 2.0 * lr * lam * since)
            since = 0
    if since and pipeline is not None and lam > 0.0:
        pipeline.prox_step(adapter, 2.0 * lr * lam * since)


def _within_float32(sample: TrainingSample) -> bool:
    """Both embeddings have a squared norm that float32 can hold. Larger ones (finite, but
    ~1e19 and up) overflow every step and every distance the pattern bank computes; the
    Instant loop never applies them, but they can reach Deep through ``deep_optimize``."""
    return vec_sq_norm_finite(sample.input_embedding) and vec_sq_norm_finite(
        sample.output_embedding
    )


def _remap(
    ensemble: dict[int, MicroLoRA], mapping: list[int], counts: np.ndarray
) -> dict[int, MicroLoRA]:
    """Follow the bank's merges: adapters of merged clusters are merged, weighted by the
    inputs each cluster held (``counts``, before the merge). Routing sent each cluster's inputs
    to its own adapter; the count-weighted mean is the one adapter closest to those predictions
    over the inputs (merged clusters point the same way), whereas an equal share would halve a
    large cluster's correction for a barely seeded neighbour."""
    if not ensemble:
        return ensemble
    groups: dict[int, list[int]] = {}
    for old, new in enumerate(mapping):
        if new >= 0 and old in ensemble:
            groups.setdefault(new, []).append(old)
    out: dict[int, MicroLoRA] = {}
    for new, olds in groups.items():
        if len(olds) == 1:
            out[new] = ensemble[olds[0]]
            continue
        rank = ensemble[olds[0]].config.rank
        held = np.array([max(int(counts[o]), 0) for o in olds], np.float64)
        shares = held / held.sum() if held.sum() > 0 else np.full(len(olds), 1.0 / len(olds))
        pairs = [(ensemble[o], float(w)) for o, w in zip(olds, shares, strict=True)]
        out[new] = MicroLoRA.merge_adapters(pairs, rank=rank)
        largest = ensemble[olds[int(np.argmax(held))]]  # the blank merge keeps its ratings
        out[new].baseline.load(largest.baseline.state())
    return out


def _split(samples: list[TrainingSample]) -> tuple[list[TrainingSample], list[TrainingSample]]:
    """Hold out the newest measurable samples (about 10 %, at most 256) for evaluation."""
    if len(samples) < 2:
        return samples, []
    want = min(MAX_EVAL, max(1, int(EVAL_FRACTION * len(samples))))
    return hold_out_newest(samples, want, _itself)


def _itself(sample: TrainingSample) -> TrainingSample:
    return sample
