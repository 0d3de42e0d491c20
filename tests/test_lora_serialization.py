"""MicroLoRA export/import and save/load: exact round trips, refusal of anything else."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from container_edits import Edit, set_at
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lora_reference import Q, Snapshot, V, config, trained, vec, weights_bytes

from sona import container
from sona.errors import ConfigMismatchError, FormatError, InvalidInputError
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA

KIND = "micro_lora"


def busy_adapter() -> MicroLoRA:
    """An adapter whose every serialised field differs from a fresh one's."""
    lora = trained(config(dropout=0.2), seed=3)
    rng = np.random.default_rng(0)
    for q in (0.3, 0.8, 0.5):
        lora.adapt(vec(rng, 12), AdaptFeedback.from_quality(q).with_output(vec(rng, 10)))
    assert lora.apply_updates(0.05)
    return lora


def continue_training(lora: MicroLoRA) -> list[bytes]:
    rng = np.random.default_rng(42)
    for _ in range(3):
        x = vec(rng, 12)
        lora.adapt(x, AdaptFeedback.from_quality(float(rng.random())).with_output(vec(rng, 10)))
        y = lora.forward(x, Q, explore=True)
        lora.adapt(x, AdaptFeedback.from_quality(float(rng.random())), Q)
        assert y.shape == (10,)
    assert lora.apply_updates(0.05)
    return weights_bytes(lora)


def test_export_import_is_exact_and_restores_every_counter() -> None:
    src = busy_adapter()
    data = src.export_weights()
    assert isinstance(data, bytes)
    dst = MicroLoRA(src.config, seed=999)
    dst.import_weights(data)
    assert weights_bytes(dst) == weights_bytes(src)
    assert (dst.seed, dst.version) == (src.seed, src.version)
    assert dst.baseline.state() == src.baseline.state()
    assert dst.export_weights() == data
    x = vec(np.random.default_rng(1), 12)
    for m in (Q, V):
        assert np.array_equal(dst.forward(x, m), src.forward(x, m))
        assert np.array_equal(dst.forward(x, m, explore=True), src.forward(x, m, explore=True))
    # the same future: baseline, dropout masks and exploration keys all came across
    assert continue_training(dst) == continue_training(src)


def test_import_discards_pending_gradients_and_explorations() -> None:
    src = busy_adapter()
    dst = MicroLoRA(src.config, seed=1)
    rng = np.random.default_rng(2)
    x = vec(rng, 12)
    dst.adapt(x, AdaptFeedback.from_quality(1.0).with_target(vec(rng, 10)))
    dst.forward(x, Q, explore=True)
    dst.import_weights(src.export_weights())
    assert dst.pending_updates == 0
    assert all(not g.any() for m in dst.modules for g in dst.gradients(m))
    assert dst.adapt(x, AdaptFeedback.from_quality(0.9), Q) is False


def test_save_load_round_trip(tmp_path: Path) -> None:
    src = busy_adapter()
    path = tmp_path / "nested" / "adapter.sona"
    src.save(path)
    loaded = MicroLoRA.load(path)
    assert loaded.config == src.config
    assert weights_bytes(loaded) == weights_bytes(src)
    assert loaded.export_weights() == src.export_weights()
    assert continue_training(loaded) == continue_training(src)
    MicroLoRA.load(str(path))  # str paths too


def test_save_replaces_atomically_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "a.sona"
    first = busy_adapter()
    first.save(path)
    second = trained(first.config, seed=77)
    second.save(path)
    assert path.read_bytes() == second.export_weights()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sona"]


