"""MicroLoraConfig and TargetModule: the documented defaults, validation and round trips."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sona.errors import ConfigError
from sona.lora import MicroLoraConfig, TargetModule

PEFT_NAMES = {
    "Q_PROJ": "q_proj",
    "K_PROJ": "k_proj",
    "V_PROJ": "v_proj",
    "O_PROJ": "o_proj",
    "GATE_PROJ": "gate_proj",
    "UP_PROJ": "up_proj",
    "DOWN_PROJ": "down_proj",
}


def test_target_module_values_are_peft_names() -> None:
    assert {m.name: m.value for m in TargetModule} == PEFT_NAMES


def test_target_module_parse_accepts_members_and_names_only() -> None:
    for m in TargetModule:
        assert TargetModule.parse(m) is m
        assert TargetModule.parse(m.value) is m
    with pytest.raises(ConfigError, match="lm_head"):
        TargetModule.parse("lm_head")
    with pytest.raises(TypeError, match="module"):
        TargetModule.parse(3)


def test_defaults_match_the_api_contract() -> None:
    c = MicroLoraConfig()
    assert (c.in_features, c.out_features, c.rank) == (768, 768, 2)
    assert c.alpha == 4.0
    assert c.dropout == 0.0
    assert c.target_modules == (TargetModule.Q_PROJ, TargetModule.V_PROJ)
    assert c.gradient_checkpointing is False
    assert c.scaling == 2.0


@given(
    n_in=st.integers(1, 64),
    n_out=st.integers(1, 64),
    rank=st.integers(1, 8),
    alpha=st.floats(1e-3, 1e3),
)
def test_scaling_is_alpha_over_rank(n_in: int, n_out: int, rank: int, alpha: float) -> None:
    if rank > min(n_in, n_out):
        with pytest.raises(ConfigError, match="rank"):
            MicroLoraConfig(in_features=n_in, out_features=n_out, rank=rank, alpha=alpha)
        return
    c = MicroLoraConfig(in_features=n_in, out_features=n_out, rank=rank, alpha=alpha)
    assert c.scaling == alpha / rank


def test_for_hidden_dim_is_square_and_takes_overrides() -> None:
    c = MicroLoraConfig.for_hidden_dim(64)
    assert (c.in_features, c.out_features) == (64, 64)
    c2 = MicroLoraConfig.for_hidden_dim(32, rank=4, alpha=8.0)
    assert (c2.in_features, c2.out_features, c2.rank, c2.scaling) == (32, 32, 4, 2.0)
    with pytest.raises(ConfigError):
        MicroLoraConfig.for_hidden_dim(0)


def test_config_is_frozen() -> None:
    c = MicroLoraConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.rank = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        MicroLoraConfig(16, 16)  # type: ignore[call-arg]  # keyword construction only


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("in_features", 0, ConfigError),
        ("in_features", -3, ConfigError),
        ("in_features", 2.0, TypeError),
        ("in_features", True, TypeError),
        ("out_features", 0, ConfigError),
        ("rank", 0, ConfigError),
        ("rank", 17, ConfigError),  # above min(in, out) = 16
        ("rank", "2", TypeError),
        ("alpha", 0.0, ConfigError),
        ("alpha", -1.0, ConfigError),
        ("alpha", float("nan"), ConfigError),
        ("alpha", float("inf"), ConfigError),
        ("alpha", "4", TypeError),
        pytest.param("alpha", 10**400, ConfigError, id="alpha-beyond-float"),
        pytest.param("alpha", 1e308, ConfigError, id="alpha-beyond-float32"),
        ("dropout", -0.1, ConfigError),
        ("dropout", 1.0, ConfigError),
        ("dropout", float("nan"), ConfigError),
        ("explore_std", 0.0, ConfigError),
        ("advantage_temperature", 0.0, ConfigError),
        ("advantage_cap", 0.5, ConfigError),
        ("baseline_decay", 1.0, ConfigError),
        ("baseline_decay", -0.5, ConfigError),
        ("target_modules", (), ConfigError),
        ("target_modules", ("q_proj", "q_proj"), ConfigError),
        ("target_modules", (TargetModule.Q_PROJ, "q_proj"), ConfigError),
        ("target_modules", ("lm_head",), ConfigError),
        ("target_modules", "q_proj", TypeError),
        ("target_modules", TargetModule.Q_PROJ, TypeError),
        ("target_modules", (1,), TypeError),
        ("gradient_checkpointing", "no", TypeError),
        ("gradient_checkpointing", 0, TypeError),
        ("gradient_checkpointing", 1.0, TypeError),
        ("gradient_checkpointing", None, TypeError),
    ],
)
def test_invalid_fields_raise_naming_the_field(field: str, value: Any, error: type) -> None:
    assert issubclass(error, (ValueError, TypeError))
    kw: dict[str, Any] = {"in_features": 16, "out_features": 32, field: value}
    with pytest.raises(error) as info:
        MicroLoraConfig(**kw)
    msg = str(info.value)
    assert field in msg or (field == "target_modules" and "module" in msg), msg


def test_rank_may_equal_the_smaller_dimension() -> None:
    c = MicroLoraConfig(in_features=3, out_features=5, rank=3)
    assert c.rank == 3


def test_target_modules_accepts_names_and_lists() -> None:
    c = MicroLoraConfig(target_modules=["k_proj", TargetModule.O_PROJ])  # type: ignore[arg-type]
    assert c.target_modules == (TargetModule.K_PROJ, TargetModule.O_PROJ)
    assert isinstance(c.target_modules, tuple)


def test_equality_and_hash_follow_fields() -> None:
    a = MicroLoraConfig(rank=4, alpha=8.0)
    b = MicroLoraConfig(rank=4, alpha=8.0)
    assert a == b and hash(a) == hash(b)
    assert a != MicroLoraConfig(rank=4, alpha=8.5)
    assert a != MicroLoraConfig(rank=4, alpha=8.0, target_modules=(TargetModule.Q_PROJ,))


configs = st.builds(
    lambda n_in, n_out, rank, alpha, dropout, mods, ckpt: MicroLoraConfig(
        in_features=n_in,
        out_features=n_out,
        rank=min(rank, n_in, n_out),
        alpha=alpha,
        dropout=dropout,
        target_modules=tuple(mods),
        gradient_checkpointing=ckpt,
    ),
    st.integers(1, 4096),
    st.integers(1, 4096),
    st.integers(1, 8),
    st.floats(1e-3, 64.0),
    st.floats(0.0, 0.9),
    st.lists(st.sampled_from(list(TargetModule)), min_size=1, max_size=7, unique=True),
    st.booleans(),
)


@settings(max_examples=50)
@given(configs)
def test_dict_and_pickle_round_trips_are_exact(c: MicroLoraConfig) -> None:
    d = c.to_dict()
    mods = d["target_modules"]
    assert isinstance(mods, list) and all(isinstance(v, str) for v in mods)
    assert MicroLoraConfig.from_dict(d) == c
    assert MicroLoraConfig.from_dict(d).scaling == c.scaling
    assert pickle.loads(pickle.dumps(c)) == c


def test_from_dict_rejects_unknown_and_invalid_fields() -> None:
    d = MicroLoraConfig().to_dict()
    with pytest.raises(ConfigError, match="unknown"):
        MicroLoraConfig.from_dict({**d, "lr": 0.1})
    with pytest.raises(ConfigError, match="rank"):
        MicroLoraConfig.from_dict({**d, "rank": 0})
    with pytest.raises(ConfigError, match="target_modules"):
        MicroLoraConfig.from_dict({**d, "target_modules": "q_proj"})
    with pytest.raises(TypeError, match="gradient_checkpointing"):
        MicroLoraConfig.from_dict({**d, "gradient_checkpointing": 0.0})


def test_replace_validates_and_leaves_the_original() -> None:
    c = MicroLoraConfig(in_features=16, out_features=16)
    c2 = c.replace(rank=4, alpha=2.0)
    assert (c2.rank, c2.scaling, c.rank) == (4, 0.5, 2)
    with pytest.raises(ConfigError, match="rank"):
        c.replace(rank=32)
    with pytest.raises(TypeError):
        c.replace(bogus=1)
