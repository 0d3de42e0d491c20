"""Adapter configuration: which modules an adapter targets and how large it is."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from sona.errors import ConfigError
from sona.kernels.update import F32_MAX
from sona.validation import config_int, config_number


class TargetModule(enum.Enum):
    """Projection layers an adapter can target; values are the PEFT / Hugging Face names."""

    Q_PROJ = "q_proj"
    K_PROJ = "k_proj"
    V_PROJ = "v_proj"
    O_PROJ = "o_proj"
    GATE_PROJ = "gate_proj"
    UP_PROJ = "up_proj"
    DOWN_PROJ = "down_proj"

    # Members are singletons compared by identity; Enum's own __hash__ is a Python-level call
    # (~0.06 µs more per lookup in the per-request dicts keyed by module).
    __hash__ = object.__hash__

    @classmethod
    def parse(cls, value: object) -> TargetModule:
        """Accept a member or its PEFT name; anything else is a ``TypeError``/``ValueError``."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value)
            except ValueError:
                names = ", ".join(m.value for m in cls)
                raise ConfigError(f"unknown module {value!r}; expected one of {names}") from None
        raise TypeError(f"module must be a TargetModule, got {type(value).__name__}")


# Sizes sona allocates float32 arrays by as soon as an adapter exists (A is rank × in, B is
# out × rank, and the EWC++ state and pattern bank hold in-wide rows), so an absurd value must
# be refused here, naming the field, rather than as a numpy MemoryError from the constructor.
# Both are far above any use: the widest projections of today's models are ~5·10⁴ wide, LoRA
# ranks in use run to a few hundred, and a rank beyond a few thousand is no longer low.
MAX_FEATURES = 1 << 20
"""Largest ``in_features`` / ``out_features`` (1,048,576)."""
MAX_RANK = 8192
"""Largest ``rank``, and of ``SonaLlmConfig.consolidated_rank``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MicroLoraConfig:
    """Shape and training knobs of a MicroLoRA; validated at construction.

    ``explore_std`` sets exploration noise relative to the input's scale (σ = explore_std·‖x‖/√out,
    the per-coordinate size of a unit-gain layer's output), so one default works at any width.
    ``advantage_temperature`` and ``advantage_cap`` shape advantage-weighted regression for rated
    outputs: weight = min(exp(advantage / temperature), cap), with advantages normalised by the
    running spread of quality. ``baseline_decay`` is the EMA decay of that running baseline.
    """

    in_features: int = 768
    out_features: int = 768
    rank: int = 2
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: tuple[TargetModule, ...] = (TargetModule.Q_PROJ, TargetModule.V_PROJ)
    gradient_checkpointing: bool = False
    explore_std: float = 0.5
    advantage_temperature: float = 1.0
    advantage_cap: float = 20.0
    baseline_decay: float = 0.99
    _scaling: float = field(init=False, repr=False, compare=False, default=0.0)

    def __post_init__(self) -> None:
        # Each numeric field is stored as the plain number it stands for (numpy scalars too).
        for name, hi in (("in_features", MAX_FEATURES), ("out_features", MAX_FEATURES)):
            object.__setattr__(self, name, config_int(getattr(self, name), name, lo=1, hi=hi))
        object.__setattr__(self, "rank", config_int(self.rank, "rank", lo=1, hi=MAX_RANK))
        if self.rank > min(self.in_features, self.out_features):
            raise ConfigError(
                f"rank must be <= min(in_features, out_features) = "
                f"{min(self.in_features, self.out_features)}, got {self.rank}"
            )
        for name, bounds in _NUMBER_BOUNDS.items():
            object.__setattr__(self, name, config_number(getattr(self, name), name, **bounds))
        modules = self.target_modules
        if isinstance(modules, (str, TargetModule)) or not isinstance(modules, (tuple, list)):
            raise TypeError("target_modules must be a tuple of TargetModule")
        parsed = tuple(TargetModule.parse(m) for m in modules)
        if not parsed:
            raise ConfigError("target_modules must not be empty")
        if len(set(parsed)) != len(parsed):
            raise ConfigError(f"target_modules has duplicates: {[m.value for m in parsed]}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise TypeError(
                "gradient_checkpointing must be a bool, "
                f"got {type(self.gradient_checkpointing).__name__}"
            )
        object.__setattr__(self, "target_modules", parsed)
        object.__setattr__(self, "_scaling", float(self.alpha) / self.rank)

    @classmethod
    def for_hidden_dim(cls, dim: int, **overrides: object) -> MicroLoraConfig:
        """A square adapter (in = out = dim), the shape of attention projections."""
        return cls(in_features=dim, out_features=dim, **overrides)  # type: ignore[arg-type]

    @property
    def scaling(self) -> float:
        """alpha / rank, the factor PEFT applies to B·A."""
        return self._scaling

    def replace(self, **changes: object) -> MicroLoraConfig:
        """A validated copy with ``changes`` applied."""
        values = {n: getattr(self, n) for n in _FIELDS}
        values.update(changes)
        return MicroLoraConfig(**values)

    def to_dict(self) -> dict[str, object]:
        values: dict[str, object] = {n: getattr(self, n) for n in _FIELDS}
        values["target_modules"] = [m.value for m in self.target_modules]
        return values

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> MicroLoraConfig:
        unknown = set(data) - set(_FIELDS)
        if unknown:
            raise ConfigError(f"unknown MicroLoraConfig fields: {sorted(unknown)}")
        values = dict(data)
        if "target_modules" in values:
            mods = values["target_modules"]
            if not isinstance(mods, (list, tuple)):
                raise ConfigError("target_modules must be a list of module names")
            values["target_modules"] = tuple(TargetModule.parse(m) for m in mods)
        return cls(**values)  # type: ignore[arg-type]


# The real-valued fields' bounds, as config_number takes them.
_NUMBER_BOUNDS: dict[str, dict[str, Any]] = {
    # the kernels compute in float32: a scaling beyond its range would turn every delta to inf
    "alpha": {"lo": 0.0, "lo_open": True, "hi": F32_MAX},
    "dropout": {"lo": 0.0, "hi": 1.0, "hi_open": True},
    "explore_std": {"lo": 0.0, "lo_open": True},
    "advantage_temperature": {"lo": 0.0, "lo_open": True},
    "advantage_cap": {"lo": 1.0},
    "baseline_decay": {"lo": 0.0, "hi": 1.0, "hi_open": True},
}

_FIELDS = (
    "in_features",
    "out_features",
    "rank",
    "alpha",
    "dropout",
    "target_modules",
    "gradient_checkpointing",
    "explore_std",
    "advantage_temperature",
    "advantage_cap",
    "baseline_decay",
)