def test_a_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.sona"
    old = busy_adapter()
    old.save(path)

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        trained(old.config, seed=5).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old.export_weights()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sona"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_and_exported_files_get_the_mode_open_would_give_them(
    tmp_path: Path, umask: int, mode: int
) -> None:
    """0o666 less the umask, as for any file the process creates: a server running as another
    user must be able to read an exported adapter when the umask allows it."""
    lora = busy_adapter()
    old = os.umask(umask)
    try:
        lora.save(tmp_path / "a.sona")
        lora.save(tmp_path / "a.sona")  # replacing
        lora.export_peft(tmp_path / "peft")
    finally:
        os.umask(old)
    written = [tmp_path / "a.sona", *(tmp_path / "peft").iterdir()]
    assert len(written) == 3
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_save_refuses_an_empty_path_or_a_directory_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As SonaRuntime.checkpoint does (a directory used to fail naming the temporary file)."""
    monkeypatch.chdir(tmp_path)  # where "" would have put its temporary file
    lora = busy_adapter()
    directory = tmp_path / "d"
    directory.mkdir()
    with pytest.raises(InvalidInputError, match=f"path {directory} is a directory"):
        lora.save(directory)
    with pytest.raises(InvalidInputError, match="path must name a file"):
        lora.save("")
    with pytest.raises(TypeError, match="path must be a path"):
        lora.save(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="path must be a path, got int"):
        MicroLoRA.load(3)  # type: ignore[arg-type]
    a_file = directory / "f"
    a_file.write_bytes(b"")
    for under_a_file in (a_file / "x.sona", a_file / "sub" / "x.sona"):
        with pytest.raises(InvalidInputError, match=f"{a_file} is a file, not a directory"):
            lora.save(under_a_file)  # used to raise a raw FileExistsError or NotADirectoryError
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and [
        p.name for p in directory.iterdir()
    ] == ["f"]


def test_import_refuses_another_config_and_changes_nothing() -> None:
    src = busy_adapter()
    for other in (
        config(rank=3),
        config(n_in=13),
        config(modules=(Q,)),
        config(dropout=0.1),
        config(alpha=8.0),
    ):
        dst = trained(other, seed=4)
        before = Snapshot.of(dst)
        with pytest.raises(ConfigMismatchError, match="config"):
            dst.import_weights(src.export_weights())
        assert Snapshot.of(dst) == before


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_corruption_is_detected_and_changes_nothing(data: st.DataObject) -> None:
    src = busy_adapter()
    blob = bytearray(src.export_weights())
    how = data.draw(st.sampled_from(["flip", "truncate", "append"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        blob += bytes(data.draw(st.binary(min_size=1, max_size=40)))
    dst = trained(src.config, seed=8)
    before = Snapshot.of(dst)
    with pytest.raises(FormatError):
        dst.import_weights(bytes(blob))
    assert Snapshot.of(dst) == before


def test_import_accepts_buffers_and_rejects_non_bytes() -> None:
    src = busy_adapter()
    data = src.export_weights()
    for buf in (bytearray(data), memoryview(data)):
        dst = MicroLoRA(src.config, seed=1)
        dst.import_weights(buf)  # type: ignore[arg-type]
        assert weights_bytes(dst) == weights_bytes(src)
    dst = MicroLoRA(src.config, seed=1)
    with pytest.raises(TypeError, match="bytes"):
        dst.import_weights(data.decode("latin-1"))  # type: ignore[arg-type]


def rebuild(data: bytes, edit: Edit) -> bytes:
    """Decode, edit, and re-encode with a valid checksum: tests the checks behind the checksum."""
    magic = data[:8]
    meta, arrays = container.decode(data, magic, KIND)
    edit(meta, arrays)
    return container.encode(magic, KIND, meta, arrays)


def _drop(path: str) -> Edit:
    def edit(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        del meta[path]

    return edit


def _array(name: str, fn: Callable[[np.ndarray], np.ndarray | None]) -> Any:
    def edit(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        out = fn(arrays[name])
        if out is None:
            del arrays[name]
        else:
            arrays[name] = out

    return edit


def _with_nan(a: np.ndarray) -> np.ndarray:
    b = a.copy()
    b.flat[3] = np.nan
    return b


@pytest.mark.parametrize(
    "edit",
    [
        set_at("seed", -1),
        set_at("seed", "x"),
        set_at("version", -2),
        _drop("version"),
        _drop("baseline"),
        set_at("baseline", {"count": 1.0, "mean": 0.5, "var": -1.0}),
        set_at("baseline", {"count": "many"}),
        set_at("dropout_counter", None),
        set_at("config.rank", 0),
        set_at("config.rank", 64),
        set_at("config.target_modules", ["lm_head"]),
        set_at("config.target_modules", 3),
        set_at("config.extra", 1),
        set_at("config", None),
        _array("q_proj.A", _with_nan),
        _array("v_proj.Bt", lambda a: np.full_like(a, np.inf)),
        _array("q_proj.A", lambda a: a[:, :-1].copy()),
        _array("q_proj.Bt", lambda a: a.astype(np.float64)),
        _array("v_proj.A", lambda a: None),
        _array("q_proj.A", lambda a: a.reshape(-1)),
    ],
)
def test_crafted_payloads_behind_a_valid_checksum_are_refused(edit: Any) -> None:
    src = busy_adapter()
    data = rebuild(src.export_weights(), edit)
    dst = trained(src.config, seed=8)
    before = Snapshot.of(dst)
    with pytest.raises(FormatError):
        dst.import_weights(data)
    assert Snapshot.of(dst) == before


def test_unchanged_rebuild_is_accepted() -> None:
    """Guards the tests of crafted payloads: rebuilding without an edit must import fine."""
    src = busy_adapter()
    dst = trained(src.config, seed=8)
    dst.import_weights(rebuild(src.export_weights(), lambda m, a: None))
    assert weights_bytes(dst) == weights_bytes(src)
    # the count is written as a float; an int of the same value is the same count
    assert src.baseline.count > 0
    dst = trained(src.config, seed=8)
    dst.import_weights(rebuild(src.export_weights(), set_at("baseline.count", src.baseline.count)))
    assert dst.baseline.state() == src.baseline.state()


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("config.gradient_checkpointing", 0.0, "gradient_checkpointing"),
        ("config.gradient_checkpointing", "yes", "gradient_checkpointing"),
        pytest.param("config.alpha", 10**400, "alpha", id="alpha-beyond-float"),
        ("seed", 1.7, "seed"),
        ("seed", "12", "seed"),
        ("seed", -0.5, "seed"),
        ("seed", True, "seed"),
        ("seed", 2**63, "seed"),
        ("version", 1.5, "version"),
        ("version", 2.0, "version"),
        ("dropout_counter", True, "dropout_counter"),
        ("dropout_counter", 2**70, "dropout_counter"),
        ("baseline.count", True, "baseline.count"),
        ("baseline.count", 1e300, "baseline.count"),
        ("baseline.count", 2**53 + 1, "baseline.count"),
        pytest.param("baseline.count", 10**400, "baseline.count", id="count-beyond-float"),
        ("baseline.count", 2.5, "baseline.count"),
        ("baseline.mean", False, "baseline.mean"),
        pytest.param("baseline.var", 10**400, "baseline.var", id="var-beyond-float"),
        ("baseline", [["count", 3.0], ["mean", 0.5], ["var", 0.0]], "baseline"),
        ("baseline", {"count": 3.0, "mean": 0.5}, "baseline"),
        ("baseline", {"count": 3.0, "mean": 0.5, "var": 0.0, "sum": 1.5}, "baseline"),
    ],
)
def test_crafted_metadata_is_refused_naming_the_field(
    tmp_path: Path, path: str, value: Any, field: str
) -> None:
    """Values a lenient reader would coerce (a float to an int or a bool) are refused instead,
    as invalid rather than as another adapter's config."""
    src = busy_adapter()
    data = rebuild(src.export_weights(), set_at(path, value))
    dst = trained(src.config, seed=8)
    before = Snapshot.of(dst)
    with pytest.raises(FormatError, match=field) as info:
        dst.import_weights(data)
    assert type(info.value) is FormatError
    assert Snapshot.of(dst) == before
    (tmp_path / "a.sona").write_bytes(data)
    with pytest.raises(FormatError, match=field):
        MicroLoRA.load(tmp_path / "a.sona")


