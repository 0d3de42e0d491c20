"""Configuration of the learning engine and runtime, with the seed's tuning presets."""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from sona.actors.mailbox import OverflowPolicy
from sona.errors import ConfigError
from sona.lora_config import MAX_RANK, MicroLoraConfig, TargetModule
from sona.training_config import TrainingConfig
from sona.validation import as_list, check_seed, config_int, config_number


class ConsolidationStrategy(enum.Enum):
    """How the Background loop folds what the Instant loop learned into the consolidated state.

    - EWC_MERGE: add the instant adapter's delta to the consolidated one (exactly, truncated to
      the consolidated rank), then pull it back toward the anchor on old tasks' input
      directions (the EWC++ proximal step).
    - AVERAGE: re-learn the batch on the consolidated adapter with the plain mean of the
      samples' gradients.
    - QUALITY_WEIGHTED: the same with each sample's gradient weighted by its quality.
    - BEST_ONLY: the same with only the top 20 % of samples by quality.
    - ENSEMBLE: one adapter per pattern-bank cluster; each sample trains its cluster's adapter
      and inference routes each input to its nearest cluster's adapter.
    """

    EWC_MERGE = "ewc_merge"
    AVERAGE = "average"
    QUALITY_WEIGHTED = "quality_weighted"
    BEST_ONLY = "best_only"
    ENSEMBLE = "ensemble"


@dataclass(frozen=True, kw_only=True, slots=True)
class SupervisionConfig:
    """Restart budget and backoff for the three loops (see ``sona.actors.Supervisor``).

    Backoff doubles on consecutive crashes and resets once a message is handled successfully.
    """

    max_restarts: int = 50
    within_s: float = 10.0
    backoff_min_s: float = 0.001
    backoff_max_s: float = 0.5
    jitter: float = 0.2
    shutdown_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        _set(self, "max_restarts", config_int(self.max_restarts, "max_restarts", lo=0))
        _set(self, "within_s", config_number(self.within_s, "within_s", lo=0.0, lo_open=True))
        _set(self, "backoff_min_s", config_number(self.backoff_min_s, "backoff_min_s", lo=0.0))
        lo = float(self.backoff_min_s)
        _set(self, "backoff_max_s", config_number(self.backoff_max_s, "backoff_max_s", lo=lo))
        _set(self, "jitter", config_number(self.jitter, "jitter", lo=0.0, hi=1.0))
        timeout = config_number(self.shutdown_timeout_s, "shutdown_timeout_s", lo=0.0)
        _set(self, "shutdown_timeout_s", timeout)


@dataclass(frozen=True, kw_only=True, slots=True)
class Chaos:
    """Fault injection: the named loops raise at random while handling messages.

    Lets users (and the demo) watch supervision work on their own integration. Raise
    ``SupervisionConfig.max_restarts`` to match the crash rate you inject.
    """

    crash_probability: float
    loops: tuple[str, ...] = ("instant", "background", "deep")
    seed: int | None = None

    def __post_init__(self) -> None:
        p = config_number(self.crash_probability, "crash_probability", lo=0.0, hi=1.0)
        _set(self, "crash_probability", p)
        _set(self, "seed", check_seed(self.seed))
        loops = tuple(as_list(self.loops, "Chaos.loops", "loop names such as ('instant', 'deep')"))
        unknown = set(loops) - {"instant", "background", "deep"}
        if unknown:
            raise ConfigError(f"Chaos.loops has unknown loops {sorted(unknown)}")
        object.__setattr__(self, "loops", loops)


