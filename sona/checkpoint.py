"""Checkpoint files: everything a :class:`~sona.runtime.SonaRuntime` needs to continue exactly.

A checkpoint holds the configuration and seed; the live adapter (with its rating baseline,
dropout position and pending explorations), the Instant loop's copies of it
(:mod:`sona.live_copies`) and the consolidated adapters, each as the adapter's own checksummed
bytes (:meth:`MicroLoRA.export_weights`); the EWC++ state (importance
sketch, anchors, task count, input window, boundary detector); the pattern bank; the replay
buffer, the held-back and pending samples, the hand-over a crash interrupted and the samples
accepted but not yet handled; every counter and the next sample id; and the log sequence number
it includes: every sample with an id at or below it has been handled, every one above it was
not (and is replayed from the durable log on restore).

The file is a :mod:`sona.container` (magic ``SONACKPT``, kind ``sona_checkpoint``): a
versioned prefix, a JSON header, raw little-endian arrays and a BLAKE2b checksum over all of
it, so a flipped byte anywhere is detected before anything is decoded, and absurd sizes are
refused before any allocation. Loading never runs code: the header is decoded by msgspec into
typed structures, samples are typed msgpack records (:mod:`sona.sample_codec`), and everything is
validated into new objects before a runtime is built, so a bad file changes nothing.

Capturing happens on the event loop, inside the Background actor's turn, so the three loops'
states are read at one consistent moment; it copies only what is mutable (adapters are
exported, arrays copied, samples are immutable and shared). Encoding and writing happen in a
worker thread.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Annotated, Any, overload

import msgspec
import numpy as np

from sona import container
from sona.actors.mailbox import OverflowPolicy
from sona.config import ConsolidationStrategy, SonaLlmConfig, SupervisionConfig
from sona.errors import ConfigMismatchError, FormatError
from sona.instant import HandOver
from sona.live_copies import COPIES_KEPT
from sona.lora import MicroLoRA
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.pattern_bank import PatternBank
from sona.published import Published
from sona.sample import TrainingSample
from sona.sample_codec import encode_sample, sample_ids, unpack_samples
from sona.training import TrainingPipeline
from sona.training_config import TrainingConfig
from sona.validation import MAX_COUNT, RUN_SEED_BITS

if TYPE_CHECKING:
    from sona.runtime import SonaRuntime

__all__ = [
    "FORMAT",
    "MAGIC",
    "CaptureState",
    "Captured",
    "CheckpointState",
    "SampleIds",
    "capture",
    "config_from_dict",
    "config_to_dict",
    "decode",
    "encode",
    "install",
    "read",
    "write",
]

MAGIC = b"SONACKPT"
KIND = "sona_checkpoint"
FORMAT = "sona.checkpoint/1"
SAMPLE_LISTS = ("replay", "pending", "carry", "unfinished", "queued")
# Fields that shape the stored state: a restore may change the others (intervals, limits,
# supervision, overflow policy), not these.
STATE_FIELDS = (
    "micro_lora",
    "training",
    "pattern_clusters",
    "consolidated_rank",
    "consolidation_strategy",
)

# The Instant loop's own small counters and flags (a new task's fresh start): kept by name so
# a checkpoint holds them whichever of them this version of the loop has.
INSTANT_STATE = ("_fresh_start", "_restarts", "_appended", "_evicted_since", "_next_copy")

Item = tuple[int, TrainingSample, TargetModule | None]


class SampleIds:
    """The runtime's sample-id counter: ``next()`` hands out ids, ``value`` is the next one.

    Unlike ``itertools.count`` its position can be read and set, which checkpoints need.
    """

    __slots__ = ("value",)

    def __init__(self, start: int = 1) -> None:
        self.value = start

    def __iter__(self) -> SampleIds:
        return self

    def __next__(self) -> int:
        v = self.value
        self.value = v + 1
        return v


class CaptureState(msgspec.Struct, frozen=True, tag=True):
    """Background loop message: capture the runtime's state between two of its turns."""


