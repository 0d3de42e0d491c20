"""SonaLlmConfig: clear errors for bad values, the seed's preset table, working presets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sona.actors import OverflowPolicy

from sona.config import ConsolidationStrategy, SonaLlmConfig, SupervisionConfig
from sona.engine import SonaLlm
from sona.errors import ConfigError
from sona.feedback import AdaptFeedback
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.training_config import TrainingConfig

# ---------------------------------------------------------------------- defaults


def test_defaults_are_the_api_contract() -> None:
    c = SonaLlmConfig()
    assert c.instant_lr == 0.01
    assert c.background_interval_ms == 100
    assert c.background_min_samples == 10
    assert c.deep_trigger_threshold == 100.0
    assert c.consolidation_strategy is ConsolidationStrategy.EWC_MERGE
    assert c.max_pending_samples == 1000
    assert c.overflow is OverflowPolicy.BLOCK
    assert c.replay_capacity == 10_000
    assert c.pattern_clusters == 16
    assert c.checkpoint_interval_s == 30.0
    assert c.micro_lora == MicroLoraConfig()
    assert c.training == TrainingConfig()
    assert c.supervision == SupervisionConfig()


def test_frozen() -> None:
    c = SonaLlmConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.instant_lr = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------------- validation
BAD_VALUES = [
    ("instant_lr", 0.0, ConfigError),
    ("instant_lr", -0.1, ConfigError),
    ("instant_lr", float("nan"), ConfigError),
    ("instant_lr", float("inf"), ConfigError),
    ("instant_lr", "0.1", TypeError),
    ("background_interval_ms", 0, ConfigError),
    ("background_interval_ms", 1.5, TypeError),
    ("background_min_samples", 0, ConfigError),
    ("background_min_samples", True, TypeError),
    ("deep_trigger_threshold", 0.0, ConfigError),
    ("deep_trigger_threshold", -5.0, ConfigError),
    ("max_pending_samples", 0, ConfigError),
    ("max_pending_samples", None, TypeError),
    ("replay_capacity", 0, ConfigError),
    ("pattern_clusters", 0, ConfigError),
    ("pattern_clusters", 2.0, TypeError),
    ("checkpoint_interval_s", 0.0, ConfigError),
    ("deep_epochs", 0, ConfigError),
    ("consolidated_rank", 0, ConfigError),
    ("consolidated_rank", 10_000, ConfigError),
    ("consolidation_strategy", "ewc_merge", TypeError),
    ("overflow", "block", TypeError),
    ("micro_lora", {"rank": 2}, TypeError),
    ("training", None, TypeError),
    ("supervision", 5, TypeError),
]


@pytest.mark.parametrize(("field", "value", "error"), BAD_VALUES)
def test_bad_values_raise_a_clear_error_naming_the_field(
    field: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=field):
        SonaLlmConfig(**{field: value})
    with pytest.raises(error, match=field):
        SonaLlmConfig().replace(**{field: value})
    assert issubclass(error, (ValueError, TypeError))


def test_a_training_learning_rate_no_loop_uses_is_refused_not_ignored() -> None:
    from sona.training_config import TrainingConfig

    with pytest.raises(ConfigError, match="instant_lr"):
        SonaLlmConfig(training=TrainingConfig(learning_rate=0.5))
    kept = SonaLlmConfig(training=TrainingConfig(ewc_lambda=2.0))  # the rest of it is used
    assert kept.training.ewc_lambda == 2.0


def test_a_min_batch_larger_than_the_pending_bound_is_refused() -> None:
    """The pending buffer could never hold enough samples for maybe_background to run: under
    the DROP and REJECT policies consolidation would stall with the buffer full forever."""
    with pytest.raises(ConfigError, match=r"background_min_samples.*max_pending_samples"):
        SonaLlmConfig(background_min_samples=20, max_pending_samples=10)
    with pytest.raises(ConfigError, match="background_min_samples"):
        SonaLlmConfig.minimal_memory().replace(background_min_samples=101)
    ok = SonaLlmConfig(background_min_samples=10, max_pending_samples=10)
    assert ok.background_min_samples == ok.max_pending_samples


def test_replace_refuses_unknown_fields_and_keeps_the_original() -> None:
    c = SonaLlmConfig()
    with pytest.raises(ConfigError, match="instant_rate"):
        c.replace(instant_rate=0.1)
    d = c.replace(instant_lr=0.2)
    assert d.instant_lr == 0.2 and c.instant_lr == 0.01


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(TypeError):
        SonaLlmConfig(learning_rate=0.1)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_restarts", -1), ("within_s", 0.0), ("jitter", 1.5), ("backoff_min_s", -1.0)],
)
def test_supervision_config_validates(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        SupervisionConfig(**{field: value})


def test_backoff_max_below_min_is_refused() -> None:
    with pytest.raises(ConfigError, match="backoff_max_s"):
        SupervisionConfig(backoff_min_s=0.5, backoff_max_s=0.1)


def test_consolidated_rank_defaults_to_four_times_the_micro_rank_capped() -> None:
    small = SonaLlmConfig(micro_lora=MicroLoraConfig.for_hidden_dim(6, rank=2))
    assert small.consolidated_lora.rank == 6  # 8 capped at the width
    wide = SonaLlmConfig(micro_lora=MicroLoraConfig.for_hidden_dim(64, rank=2))
    assert wide.consolidated_lora.rank == 8
    fixed = wide.replace(consolidated_rank=3)
    assert fixed.consolidated_lora.rank == 3
    assert fixed.consolidated_lora.target_modules == wide.micro_lora.target_modules


def test_consolidated_rank_is_capped_by_the_narrower_side_of_the_adapter() -> None:
    """in_features and out_features may differ: the default consolidated rank and an explicit
    one are both bounded by the smaller, as a MicroLoraConfig's rank is."""
    narrow_out = MicroLoraConfig(in_features=16, out_features=4, rank=2)
    narrow_in = MicroLoraConfig(in_features=4, out_features=16, rank=2)
    for micro in (narrow_out, narrow_in):
        config = SonaLlmConfig(micro_lora=micro)
        assert config.consolidated_lora.rank == 4  # 8 capped at min(16, 4)
        with pytest.raises(ConfigError, match="consolidated_rank"):
            SonaLlmConfig(micro_lora=micro, consolidated_rank=5)
    engine = SonaLlm(SonaLlmConfig(micro_lora=narrow_out), seed=0)
    assert engine.forward(np.ones(16, np.float32), TargetModule.Q_PROJ).shape == (4,)


