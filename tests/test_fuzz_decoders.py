"""Fuzzing every decoder: adapter bytes, checkpoint files, sample records, the sample log and
events decoded from bytes.

Each case must end in the documented error (a ``ValueError`` or ``TypeError`` subclass, for
files a :class:`FormatError`) or in a valid object, and a rejected input must leave whatever
was importing it unchanged. Mutations of valid bytes mostly stop at the checksum, so the
hostile cases that matter most are rebuilt with a correct checksum around edited content.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest
from fuzzing import DIM, EXPECTED, fuzz
from hypothesis import given
from hypothesis import strategies as st

from sona import checkpoint as ckpt
from sona import container
from sona.config import ConsolidationStrategy, SonaLlmConfig
from sona.errors import FormatError
from sona.events import SonaEvent
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample
from sona.sample_codec import _Record, decode_sample, encode_sample
from sona.sample_log import SampleLog

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.sampled_from([-1, 0, 1, 2, 7, 2**31, 2**62, 10**18])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=6,
)


def mutate(data: bytes, draw: Any) -> bytes:
    """Flip, overwrite, cut, insert or splice bytes of ``data``."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "splice"]))
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] ^= draw(st.integers(1, 255))
        elif op == "set" and buf:
            buf[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif op == "cut":
            del buf[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            chunk = draw(st.binary(min_size=1, max_size=32))
            buf[pos : pos + len(chunk)] = chunk
    return bytes(buf)


# ---------------------------------------------------------------------- adapter bytes
ADAPTER_CONFIG = MicroLoraConfig(in_features=DIM, out_features=4, rank=2)


def trained_adapter() -> MicroLoRA:
    lora = MicroLoRA(ADAPTER_CONFIG, seed=3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        fb = AdaptFeedback.from_quality(0.8).with_target(rng.standard_normal(4))
        lora.step(rng.standard_normal(DIM), fb, 0.1)
    return lora


VALID_ADAPTER = trained_adapter().export_weights()


def adapter_state(lora: MicroLoRA) -> tuple[Any, ...]:
    grads = [g.tobytes() for m in lora.modules for g in lora.gradients(m)]
    return (lora.export_weights(), lora.pending_updates, tuple(grads))


def import_or_refuse(data: Any) -> None:
    lora = trained_adapter()
    before = adapter_state(lora)
    try:
        lora.import_weights(data)
    except EXPECTED:
        assert adapter_state(lora) == before
        return
    # accepted: it must be a consistent adapter
    assert lora.forward(np.ones(DIM, np.float32), TargetModule.Q_PROJ).shape == (4,)


@fuzz(1500)
@given(st.data())
def test_adapter_bytes_mutated(data: st.DataObject) -> None:
    import_or_refuse(mutate(VALID_ADAPTER, data.draw))


@fuzz(600)
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=200).map(lambda b: b"SONALORA" + b)))
def test_adapter_bytes_random(data: bytes) -> None:
    import_or_refuse(data)


ADAPTER_META, ADAPTER_ARRAYS = container.decode(VALID_ADAPTER, b"SONALORA", "micro_lora")