# ---------------------------------------------------------------------- configuration
def config_to_dict(config: SonaLlmConfig) -> dict[str, Any]:
    """A JSON-able dict that :func:`config_from_dict` turns back into an equal config."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (ConsolidationStrategy, OverflowPolicy)):
            value = value.value
        elif isinstance(value, (MicroLoraConfig, TrainingConfig)):
            value = value.to_dict()
        elif isinstance(value, SupervisionConfig):
            value = {g.name: getattr(value, g.name) for g in fields(value)}
        out[f.name] = value
    return out


def config_from_dict(data: Any, *, what: str = "config") -> SonaLlmConfig:
    """The config :func:`config_to_dict` described; fields it lacks take their defaults."""
    if not isinstance(data, dict):
        raise FormatError(f"{what}: expected an object, got {type(data).__name__}")
    known = {f.name for f in fields(SonaLlmConfig)}
    unknown = set(data) - known
    if unknown:
        raise FormatError(f"{what}: unknown fields {sorted(unknown)}")
    values = dict(data)
    try:
        if "consolidation_strategy" in values:
            values["consolidation_strategy"] = ConsolidationStrategy(
                values["consolidation_strategy"]
            )
        if "overflow" in values:
            values["overflow"] = OverflowPolicy(values["overflow"])
        if "micro_lora" in values:
            values["micro_lora"] = MicroLoraConfig.from_dict(_obj(values["micro_lora"]))
        if "training" in values:
            values["training"] = TrainingConfig.from_dict(_obj(values["training"]))
        if "supervision" in values:
            values["supervision"] = SupervisionConfig(**_obj(values["supervision"]))
        return SonaLlmConfig(**values)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{what}: invalid configuration: {exc}") from None


def _obj(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------- the header, typed
_Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
_Id = Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)]
_Seed = Annotated[int, msgspec.Meta(ge=0, lt=2**RUN_SEED_BITS)]
# a Unix time up to the last second of year 9999, the last one a datetime can show
_Time = Annotated[float, msgspec.Meta(ge=0.0, le=253_402_300_799.0)]


class _Counters(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    submitted: _Count
    dropped: _Count
    dead_lettered: _Count
    deep_runs: _Count


class _InstantMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    applied: _Count
    skipped: _Count
    rejected: _Count
    evicted: _Count
    skip_reasons: dict[str, _Count]
    latency_sum_us: Annotated[float, msgspec.Meta(ge=0.0)]
    accumulated_quality: Annotated[float, msgspec.Meta(ge=0.0)]
    loop_state: dict[str, _Count]
    explored: _Count
    copies: list[_Count] = msgspec.field(default_factory=list)  # where each copy was taken


class _BackgroundMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: _Count
    runs: _Count
    consolidated: _Count
    published_version: _Count
    ensemble: list[_Count]
    centroids: bool


class _Meta(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: str
    created_unix: _Time
    run_id: str
    checkpoint_seq: _Count
    seed: _Seed
    config: dict[str, Any]
    log_sequence: _Count
    next_sample_id: _Id
    counters: _Counters
    instant: _InstantMeta
    background: _BackgroundMeta
    pipeline: dict[str, Any]
    bank: dict[str, Any]
    unfinished: bool
    unfinished_learned: _Count = 0  # of the unfinished hand-over's copy (0: none)


# ---------------------------------------------------------------------- capture
class _Unnumbered(Sequence[Item]):
    """Samples without ids (the replay buffer) seen as items with id 0, built on access: a
    capture on the event loop copies one list instead of creating an object per sample."""

    __slots__ = ("_samples",)

    def __init__(self, samples: list[TrainingSample]) -> None:
        self._samples = samples

    def __len__(self) -> int:
        return len(self._samples)

    @overload
    def __getitem__(self, index: int) -> Item: ...
    @overload
    def __getitem__(self, index: slice) -> list[Item]: ...
    def __getitem__(self, index: int | slice) -> Item | list[Item]:
        if isinstance(index, slice):
            return [(0, s, None) for s in self._samples[index]]
        return (0, self._samples[index], None)


@dataclass(slots=True)
class Captured:
    """A consistent copy of a runtime's state, cheap to take; encoded off the event loop."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    samples: dict[str, Sequence[Item]]

    @property
    def log_sequence(self) -> int:
        return int(self.meta["log_sequence"])


