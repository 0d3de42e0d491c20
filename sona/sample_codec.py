"""Samples as bytes, for the durable sample log and for checkpoints.

One record per sample: a msgpack array (msgspec, typed) whose vectors are the raw little-endian
float32 bytes of the arrays (``tobytes``), never lists of numbers, plus the sample's small
metadata (quality, texts, feedback form and its vector, the module it was aimed at). Decoding
is typed and bounded: msgspec refuses anything that is not exactly this shape, every size is
checked against the configured widths before an array is built, and the sample is rebuilt
through the same validating constructors a host uses, so a decoded sample is as trustworthy as
a submitted one. Every failure is a :class:`~sona.errors.FormatError` naming its source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from sona.errors import FormatError
from sona.feedback import AdaptFeedback, FeedbackKind, _rebuild
from sona.lora_config import TargetModule
from sona.sample import TrainingSample
from sona.validation import check_quality

__all__ = [
    "decode_sample",
    "encode_records",
    "encode_sample",
    "pack_samples",
    "sample_ids",
    "unpack_samples",
]

RECORD_VERSION = 1
MAX_RECORD_BYTES = 64 << 20  # one sample: two vectors and its texts
_F4 = np.dtype("<f4")
_F8 = np.dtype("<f8")


class _Record(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    version: int
    x: bytes
    y: bytes
    quality: float
    query: str | None
    response: str | None
    latency_ms: float
    token_count: int
    session_id: str
    kind: str | None  # None: the output embedding is the rated output
    fb_quality: float
    fb_vector: bytes | None
    group: bytes | None  # float64 qualities of a group's candidates
    module: str | None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Record)


def encode_sample(sample: TrainingSample, module: TargetModule | str | None = None) -> bytes:
    """The record of one sample and the module it is for (by enum or name; default: the
    sample's own)."""
    if module is None:
        module = sample.module
    fb = sample.feedback
    vec = None if fb is None else fb.vector
    gq = None if fb is None else fb.group_qualities
    record = _Record(
        version=RECORD_VERSION,
        x=sample.input_embedding.astype(_F4, copy=False).tobytes(),
        y=sample.output_embedding.astype(_F4, copy=False).tobytes(),
        quality=sample.quality,
        query=sample.query,
        response=sample.response,
        latency_ms=sample.latency_ms,
        token_count=sample.token_count,
        session_id=sample.session_id,
        kind=None if fb is None else fb.kind.value,
        fb_quality=0.0 if fb is None else fb.quality,
        fb_vector=None if vec is None else vec.astype(_F4, copy=False).tobytes(),
        group=None if gq is None else gq.astype(_F8, copy=False).tobytes(),
        module=None if module is None else TargetModule.parse(module).value,
    )
    return _encoder.encode(record)


def decode_sample(
    data: Any, *, in_features: int, out_features: int, what: str = "sample record"
) -> tuple[TrainingSample, TargetModule | None]:
    """A sample from :func:`encode_sample` bytes; refuses anything else with a FormatError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, got {type(data).__name__}")
    if len(data) > MAX_RECORD_BYTES:
        raise FormatError(f"{what}: {len(data)} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")
    try:
        rec = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise FormatError(f"{what}: not a sample record: {exc}") from None
    if rec.version != RECORD_VERSION:
        raise FormatError(f"{what}: record version {rec.version}, this sona reads {RECORD_VERSION}")
    try:
        return _build(rec, in_features, out_features)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{what}: invalid sample: {exc}") from None


def _vector(raw: bytes, width: int, name: str) -> np.ndarray:
    if len(raw) != width * _F4.itemsize:
        raise FormatError(f"{name} holds {len(raw)} bytes, expected {width} float32 values")
    return np.frombuffer(raw, dtype=_F4)


def _build(
    rec: _Record, in_features: int, out_features: int
) -> tuple[TrainingSample, TargetModule | None]:
    x = _vector(rec.x, in_features, "input_embedding")
    y = _vector(rec.y, out_features, "output_embedding")
    sample = TrainingSample(x, y, rec.quality)  # validates finiteness and the quality range
    if rec.kind is not None:
        sample = sample.with_feedback(_feedback(rec, out_features))
    elif rec.fb_vector is not None or rec.group is not None:
        raise FormatError("feedback arrays without a feedback kind")
    if rec.query is not None:
        sample = sample.with_query(rec.query)
    if rec.response is not None:
        sample = sample.with_response(rec.response)
    if rec.latency_ms != 0.0:
        sample = sample.with_latency(rec.latency_ms)
    if rec.token_count != 0:
        sample = sample.with_tokens(rec.token_count)
    if rec.session_id:
        sample = sample.with_session(rec.session_id)
    module = None if rec.module is None else TargetModule.parse(rec.module)
    if module is not None:
        sample = sample.with_module(module)
    return sample, module


def _feedback(rec: _Record, out_features: int) -> AdaptFeedback:
    try:
        kind = FeedbackKind(rec.kind)
    except ValueError:
        raise FormatError(f"unknown feedback kind {rec.kind!r}") from None
    quality = check_quality(rec.fb_quality, "feedback quality")
    if kind is FeedbackKind.QUALITY:
        if rec.fb_vector is not None or rec.group is not None:
            raise FormatError("quality-only feedback carries no vector")
        return AdaptFeedback.from_quality(quality)
    if rec.fb_vector is None:
        raise FormatError(f"{kind.value} feedback without its vector")
    vec = _vector(rec.fb_vector, out_features, f"feedback {kind.value}")
    base = AdaptFeedback.from_quality(quality)
    if kind is FeedbackKind.OUTPUT:
        return base.with_output(vec)
    if kind is FeedbackKind.TARGET:
        return base.with_target(vec)
    if kind is FeedbackKind.GRADIENT:
        return base.with_gradient(vec)
    # GROUP: the pull target was computed from candidates that are not kept; check what is
    if rec.group is None or len(rec.group) % _F8.itemsize or len(rec.group) < 2 * _F8.itemsize:
        raise FormatError("group feedback needs the qualities of at least two candidates")
    qs = np.frombuffer(rec.group, dtype=_F8)
    if not (np.isfinite(qs).all() and (qs >= 0.0).all() and (qs <= 1.0).all()):
        raise FormatError("group qualities must be finite and in [0, 1]")
    base.with_output(vec)  # the same finiteness and shape checks as any feedback vector
    return _rebuild(FeedbackKind.GROUP.value, quality, vec, qs)


# ---------------------------------------------------------------------- many samples
def encode_records(
    items: Sequence[tuple[int, TrainingSample, TargetModule | None]],
) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """(ids, record lengths, records) of ``(id, sample, module)`` items."""
    records = [encode_sample(sample, module) for _, sample, module in items]
    ids = np.fromiter((i for i, _, _ in items), dtype=np.int64, count=len(items))
    lengths = np.fromiter(map(len, records), dtype=np.int64, count=len(records))
    return ids, lengths, records


def pack_samples(
    items: Sequence[tuple[int, TrainingSample, TargetModule | None]],
) -> dict[str, np.ndarray]:
    """Arrays holding ``(id, sample, module)`` items: ids, record lengths, records (bytes)."""
    ids, lengths, records = encode_records(items)
    blob = np.frombuffer(b"".join(records), dtype=np.uint8)
    return {"ids": ids, "lengths": lengths, "records": blob}


def sample_ids(arrays: dict[str, np.ndarray], *, what: str) -> list[int]:
    """The ids of :func:`pack_samples` arrays, after checking their framing (not the records)."""
    try:
        ids = arrays["ids"]
        lengths = arrays["lengths"]
        blob = arrays["records"]
    except KeyError as exc:
        raise FormatError(f"{what}: missing array {exc}") from None
    if ids.dtype != np.int64 or lengths.dtype != np.int64 or blob.dtype != np.uint8:
        raise FormatError(f"{what}: sample arrays have the wrong dtypes")
    if ids.ndim != 1 or lengths.shape != ids.shape or blob.ndim != 1:
        raise FormatError(f"{what}: sample arrays have inconsistent shapes")
    if (lengths < 0).any() or int(lengths.sum()) != blob.shape[0]:
        raise FormatError(f"{what}: record lengths do not add up to the stored bytes")
    return [int(i) for i in ids]


def unpack_samples(
    arrays: dict[str, np.ndarray],
    *,
    in_features: int,
    out_features: int,
    what: str,
) -> list[tuple[int, TrainingSample, TargetModule | None]]:
    """Items from :func:`pack_samples` arrays; a FormatError naming ``what`` if anything is off."""
    ids = sample_ids(arrays, what=what)
    raw = arrays["records"].tobytes()
    out: list[tuple[int, TrainingSample, TargetModule | None]] = []
    offset = 0
    for i, n in zip(ids, map(int, arrays["lengths"]), strict=True):
        sample, module = decode_sample(
            raw[offset : offset + n],
            in_features=in_features,
            out_features=out_features,
            what=f"{what}[{len(out)}]",
        )
        out.append((i, sample, module))
        offset += n
    return out