def test_a_tensor_of_another_dtype_is_named_as_such() -> None:
    src = busy_adapter()
    data = rebuild(src.export_weights(), _array("q_proj.Bt", lambda a: a.astype(np.float64)))
    with pytest.raises(FormatError, match=r"tensor q_proj\.Bt has dtype float64, expected float32"):
        trained(src.config, seed=8).import_weights(data)


F32_MAX = float(np.finfo(np.float32).max)


def _fill(value: float) -> Edit:
    def edit(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        for name, arr in arrays.items():
            arrays[name] = np.full_like(arr, value)

    return edit


def test_finite_factors_whose_delta_overflows_float32_are_refused(tmp_path: Path) -> None:
    src = busy_adapter()
    data = rebuild(src.export_weights(), _fill(1e30))
    dst = trained(src.config, seed=8)
    before = Snapshot.of(dst)
    with pytest.raises(FormatError, match=r"q_proj\.A and q_proj\.Bt .*overflow"):
        dst.import_weights(data)
    assert Snapshot.of(dst) == before
    (tmp_path / "a.sona").write_bytes(data)
    with pytest.raises(FormatError, match="overflow"):
        MicroLoRA.load(tmp_path / "a.sona")


@settings(max_examples=40, deadline=None)
@given(exponent=st.floats(15.0, 22.0))
@example(exponent=18.0)  # fits
@example(exponent=19.0)  # overflows
def test_imported_factors_keep_the_bound_the_updates_keep(exponent: float) -> None:
    """Accepted exactly when s·‖A‖·‖B‖ < float32's max (what apply_updates enforces), and then
    forward and delta_weight stay finite."""
    src = busy_adapter()
    cfg = src.config
    data = rebuild(src.export_weights(), _fill(10.0**exponent))
    value = float(np.float32(10.0**exponent))
    bound = (
        cfg.scaling * value**2 * np.sqrt(cfg.rank * cfg.in_features * cfg.rank * cfg.out_features)
    )
    dst = trained(cfg, seed=8)
    before = Snapshot.of(dst)
    try:
        dst.import_weights(data)
    except FormatError as exc:
        assert "overflow" in str(exc)
        assert bound >= F32_MAX * (1 - 1e-9)
        assert Snapshot.of(dst) == before
        return
    assert bound < F32_MAX * (1 + 1e-9)
    x = np.full(cfg.in_features, 1.0 / np.sqrt(cfg.in_features), np.float32)
    for m in (Q, V):
        assert np.isfinite(dst.delta_weight(m)).all()
        assert np.isfinite(dst.forward(x, m)).all()


def test_extra_tensors_are_refused() -> None:
    src = busy_adapter()

    def add(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        arrays["k_proj.A"] = arrays["q_proj.A"].copy()

    dst = trained(src.config, seed=8)
    with pytest.raises(FormatError, match="tensors"):
        dst.import_weights(rebuild(src.export_weights(), add))


def test_other_files_are_refused(tmp_path: Path) -> None:
    src = busy_adapter()
    data = src.export_weights()
    foreign = container.encode(data[:8], "checkpoint", {}, {})
    with pytest.raises(FormatError, match="micro_lora"):
        MicroLoRA(src.config).import_weights(foreign)
    other_magic = container.encode(b"NOTSONA!", KIND, {}, {})
    with pytest.raises(FormatError, match="magic"):
        MicroLoRA(src.config).import_weights(other_magic)
    (tmp_path / "junk").write_bytes(b"hello world" * 10)
    with pytest.raises(FormatError):
        MicroLoRA.load(tmp_path / "junk")
    with pytest.raises(FormatError, match="directory"):
        MicroLoRA.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        MicroLoRA.load(tmp_path / "missing")


def test_load_refuses_what_is_not_a_regular_file(fifo: Path) -> None:
    """A FIFO would be waited on forever, a device read as if it were the file."""
    with pytest.raises(FormatError, match=f"{fifo}: not a regular file"):
        MicroLoRA.load(fifo)
    if Path("/dev/null").exists():
        with pytest.raises(FormatError, match="/dev/null: not a regular file"):
            MicroLoRA.load("/dev/null")