def capture(
    rt: SonaRuntime, *, run_id: str, checkpoint_seq: int, undelivered: Sequence[Item] = ()
) -> Captured:
    """Read ``rt``'s state; must run where no loop is mid-turn (see the module docstring).

    ``undelivered``: samples a restore brought back that are not yet counted as accepted
    (a restored runtime that was not started); they are stored as queued.
    """
    inst = rt._instant
    bg = rt._background
    live = inst.live
    arrays: dict[str, np.ndarray] = {
        "adapter.live": _adapter_bytes(live),
        "adapter.base": _adapter_bytes(bg.published.base),
    }
    for label, adapter in bg.published.ensemble.items():
        arrays[f"adapter.ensemble.{label}"] = _adapter_bytes(adapter)
    centroids = bg.published.centroids
    if centroids is not None:
        arrays["published.centroids"] = centroids.copy()
    loop_state = {n: int(getattr(inst, n)) for n in INSTANT_STATE if hasattr(inst, n)}
    explored: dict[tuple[int, int], float] = getattr(live, "_explored", {})
    if explored:
        arrays["live.explored.keys"] = np.array(list(explored), dtype=np.uint64).reshape(-1, 2)
        arrays["live.explored.sigma"] = np.fromiter(explored.values(), np.float64, len(explored))
    pipe_meta, pipe_arrays = bg.pipeline.state_dict()
    arrays.update({f"pipeline.{k}": v for k, v in pipe_arrays.items()})
    bank_meta, bank_arrays = bg.bank.state()
    arrays.update({f"bank.{k}": v for k, v in bank_arrays.items()})
    unfinished = inst.unfinished
    learned = 0
    if unfinished is not None:
        arrays["adapter.unfinished"] = _adapter_bytes(unfinished.live)
        if unfinished.before_held is not None:
            arrays["adapter.unfinished.before"] = _adapter_bytes(unfinished.before_held)
            learned = unfinished.learned
    copies = inst.copies
    for i, (_, copy) in enumerate(copies):
        arrays[f"adapter.copy.{i}"] = _adapter_bytes(copy)
    queued: list[Item] = [
        (sid, t.sample, t.module)
        for sid, t in rt._queued.items()
        if t.sample is not None  # answered at stop but unhandled ones stay queued
    ]
    if undelivered:
        queued = sorted([*queued, *undelivered], key=lambda item: item[0])
    next_id = rt._ids.value
    log_sequence = min((sid for sid, _, _ in queued), default=next_id) - 1
    samples: dict[str, Sequence[Item]] = {
        "replay": _Unnumbered(list(bg.replay)),
        "pending": [(sid, s, None) for sid, s in inst.pending],
        "carry": [(sid, s, None) for sid, s in bg.carry],
        "unfinished": [] if unfinished is None else [(i, s, None) for i, s in unfinished.samples],
        "queued": queued,
    }
    meta = {
        "format": FORMAT,
        "created_unix": time.time(),
        "run_id": run_id,
        "checkpoint_seq": checkpoint_seq,
        "seed": rt.seed,
        "config": config_to_dict(rt.config),
        "log_sequence": log_sequence,
        "next_sample_id": next_id,
        "counters": {
            "submitted": rt.submitted + len(undelivered),
            "dropped": rt.dropped,
            "dead_lettered": rt.dead_lettered,
            "deep_runs": rt.deep_runs,
        },
        "instant": {
            "applied": inst.applied,
            "skipped": inst.skipped,
            "rejected": inst.rejected,
            "evicted": inst.evicted,
            "skip_reasons": dict(inst.skip_reasons),
            "latency_sum_us": inst.latency_sum_us,
            # with the quality a Deep run in progress took: restored, the run is due again
            "accumulated_quality": inst.accumulated_quality + rt._deep_taken,
            "loop_state": loop_state,
            "explored": len(explored),
            "copies": [at for at, _ in copies],
        },
        "background": {
            "version": bg.version,
            "runs": bg.runs,
            "consolidated": bg.consolidated,
            "published_version": bg.published.version,
            "ensemble": sorted(bg.published.ensemble),
            "centroids": centroids is not None,
        },
        "pipeline": pipe_meta,
        "bank": bank_meta,
        "unfinished": unfinished is not None,
        "unfinished_learned": learned,
    }
    return Captured(meta, arrays, samples)


def _adapter_bytes(adapter: MicroLoRA) -> np.ndarray:
    return np.frombuffer(adapter.export_weights(), dtype=np.uint8)