@dataclass(frozen=True, kw_only=True, slots=True)
class SonaLlmConfig:
    """Everything the three loops need; every field changes behaviour.

    The loops step at ``instant_lr`` (Deep at a decaying multiple of it) and take the rest of
    ``training`` as it is; ``training.learning_rate``, the step size of a stand-alone
    :class:`sona.training.TrainingPipeline`, has no role here, so a value other than its
    default is refused rather than ignored.

    ``deep_epochs`` is the number of passes over the replay buffer per Deep run, at a learning
    rate decaying as instant_lr · 0.95^epoch. ``consolidated_rank`` is the rank of the
    consolidated adapter the live one is folded into (None: 4 × the micro rank, capped), so
    what a new domain teaches is not truncated away by what older ones left. Text is embedded
    at the adapter's in_features (queries) and out_features (responses).
    """

    instant_lr: float = 0.01
    background_interval_ms: int = 100
    background_min_samples: int = 10
    deep_trigger_threshold: float = 100.0
    consolidation_strategy: ConsolidationStrategy = ConsolidationStrategy.EWC_MERGE
    max_pending_samples: int = 1000
    overflow: OverflowPolicy = OverflowPolicy.BLOCK
    replay_capacity: int = 10_000
    pattern_clusters: int = 16
    checkpoint_interval_s: float = 30.0
    deep_epochs: int = 3
    consolidated_rank: int | None = None
    micro_lora: MicroLoraConfig = field(default_factory=MicroLoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)

    def __post_init__(self) -> None:
        # Numbers are stored as the plain int or float they stand for (numpy scalars too).
        _set(self, "instant_lr", config_number(self.instant_lr, "instant_lr", lo=0.0, lo_open=True))
        for name in ("background_interval_ms", "background_min_samples", "max_pending_samples"):
            _set(self, name, config_int(getattr(self, name), name, lo=1, hi=_MAX_COUNT))
        threshold = config_number(
            self.deep_trigger_threshold, "deep_trigger_threshold", lo=0.0, lo_open=True
        )
        _set(self, "deep_trigger_threshold", threshold)
        if self.background_min_samples > self.max_pending_samples:
            # the buffer could never fill enough for a run: consolidation would stall
            raise ConfigError(
                f"background_min_samples ({self.background_min_samples}) must be <= "
                f"max_pending_samples ({self.max_pending_samples})"
            )
        capacity = config_int(self.replay_capacity, "replay_capacity", lo=1, hi=_MAX_COUNT)
        _set(self, "replay_capacity", capacity)
        clusters = config_int(
            self.pattern_clusters, "pattern_clusters", lo=1, hi=MAX_PATTERN_CLUSTERS
        )
        _set(self, "pattern_clusters", clusters)
        interval = config_number(
            self.checkpoint_interval_s, "checkpoint_interval_s", lo=0.0, lo_open=True
        )
        _set(self, "checkpoint_interval_s", interval)
        _set(self, "deep_epochs", config_int(self.deep_epochs, "deep_epochs", lo=1, hi=_MAX_COUNT))
        if self.consolidated_rank is not None:
            rank = config_int(self.consolidated_rank, "consolidated_rank", lo=1, hi=MAX_RANK)
            limit = min(self.micro_lora.in_features, self.micro_lora.out_features)
            if rank > limit:
                raise ConfigError(f"consolidated_rank must be <= {limit}, got {rank}")
            _set(self, "consolidated_rank", rank)
        _typed(self.consolidation_strategy, ConsolidationStrategy, "consolidation_strategy")
        _typed(self.overflow, OverflowPolicy, "overflow")
        _typed(self.micro_lora, MicroLoraConfig, "micro_lora")
        _typed(self.training, TrainingConfig, "training")
        _typed(self.supervision, SupervisionConfig, "supervision")
        if self.training.learning_rate != TrainingConfig().learning_rate:
            raise ConfigError(
                f"training.learning_rate ({self.training.learning_rate}) is TrainingPipeline's "
                "step size and no loop of SonaLlm or SonaRuntime uses it: set instant_lr instead"
            )

    @property
    def consolidated_lora(self) -> MicroLoraConfig:
        """Config of the consolidated adapter(s): the micro shape at the consolidated rank."""
        m = self.micro_lora
        rank = self.consolidated_rank or min(4 * m.rank, m.in_features, m.out_features, MAX_RANK)
        return m.replace(rank=rank, alpha=float(rank))

    def replace(self, **changes: Any) -> SonaLlmConfig:
        """A validated copy with ``changes`` applied."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(values)
        if unknown:
            raise ConfigError(f"unknown SonaLlmConfig fields: {sorted(unknown)}")
        values.update(changes)
        return SonaLlmConfig(**values)

    # presets from the seed's tuning table ------------------------------------------------
    # Each takes the hidden width; below the table's rank the rank is capped at the width.
    @classmethod
    def low_latency(cls, dim: int = 768) -> SonaLlmConfig:
        """Rank 1 on one module, consolidation every 200 ms, no EWC penalty."""
        return cls(
            background_interval_ms=200,
            micro_lora=_preset_lora(dim, 1, (TargetModule.Q_PROJ,)),
            training=TrainingConfig(ewc_lambda=0.0),
        )

    @classmethod
    def balanced(cls, dim: int = 768) -> SonaLlmConfig:
        """Rank 2 on two modules, consolidation every 100 ms, lambda 0.1 (the defaults)."""
        return cls(
            background_interval_ms=100,
            micro_lora=_preset_lora(dim, 2, (TargetModule.Q_PROJ, TargetModule.V_PROJ)),
            training=TrainingConfig(ewc_lambda=0.1),
        )

    @classmethod
    def high_quality(cls, dim: int = 768) -> SonaLlmConfig:
        """Rank 4 on four attention modules, consolidation every 50 ms, lambda 0.5."""
        mods = (TargetModule.Q_PROJ, TargetModule.K_PROJ, TargetModule.V_PROJ, TargetModule.O_PROJ)
        return cls(
            background_interval_ms=50,
            micro_lora=_preset_lora(dim, 4, mods),
            training=TrainingConfig(ewc_lambda=0.5),
        )

    @classmethod
    def minimal_memory(cls, dim: int = 768) -> SonaLlmConfig:
        """Rank 1 on one module, at most 100 pending samples, a small replay buffer."""
        return cls(
            max_pending_samples=100,
            replay_capacity=1000,
            pattern_clusters=4,
            micro_lora=_preset_lora(dim, 1, (TargetModule.Q_PROJ,)),
        )


def _preset_lora(dim: int, rank: int, modules: tuple[TargetModule, ...]) -> MicroLoraConfig:
    """The preset's adapter at width ``dim``: its rank capped at the width (a rank-4 preset
    must still build at dim 2), alpha = 2·rank so the scaling stays the table's 2."""
    if isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and dim >= 1:
        rank = min(rank, dim)  # anything else: for_hidden_dim names what is wrong with dim
    return MicroLoraConfig.for_hidden_dim(dim, rank=rank, alpha=2.0 * rank, target_modules=modules)


# The pattern bank holds a centroid of in_features float32 per cluster from the start (and
# the ENSEMBLE strategy an adapter per cluster), so an absurd count is refused here, naming
# the field, rather than as a numpy MemoryError from SonaLlm(); the default is 16, and each
# input is compared with every centroid, so even a few hundred is far beyond use.
MAX_PATTERN_CLUSTERS = 4096
"""Largest ``pattern_clusters``."""

# Counts become C sizes (deque maxlen, array shapes) and intervals become floats: larger ints
# would fail there with OverflowError, away from the field that caused it.
_MAX_COUNT = sys.maxsize


def _set(config: object, name: str, value: object) -> None:
    """Store a checked value on a frozen config (what ``__post_init__`` may do)."""
    object.__setattr__(config, name, value)


def _typed(value: object, kind: type, name: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
