"""InstantLoop's path for rated samples (``_step_rated``).

It skips the feedback object, the offsets mapping and ``forward``'s result buffer, but must
learn exactly what the general path (``_consolidated_outputs`` then ``MicroLoRA.step``) learns:
the same weights bit for bit, the same running baseline, the same outcome and notes, with a
consolidation in transit or not; and where a kernel refuses, the general path decides.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sona.background import BackgroundLoop
from sona.config import ConsolidationStrategy, SonaLlmConfig
from sona.instant import InstantLoop, InstantOutcome
from sona.lora import MicroLoRA
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.sample import TrainingSample

Q, V = TargetModule.Q_PROJ, TargetModule.V_PROJ
DIM = 24


def _pair(
    modules: tuple[TargetModule, ...] = (Q,), *, rank: int = 2, dropout: float = 0.0, **kw: Any
) -> tuple[tuple[InstantLoop, BackgroundLoop], tuple[InstantLoop, BackgroundLoop]]:
    """Two identical loops; the second always takes the general path."""
    micro = MicroLoraConfig.for_hidden_dim(DIM, rank=rank, target_modules=modules).replace(
        dropout=dropout
    )
    cfg = SonaLlmConfig(micro_lora=micro, background_min_samples=1, **kw)
    loops = []
    for _ in range(2):
        bg = BackgroundLoop(cfg, seed=5)
        loops.append((InstantLoop(cfg, seed=5, consolidated=lambda bg=bg: bg.published), bg))
    general = loops[1][0]
    general._step_rated = lambda sample: None  # type: ignore[method-assign]
    return loops[0], loops[1]


def _weights(lora: MicroLoRA) -> list[np.ndarray]:
    return [arr.copy() for _, a, bt in lora.iter_factors() for arr in (a, bt)]


def _same_state(a: InstantLoop, b: InstantLoop) -> None:
    for wa, wb in zip(_weights(a.live), _weights(b.live), strict=True):
        assert np.array_equal(wa, wb)
    assert a.live.baseline.state() == b.live.baseline.state()
    assert a.live.version == b.live.version and a.live.last_note == b.live.last_note
    assert (a.applied, a.skipped, a.rejected) == (b.applied, b.skipped, b.rejected)
    assert a.skip_reasons == b.skip_reasons
    assert [sid for sid, _ in a.pending] == [sid for sid, _ in b.pending]


def _same_outcome(a: InstantOutcome, b: InstantOutcome) -> None:
    assert (a.applied, a.notes, a.reason, a.rejected) == (b.applied, b.notes, b.reason, b.rejected)


def _step_calls(inst: InstantLoop, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    step = inst.live.step

    def counted(*args: Any, **kw: Any) -> bool:
        calls.append(1)
        return step(*args, **kw)

    monkeypatch.setattr(inst.live, "step", counted)
    return calls


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rounds=st.integers(1, 4),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    modules=st.sampled_from([(Q,), (Q, V), (V, Q)]),
)
def test_rated_samples_learn_exactly_what_the_general_path_learns(
    seed: int, rounds: int, scale: float, modules: tuple[TargetModule, ...]
) -> None:
    (fast, fast_bg), (general, general_bg) = _pair(modules)
    rng = np.random.default_rng(seed)
    sid = 0
    for r in range(rounds):
        for _ in range(int(rng.integers(1, 12))):
            x = (scale * rng.standard_normal(DIM)).astype(np.float32)
            y = rng.standard_normal(DIM).astype(np.float32)
            sample = TrainingSample(x, y, float(rng.uniform(0.0, 1.0)))
            _same_outcome(fast.process(sid, sample), general.process(sid, sample))
            sid += 1
            _same_state(fast, general)
        hands = fast.hand_over(), general.hand_over()
        if r % 2:  # a consolidation in flight: its snapshot is part of the offsets
            fast.in_transit, general.in_transit = hands[0].live, hands[1].live
            continue
        fast.in_transit = general.in_transit = None
        fast_bg.consolidate(hands[0])
        general_bg.consolidate(hands[1])
        for wa, wb in zip(_weights(fast_bg.base), _weights(general_bg.base), strict=True):
            assert np.array_equal(wa, wb)


@pytest.mark.parametrize("modules", [(Q,), (Q, V)])
def test_the_rated_path_is_taken_and_skips_step(
    modules: tuple[TargetModule, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    (fast, _), _ = _pair(modules)
    rng = np.random.default_rng(0)
    calls = _step_calls(fast, monkeypatch)
    for i in range(5):
        sample = TrainingSample(rng.standard_normal(DIM), rng.standard_normal(DIM), 0.7)
        assert fast.process(i, sample).applied
    fast.in_transit = fast.hand_over().live
    sample = TrainingSample(rng.standard_normal(DIM), rng.standard_normal(DIM), 0.7)
    assert fast.process(5, sample, Q if len(modules) == 1 else None).applied
    assert not calls and fast.applied == 6


@pytest.mark.parametrize(
    "case",
    ["one of two modules", "ensemble", "explicit feedback", "rank 4", "dropout", "integer rate"],
)
def test_other_cases_take_the_general_path(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if case == "one of two modules":
        (inst, bg), _ = _pair((Q, V))
    elif case == "ensemble":
        (inst, bg), _ = _pair(consolidation_strategy=ConsolidationStrategy.ENSEMBLE)
    elif case == "rank 4":
        (inst, bg), _ = _pair(rank=4)
    elif case == "dropout":
        (inst, bg), _ = _pair(dropout=0.1)
    elif case == "integer rate":  # kept as an int by the config: step's general path
        (inst, bg), _ = _pair(instant_lr=1)
    else:
        (inst, bg), _ = _pair()
    rng = np.random.default_rng(1)
    for i in range(12):
        x, y = rng.standard_normal(DIM), rng.standard_normal(DIM)
        inst.process(i, TrainingSample(x, y, 0.8))
    bg.consolidate(inst.hand_over())
    calls = _step_calls(inst, monkeypatch)
    deltas: list[int] = []  # the rated path's kernels for the offsets: none, not twice
    monkeypatch.setattr(MicroLoRA, "_delta_into", lambda *a: deltas.append(1))
    sample = TrainingSample(rng.standard_normal(DIM), rng.standard_normal(DIM), 0.8)
    if case == "explicit feedback":
        sample = sample.with_feedback(
            sample.to_feedback().from_quality(0.8).with_target(rng.standard_normal(DIM))
        )
    if case == "ensemble":
        assert inst._consolidated is not None and inst._consolidated().ensemble
    assert inst.process(12, sample, V if case == "one of two modules" else None).applied
    assert calls == [1] and not deltas


@pytest.mark.parametrize("modules", [(Q,), (Q, V)])
def test_a_zero_input_is_declined_on_both_paths(modules: tuple[TargetModule, ...]) -> None:
    (fast, _), (general, _) = _pair(modules)
    sample = TrainingSample(np.zeros(DIM), np.ones(DIM), 0.9)
    a, b = fast.process(0, sample), general.process(0, sample)
    _same_outcome(a, b)
    assert not a.applied and a.reason == "no_direction" and "zero" in a.notes[0]
    _same_state(fast, general)


@pytest.mark.parametrize("modules", [(Q,), (Q, V)])
@pytest.mark.parametrize("where", ["live gradient", "consolidated delta"])
def test_an_overflow_falls_back_to_the_general_path_which_rejects(
    where: str, modules: tuple[TargetModule, ...]
) -> None:
    """Finite inputs whose gradient (huge live weights) or consolidated delta (huge
    consolidated weights) overflows float32: the rated path changes nothing and the general
    path rejects the sample as it always did, with the same note."""
    (fast, fast_bg), (general, general_bg) = _pair(modules)
    for inst, bg in ((fast, fast_bg), (general, general_bg)):
        if where == "live gradient":
            a, bt = inst.live.factors(Q)
            inst.live.set_factors(Q, np.full(a.shape, 1e37, np.float32), np.zeros_like(bt))
        else:  # s·‖A‖·‖B‖ ~ 1e32 is allowed, but not times ‖x‖ ~ 1e9
            a, bt = bg.base.factors(Q)
            bg.base.set_factors(
                Q, np.full(a.shape, 1e15, np.float32), np.full(bt.shape, 1e15, np.float32)
            )
    x = np.full(DIM, 1.0 if where == "live gradient" else 2e8, np.float32)
    sample = TrainingSample(x, np.ones(DIM, np.float32), 0.5)
    before = _weights(fast.live)
    a_out, b_out = fast.process(0, sample), general.process(0, sample)
    _same_outcome(a_out, b_out)
    assert a_out.rejected and a_out.reason == "update_rejected"
    assert "overflow" in a_out.notes[0] or "NaN or inf" in a_out.notes[0]
    assert all(np.array_equal(u, v) for u, v in zip(_weights(fast.live), before, strict=True))
    _same_state(fast, general)