def _arrays(captured: Captured) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The container's arrays but the sample records, and the records' sizes (one pass of
    encoding that keeps only the lengths)."""
    arrays = dict(captured.arrays)
    sizes: dict[str, int] = {}
    for name in SAMPLE_LISTS:
        items = captured.samples[name]
        lengths = np.empty(len(items), np.int64)
        for i, (_, sample, module) in enumerate(items):
            lengths[i] = len(encode_sample(sample, module))
            if i % 512 == 511:
                time.sleep(0)  # let the event loop have the GIL between slices
        arrays[f"samples.{name}.ids"] = np.fromiter(
            (sid for sid, _, _ in items), dtype=np.int64, count=len(items)
        )
        arrays[f"samples.{name}.lengths"] = lengths
        sizes[f"samples.{name}.records"] = int(lengths.sum())
    return arrays, sizes


def _records(items: Sequence[Item], chunk: int = 256) -> Iterator[bytes]:
    """The records of ``items``, encoded again and joined a few hundred at a time."""
    for start in range(0, len(items), chunk):
        yield b"".join(encode_sample(s, m) for _, s, m in items[start : start + chunk])
        time.sleep(0)


def encode(captured: Captured) -> bytes:
    """The checkpoint file's bytes (CPU-bound: call it from a worker thread)."""
    arrays, _ = _arrays(captured)
    for name in SAMPLE_LISTS:
        blob = b"".join(_records(captured.samples[name]))
        arrays[f"samples.{name}.records"] = np.frombuffer(blob, dtype=np.uint8)
    return container.encode(MAGIC, KIND, captured.meta, arrays)


def write(captured: Captured, path: Any) -> int:
    """Check that ``captured`` decodes (header, adapters, training state, ids), then write it
    atomically, streamed from its arrays and records; its size in bytes. Call it from a worker
    thread. The result is byte for byte :func:`encode`'s.

    The records are encoded twice (once for their lengths, which the header needs first, once
    to write them a few hundred at a time), so writing a checkpoint never holds its replay
    buffer in memory a second time. The check decodes from the arrays themselves and does not
    re-read the records (they were just encoded from validated samples).
    """
    arrays, sizes = _arrays(captured)
    shadow: dict[str, np.ndarray] = dict(arrays)
    for name, size in sizes.items():  # the records' sizes, without their bytes
        shadow[name] = np.broadcast_to(np.uint8(0), (size,))
    raw_meta = msgspec.json.decode(msgspec.json.encode(captured.meta))  # as a reader sees it
    _from_container(raw_meta, shadow, str(path), samples=False)
    lazy = {
        f"samples.{name}.records": (
            sizes[f"samples.{name}.records"],
            _records(captured.samples[name]),
        )
        for name in SAMPLE_LISTS
    }
    return container.write_encoded_atomic(
        path, MAGIC, KIND, captured.meta, arrays, byte_arrays=lazy
    )


# ---------------------------------------------------------------------- decode
@dataclass(slots=True)
class CheckpointState:
    """A decoded, fully validated checkpoint: new objects, ready to be installed."""

    path: str
    config: SonaLlmConfig
    seed: int
    run_id: str
    checkpoint_seq: int
    created_unix: float
    log_sequence: int
    next_sample_id: int
    counters: _Counters
    instant: _InstantMeta
    background: _BackgroundMeta
    live: MicroLoRA
    base: MicroLoRA
    ensemble: dict[int, MicroLoRA]
    centroids: np.ndarray | None
    explored: list[tuple[tuple[int, int], float]]
    pipeline: TrainingPipeline
    bank: PatternBank
    unfinished: HandOver | None
    samples: dict[str, list[Item]] = field(default_factory=dict)
    copies: list[tuple[int, MicroLoRA]] = field(default_factory=list)  # InstantLoop.copies

    @property
    def queued(self) -> list[Item]:
        return self.samples["queued"]


def read(path: Any) -> CheckpointState:
    """Read and validate a checkpoint file; a FormatError naming the file if anything is off."""
    return decode(container.read_file(path), what=str(path))


