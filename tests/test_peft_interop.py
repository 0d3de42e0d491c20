"""sona adapters against Hugging Face PEFT itself, on a tiny randomly initialised Llama.

The model's targeted projections must share one shape (a MicroLoRA holds one shape), so the
config uses num_key_value_heads == num_attention_heads: under grouped-query attention v_proj is
narrower than q_proj, which ``test_gqa_adapter_is_refused`` checks is refused, not mangled.
Needs the ``peft`` extra (torch, transformers, peft); skipped without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402

from sona.errors import FormatError  # noqa: E402
from sona.feedback import AdaptFeedback  # noqa: E402
from sona.lora import MicroLoRA  # noqa: E402
from sona.lora_config import MicroLoraConfig, TargetModule  # noqa: E402
from sona.peft_format import ADAPTER_WEIGHTS  # noqa: E402

# transformers 5 deprecation raised from inside peft, not from anything these tests call.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")

Q, V = TargetModule.Q_PROJ, TargetModule.V_PROJ
HIDDEN = 32
TOL = 1e-5


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tiny_llama(*, kv_heads: int = 4, layers: int = 3, seed: int = 0) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def trained_sona() -> MicroLoRA:
    """A sona adapter after a few supervised steps: B is no longer zero."""
    config = MicroLoraConfig(in_features=HIDDEN, out_features=HIDDEN, rank=2, alpha=4.0)
    lora = MicroLoRA(config, seed=7)
    rng = np.random.default_rng(1)
    targets = rng.standard_normal((4, HIDDEN)).astype(np.float32)
    for step in range(20):
        x = rng.standard_normal(HIDDEN).astype(np.float32)
        assert lora.adapt(x, AdaptFeedback.from_quality(1.0).with_target(targets[step % 4]))
        assert lora.apply_updates(0.1)
    for m in (Q, V):
        assert np.abs(lora.factors(m)[1]).max() > 1e-3
    return lora


def attn(model: Any, layer: int, module: TargetModule) -> Any:
    """The (PEFT-wrapped) projection of one layer, whatever wrapping PEFT added on top."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner.model.layers[layer].self_attn, module.value)


def peft_delta(model: Any, layer: int, module: TargetModule, x: np.ndarray) -> np.ndarray:
    """What the adapter adds to the base projection's output for inputs ``x``."""
    proj = attn(model, layer, module)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        return np.asarray((proj(xt) - proj.base_layer(xt)).numpy())


def random_inputs(seed: int, n: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, HIDDEN)).astype(np.float32)


def test_sona_export_loads_in_peft_and_matches_forward(tmp_path: Path) -> None:
    lora = trained_sona()
    out = lora.export_peft(tmp_path / "sona", layers=(0, 1), base_model_name_or_path="tiny")
    model = peft.PeftModel.from_pretrained(tiny_llama(), str(out)).eval()

    # Every adapter tensor PEFT holds is one sona wrote, and none was left at its initial value.
    with torch.no_grad():
        held = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    written = set(safetensors.numpy.load_file(str(out / ADAPTER_WEIGHTS)))
    assert set(held) == written
    # layers_to_transform: layer 2 was not exported and is not wrapped.
    assert not hasattr(attn(model, 2, Q), "lora_A")

    x = random_inputs(3)
    for layer in (0, 1):
        for m in (Q, V):
            np.testing.assert_allclose(peft_delta(model, layer, m, x), lora.forward(x, m), atol=TOL)
            proj = attn(model, layer, m)
            assert proj.scaling["default"] == pytest.approx(lora.scaling)


def test_sona_export_matches_inside_a_full_model_forward(tmp_path: Path) -> None:
    """Hooks capture what q_proj/v_proj really see and produce during generation's forward."""
    lora = trained_sona()
    out = lora.export_peft(tmp_path / "sona", layers=(0, 1))
    model = peft.PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    seen: dict[tuple[int, TargetModule], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def hook(key: tuple[int, TargetModule]) -> Any:
        def capture(module: Any, args: Any, output: Any) -> None:
            x = args[0].detach()
            base = module.base_layer(x)
            seen[key] = (x.numpy(), output.detach().numpy(), base.detach().numpy())

        return capture

    handles = [
        attn(model, layer, m).register_forward_hook(hook((layer, m)))
        for layer in (0, 1)
        for m in (Q, V)
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9, 2, 7]]))
    for h in handles:
        h.remove()
    assert len(seen) == 4
    for (_, m), (x, output, base) in seen.items():
        flat = x.reshape(-1, HIDDEN)
        np.testing.assert_allclose(
            (output - base).reshape(-1, HIDDEN), lora.forward(flat, m), atol=TOL
        )


