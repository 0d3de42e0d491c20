"""Numbers computed with numpy are taken by every config, and stored as plain Python numbers.

``SonaLlmConfig(instant_lr=np.float32(0.01))`` used to raise "must be a number, got float32",
while ``np.float64`` was taken and kept as a numpy scalar, and no numpy integer was taken at
all. A config built from numpy scalars now equals, hashes, prints and serialises like the one
built from the literals they stand for.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sona.checkpoint import config_from_dict, config_to_dict, read
from sona.config import Chaos, SonaLlmConfig, SupervisionConfig
from sona.lora_config import MicroLoraConfig
from sona.runtime import SonaRuntime
from sona.training_config import TrainingConfig

CLASSES: list[type] = [MicroLoraConfig, TrainingConfig, SupervisionConfig, SonaLlmConfig, Chaos]
# A valid value for the fields whose default is not a number.
REQUIRED = {(Chaos, "crash_probability"): 0.25, (Chaos, "seed"): 7}
OVERRIDES = {(SonaLlmConfig, "consolidated_rank"): 3}
FLOAT_TYPES = [np.float16, np.float32, np.float64, np.longdouble]
INT_TYPES = [np.int8, np.int32, np.int64, np.uint16, np.uint64]


def _make(cls: type, name: str, value: Any) -> Any:
    """``cls`` with ``name`` set to ``value`` and the other required fields valid."""
    required = {n: v for (c, n), v in REQUIRED.items() if c is cls and n != "seed"}
    return cls(**{**required, name: value})


def _holds(np_type: type, value: Any) -> bool:
    if np_type in INT_TYPES:
        info = np.iinfo(np_type)
        return value == int(value) and info.min <= value <= info.max
    return True


def numeric_fields() -> list[tuple[type, str, str, Any]]:
    """(class, field, "int" or "float", a valid plain value) for every numeric field."""
    out = []
    for cls in CLASSES:
        for f in dataclasses.fields(cls):
            kind = {"int": "int", "float": "float", "int | None": "int"}.get(str(f.type))
            if kind is None or not f.init:
                continue
            value = REQUIRED.get((cls, f.name), OVERRIDES.get((cls, f.name), f.default))
            out.append((cls, f.name, kind, value))
    return out


FIELDS = numeric_fields()
IDS = [f"{cls.__name__}.{name}" for cls, name, _, _ in FIELDS]


def test_every_numeric_field_is_covered() -> None:
    names = {f"{cls.__name__}.{name}" for cls, name, _, _ in FIELDS}
    assert {"MicroLoraConfig.rank", "TrainingConfig.ewc_rank", "Chaos.seed"} <= names
    assert {"SonaLlmConfig.instant_lr", "SupervisionConfig.jitter"} <= names
    assert len(FIELDS) == 34


@pytest.mark.parametrize(("cls", "name", "kind", "value"), FIELDS, ids=IDS)
def test_numpy_scalars_are_stored_as_the_plain_number(
    cls: type, name: str, kind: str, value: Any
) -> None:
    kinds = FLOAT_TYPES + INT_TYPES if kind == "float" else INT_TYPES
    for np_type in kinds:
        if not _holds(np_type, value):
            continue
        # what the literal the numpy scalar stands for gives
        literal = int(value) if np_type in INT_TYPES else value
        plain = _make(cls, name, literal)
        config = _make(cls, name, np_type(value))
        stored = getattr(config, name)
        assert type(stored) is type(getattr(plain, name)), (np_type, stored)
        assert stored == value
        assert config == plain and hash(config) == hash(plain)
        assert repr(config) == repr(plain)


@pytest.mark.parametrize(("cls", "name", "kind", "value"), FIELDS, ids=IDS)
def test_numpy_bools_and_floats_for_ints_are_refused_naming_the_field(
    cls: type, name: str, kind: str, value: Any
) -> None:
    bad: list[Any] = [np.bool_(True), True]
    if kind == "int":
        bad += [np.float64(2.0), np.float32(2.5), 2.5]
    for v in bad:
        with pytest.raises(TypeError, match=name):
            _make(cls, name, v)


@given(st.floats(0.0, 1e6, width=32, exclude_min=True))
def test_a_float32_reads_as_the_decimal_it_prints(value: float) -> None:
    """np.float32(0.01) is stored as 0.01 (what it prints, and what its holder meant), not as
    its exact binary value 0.009999999776482582: it then equals the literal's config."""
    x = np.float32(value)
    config = SonaLlmConfig(instant_lr=x)
    assert config.instant_lr == float(str(x))
    assert np.float32(config.instant_lr) == x  # the same float32, whichever way it is read
    assert config == SonaLlmConfig(instant_lr=float(str(x)))


def test_numpy_scalars_outside_the_range_are_still_refused() -> None:
    with pytest.raises(ValueError, match="instant_lr"):
        SonaLlmConfig(instant_lr=np.float32(np.nan))
    with pytest.raises(ValueError, match="instant_lr"):
        SonaLlmConfig(instant_lr=np.float64(-1.0))
    with pytest.raises(ValueError, match="rank"):
        MicroLoraConfig(rank=np.int64(0))
    with pytest.raises(ValueError, match="seed"):
        Chaos(crash_probability=0.1, seed=np.int64(-1))


def _numpy_config() -> SonaLlmConfig:
    return SonaLlmConfig(
        instant_lr=np.float32(0.02),
        background_interval_ms=np.int64(3_600_000),
        background_min_samples=np.int32(4),
        deep_trigger_threshold=np.float64(1e9),
        pattern_clusters=np.uint8(3),
        consolidated_rank=np.int16(4),
        micro_lora=MicroLoraConfig.for_hidden_dim(
            np.int64(12), rank=np.int64(2), alpha=np.float32(3.5), dropout=np.float16(0.25)
        ),
        training=TrainingConfig(ewc_lambda=np.float32(0.3), fisher_samples=np.int64(16)),
        supervision=SupervisionConfig(max_restarts=np.int64(9), jitter=np.float32(0.1)),
    )


def test_a_numpy_built_config_serialises_to_json_and_back() -> None:
    config = _numpy_config()
    text = json.dumps(config_to_dict(config))
    back = config_from_dict(json.loads(text))
    assert back == config and repr(back) == repr(config)
    assert back.instant_lr == 0.02 and back.micro_lora.dropout == 0.25


@pytest.mark.anyio
async def test_a_numpy_built_config_survives_a_checkpoint(tmp_path: Path) -> None:
    config = _numpy_config()
    rt = SonaRuntime(config, seed=1)
    path = await rt.checkpoint(tmp_path / "c.sona")
    assert read(path).config == config
    assert SonaRuntime.restore(path).config == config