def decode(data: Any, *, what: str = "checkpoint", samples: bool = True) -> CheckpointState:
    """Validate and decode checkpoint bytes; every failure is a FormatError naming ``what``.

    ``samples=False`` checks the sample lists' framing and ids but leaves them empty, for a
    quick check of a checkpoint that was just encoded.
    """
    raw_meta, arrays = container.decode(data, MAGIC, KIND, what=what)
    return _from_container(raw_meta, arrays, what, samples)


def _from_container(
    raw_meta: dict[str, Any], arrays: dict[str, np.ndarray], what: str, samples: bool
) -> CheckpointState:
    try:
        meta = msgspec.convert(raw_meta, type=_Meta)
    except msgspec.ValidationError as exc:
        raise FormatError(f"{what}: malformed checkpoint header: {exc}") from None
    if meta.format != FORMAT:
        raise FormatError(f"{what}: checkpoint format {meta.format!r}, this sona reads {FORMAT}")
    try:
        return _decode_state(meta, arrays, what, samples)
    except FormatError as exc:
        text = str(exc)
        raise FormatError(text if text.startswith(what) else f"{what}: {text}") from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise FormatError(f"{what}: invalid checkpoint content: {exc!r}") from None


def _decode_state(
    meta: _Meta, arrays: dict[str, np.ndarray], what: str, with_samples: bool
) -> CheckpointState:
    for name, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise FormatError(f"array {name} holds NaN or inf")
    # (created_unix is bounded by its type; these two only from below, which lets inf through)
    for value in (meta.instant.latency_sum_us, meta.instant.accumulated_quality):
        if not math.isfinite(value):
            raise FormatError("a header number is not finite")
    config = config_from_dict(meta.config, what="config")
    micro = config.micro_lora
    used: set[str] = set()

    def take(name: str, *, dtype: str | None = None, optional: bool = False) -> np.ndarray | None:
        arr = arrays.get(name)
        if arr is None:
            if optional:
                return None
            raise FormatError(f"missing array {name}")
        if dtype is not None and arr.dtype != np.dtype(dtype):
            raise FormatError(f"array {name} has dtype {arr.dtype}, expected {dtype}")
        used.add(name)
        return arr

    def adapter(name: str, cfg: MicroLoraConfig) -> MicroLoRA:
        blob = take(name, dtype="u1")
        assert blob is not None
        lora = MicroLoRA(cfg, seed=0)
        try:
            lora.import_weights(blob.tobytes())
        except ConfigMismatchError:
            raise FormatError(f"adapter {name} does not match the stored configuration") from None
        except FormatError as exc:
            raise FormatError(f"adapter {name}: {exc}") from None
        return lora

    live = adapter("adapter.live", micro)
    base = adapter("adapter.base", config.consolidated_lora)
    bgm = meta.background
    if len(set(bgm.ensemble)) != len(bgm.ensemble):
        raise FormatError("duplicate ensemble labels")
    if any(label >= config.pattern_clusters for label in bgm.ensemble):
        raise FormatError("an ensemble label exceeds pattern_clusters")
    ensemble = {
        label: adapter(f"adapter.ensemble.{label}", config.consolidated_lora)
        for label in bgm.ensemble
    }
    centroids = take("published.centroids", dtype="f4", optional=not bgm.centroids)
    if bgm.centroids:
        assert centroids is not None
        if centroids.ndim != 2 or centroids.shape[1] != micro.in_features:
            raise FormatError(f"published centroids have shape {centroids.shape}")
        if centroids.shape[0] > config.pattern_clusters:
            raise FormatError("more published centroids than pattern_clusters")
    elif centroids is not None:
        raise FormatError("published centroids present but not announced")
    unknown = set(meta.instant.loop_state) - set(INSTANT_STATE)
    if unknown:
        raise FormatError(f"unknown Instant loop state {sorted(unknown)}")
    explored = _explored(meta.instant.explored, take, len(micro.target_modules))
    pipeline = TrainingPipeline(config.training)
    pipe_arrays = {k[len("pipeline.") :]: v for k, v in arrays.items() if k.startswith("pipeline.")}
    used.update(f"pipeline.{k}" for k in pipe_arrays)
    try:
        pipeline.load_state_dict(meta.pipeline, pipe_arrays)
    except FormatError as exc:
        raise FormatError(f"training state: {exc}") from None
    bank = PatternBank(config.pattern_clusters, micro.in_features)
    bank_arrays = {k[len("bank.") :]: v for k, v in arrays.items() if k.startswith("bank.")}
    used.update(f"bank.{k}" for k in bank_arrays)
    try:
        bank.load(meta.bank, bank_arrays)
    except FormatError as exc:
        raise FormatError(f"pattern bank: {exc}") from None
    samples: dict[str, list[Item]] = {}
    ids: dict[str, list[int]] = {}
    for name in SAMPLE_LISTS:
        prefix = f"samples.{name}."
        part = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        if set(part) != {"ids", "lengths", "records"}:
            raise FormatError(f"sample list {name} is incomplete")
        used.update(prefix + k for k in part)
        ids[name] = sample_ids(part, what=f"{name} samples")
        samples[name] = (
            unpack_samples(
                part,
                in_features=micro.in_features,
                out_features=micro.out_features,
                what=f"{what}: {name} samples",
            )
            if with_samples
            else []
        )
    unfinished = None
    learned = meta.unfinished_learned
    if meta.unfinished:
        snap = adapter("adapter.unfinished", micro)
        before = adapter("adapter.unfinished.before", micro) if learned else None
        if learned and learned >= len(ids["unfinished"]):
            raise FormatError("the unfinished hand-over's copy learned all its samples or more")
        unfinished = HandOver(
            snap, [(sid, s) for sid, s, _ in samples["unfinished"]], False, before, learned
        )
    elif ids["unfinished"] or "adapter.unfinished" in arrays or learned:
        raise FormatError("unfinished hand-over present but not announced")
    copies = [(at, adapter(f"adapter.copy.{i}", micro)) for i, at in enumerate(meta.instant.copies)]
    _check_copies(meta, config, len(ids["pending"]))
    extra = set(arrays) - used
    if extra:
        raise FormatError(f"unexpected arrays {sorted(extra)[:5]}")
    _check_ids(meta, ids)
    _check_counts(meta, ids, samples, config)
    return CheckpointState(
        path=what,
        config=config,
        seed=meta.seed,
        run_id=meta.run_id,
        checkpoint_seq=meta.checkpoint_seq,
        created_unix=meta.created_unix,
        log_sequence=meta.log_sequence,
        next_sample_id=meta.next_sample_id,
        counters=meta.counters,
        instant=meta.instant,
        background=bgm,
        live=live,
        base=base,
        ensemble=ensemble,
        centroids=None if centroids is None else centroids.copy(),
        explored=explored,
        pipeline=pipeline,
        bank=bank,
        unfinished=unfinished,
        samples=samples,
        copies=copies,
    )