def test_merged_peft_weights_equal_base_plus_sona_delta(tmp_path: Path) -> None:
    lora = trained_sona()
    out = lora.export_peft(tmp_path / "sona", layers=(0, 1))
    base = tiny_llama()
    before = {
        (i, m): attn(base, i, m).weight.detach().clone().numpy() for i in (0, 1) for m in (Q, V)
    }
    merged = peft.PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    for (i, m), w in before.items():
        got = attn(merged, i, m).weight.detach().numpy()
        np.testing.assert_allclose(got - w, lora.delta_weight(m), atol=TOL)


@pytest.mark.parametrize(("rank", "alpha", "rslora"), [(2, 8, False), (4, 8, True), (1, 3, False)])
def test_peft_saved_adapter_loads_into_sona(
    tmp_path: Path, rank: int, alpha: int, rslora: bool
) -> None:
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
        use_rslora=rslora,
        init_lora_weights=False,  # random B: a non-zero delta to compare
    )
    model = peft.get_peft_model(tiny_llama(layers=2), config).eval()
    model.save_pretrained(str(tmp_path / "peft"))

    x = random_inputs(4)
    for layer in (0, 1):
        lora = MicroLoRA.from_peft(tmp_path / "peft", layer=layer)
        assert lora.config.rank == rank
        assert lora.config.target_modules == (Q, V)
        assert lora.scaling == pytest.approx(attn(model, layer, Q).scaling["default"], rel=1e-12)
        for m in (Q, V):
            expected = peft_delta(model, layer, m, x)
            assert np.abs(expected).max() > 1e-3
            np.testing.assert_allclose(lora.forward(x, m), expected, atol=TOL)


def test_round_trip_through_peft_save(tmp_path: Path) -> None:
    """sona → PEFT load → PEFT save → sona gives back the same adapter."""
    lora = trained_sona()
    lora.export_peft(tmp_path / "sona", layers=(0, 1))
    model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "sona"))
    model.save_pretrained(str(tmp_path / "again"))
    back = MicroLoRA.from_peft(tmp_path / "again", layer=1)
    for m in (Q, V):
        np.testing.assert_allclose(back.delta_weight(m), lora.delta_weight(m), atol=1e-7)


@pytest.mark.parametrize("pattern", ["alpha_pattern", "rank_pattern"])
def test_peft_anchored_patterns_load_with_the_scale_peft_applies(
    tmp_path: Path, pattern: str
) -> None:
    """PEFT's documentation writes patterns as ``^model.layers.0.…``, anchored at the name
    inside the base model."""
    layer0 = {f"^model.layers.0.self_attn.{m}": 4 for m in ("q_proj", "v_proj")}
    config = peft.LoraConfig(
        r=2,
        lora_alpha=2,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        **{pattern: layer0},
    )
    model = peft.get_peft_model(tiny_llama(layers=2), config).eval()
    model.save_pretrained(str(tmp_path / "peft"))
    x = random_inputs(5)
    for layer in (0, 1):
        lora = MicroLoRA.from_peft(tmp_path / "peft", layer=layer)
        assert lora.scaling == attn(model, layer, Q).scaling["default"]
        for m in (Q, V):
            np.testing.assert_allclose(lora.forward(x, m), peft_delta(model, layer, m, x), atol=TOL)


