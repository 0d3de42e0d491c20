"""``sona inspect``: sona adapter files, PEFT adapter directories, bad input, plug-in kinds."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from sona import inspect as sona_inspect
from sona.cli import main
from sona.lora import MicroLoRA
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS

Q, V = TargetModule.Q_PROJ, TargetModule.V_PROJ


def adapter(*, trained: bool = True, rank: int = 2, alpha: float = 4.0) -> MicroLoRA:
    config = MicroLoraConfig(in_features=24, out_features=16, rank=rank, alpha=alpha)
    lora = MicroLoRA(config, seed=0)
    if trained:
        a, bt = lora.factors(Q)
        lora.set_factors(Q, a, np.ones_like(bt))
    return lora


def run(path: Path | str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = sona_inspect.run(str(path), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def fields(text: str) -> dict[str, str]:
    """The summary block as a dict: 'key  value' lines before the table."""
    found = {}
    for line in text.splitlines()[1:]:
        if not line.strip():
            break
        key, _, value = line.strip().partition("  ")
        found[key] = value.strip()
    return found


def table(text: str) -> list[list[str]]:
    """The table rows (header first) split on runs of spaces."""
    blocks = text.split("\n\n", 1)
    if len(blocks) < 2:
        return []
    return [line.split() for line in blocks[1].splitlines() if line.strip() and "note:" not in line]


def test_sona_adapter_file(tmp_path: Path) -> None:
    lora = adapter(rank=2, alpha=3.0)
    a, bt = lora.factors(Q)
    lora.set_factors(Q, a, np.ones_like(bt))
    lora.save(tmp_path / "a.sona")
    code, out, err = run(tmp_path / "a.sona")
    assert code == 0 and err == ""
    info = fields(out)
    assert out.startswith(f"sona adapter: {tmp_path / 'a.sona'}")
    assert info["modules"] == "q_proj, v_proj"
    assert (info["in_features"], info["out_features"], info["rank"]) == ("24", "16", "2")
    assert info["scaling"].startswith("1.5")
    assert info["parameters"] == str(lora.param_count) == str(2 * 2 * (24 + 16))
    assert info["version"] == str(lora.version) != "0"  # set_factors made a new version
    rows = table(out)
    assert rows[0] == ["module", "rank", "in", "out", "scale", "|ΔW|"]
    norms = {r[0]: float(r[5]) for r in rows[1:]}
    assert norms["q_proj"] == pytest.approx(np.linalg.norm(lora.delta_weight(Q)), rel=1e-3)
    assert norms["v_proj"] == 0.0


def test_peft_directory_written_by_sona(tmp_path: Path) -> None:
    adapter().export_peft(tmp_path / "p", layers=(0, 1, 2, 5), base_model_name_or_path="tiny")
    code, out, _ = run(tmp_path / "p")
    assert code == 0
    assert out.startswith("PEFT LoRA adapter:")
    info = fields(out)
    assert info["base model"] == "tiny"
    assert (info["r"], info["lora_alpha"]) == ("2", "4")
    assert info["scale"] == "2 (lora_alpha / r)"
    assert info["target_modules"] == "q_proj, v_proj"
    assert info["layers"] == "0-2,5"
    assert info["parameters"] == str(4 * 2 * 2 * (24 + 16))
    assert info["sona from_peft"].startswith("yes (layer 0: in=24, out=16, rank=2,")
    rows = table(out)
    assert rows[0] == ["module", "layers", "rank", "in", "out", "scale"]
    assert ["base_model.model.model.layers.*.self_attn.q_proj", "0-2,5", "2", "24", "16", "2"] in (
        rows
    )
    assert len(rows) == 3


def test_peft_file_inside_the_directory_is_accepted(tmp_path: Path) -> None:
    adapter().export_peft(tmp_path / "p")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        code, out, _ = run(tmp_path / "p" / name)
        assert code == 0 and out.startswith(f"PEFT LoRA adapter: {tmp_path / 'p'}")


def test_peft_rslora_and_patterns_show_the_scale_peft_applies(tmp_path: Path) -> None:
    adapter(rank=4, alpha=8.0).export_peft(tmp_path / "p", layers=(0, 1))
    config_path = tmp_path / "p" / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config.update(use_rslora=True, alpha_pattern={"layers.1.self_attn.v_proj": 16})
    config_path.write_text(json.dumps(config))
    code, out, _ = run(tmp_path / "p")
    assert code == 0
    info = fields(out)
    assert info["scale"] == "4 (lora_alpha / sqrt(r), rsLoRA)"
    assert info["alpha_pattern"] == "{'layers.1.self_attn.v_proj': 16}"
    scales = {(r[0].rsplit(".", 1)[-1], r[1]): r[5] for r in table(out)[1:]}
    assert scales == {("q_proj", "0-1"): "4", ("v_proj", "0"): "4", ("v_proj", "1"): "8"}


def test_peft_anchored_pattern_shows_the_scale_peft_applies(tmp_path: Path) -> None:
    adapter(rank=2, alpha=4.0).export_peft(tmp_path / "p", layers=(0, 1))
    config_path = tmp_path / "p" / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config.update(alpha_pattern={"^model.layers.1.self_attn.q_proj": 8})
    config_path.write_text(json.dumps(config))
    code, out, _ = run(tmp_path / "p")
    assert code == 0
    scales = {(r[0].rsplit(".", 1)[-1], r[1]): r[5] for r in table(out)[1:]}
    assert scales == {("q_proj", "0"): "2", ("q_proj", "1"): "4", ("v_proj", "0-1"): "2"}


def test_peft_adapter_sona_cannot_read_is_still_described(tmp_path: Path) -> None:
    adapter().export_peft(tmp_path / "p")
    config_path = tmp_path / "p" / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config.update(use_dora=True)
    config_path.write_text(json.dumps(config))
    code, out, _ = run(tmp_path / "p")
    assert code == 0
    info = fields(out)
    assert info["use_dora"] == "True"
    assert info["sona from_peft"].startswith("no:") and "use_dora" in info["sona from_peft"]


@pytest.mark.parametrize("case", ["missing", "unknown_file", "empty_dir", "truncated", "flipped"])
def test_bad_inputs_exit_2_with_a_message(tmp_path: Path, case: str) -> None:
    path = tmp_path / "x"
    if case == "unknown_file":
        path.write_text("hello")
    elif case == "empty_dir":
        path.mkdir()
    elif case in ("truncated", "flipped"):
        adapter().save(path)
        data = bytearray(path.read_bytes())
        if case == "truncated":
            data = data[: len(data) // 2]
        else:
            data[-40] ^= 0xFF
        path.write_bytes(bytes(data))
    code, out, err = run(path)
    assert code == 2
    assert out == ""
    assert err.startswith("sona inspect: error:") and str(path) in err


def test_what_is_not_a_regular_file_or_directory_exits_2(fifo: Path) -> None:
    code, out, err = run(fifo)
    assert code == 2 and out == ""
    assert err.startswith(f"sona inspect: error: {fifo}: not a regular file or directory")


def test_corrupt_peft_directory_exits_2(tmp_path: Path) -> None:
    adapter().export_peft(tmp_path / "p")
    (tmp_path / "p" / ADAPTER_WEIGHTS).write_bytes(b"garbage")
    code, _, err = run(tmp_path / "p")
    assert code == 2 and "safetensors" in err
    (tmp_path / "p" / ADAPTER_CONFIG).write_text("{")
    code, _, err = run(tmp_path / "p")
    assert code == 2 and "JSON" in err


def test_peft_config_with_an_integer_beyond_float_range_is_described(tmp_path: Path) -> None:
    adapter().export_peft(tmp_path / "p")
    config_path = tmp_path / "p" / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config["lora_alpha"] = 10**400
    config_path.write_text(json.dumps(config))
    code, out, _ = run(tmp_path / "p")
    assert code == 0
    assert fields(out)["scale"].startswith("? ")
    assert "must be finite" in fields(out)["sona from_peft"]


def test_peft_factors_of_different_ranks_are_noted(tmp_path: Path) -> None:
    import safetensors.numpy

    adapter().export_peft(tmp_path / "p")
    weights = tmp_path / "p" / ADAPTER_WEIGHTS
    tensors = safetensors.numpy.load_file(str(weights))
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key] = np.zeros((tensors[key].shape[0], 3), np.float32)
    safetensors.numpy.save_file(tensors, str(weights))
    code, out, _ = run(tmp_path / "p")
    assert code == 0
    module = key.removesuffix(".lora_B.weight")
    assert f"note: {module}: lora_A has rank 2, lora_B has rank 3" in out


def test_an_invalid_peft_pattern_names_the_config_file(tmp_path: Path) -> None:
    adapter().export_peft(tmp_path / "p")
    config_path = tmp_path / "p" / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config.update(rank_pattern=[1])
    config_path.write_text(json.dumps(config))
    code, _, err = run(tmp_path / "p")
    assert code == 2 and f"{config_path}: rank_pattern/alpha_pattern must be an object" in err


def test_deeply_nested_peft_config_exits_2(tmp_path: Path) -> None:
    adapter().export_peft(tmp_path / "p")
    (tmp_path / "p" / ADAPTER_CONFIG).write_text("[" * 100_000)
    code, _, err = run(tmp_path / "p")
    assert code == 2 and "not valid JSON" in err


def test_cli_routes_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter().save(tmp_path / "a.sona")
    assert main(["inspect", str(tmp_path / "a.sona")]) == 0
    assert "sona adapter" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "no such file" in capsys.readouterr().err


class _Checkpoint:
    """A stand-in for a kind added later: files starting with a magic number."""

    name = "test checkpoint"

    def recognises(self, path: Path) -> bool:
        return path.is_file() and path.read_bytes().startswith(b"CKPT")

    def describe(self, path: Path) -> sona_inspect.Report:
        return sona_inspect.Report("test checkpoint", path, [("steps", "3")])


@pytest.fixture
def plugged() -> Iterator[None]:
    before = list(sona_inspect._REGISTRY)
    sona_inspect.register(_Checkpoint())
    yield
    sona_inspect._REGISTRY[:] = before


@pytest.mark.usefixtures("plugged")
def test_another_kind_plugs_in(tmp_path: Path) -> None:
    (tmp_path / "c").write_bytes(b"CKPT....")
    code, out, _ = run(tmp_path / "c")
    assert code == 0
    assert out.splitlines() == [f"test checkpoint: {tmp_path / 'c'}", "  steps  3"]
    assert "test checkpoint" in [i.name for i in sona_inspect.inspectors()]
    adapter().save(tmp_path / "a.sona")
    assert run(tmp_path / "a.sona")[1].startswith("sona adapter")


def test_register_refuses_non_inspectors() -> None:
    with pytest.raises(TypeError, match="recognises"):
        sona_inspect.register(object())  # type: ignore[arg-type]


def test_an_empty_path_is_refused_not_read_as_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Path("")`` is ``.``: ``sona inspect ""`` (an unset shell variable, say) described
    whatever adapter directory the shell happened to be in, instead of saying no path was
    given."""
    adapter().export_peft(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out, err = run("")
    assert code == 2 and out == ""
    assert err == "sona inspect: error: an empty path names no file or directory\n"


def _edit_weights(directory: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    import safetensors.numpy

    weights = directory / ADAPTER_WEIGHTS
    tensors = safetensors.numpy.load_file(str(weights))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(weights))


def test_peft_tensors_that_are_not_lora_factor_pairs_are_noted(tmp_path: Path) -> None:
    """A factor without its partner, a 1-d tensor with a factor's name, extra tensors beyond
    the five shown, an unlayered pair beside the layered ones: each is noted or kept out of
    the layers, and the adapter is still described."""
    adapter().export_peft(tmp_path / "p", layers=(2, 5))
    lm_head = "base_model.model.lm_head"

    def edit(tensors: dict[str, np.ndarray]) -> None:
        del tensors[
            next(k for k in tensors if "layers.5" in k and k.endswith("v_proj.lora_B.weight"))
        ]
        tensors["base_model.model.norm.lora_A.weight"] = np.zeros(4, np.float32)
        for i in range(6):
            tensors[f"base_model.model.extra{i}.weight"] = np.zeros((2, 2), np.float32)
        tensors[f"{lm_head}.lora_A.weight"] = np.zeros((2, 24), np.float32)
        tensors[f"{lm_head}.lora_B.weight"] = np.zeros((16, 2), np.float32)

    _edit_weights(tmp_path / "p", edit)
    code, out, _ = run(tmp_path / "p")
    assert code == 0
    info = fields(out)
    assert info["layers"] == "2,5"
    notes = [line.strip().removeprefix("note: ") for line in out.splitlines() if "note:" in line]
    assert "base_model.model.model.layers.5.self_attn.v_proj: lora_B.weight is missing" in notes
    (extra,) = [n for n in notes if "non-LoRA-factor" in n]
    assert extra.startswith("7 non-LoRA-factor tensors: base_model.model.extra0.weight, ")
    assert extra.endswith(" and 2 more")
    assert [lm_head, "-", "2", "24", "16", "2"] in table(out)


def test_peft_config_rank_that_differs_from_the_tensors_is_noted(tmp_path: Path) -> None:
    adapter().export_peft(tmp_path / "p")
    config_path = tmp_path / "p" / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config.update(r=4)
    config_path.write_text(json.dumps(config))
    code, out, _ = run(tmp_path / "p")
    assert code == 0
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    assert f"note: {module}: tensors have rank 2, the config says 4" in out


def test_sona_reads_a_peft_adapter_from_its_first_layer(tmp_path: Path) -> None:
    adapter().export_peft(tmp_path / "p", layers=(2, 5))
    code, out, _ = run(tmp_path / "p")
    assert code == 0
    assert fields(out)["sona from_peft"].startswith("yes (layer 2: in=24, out=16, rank=2,")