def _explored(count: int, take: Any, modules: int) -> list[tuple[tuple[int, int], float]]:
    keys = take("live.explored.keys", dtype="u8", optional=count == 0)
    sigma = take("live.explored.sigma", dtype="f8", optional=count == 0)
    if count == 0:
        if keys is not None or sigma is not None:
            raise FormatError("explorations present but not announced")
        return []
    if keys.shape != (count, 2) or sigma.shape != (count,):
        raise FormatError("exploration arrays do not match their count")
    if (keys[:, 0] >= modules).any() or not (sigma > 0).all():
        raise FormatError("exploration entries are out of range")
    return [((int(k[0]), int(k[1])), float(s)) for k, s in zip(keys, sigma, strict=True)]


def _check_ids(meta: _Meta, ids: dict[str, list[int]]) -> None:
    """Every kept sample id is unique and sits on the right side of the log sequence."""
    seen: set[int] = set()
    lsn = meta.log_sequence
    if lsn >= meta.next_sample_id:
        raise FormatError("log_sequence must be below next_sample_id")
    for name in ("pending", "carry", "unfinished", "queued"):
        for sid in ids[name]:
            if sid < 1 or sid >= meta.next_sample_id or sid in seen:
                raise FormatError(f"{name} sample id {sid} is out of range or repeated")
            if (sid > lsn) != (name == "queued"):
                raise FormatError(f"{name} sample id {sid} contradicts log_sequence {lsn}")
            seen.add(sid)
    queued = ids["queued"]
    if queued and (queued != sorted(queued) or queued[0] != lsn + 1):
        raise FormatError("queued samples must follow log_sequence in id order")
    if any(sid != 0 for sid in ids["replay"]):
        raise FormatError("replay samples carry no ids")