# ---------------------------------------------------------------------- presets
Q, K, V, OP = (TargetModule.Q_PROJ, TargetModule.K_PROJ, TargetModule.V_PROJ, TargetModule.O_PROJ)

# The seed's tuning table: rank, modules, background interval, EWC lambda, max pending.
TABLE = {
    "low_latency": (1, 1, 200, 0.0, None),
    "balanced": (2, 2, 100, 0.1, None),
    "high_quality": (4, 4, 50, 0.5, None),
    "minimal_memory": (1, 1, None, None, 100),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_presets_match_the_seed_table(name: str) -> None:
    rank, modules, interval, lam, pending = TABLE[name]
    c = getattr(SonaLlmConfig, name)()
    assert isinstance(c, SonaLlmConfig)
    assert c.micro_lora.rank == rank
    assert len(c.micro_lora.target_modules) == modules
    assert len(set(c.micro_lora.target_modules)) == modules
    if interval is not None:
        assert c.background_interval_ms == interval
    if lam is not None:
        assert c.training.ewc_lambda == lam
    if pending is not None:
        assert c.max_pending_samples == pending
    assert c.micro_lora.in_features == c.micro_lora.out_features == 768


def test_presets_target_the_expected_modules() -> None:
    assert SonaLlmConfig.low_latency().micro_lora.target_modules == (Q,)
    assert set(SonaLlmConfig.balanced().micro_lora.target_modules) == {Q, V}
    assert set(SonaLlmConfig.high_quality().micro_lora.target_modules) == {Q, K, V, OP}
    assert len(SonaLlmConfig.minimal_memory().micro_lora.target_modules) == 1


def test_minimal_memory_keeps_less_than_the_defaults() -> None:
    m, d = SonaLlmConfig.minimal_memory(), SonaLlmConfig()
    assert m.replay_capacity < d.replay_capacity
    assert m.pattern_clusters < d.pattern_clusters
    assert m.max_pending_samples < d.max_pending_samples


def test_presets_are_ordered_by_latency_and_capacity() -> None:
    ll, hq = SonaLlmConfig.low_latency(), SonaLlmConfig.high_quality()
    assert ll.micro_lora.rank < hq.micro_lora.rank
    assert ll.background_interval_ms > hq.background_interval_ms


@pytest.mark.parametrize("name", list(TABLE))
def test_presets_take_a_hidden_dim(name: str) -> None:
    c = getattr(SonaLlmConfig, name)(48)
    assert c.micro_lora.in_features == c.micro_lora.out_features == 48


@pytest.mark.parametrize("name", list(TABLE))
def test_presets_construct_working_engines(name: str) -> None:
    dim = 32
    config = getattr(SonaLlmConfig, name)(dim)
    t = [0.0]
    engine = SonaLlm(config, seed=0, clock=lambda: t[0])
    rng = np.random.default_rng(0)
    w = rng.standard_normal((dim, dim)).astype(np.float32) / np.sqrt(dim)
    probe = rng.standard_normal(dim).astype(np.float32)
    n = max(config.background_min_samples, 12)
    for _ in range(n):
        x = rng.standard_normal(dim).astype(np.float32)
        x /= np.linalg.norm(x)
        assert engine.adapt(x, AdaptFeedback.from_quality(0.9).with_target(w @ x)).applied
    assert engine.instant_adapt("a query", "a response", 0.8).applied
    for m in config.micro_lora.target_modules:
        assert engine.forward(probe, m).any()
    t[0] = config.background_interval_ms / 1e3
    result = engine.maybe_background()
    assert result is not None and result.samples_used > 0
    deep = engine.deep_optimize()
    assert deep.samples_used > 0 and deep.epochs == config.deep_epochs
    for m in config.micro_lora.target_modules:
        out = engine.forward(probe, m)
        assert out.shape == (dim,) and np.isfinite(out).all() and out.any()
    s = engine.stats()
    assert s.instant_count == n + 1 and s.background_count == 1 and s.deep_count == 1


@pytest.mark.parametrize("name", list(TABLE))
@pytest.mark.parametrize("dim", [1, 2, 3, 4, 5])
def test_presets_build_at_any_width_with_the_rank_capped(name: str, dim: int) -> None:
    """high_quality(2) used to raise ConfigError (rank 4 > width 2), balanced(1) too."""
    rank = TABLE[name][0]
    c = getattr(SonaLlmConfig, name)(dim)
    assert c.micro_lora.rank == min(rank, dim)
    assert c.micro_lora.scaling == 2.0  # the table's alpha / rank
    assert c.micro_lora.in_features == c.micro_lora.out_features == dim
    engine = SonaLlm(c, seed=0, clock=lambda: 0.0)
    x = np.ones(dim, np.float32)
    assert engine.adapt(x, AdaptFeedback.from_quality(0.9).with_target(x)).applied


@pytest.mark.parametrize("name", list(TABLE))
@pytest.mark.parametrize("dim", [0, -3, True, 2.0, "8"])
def test_presets_refuse_a_bad_width_naming_it(name: str, dim: object) -> None:
    with pytest.raises((ConfigError, TypeError), match="in_features"):
        getattr(SonaLlmConfig, name)(dim)


@pytest.mark.parametrize(
    "field",
    [
        "background_interval_ms",
        "background_min_samples",
        "max_pending_samples",
        "replay_capacity",
        "pattern_clusters",
        "deep_epochs",
    ],
)
def test_counts_beyond_a_machine_size_are_refused_naming_the_field(field: str) -> None:
    """replay_capacity=2**70 used to pass and make SonaLlm() raise OverflowError (a deque's
    maxlen); background_interval_ms=10**400 made maybe_background() raise OverflowError."""
    changes: dict[str, object] = {field: 2**70}
    if field == "background_min_samples":
        changes["max_pending_samples"] = 2**70
    with pytest.raises(ConfigError, match=field):
        SonaLlmConfig(**changes)  # type: ignore[arg-type]
