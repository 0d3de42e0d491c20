"""sona: online adaptation of language models from user feedback.

Feedback on an answer becomes a tiny low-rank weight update (MicroLoRA) in microseconds; a
Background loop consolidates updates without forgetting earlier lessons (EWC++); a Deep loop
replays kept samples. ``SonaLlm`` drives the loops synchronously; ``SonaRuntime`` runs them as
supervised async actors inside the host's event loop.
"""

from __future__ import annotations

from sona.actors import Backpressure, OverflowPolicy, SupervisorGaveUp
from sona.config import Chaos, ConsolidationStrategy, SonaLlmConfig, SupervisionConfig
from sona.embedding import Embedder, HashingEmbedder
from sona.engine import SonaLlm
from sona.feedback import AdaptFeedback
from sona.lora import ComposedAdapter, MicroLoRA
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.results import AdaptationResult, BackgroundResult, DeepResult, LearningStats
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample
from sona.training import StepResult, TrainingPipeline
from sona.training_config import TrainingConfig

__version__ = "0.1.0"

__all__ = [
    "AdaptFeedback",
    "AdaptationResult",
    "BackgroundResult",
    "Backpressure",
    "Chaos",
    "ComposedAdapter",
    "ConsolidationStrategy",
    "DeepResult",
    "Embedder",
    "HashingEmbedder",
    "LearningStats",
    "MicroLoRA",
    "MicroLoraConfig",
    "OverflowPolicy",
    "SonaLlm",
    "SonaLlmConfig",
    "SonaRuntime",
    "StepResult",
    "SupervisionConfig",
    "SupervisorGaveUp",
    "TargetModule",
    "TrainingConfig",
    "TrainingPipeline",
    "TrainingSample",
]
