"""PEFT adapter directories written and read without torch: layout, round trip, refusals."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

from sona.errors import FormatError, InvalidInputError
from sona.lora import MicroLoRA
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LLAMA, PeftNaming

Q, V = TargetModule.Q_PROJ, TargetModule.V_PROJ
PREFIX = "base_model.model.model.layers"


def trained(
    *,
    n_in: int = 16,
    n_out: int = 16,
    rank: int = 2,
    alpha: float = 4.0,
    modules: tuple[TargetModule, ...] = (Q, V),
    seed: int = 0,
) -> MicroLoRA:
    """An adapter with non-zero B, so an export that dropped or transposed B would show."""
    config = MicroLoraConfig(
        in_features=n_in, out_features=n_out, rank=rank, alpha=alpha, target_modules=modules
    )
    lora = MicroLoRA(config, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for m in modules:
        a, bt = lora.factors(m)
        lora.set_factors(m, a, rng.standard_normal(bt.shape).astype(np.float32))
    return lora


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(directory / ADAPTER_WEIGHTS))


def rewrite_config(directory: Path, **changes: Any) -> None:
    path = directory / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def rewrite_tensors(directory: Path, tensors: dict[str, np.ndarray]) -> None:
    safetensors.numpy.save_file(
        tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"}
    )


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    trained().export_peft(tmp_path / "adapter", layers=(0, 1))
    return tmp_path / "adapter"


# ---------------------------------------------------------------------- layout
def test_export_writes_peft_tensor_names_shapes_and_metadata(tmp_path: Path) -> None:
    lora = trained(n_in=16, n_out=16, rank=2)
    out = lora.export_peft(tmp_path / "a", layers=(0, 1))
    assert out == tmp_path / "a"
    with safe_open(str(out / ADAPTER_WEIGHTS), framework="numpy") as fh:
        assert fh.metadata() == {"format": "pt", "sona.target_modules": "q_proj,v_proj"}
        names = set(fh.keys())
    expected = {
        f"{PREFIX}.{i}.self_attn.{m}.lora_{f}.weight"
        for i in (0, 1)
        for m in ("q_proj", "v_proj")
        for f in "AB"
    }
    assert names == expected
    tensors = read_tensors(out)
    for i in (0, 1):
        for m in (Q, V):
            a, bt = lora.factors(m)
            got_a = tensors[f"{PREFIX}.{i}.self_attn.{m.value}.lora_A.weight"]
            got_b = tensors[f"{PREFIX}.{i}.self_attn.{m.value}.lora_B.weight"]
            assert got_a.shape == (2, 16) and got_b.shape == (16, 2)
            assert got_a.dtype == np.float32 and got_b.dtype == np.float32
            np.testing.assert_array_equal(got_a, a)
            np.testing.assert_array_equal(got_b, bt.T)
            # PEFT's delta: lora_alpha / r · B·A
            np.testing.assert_allclose(
                2.0 * got_b @ got_a, lora.delta_weight(m), rtol=1e-6, atol=1e-7
            )


def test_export_config_holds_peft_fields_and_preserves_the_scale(tmp_path: Path) -> None:
    lora = trained(rank=2, alpha=3.0)
    lora.export_peft(tmp_path / "a", layers=(1, 0), base_model_name_or_path="org/tiny-llama")
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "org/tiny-llama"
    assert config["r"] == 2
    assert config["lora_alpha"] / config["r"] == pytest.approx(lora.scaling)
    assert config["lora_dropout"] == 0.0
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["bias"] == "none"
    assert config["use_dora"] is False and config["use_rslora"] is False
    assert config["layers_to_transform"] == [0, 1]
    assert config["layers_pattern"] == "layers"


def test_fractional_alpha_is_written_exactly(tmp_path: Path) -> None:
    trained(alpha=2.5).export_peft(tmp_path / "a")
    assert json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())["lora_alpha"] == 2.5


def test_mlp_modules_live_under_mlp(tmp_path: Path) -> None:
    lora = trained(n_in=16, n_out=32, modules=(TargetModule.GATE_PROJ, TargetModule.UP_PROJ))
    lora.export_peft(tmp_path / "a")
    names = set(read_tensors(tmp_path / "a"))
    assert f"{PREFIX}.0.mlp.gate_proj.lora_A.weight" in names
    assert f"{PREFIX}.0.mlp.up_proj.lora_B.weight" in names
    back = MicroLoRA.from_peft(tmp_path / "a")
    assert back.config.target_modules == (TargetModule.GATE_PROJ, TargetModule.UP_PROJ)
    assert (back.config.in_features, back.config.out_features) == (16, 32)


def test_naming_is_overridable_for_other_families(tmp_path: Path) -> None:
    naming = PeftNaming(layers_prefix="base_model.model.model.decoder.layers", attention="attn")
    lora = trained()
    lora.export_peft(tmp_path / "a", naming=naming)
    names = set(read_tensors(tmp_path / "a"))
    assert "base_model.model.model.decoder.layers.0.attn.q_proj.lora_A.weight" in names
    with pytest.raises(FormatError, match="PeftNaming"):
        MicroLoRA.from_peft(tmp_path / "a")
    back = MicroLoRA.from_peft(tmp_path / "a", naming=naming)
    np.testing.assert_array_equal(back.delta_weight(Q), lora.delta_weight(Q))


# ---------------------------------------------------------------------- round trip
def test_round_trip_reproduces_forward_for_every_layer(exported: Path) -> None:
    lora = trained()
    x = np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32)
    for layer in (0, 1):
        back = MicroLoRA.from_peft(exported, layer=layer)
        assert back.config.rank == 2 and back.scaling == lora.scaling
        assert back.config.target_modules == (Q, V)
        for m in (Q, V):
            np.testing.assert_array_equal(back.forward(x, m), lora.forward(x, m))


@pytest.mark.parametrize("modules", [(V, Q), (TargetModule.O_PROJ, Q, TargetModule.K_PROJ)])
def test_round_trip_keeps_the_adapters_module_order(tmp_path: Path, modules: Any) -> None:
    """The config comes back equal, so the adapter's own bytes import into the read one."""
    lora = trained(modules=modules)
    lora.export_peft(tmp_path / "a")
    back = MicroLoRA.from_peft(tmp_path / "a")
    assert back.config == lora.config
    back.import_weights(lora.export_weights())
    rewrite_tensors(tmp_path / "a", read_tensors(tmp_path / "a"))  # as PEFT writes them
    assert MicroLoRA.from_peft(tmp_path / "a").config.target_modules == tuple(
        m for m in TargetModule if m in modules
    )  # PEFT keeps target_modules as a set: the enum's order


