"""MicroLoRA.step (the fused single-sample update) equals adapt + apply_updates."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sona.errors import InvalidInputError
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA, MicroLoraConfig, TargetModule

Q, V = TargetModule.Q_PROJ, TargetModule.V_PROJ


def _pair(n_in: int, n_out: int, rank: int, modules: tuple[TargetModule, ...], seed: int):  # type: ignore[no-untyped-def]
    cfg = MicroLoraConfig(in_features=n_in, out_features=n_out, rank=rank, target_modules=modules)
    a = MicroLoRA(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    for m, fa, fbt in a.iter_factors():
        a.set_factors(m, fa, rng.standard_normal(fbt.shape).astype(np.float32) * 0.1)
    return a, a.clone()


@settings(max_examples=40, deadline=None)
@given(
    n_in=st.integers(2, 40),
    n_out=st.integers(2, 40),
    rank=st.integers(1, 4),
    two=st.booleans(),
    kind=st.sampled_from(["target", "gradient", "output"]),
    lr=st.sampled_from([1e-3, 0.1, 5.0]),
    clip=st.sampled_from([None, 0.01, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_step_matches_adapt_then_apply(
    n_in: int, n_out: int, rank: int, two: bool, kind: str, lr: float, clip: float | None, seed: int
) -> None:
    rank = min(rank, n_in, n_out)
    modules = (Q, V) if two else (Q,)
    fused, plain = _pair(n_in, n_out, rank, modules, seed)
    rng = np.random.default_rng(seed + 1)
    # Several steps only where the dynamics are stable: with a huge unclipped step, float32
    # rounding differences between the two paths grow from step to step.
    steps = 3 if lr <= 0.1 and clip is not None else 1
    for _ in range(steps):
        x = rng.standard_normal(n_in).astype(np.float32) * 3.0
        v = rng.standard_normal(n_out).astype(np.float32)
        base = AdaptFeedback.from_quality(float(rng.uniform(0.2, 1.0)))
        fb = {
            "target": base.with_target,
            "gradient": base.with_gradient,
            "output": base.with_output,
        }[kind](v)
        assert fused.step(x, fb, lr, max_norm=clip) == (
            plain.adapt(x, fb) and plain.apply_updates(lr, max_norm=clip)
        )
        assert fused.last_note == plain.last_note
        for m in modules:
            np.testing.assert_allclose(
                fused.delta_weight(m), plain.delta_weight(m), rtol=2e-4, atol=2e-6
            )
        assert fused.last_update_norm == pytest.approx(plain.last_update_norm, rel=1e-4)


def test_step_rejects_an_overflowing_update_and_keeps_the_weights() -> None:
    fused, _ = _pair(8, 8, 2, (Q,), 3)
    before = [arr.tobytes() for _, a, bt in fused.iter_factors() for arr in (a, bt)]
    fb = AdaptFeedback.from_quality(1.0).with_gradient(np.full(8, 1e30, np.float32))
    assert fused.step(np.ones(8, np.float32), fb, 1e30, max_norm=None) is False
    assert fused.last_note is not None and fused.last_note.startswith("rejected")
    after = [arr.tobytes() for _, a, bt in fused.iter_factors() for arr in (a, bt)]
    assert before == after
    assert fused.pending_updates == 0


@pytest.mark.parametrize(("rank", "modules"), [(1, (Q,)), (2, (Q,)), (3, (Q,)), (2, (Q, V))])
def test_a_step_whose_factors_overflow_float32_keeps_the_weights_finite(
    rank: int, modules: tuple[TargetModule, ...]
) -> None:
    """‖x‖² overflows float32, so the normalised gradient would be zero, while lr·h does too:
    the input is refused (it once counted as a step that changed nothing) and must not turn
    into inf·0 = NaN in B."""
    fused, plain = _pair(16, 16, rank, modules, 9)
    before = [arr.tobytes() for _, a, bt in fused.iter_factors() for arr in (a, bt)]
    versions = fused.version, plain.version
    x = np.full(16, 1e20, np.float32)
    fb = AdaptFeedback.from_quality(1.0).with_target(np.ones(16, np.float32))
    with pytest.raises(InvalidInputError, match="too large"):
        fused.step(x, fb, 1e30, max_norm=None)
    with pytest.raises(InvalidInputError, match="too large"):
        plain.adapt(x, fb)
    assert (fused.version, plain.version) == versions and plain.pending_updates == 0
    for lora in (fused, plain):
        assert [arr.tobytes() for _, a, bt in lora.iter_factors() for arr in (a, bt)] == before
