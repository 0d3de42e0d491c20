"""Configuration of the EWC++ training pipeline; validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from sona.errors import ConfigError
from sona.validation import config_int, config_number

# The pipeline allocates fisher_samples rows of in_features float32 twice (the importance
# window and the shift detector's reference) and a sketch of ewc_rank rows as soon as it meets
# an adapter, so an absurd value is refused here, naming the field, rather than as a numpy
# MemoryError from ``init_for_lora``. Both limits are far above use (the defaults are 100
# and 16): more samples than this only average the same importance, and a sketch wider than
# the layer is cut to its width anyway.
MAX_FISHER_SAMPLES = 100_000
"""Largest ``fisher_samples``."""
MAX_EWC_RANK = 4096
"""Largest ``ewc_rank``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingConfig:
    """Every field changes what :class:`sona.training.TrainingPipeline` does.

    - ``learning_rate``: the step size of every update and of the EWC++ proximal step (the
      pipeline's own; the loops of :class:`sona.SonaLlm` step at ``instant_lr`` instead).
    - ``ewc_lambda``: strength of the penalty on changing ΔW along old tasks' inputs; 0 is plain
      SGD, bit for bit.
    - ``quality_threshold``: target and gradient feedback (and replayed samples of any form)
      rated below it are not learned from; advantage-based forms compare against their baseline
      instead, so a low rating there is still information.
    - ``fisher_samples``: how many of the current task's most recent inputs stand behind the
      importance folded in at the next boundary, and how many the shift detector uses to learn
      what the current task's inputs look like.
    - ``online_ewc_gamma``: the accumulated importance decays by this factor at each boundary.
    - ``max_grad_norm``: updates are clipped to this norm before they are applied.
    - ``ewc_rank``: how many input directions the importance sketch keeps.
    - ``boundary_detection``: start a new task when the input statistics shift for good.
    """

    learning_rate: float = 0.001
    ewc_lambda: float = 0.1
    quality_threshold: float = 0.5
    fisher_samples: int = 100
    online_ewc_gamma: float = 0.95
    max_grad_norm: float = 1.0
    ewc_rank: int = 16
    boundary_detection: bool = True

    def __post_init__(self) -> None:
        # Stored as plain numbers whatever was passed (numpy scalars too), rates as floats.
        for name, bounds in _NUMBER_BOUNDS.items():
            value = config_number(getattr(self, name), name, **bounds)
            object.__setattr__(self, name, float(value))
        for name, hi in (("fisher_samples", MAX_FISHER_SAMPLES), ("ewc_rank", MAX_EWC_RANK)):
            object.__setattr__(self, name, config_int(getattr(self, name), name, lo=1, hi=hi))
        if not isinstance(self.boundary_detection, bool):
            raise TypeError(
                f"boundary_detection must be a bool, got {type(self.boundary_detection).__name__}"
            )

    def replace(self, **changes: Any) -> TrainingConfig:
        """A validated copy with ``changes`` applied."""
        values = self.to_dict()
        unknown = set(changes) - set(values)
        if unknown:
            raise ConfigError(f"unknown TrainingConfig fields: {sorted(unknown)}")
        values.update(changes)
        return TrainingConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown TrainingConfig fields: {sorted(unknown)}")
        return cls(**data)


# The real-valued fields' bounds, as config_number takes them.
_NUMBER_BOUNDS: dict[str, dict[str, Any]] = {
    "learning_rate": {"lo": 0.0, "lo_open": True},
    "ewc_lambda": {"lo": 0.0},
    "quality_threshold": {"lo": 0.0, "hi": 1.0},
    "online_ewc_gamma": {"lo": 0.0, "hi": 1.0},
    "max_grad_norm": {"lo": 0.0, "lo_open": True},
}