def test_an_invalid_pattern_names_the_config_file(exported: Path) -> None:
    rewrite_config(exported, alpha_pattern={"q_proj(": 4})
    with pytest.raises(FormatError, match=rf"{ADAPTER_CONFIG}: invalid pattern"):
        MicroLoRA.from_peft(exported)


def test_round_trip_keeps_dropout_and_takes_a_seed(tmp_path: Path) -> None:
    config = MicroLoraConfig(in_features=8, out_features=8, rank=1, alpha=1.0, dropout=0.1)
    MicroLoRA(config, seed=3).export_peft(tmp_path / "a")
    back = MicroLoRA.from_peft(tmp_path / "a", seed=11)
    assert back.config.dropout == pytest.approx(0.1)
    assert back.seed == 11


def test_rslora_scale_is_kept_exactly(exported: Path) -> None:
    rewrite_config(exported, use_rslora=True, r=2, lora_alpha=4)
    back = MicroLoRA.from_peft(exported)
    assert back.scaling == pytest.approx(4 / math.sqrt(2), rel=1e-12)
    tensors = read_tensors(exported)
    a = tensors[f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"]
    b = tensors[f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"]
    np.testing.assert_allclose(back.delta_weight(Q), 4 / math.sqrt(2) * b @ a, atol=1e-6)


def test_float16_tensors_are_read(exported: Path) -> None:
    tensors = {k: v.astype(np.float16) for k, v in read_tensors(exported).items()}
    rewrite_tensors(exported, tensors)
    back = MicroLoRA.from_peft(exported)
    a, bt = back.factors(Q)
    np.testing.assert_array_equal(a, tensors[f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"])
    np.testing.assert_array_equal(bt.T, tensors[f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"])


def test_patterns_that_repeat_the_defaults_are_accepted(exported: Path) -> None:
    rewrite_config(exported, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4})
    assert MicroLoRA.from_peft(exported).scaling == 2.0


def test_alpha_pattern_for_another_layer_leaves_this_one_readable(exported: Path) -> None:
    rewrite_config(exported, alpha_pattern={"layers.1.self_attn.v_proj": 8})
    assert MicroLoRA.from_peft(exported, layer=0).scaling == 2.0
    with pytest.raises(FormatError, match="alpha_pattern"):
        MicroLoRA.from_peft(exported, layer=1)


@pytest.mark.parametrize("key", ["proj", "_proj", "elf_attn.q_proj", "s.0.self_attn.v_proj"])
def test_patterns_match_whole_name_parts_only(exported: Path, key: str) -> None:
    """PEFT matches a pattern key against the end of the module's name at a dot boundary:
    ``proj`` names no module (``q_proj`` is one name part), so the default alpha stays."""
    rewrite_config(exported, alpha_pattern={key: 8})
    assert MicroLoRA.from_peft(exported, layer=0).scaling == 2.0
    assert MicroLoRA.from_peft(exported, layer=1).scaling == 2.0


def test_anchored_patterns_match_the_name_inside_the_base_model(exported: Path) -> None:
    """PEFT matches patterns against ``model.layers.0.self_attn.q_proj``, the name inside the
    base model: a ``^``-anchored key (the form PEFT's documentation shows) names that, not the
    saved tensor's ``base_model.model.…`` path."""
    rewrite_config(
        exported, alpha_pattern={f"^model.layers.0.self_attn.{m}": 8 for m in ("q_proj", "v_proj")}
    )
    assert MicroLoRA.from_peft(exported, layer=0).scaling == 4.0
    assert MicroLoRA.from_peft(exported, layer=1).scaling == 2.0
    rewrite_config(exported, alpha_pattern={}, rank_pattern={"^model.layers.1.self_attn.q_proj": 4})
    assert MicroLoRA.from_peft(exported, layer=0).scaling == 2.0
    with pytest.raises(FormatError, match="r=4"):
        MicroLoRA.from_peft(exported, layer=1)


# ---------------------------------------------------------------------- export refusals
@pytest.mark.parametrize(
    ("layers", "error"),
    [
        ((), InvalidInputError),
        ((-1,), InvalidInputError),
        ((0, 0), InvalidInputError),
        ("0", TypeError),
        (0, TypeError),
        ((0.0,), TypeError),
        ((True,), TypeError),
    ],
)
def test_export_refuses_bad_layers_and_writes_nothing(
    tmp_path: Path, layers: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match="layers"):
        trained().export_peft(tmp_path / "a", layers=layers)
    assert not (tmp_path / "a").exists()


def test_export_refuses_bad_arguments(tmp_path: Path) -> None:
    lora = trained()
    with pytest.raises(TypeError, match="naming"):
        lora.export_peft(tmp_path / "a", naming="llama")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="base_model_name_or_path"):
        lora.export_peft(tmp_path / "a", base_model_name_or_path=3)  # type: ignore[arg-type]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="not a directory"):
        lora.export_peft(tmp_path / "file")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("blocked", [ADAPTER_WEIGHTS, ADAPTER_CONFIG])
def test_export_refuses_a_directory_where_a_file_goes_and_writes_nothing(
    tmp_path: Path, blocked: str
) -> None:
    (tmp_path / "a" / blocked).mkdir(parents=True)
    with pytest.raises(InvalidInputError, match=f"{blocked} is a directory"):
        trained().export_peft(tmp_path / "a")
    assert [p.name for p in (tmp_path / "a").iterdir()] == [blocked]


def _fail_once(monkeypatch: pytest.MonkeyPatch, name: str, when: Any) -> None:
    """Make ``os.<name>`` in the file writer raise once, on the first call ``when`` accepts."""
    import sona.container

    real = getattr(os, name)
    armed = [True]

    def failing(*args: Any) -> Any:
        if armed[0] and when(*args):
            armed[0] = False
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(sona.container.os, name, failing)


def test_an_export_cut_short_never_leaves_a_mixed_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same rank, other alpha: new weights read with the old config would load without an
    error, at the wrong scale."""
    old, new = trained(alpha=4.0, seed=0), trained(alpha=8.0, seed=5)
    old.export_peft(tmp_path / "a")
    _fail_once(monkeypatch, "replace", lambda src, dst: Path(dst).name == ADAPTER_CONFIG)
    with pytest.raises(OSError):
        new.export_peft(tmp_path / "a")
    with pytest.raises(FormatError, match=ADAPTER_CONFIG):
        MicroLoRA.from_peft(tmp_path / "a")
    new.export_peft(tmp_path / "a")  # the next export completes it
    assert MicroLoRA.from_peft(tmp_path / "a").config.alpha == 8.0


def test_an_export_that_cannot_write_its_weights_leaves_the_old_adapter_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = trained(alpha=4.0, seed=0), trained(alpha=8.0, seed=5)
    old.export_peft(tmp_path / "a")
    _fail_once(monkeypatch, "fsync", lambda fd: True)  # the weights' temporary file
    with pytest.raises(OSError):
        new.export_peft(tmp_path / "a")
    back = MicroLoRA.from_peft(tmp_path / "a")
    assert back.config.alpha == 4.0
    for m in (Q, V):
        assert np.array_equal(back.factors(m)[1], old.factors(m)[1])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def test_export_under_a_file_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match=r"file is a file, not a directory"):
        trained().export_peft(tmp_path / "file" / "a")
    assert (tmp_path / "file").read_text() == "x"


def test_naming_refuses_malformed_paths() -> None:
    with pytest.raises(ValueError, match="layers_prefix"):
        PeftNaming(layers_prefix="model.layers.{i}")
    with pytest.raises(TypeError, match="mlp"):
        PeftNaming(mlp=None)  # type: ignore[arg-type]
    assert LLAMA.tensor_name(3, V, "B") == f"{PREFIX}.3.self_attn.v_proj.lora_B.weight"


# ---------------------------------------------------------------------- import refusals
def test_missing_directory_config_and_weights(tmp_path: Path, exported: Path) -> None:
    with pytest.raises(FormatError, match="not a directory"):
        MicroLoRA.from_peft(tmp_path / "nope")
    (exported / ADAPTER_WEIGHTS).rename(exported / "adapter_model.bin")
    with pytest.raises(FormatError, match=r"adapter_model\.safetensors: missing.*can run code"):
        MicroLoRA.from_peft(exported)
    (exported / ADAPTER_CONFIG).unlink()
    with pytest.raises(FormatError, match=r"adapter_config\.json: missing"):
        MicroLoRA.from_peft(exported)


@pytest.mark.parametrize("name", [ADAPTER_WEIGHTS, ADAPTER_CONFIG])
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p.mkdir(), "is a directory, expected a file"),
        (lambda p: os.mkfifo(p), "not a regular file"),
        (lambda p: p.symlink_to(p.parent / "nowhere"), "a symbolic link that leads to no file"),
        (lambda p: p.symlink_to(p), "a symbolic link that leads to no file"),
    ],
    ids=["directory", "fifo", "dangling-symlink", "symlink-loop"],
)
def test_something_other_than_a_file_is_named_not_called_missing(
    exported: Path, name: str, make: Any, match: str
) -> None:
    (exported / name).unlink()
    make(exported / name)
    with pytest.raises(FormatError, match=rf"{re.escape(name)}: {match}"):
        MicroLoRA.from_peft(exported)


def test_a_symlinked_adapter_file_is_read(exported: Path) -> None:
    (exported / ADAPTER_WEIGHTS).rename(exported / "real.safetensors")
    (exported / ADAPTER_WEIGHTS).symlink_to("real.safetensors")
    assert MicroLoRA.from_peft(exported).config.target_modules == (Q, V)


def test_corrupt_config_and_weights(exported: Path) -> None:
    (exported / ADAPTER_WEIGHTS).write_bytes(b"\x00" * 40)
    with pytest.raises(FormatError, match="not a valid safetensors file"):
        MicroLoRA.from_peft(exported)
    (exported / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        MicroLoRA.from_peft(exported)
    (exported / ADAPTER_CONFIG).write_text("[1, 2]")
    with pytest.raises(FormatError, match="JSON object"):
        MicroLoRA.from_peft(exported)


def test_missing_tensor_is_named(exported: Path) -> None:
    tensors = read_tensors(exported)
    name = f"{PREFIX}.0.self_attn.v_proj.lora_B.weight"
    del tensors[name]
    rewrite_tensors(exported, tensors)
    with pytest.raises(FormatError, match=f"missing tensor {name}"):
        MicroLoRA.from_peft(exported)


def test_shape_mismatches_are_refused(exported: Path) -> None:
    tensors = read_tensors(exported)
    key_b = f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"
    tensors[key_b] = np.zeros((16, 3), np.float32)
    rewrite_tensors(exported, tensors)
    with pytest.raises(FormatError, match="same r"):
        MicroLoRA.from_peft(exported)

    tensors = read_tensors(exported)
    tensors[key_b] = np.zeros((8, 2), np.float32)  # q_proj out 8, v_proj out 16
    rewrite_tensors(exported, tensors)
    with pytest.raises(FormatError, match="different shapes"):
        MicroLoRA.from_peft(exported)


def test_config_rank_must_match_the_tensors(exported: Path) -> None:
    rewrite_config(exported, r=4)
    with pytest.raises(FormatError, match="rank 2 but the config gives it r=4"):
        MicroLoRA.from_peft(exported)


def test_non_finite_tensor_is_refused(exported: Path) -> None:
    tensors = read_tensors(exported)
    tensors[f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"][0, 0] = np.nan
    rewrite_tensors(exported, tensors)
    with pytest.raises(FormatError, match="NaN"):
        MicroLoRA.from_peft(exported)


@pytest.mark.parametrize("value", [1e39, -3.5e38, 1e300])
def test_float64_tensor_beyond_float32_range_is_refused_as_such(
    exported: Path, value: float
) -> None:
    tensors = {k: v.astype(np.float64) for k, v in read_tensors(exported).items()}
    tensors[f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"][0, 0] = value
    rewrite_tensors(exported, tensors)
    with pytest.raises(
        FormatError, match=re.escape(f"q_proj.lora_A.weight holds {abs(value):.4g}, beyond")
    ):
        MicroLoRA.from_peft(exported)


def test_float64_tensors_are_read_as_their_float32_rounding(exported: Path) -> None:
    tensors = {k: v.astype(np.float64) + 1e-12 for k, v in read_tensors(exported).items()}
    rewrite_tensors(exported, tensors)
    a, _ = MicroLoRA.from_peft(exported).factors(Q)
    key = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
    np.testing.assert_array_equal(a, tensors[key].astype(np.float32))


def test_finite_factors_whose_delta_overflows_float32_are_refused(exported: Path) -> None:
    rewrite_tensors(exported, {k: np.full_like(v, 1e30) for k, v in read_tensors(exported).items()})
    key = f"{PREFIX}.0.self_attn.q_proj"
    with pytest.raises(
        FormatError, match=rf"{key}\.lora_A\.weight and {key}\.lora_B\.weight .*overflow"
    ):
        MicroLoRA.from_peft(exported)


def test_the_scale_counts_towards_the_overflow_bound(exported: Path) -> None:
    rewrite_config(exported, lora_alpha=3e38)  # within float32, but not times the weights
    with pytest.raises(FormatError, match=r"scale 1.5e\+38.*overflow"):
        MicroLoRA.from_peft(exported)
    rewrite_config(exported, lora_alpha=1e39)  # beyond float32 itself
    with pytest.raises(FormatError, match=r"alpha must be a finite number in"):
        MicroLoRA.from_peft(exported)
    rewrite_config(exported, lora_alpha=1e30)
    lora = MicroLoRA.from_peft(exported)
    assert np.isfinite(lora.delta_weight(Q)).all()


def test_integer_tensor_is_refused(exported: Path) -> None:
    tensors = read_tensors(exported)
    key = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = tensors[key].astype(np.int32)
    rewrite_tensors(exported, tensors)
    with pytest.raises(FormatError, match="float dtype"):
        MicroLoRA.from_peft(exported)


@pytest.mark.parametrize(
    "text",
    [
        '{"r": 1' + "0" * 5000 + "}",  # past Python's 4300-digit limit for int()
        "[" * 100_000,
        '{"a": ' * 100_000,
    ],
    ids=["digits", "nested-arrays", "nested-objects"],
)
def test_hostile_config_json_is_a_format_error(exported: Path, text: str) -> None:
    (exported / ADAPTER_CONFIG).write_text(text)
    with pytest.raises(FormatError, match=r"adapter_config\.json: not valid JSON"):
        MicroLoRA.from_peft(exported)


@pytest.mark.parametrize("field", ["lora_alpha", "lora_dropout"])
def test_integer_beyond_float_range_is_a_format_error(exported: Path, field: str) -> None:
    rewrite_config(exported, **{field: 10**400})
    with pytest.raises(FormatError, match=f"{field} must be finite, got an integer of 401"):
        MicroLoRA.from_peft(exported)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"peft_type": "IA3"}, "only LORA"),
        ({"bias": "all"}, "bias='all'"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"use_dora": True}, "use_dora=True"),
        ({"lora_bias": True}, "lora_bias=True"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"some_future_option": {"on": True}}, "some_future_option"),
        ({"rank_pattern": {"v_proj": 4}}, "r=4"),
        ({"alpha_pattern": {"v_proj": 16}}, "alpha_pattern"),
        ({"alpha_pattern": {"q_proj": "4", "v_proj": "4"}}, "q_proj must be a number"),
        ({"alpha_pattern": {"q_proj": 0}}, "q_proj must be > 0"),
        ({"lora_alpha": 0}, "lora_alpha must be > 0"),
        ({"lora_alpha": "8"}, "lora_alpha must be a number"),
        ({"r": 0}, "r must be a positive integer"),
        ({"lora_dropout": 1.5}, "does not fit a MicroLoRA"),
        ({"layers_to_transform": [1]}, "covers layers"),
        ({"target_modules": ["q_proj"]}, "does not list"),
        ({"target_modules": ["q_proj", "v_proj", "lm_head"]}, r"lists \['lm_head'\]"),
        ({"target_modules": ["q_proj", "v_proj", "model.embed_tokens"]}, "embed_tokens"),
        ({"target_modules": ["q_proj", "v_proj", 3]}, "cannot represent"),
        ({"target_modules": {"q_proj": 1}}, "target_modules must be a list"),
        ({"target_modules": r".*\.q_proj"}, r"\['v_proj'\], which the target_modules regex"),
        ({"target_modules": ".*lm_head"}, r"\['q_proj', 'v_proj'\], which the target_modules"),
        ({"target_modules": "(q_proj"}, "is not a regex"),
        ({"target_modules": [f"{PREFIX}.0.self_attn.q_proj", "v_proj"]}, "does not list"),
        ({"exclude_modules": ["v_proj"]}, r"\['v_proj'\], which exclude_modules"),
        ({"exclude_modules": ["self_attn.q_proj", "lm_head"]}, r"\['q_proj'\], which exclude"),
        ({"exclude_modules": ["model.layers.0.self_attn.q_proj"]}, r"\['q_proj'\], which"),
        ({"exclude_modules": r".*\.0\.self_attn\..*"}, r"\['q_proj', 'v_proj'\], which exclude"),
        ({"exclude_modules": "(v_proj"}, "exclude_modules '\\(v_proj' is not a regex"),
        ({"exclude_modules": {"v_proj": 1}}, "exclude_modules must be a list"),
        ({"exclude_modules": ["v_proj", 3]}, "exclude_modules must be a list"),
    ],
)
def test_unsupported_or_inconsistent_config_is_refused(
    exported: Path, changes: dict[str, Any], match: str
) -> None:
    rewrite_config(exported, **changes)
    with pytest.raises(FormatError, match=match):
        MicroLoRA.from_peft(exported)


def test_harmless_options_are_accepted(exported: Path) -> None:
    rewrite_config(
        exported,
        fan_in_fan_out=True,
        init_lora_weights="gaussian",
        loftq_config={},
        peft_version="0.21.2",
        target_modules="all-linear",
        some_future_option=None,
    )
    assert MicroLoRA.from_peft(exported).config.target_modules == (Q, V)
    rewrite_config(exported, target_modules=["self_attn.q_proj", "v_proj"])
    assert MicroLoRA.from_peft(exported).config.target_modules == (Q, V)
    rewrite_config(exported, target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj")
    assert MicroLoRA.from_peft(exported, layer=1).config.target_modules == (Q, V)


@pytest.mark.parametrize(
    "excluded",
    [
        None,
        [],
        "",
        ["lm_head", "k_proj"],
        ["model.layers.1.self_attn.v_proj"],  # another layer's module
        [f"{PREFIX}.0.self_attn.v_proj"],  # PEFT matches inside the base model: not this one
        r".*\.1\.self_attn\..*",
        "v_proj",  # a string is a regex matched against the whole name
    ],
)
def test_exclude_modules_that_excludes_no_module_with_tensors_is_accepted(
    exported: Path, excluded: Any
) -> None:
    rewrite_config(exported, exclude_modules=excluded)
    assert MicroLoRA.from_peft(exported, layer=0).config.target_modules == (Q, V)


def test_sona_never_imports_torch_transformers_or_peft() -> None:
    code = (
        "import sys, sona.lora, sona.peft_format, sona.inspect, sona.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert out.stdout.strip() == "[]"


def test_absent_layer_lists_the_layers_present(exported: Path) -> None:
    rewrite_config(exported, layers_to_transform=None)
    with pytest.raises(FormatError, match=r"no tensors for layer 5; it holds layers \[0, 1\]"):
        MicroLoRA.from_peft(exported, layer=5)


def test_unknown_module_in_the_layer_is_refused(exported: Path) -> None:
    tensors = read_tensors(exported)
    tensors[f"{PREFIX}.0.self_attn.c_attn.lora_A.weight"] = np.zeros((2, 16), np.float32)
    rewrite_tensors(exported, tensors)
    with pytest.raises(FormatError, match="c_attn"):
        MicroLoRA.from_peft(exported)
    assert MicroLoRA.from_peft(exported, layer=1).config.target_modules == (Q, V)


@pytest.mark.parametrize(
    "name",
    [
        "base_model.model.lm_head.lora_A.weight",
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "foo",
        f"{PREFIX}.self_attn.q_proj.lora_A.weight",
        f"{PREFIX}.01.self_attn.q_proj.lora_A.weight",
        f"{PREFIX}_extra.0.self_attn.q_proj.lora_A.weight",
    ],
)
def test_tensors_outside_the_decoder_layers_are_refused_by_name(exported: Path, name: str) -> None:
    """No layer's MicroLoRA represents them, so no choice of layer reads the file."""
    tensors = read_tensors(exported)
    tensors[name] = np.zeros((2, 16), np.float32)
    rewrite_tensors(exported, tensors)
    for layer in (0, 1):
        with pytest.raises(FormatError, match=rf"outside the decoder layers.*{re.escape(name)}"):
            MicroLoRA.from_peft(exported, layer=layer)


def test_a_long_list_of_foreign_tensors_is_cut_short(exported: Path) -> None:
    tensors = read_tensors(exported)
    for i in range(25):
        tensors[f"extra.{i:02d}"] = np.zeros(1, np.float32)
    rewrite_tensors(exported, tensors)
    with pytest.raises(FormatError, match=r"extra\.09 and 15 more$"):
        MicroLoRA.from_peft(exported)


def test_bad_layer_argument(exported: Path) -> None:
    with pytest.raises(InvalidInputError, match="layer"):
        MicroLoRA.from_peft(exported, layer=-1)
    with pytest.raises(TypeError, match="layer"):
        MicroLoRA.from_peft(exported, layer="0")  # type: ignore[arg-type]
