"""Two conflicting domains, visited A, B, A, B: SonaLlm learns both and EWC++ keeps A.

The domains share input directions whose hidden corrections disagree, so whatever the adapter
learns for B on them is wrong for A: forgetting is real here, and only the penalty (lambda > 0)
protects what A taught.
"""

from __future__ import annotations

import numpy as np
import pytest

from sona.config import SonaLlmConfig
from sona.engine import SonaLlm
from sona.feedback import AdaptFeedback
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.simulator import DomainWorld
from sona.training_config import TrainingConfig

Q = TargetModule.Q_PROJ
DIM = 48
PHASE = 1500
SCHEDULE = (0, 1, 0, 1)


def _run(seed: int, ewc_lambda: float | None) -> tuple[list[float], list[float]]:
    """Final held-out quality per domain, and the frozen base's."""
    world = DomainWorld(dim=DIM, domains=2, shared=2, base_quality=0.65, seed=seed)
    micro = MicroLoraConfig.for_hidden_dim(DIM, target_modules=(Q,))
    cfg = SonaLlmConfig(micro_lora=micro)  # defaults everywhere else
    if ewc_lambda is not None:
        cfg = cfg.replace(training=TrainingConfig(ewc_lambda=ewc_lambda))
    clock = [0.0]
    engine = SonaLlm(cfg, seed=seed, clock=lambda: clock[0])
    for domain in SCHEDULE:
        xs = world.inputs(domain, PHASE)
        for x, y in zip(xs, world.target_delta(domain, xs), strict=True):
            engine.adapt(x, AdaptFeedback.from_quality(1.0).with_target(y))
            clock[0] += 0.001  # 1,000 samples a second: a consolidation every 100 samples
            engine.maybe_background()
    final = [world.quality(d, engine.forward(world.held_out(d), Q)) for d in (0, 1)]
    return final, [world.base_quality(d) for d in (0, 1)]


@pytest.mark.slow
def test_defaults_learn_both_domains_and_keep_more_of_a_than_plain_sgd() -> None:
    kept_ewc, kept_sgd = [], []
    for seed in range(3):
        final, base = _run(seed, None)
        assert final[0] > base[0] and final[1] > base[1], (seed, final, base)
        plain, _ = _run(seed, 0.0)
        kept_ewc.append(final[0])
        kept_sgd.append(plain[0])
    assert np.mean(kept_ewc) >= np.mean(kept_sgd) + 0.02, (kept_ewc, kept_sgd)