def test_peft_adapter_with_regex_target_modules_loads(tmp_path: Path) -> None:
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
        init_lora_weights=False,
    )
    model = peft.get_peft_model(tiny_llama(layers=2), config).eval()
    model.save_pretrained(str(tmp_path / "peft"))
    x = random_inputs(6)
    lora = MicroLoRA.from_peft(tmp_path / "peft", layer=1)
    for m in (Q, V):
        np.testing.assert_allclose(lora.forward(x, m), peft_delta(model, 1, m, x), atol=TOL)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"use_dora": True}, "use_dora=True"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"rank_pattern": {"v_proj": 4}}, "different shapes or ranks"),
        ({"alpha_pattern": {"v_proj": 16}}, "alpha_pattern"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_peft_options_sona_cannot_represent_are_refused(
    tmp_path: Path, options: dict[str, Any], match: str
) -> None:
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **options
    )
    peft.get_peft_model(tiny_llama(layers=1), config).save_pretrained(str(tmp_path / "p"))
    with pytest.raises(FormatError, match=match):
        MicroLoRA.from_peft(tmp_path / "p")


@pytest.mark.parametrize(
    ("extra", "tensor"),
    [
        ("lm_head", "base_model.model.lm_head.lora_A.weight"),
        ("embed_tokens", "base_model.model.model.embed_tokens.lora_embedding_A"),
    ],
)
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`")
def test_a_peft_adapter_that_trains_modules_outside_the_layers_is_refused(
    tmp_path: Path, extra: str, tensor: str
) -> None:
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", extra], task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(tiny_llama(layers=2), config)
    model.save_pretrained(str(tmp_path / "p"))
    assert tensor in safetensors.numpy.load_file(str(tmp_path / "p" / ADAPTER_WEIGHTS))
    for layer in (0, 1):
        with pytest.raises(FormatError, match=rf"outside the decoder layers.*{tensor}"):
            MicroLoRA.from_peft(tmp_path / "p", layer=layer)


def test_gqa_adapter_is_refused(tmp_path: Path) -> None:
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    peft.get_peft_model(tiny_llama(kv_heads=2, layers=1), config).save_pretrained(
        str(tmp_path / "p")
    )
    with pytest.raises(FormatError, match=r"q_proj \(r=2, in=32, out=32\), v_proj \(r=2"):
        MicroLoRA.from_peft(tmp_path / "p")


def test_bfloat16_adapter_is_refused_with_a_reason(tmp_path: Path) -> None:
    trained_sona().export_peft(tmp_path / "a")
    path = tmp_path / "a" / ADAPTER_WEIGHTS
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(FormatError, match="BF16"):
        MicroLoRA.from_peft(tmp_path / "a")


def test_exclude_modules_is_honoured_as_peft_honours_it(tmp_path: Path) -> None:
    """PEFT does not wrap a module exclude_modules names, so it ignores tensors saved for one.
    An adapter PEFT saved with layer 0's v_proj excluded reads as PEFT computes it (q_proj
    alone in layer 0); once tensors for that v_proj are added, PEFT still ignores them, and
    sona, which used to load them, refuses the file as it refuses tensors target_modules does
    not list."""
    excluded = "model.layers.0.self_attn.v_proj"
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=[excluded],
        init_lora_weights=False,
    )
    peft.get_peft_model(tiny_llama(layers=2), config).save_pretrained(str(tmp_path / "p"))
    x = random_inputs(7)
    lora = MicroLoRA.from_peft(tmp_path / "p", layer=0)
    assert lora.config.target_modules == (Q,)
    model = peft.PeftModel.from_pretrained(tiny_llama(layers=2), str(tmp_path / "p")).eval()
    np.testing.assert_allclose(lora.forward(x, Q), peft_delta(model, 0, Q, x), atol=TOL)

    path = tmp_path / "p" / ADAPTER_WEIGHTS
    tensors = load_file(str(path))
    for factor in ("A", "B"):
        src = f"base_model.model.model.layers.1.self_attn.v_proj.lora_{factor}.weight"
        tensors[src.replace("layers.1", "layers.0")] = tensors[src].clone()
    save_file(tensors, str(path), metadata={"format": "pt"})
    model = peft.PeftModel.from_pretrained(tiny_llama(layers=2), str(tmp_path / "p")).eval()
    assert not hasattr(attn(model, 0, V), "lora_A")  # PEFT left the tensors out
    with pytest.raises(FormatError, match=r"\['v_proj'\], which exclude_modules"):
        MicroLoRA.from_peft(tmp_path / "p", layer=0)