def _check_copies(meta: _Meta, config: SonaLlmConfig, pending: int) -> None:
    """The Instant loop's copies of its live adapter are ones it could have kept: only under
    EWC_MERGE, at most COPIES_KEPT, in the order taken, none past the pending samples."""
    at = meta.instant.copies
    if not at:
        return
    if config.consolidation_strategy is not ConsolidationStrategy.EWC_MERGE:
        raise FormatError("copies of the live adapter under a strategy that keeps none")
    if len(at) > COPIES_KEPT:
        raise FormatError(f"more than {COPIES_KEPT} copies of the live adapter")
    evicted = meta.instant.loop_state.get("_evicted_since", 0)
    if at != sorted(set(at)) or at[0] < 1 or at[-1] - evicted > pending:
        raise FormatError("copies of the live adapter out of order or past the pending samples")


def _check_counts(
    meta: _Meta,
    ids: dict[str, list[int]],
    samples: dict[str, list[Item]],
    config: SonaLlmConfig,
) -> None:
    if len(ids["replay"]) > config.replay_capacity:
        raise FormatError("more replay samples than replay_capacity")
    if meta.counters.submitted < len(ids["queued"]):
        raise FormatError("fewer samples submitted than are queued")
    modules = set(config.micro_lora.target_modules)
    for name, items in samples.items():
        for _, _, module in items:
            if module is not None and module not in modules:
                raise FormatError(f"a {name} sample names module {module.value}, not targeted")


# ---------------------------------------------------------------------- install
def check_config(state: CheckpointState, config: SonaLlmConfig | None) -> SonaLlmConfig:
    """The config a restored runtime runs with: the stored one, or ``config`` if it agrees
    with the stored one on everything that shapes the state (:data:`STATE_FIELDS`)."""
    if config is None:
        return state.config
    if not isinstance(config, SonaLlmConfig):
        raise TypeError(f"config must be a SonaLlmConfig or None, got {type(config).__name__}")
    for name in STATE_FIELDS:
        if getattr(config, name) != getattr(state.config, name):
            raise ConfigMismatchError(
                f"{state.path}: config.{name} differs from the checkpoint's "
                f"({getattr(config, name)!r} != {getattr(state.config, name)!r}); only "
                f"fields other than {', '.join(STATE_FIELDS)} may change on restore"
            )
    return config


def install(rt: SonaRuntime, state: CheckpointState) -> None:
    """Put ``state`` into a runtime that was just built (not started) with its config/seed."""
    inst = rt._instant
    bg = rt._background
    inst.live = state.live
    explored: OrderedDict[tuple[int, int], float] = getattr(state.live, "_explored")  # noqa: B009
    explored.update(state.explored)
    inst.pending = deque((sid, s) for sid, s, _ in state.samples["pending"])
    im = state.instant
    inst.applied = im.applied
    inst.skipped = im.skipped
    inst.rejected = im.rejected
    inst.evicted = im.evicted
    inst.skip_reasons = dict(im.skip_reasons)
    inst.latency_sum_us = im.latency_sum_us
    inst.accumulated_quality = im.accumulated_quality
    for name, value in im.loop_state.items():
        if hasattr(inst, name):
            setattr(inst, name, type(getattr(inst, name))(value))
    inst.copies = state.copies
    bm = state.background
    bg.published = Published(
        state.base, dict(state.ensemble), state.centroids, bm.published_version
    )
    bg.pipeline = state.pipeline
    bg.bank = state.bank
    bg.replay = deque((s for _, s, _ in state.samples["replay"]), maxlen=rt.config.replay_capacity)
    bg.carry = [(sid, s) for sid, s, _ in state.samples["carry"]]
    bg.version = bm.version
    bg.runs = bm.runs
    bg.consolidated = bm.consolidated
    inst.set_unfinished(state.unfinished)
    c = state.counters
    rt.submitted = c.submitted - len(state.queued)  # queued samples count again on delivery
    rt.dropped = c.dropped
    rt.dead_lettered = c.dead_lettered
    rt.deep_runs = c.deep_runs
    rt._ids = SampleIds(state.next_sample_id)
    rt._pending = len(inst.pending) + len(bg.carry) + inst.unfinished_count
