"""Sizes sona allocates arrays by are refused past a documented maximum, at construction.

``TrainingConfig(fisher_samples=10**9)``, ``ewc_rank=10**9`` and
``SonaLlmConfig(pattern_clusters=10**9)`` used to be accepted, and ``SonaLlm()`` (or
``TrainingPipeline.init_for_lora``) then failed with a bare numpy MemoryError or ValueError
that named no field. Counts that only bound a deque (``replay_capacity``, the pending buffer)
keep their machine-size limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sona.checkpoint import config_from_dict, config_to_dict
from sona.config import MAX_PATTERN_CLUSTERS, SonaLlmConfig
from sona.errors import ConfigError, FormatError
from sona.lora_config import MAX_FEATURES, MAX_RANK, MicroLoraConfig
from sona.training_config import MAX_EWC_RANK, MAX_FISHER_SAMPLES, TrainingConfig


def _wide(n: int) -> MicroLoraConfig:
    return MicroLoraConfig.for_hidden_dim(n, rank=2)


# field, its limit, and a config with that field set to a value
LIMITS: list[tuple[str, int, Callable[[int], Any]]] = [
    ("in_features", MAX_FEATURES, lambda v: MicroLoraConfig(in_features=v, out_features=8, rank=1)),
    (
        "out_features",
        MAX_FEATURES,
        lambda v: MicroLoraConfig(in_features=8, out_features=v, rank=1),
    ),
    ("rank", MAX_RANK, lambda v: MicroLoraConfig.for_hidden_dim(MAX_RANK + 1, rank=v)),
    ("fisher_samples", MAX_FISHER_SAMPLES, lambda v: TrainingConfig(fisher_samples=v)),
    ("ewc_rank", MAX_EWC_RANK, lambda v: TrainingConfig(ewc_rank=v)),
    ("pattern_clusters", MAX_PATTERN_CLUSTERS, lambda v: SonaLlmConfig(pattern_clusters=v)),
    (
        "consolidated_rank",
        MAX_RANK,
        lambda v: SonaLlmConfig(consolidated_rank=v, micro_lora=_wide(MAX_RANK + 1)),
    ),
]
IDS = [field for field, _, _ in LIMITS]


@pytest.mark.parametrize(("field", "limit", "make"), LIMITS, ids=IDS)
def test_a_size_past_its_limit_is_refused_naming_field_and_limit(
    field: str, limit: int, make: Callable[[int], Any]
) -> None:
    assert getattr(make(limit), field) == limit  # the limit itself is allowed
    for value in (limit + 1, 10**9, 2**70):
        with pytest.raises(ConfigError, match=f"{field} must be <= {limit}, got {value}"):
            make(value)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: TrainingConfig(fisher_samples=10**9), "fisher_samples"),
        (lambda: TrainingConfig(ewc_rank=10**9), "ewc_rank"),
        (lambda: SonaLlmConfig(pattern_clusters=10**9), "pattern_clusters"),
        (lambda: SonaLlmConfig().replace(pattern_clusters=10**9), "pattern_clusters"),
        (lambda: TrainingConfig().replace(ewc_rank=10**9), "ewc_rank"),
        (lambda: MicroLoraConfig().replace(in_features=10**9), "in_features"),
    ],
)
def test_the_reported_repros_fail_at_the_config_not_in_numpy(
    make: Callable[[], Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        make()


@given(
    st.sampled_from(LIMITS),
    st.integers(1, 2**80),
)
def test_any_size_is_either_refused_or_within_its_limit(
    case: tuple[str, int, Callable[[int], Any]], value: int
) -> None:
    field, limit, make = case
    if value > limit:
        with pytest.raises(ConfigError, match=field):
            make(value)
    else:
        assert getattr(make(value), field) == value


def test_a_stored_config_past_a_limit_is_a_format_error_naming_the_field() -> None:
    data = config_to_dict(SonaLlmConfig())
    with pytest.raises(FormatError, match="pattern_clusters"):
        config_from_dict({**data, "pattern_clusters": 10**9})
    assert isinstance(data["training"], dict)
    with pytest.raises(FormatError, match="fisher_samples"):
        config_from_dict({**data, "training": {**data["training"], "fisher_samples": 10**9}})


def test_the_default_consolidated_rank_stays_within_the_limit() -> None:
    """4 × the micro rank, capped at the width, and now at MAX_RANK too: a legal micro rank
    must not give a consolidated adapter the config would refuse."""
    config = SonaLlmConfig(micro_lora=MicroLoraConfig.for_hidden_dim(4 * MAX_RANK, rank=MAX_RANK))
    assert config.consolidated_lora.rank == MAX_RANK


def test_counts_that_allocate_nothing_up_front_keep_their_machine_size_limit() -> None:
    big = SonaLlmConfig(replay_capacity=10**12, max_pending_samples=10**12)
    assert big.replay_capacity == big.max_pending_samples == 10**12