def edited(
    meta: dict[str, Any], arrays: dict[str, np.ndarray], data: st.DataObject
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A structural edit of decoded (meta, arrays): any value, key or array may change."""
    meta = copy.deepcopy(meta)
    arrays = {k: v.copy() for k, v in arrays.items()}
    op = data.draw(
        st.sampled_from(["replace", "delete", "add", "dtype", "shape", "nan", "drop", "extra"])
    )
    if op in ("replace", "delete", "add"):
        holders: list[Any] = []

        def walk(node: Any) -> None:
            if isinstance(node, (dict, list)):
                holders.append(node)
                for v in node.values() if isinstance(node, dict) else node:
                    walk(v)

        walk(meta)
        node = data.draw(st.sampled_from(holders))
        if isinstance(node, dict) and node:
            key = data.draw(st.sampled_from(sorted(node)))
            if op == "replace":
                node[key] = data.draw(json_values)
            elif op == "delete":
                del node[key]
            else:
                node[data.draw(st.text(max_size=8))] = data.draw(json_values)
        elif isinstance(node, list) and node:
            i = data.draw(st.integers(0, len(node) - 1))
            if op == "delete":
                del node[i]
            else:
                node[i] = data.draw(json_values)
        return meta, arrays
    names = sorted(arrays)
    if op == "extra" or not names:
        arrays[data.draw(st.text(min_size=1, max_size=30))] = np.zeros(
            data.draw(st.integers(0, 5)), np.float32
        )
        return meta, arrays
    name = data.draw(st.sampled_from(names))
    arr = arrays[name]
    if op == "dtype":
        target = data.draw(st.sampled_from([np.float32, np.float64, np.int64, np.uint64, np.uint8]))
        arrays[name] = arr.astype(target) if arr.dtype != target else arr.astype(np.float64)
    elif op == "shape":
        shape = data.draw(st.lists(st.integers(0, 9), max_size=3))
        arrays[name] = np.resize(arr, shape)
    elif op == "nan":
        if arr.size and arr.dtype.kind == "f":
            flat = arr.reshape(-1)
            flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(
                st.sampled_from([np.nan, np.inf, -np.inf, 1e38, -0.0])
            )
        elif arr.size:
            flat = arr.reshape(-1)
            flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(
                st.integers(0, int(np.iinfo(arr.dtype).max))
            )
    else:
        del arrays[name]
    return meta, arrays


@fuzz(900)
@given(st.data())
def test_adapter_bytes_hostile_with_a_valid_checksum(data: st.DataObject) -> None:
    meta, arrays = edited(ADAPTER_META, ADAPTER_ARRAYS, data)
    try:
        blob = container.encode(b"SONALORA", "micro_lora", meta, arrays)
    except EXPECTED:
        return  # not even encodable
    import_or_refuse(blob)


# ---------------------------------------------------------------------- checkpoints
def checkpoint_bytes() -> bytes:
    cfg = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(DIM),
        consolidation_strategy=ConsolidationStrategy.ENSEMBLE,
        background_interval_ms=3_600_000,
        background_min_samples=3,
        deep_trigger_threshold=1e9,
        pattern_clusters=2,
        replay_capacity=30,
    )
    out: list[bytes] = []

    async def make() -> None:
        rng = np.random.default_rng(1)
        async with SonaRuntime(cfg, seed=2) as rt:
            for i in range(14):
                x = rng.standard_normal(DIM)
                s = TrainingSample(x, rng.standard_normal(DIM), 0.9).with_query(f"q{i}")
                await rt.submit(s)
                if i == 9:
                    await rt.consolidate()
            rt.forward(x, TargetModule.Q_PROJ, explore=True)
            captured = rt._durable.capture_now()
            out.append(ckpt.encode(captured))

    anyio.run(make)
    return out[0]


VALID_CHECKPOINT = checkpoint_bytes()
CKPT_META, CKPT_ARRAYS = container.decode(VALID_CHECKPOINT, ckpt.MAGIC, ckpt.KIND)


def decode_or_refuse(data: bytes) -> None:
    try:
        state = ckpt.decode(data, what="fuzz.sona")
    except FormatError as exc:
        assert str(exc).startswith("fuzz.sona")
        return
    # accepted: it must make a working runtime
    rt = SonaRuntime(state.config, seed=state.seed)
    ckpt.install(rt, state)
    rt.stats()
    rt.forward(np.ones(DIM, np.float32), TargetModule.V_PROJ)


@fuzz(1200)
@given(st.data())
def test_checkpoint_bytes_mutated(data: st.DataObject) -> None:
    decode_or_refuse(mutate(VALID_CHECKPOINT, data.draw))


@fuzz(2000)
@given(st.data())
def test_checkpoint_hostile_with_a_valid_checksum(data: st.DataObject) -> None:
    meta, arrays = edited(CKPT_META, CKPT_ARRAYS, data)
    try:
        blob = container.encode(ckpt.MAGIC, ckpt.KIND, meta, arrays)
    except EXPECTED:
        return
    decode_or_refuse(blob)


def test_the_unedited_checkpoint_decodes() -> None:
    assert ckpt.decode(VALID_CHECKPOINT).next_sample_id == 15
    blob = container.encode(ckpt.MAGIC, ckpt.KIND, CKPT_META, CKPT_ARRAYS)
    assert ckpt.decode(blob).next_sample_id == 15


# ---------------------------------------------------------------------- sample records
def valid_records() -> list[bytes]:
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal(DIM), rng.standard_normal(DIM)
    base = TrainingSample(x, y, 0.5).with_query("q").with_session("s")
    group = AdaptFeedback.from_group(np.stack([y, -y]), [0.2, 0.9])
    return [
        encode_sample(base),
        encode_sample(base.with_feedback(AdaptFeedback.from_quality(0.3)), TargetModule.Q_PROJ),
        encode_sample(base.with_feedback(AdaptFeedback.from_quality(0.6).with_target(y))),
        encode_sample(base.with_feedback(group)),
    ]


RECORDS = valid_records()
field_values = st.one_of(
    json_values,
    st.binary(max_size=40),
    st.sampled_from([b"\0" * 24, np.full(DIM, np.nan, np.float32).tobytes(), b"\0" * 16]),
    st.sampled_from(["quality", "output", "target", "gradient", "group", "q_proj", "nope"]),
)


def record_or_refuse(data: Any) -> None:
    try:
        sample, module = decode_sample(data, in_features=DIM, out_features=DIM, what="rec")
    except EXPECTED:
        return
    assert sample.input_embedding.shape == (DIM,) and np.isfinite(sample.input_embedding).all()
    assert module is None or isinstance(module, TargetModule)
    sample.to_feedback()


@fuzz(800)
@given(st.data())
def test_sample_records_mutated(data: st.DataObject) -> None:
    record_or_refuse(mutate(data.draw(st.sampled_from(RECORDS)), data.draw))


@fuzz(1200)
@given(st.data())
def test_sample_records_well_formed_and_hostile(data: st.DataObject) -> None:
    fields = list(msgspec.msgpack.decode(data.draw(st.sampled_from(RECORDS))))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(fields) - 1))
        fields[i] = data.draw(field_values)
    if data.draw(st.booleans()):
        fields = fields[: data.draw(st.integers(0, len(fields)))]
    try:
        blob = msgspec.msgpack.encode(fields)
    except (TypeError, OverflowError):
        return
    record_or_refuse(blob)


def test_record_struct_is_what_the_encoder_writes() -> None:
    assert len(msgspec.msgpack.decode(RECORDS[0])) == len(_Record.__struct_fields__)


@fuzz(400)
@given(st.binary(max_size=200))
def test_sample_records_random(data: bytes) -> None:
    record_or_refuse(data)


# ---------------------------------------------------------------------- the log file, events
@fuzz(60)
@given(st.binary(max_size=4096))
def test_sample_log_files_that_are_not_logs(tmp_path_factory: Any, data: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("log")) / "samples.sqlite3"
    path.write_bytes(data)
    try:
        log = SampleLog(path, in_features=DIM, out_features=DIM)
    except FormatError as exc:
        assert str(path) in str(exc)
        return
    log.close()  # empty input: a new, valid log


VALID_EVENTS = [
    b'{"type":"InstantApplied","at":1.0,"seq":1,"sample_id":3,"latency_us":2.0,"quality":0.5}',
    b'{"type":"CheckpointWritten","at":1.0,"seq":2,"path":"x","bytes":9,"log_sequence":4}',
    b'{"type":"Lagged","at":1.0,"seq":3,"missed":2}',
]


@fuzz(500)
@given(st.data())
def test_events_decoded_from_bytes(data: st.DataObject) -> None:
    kind = data.draw(st.integers(0, 2))
    if kind == 0:
        raw = mutate(data.draw(st.sampled_from(VALID_EVENTS)), data.draw)
    elif kind == 1:
        raw = data.draw(st.binary(max_size=100))
    else:
        raw = msgspec.json.encode(data.draw(json_values))
    try:
        msgspec.json.decode(raw, type=SonaEvent)
    except EXPECTED:  # msgspec.DecodeError; UnicodeDecodeError for bytes that are not UTF-8
        return


def test_valid_events_decode() -> None:
    for raw in VALID_EVENTS:
        msgspec.json.decode(raw, type=SonaEvent)


def _one_of_each_event() -> list[Any]:
    import sona.events as ev

    return [
        ev.InstantApplied(at=1.0, seq=1, sample_id=3, latency_us=2.0, quality=0.5),
        ev.InstantSkipped(at=1.0, seq=2, sample_id=4, reason="no_direction"),
        ev.BackgroundCompleted(
            at=1.0, seq=3, samples_used=5, strategy="ewc_merge", quality_delta=None, latency_ms=1.0
        ),
        ev.DeepCompleted(
            at=1.0, seq=4, samples_used=0, epochs=0, quality_delta=0.1, latency_ms=2.0,
            installed=True,
        ),
        ev.TaskBoundary(at=1.0, seq=5, task_count=2, reason="requested"),
        ev.UpdateRejected(at=1.0, seq=6, loop="instant", reason="non-finite"),
        ev.SamplesDropped(at=1.0, seq=7, count=2, stage="ingress", policy="DROP_OLDEST"),
        ev.DeadLettered(
            at=1.0, seq=8, actor="instant", message_type="Process", message="m",
            error_type="RuntimeError", error="boom",
        ),
        ev.LoopCrashed(
            at=1.0, seq=9, actor="deep", error_type="RuntimeError", error="boom", consecutive=1
        ),
        ev.LoopRestarted(at=1.0, seq=10, actor="deep", restarts=1, backoff_s=0.0, cause="deep"),
        ev.SupervisorGaveUp(
            at=1.0, seq=11, actor="instant", error_type="RuntimeError", error="boom",
            restarts=6, within_s=10.0,
        ),
        ev.Lagged(at=1.0, seq=12, missed=3),
        ev.CheckpointWritten(at=1.0, seq=13, path="x", bytes=9, log_sequence=4),
        ev.CheckpointFailed(at=1.0, seq=14, path="x", error="disk full"),
    ]  # fmt: skip


def test_every_event_the_runtime_publishes_round_trips_through_the_union() -> None:
    """A host that records the event stream reads it back with ``SonaEvent``: every kind the
    runtime publishes must be in the union, or its records become undecodable."""
    import sona.events as ev

    events = _one_of_each_event()
    kinds = {
        cls
        for name in ev.__all__
        if isinstance(cls := getattr(ev, name), type) and issubclass(cls, ev.Event)
    } - {ev.Event}
    assert {type(e) for e in events} == kinds
    for event in events:
        for codec in (msgspec.json, msgspec.msgpack):
            assert codec.decode(codec.encode(event), type=SonaEvent) == event


@pytest.mark.parametrize("bad", [None, 3, "text", [1, 2], object()])
def test_decoders_refuse_what_is_not_bytes(bad: Any) -> None:
    with pytest.raises(TypeError):
        ckpt.decode(bad)
    with pytest.raises(TypeError):
        decode_sample(bad, in_features=DIM, out_features=DIM)
    with pytest.raises(TypeError):
        trained_adapter().import_weights(bad)
