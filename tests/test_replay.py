"""``MicroLoRA.replay``: a whole epoch in one kernel call, against the per-sample loop it
replaces (``step`` per sample, an EWC++ proximal step every k applied steps), and the Deep
loop taking it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sona.config import SonaLlmConfig
from sona.engine import SonaLlm
from sona.errors import InvalidInputError
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA, passed_over_note
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.replay import ReplayBatch
from sona.sample import TrainingSample
from sona.stacking import stack_rows
from sona.training import TrainingPipeline
from sona.training_config import TrainingConfig

MODULES = (TargetModule.Q_PROJ, TargetModule.V_PROJ, TargetModule.K_PROJ)
EVERY = 4


def _adapter(dim: int, rank: int, modules: int, seed: int, **kw: object) -> MicroLoRA:
    cfg = MicroLoraConfig.for_hidden_dim(dim, rank=rank, target_modules=MODULES[:modules], **kw)
    lora = MicroLoRA(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    for m, a, bt in lora.iter_factors():  # B = 0 would make every first step alike
        lora.set_factors(m, a, (0.1 * rng.standard_normal(bt.shape)).astype(np.float32))
    return lora


def _samples(dim: int, n: int, seed: int, kinds: str = "otgp") -> list[TrainingSample]:
    """Every feedback form replay covers: rated output, target, gradient, group pull target;
    with ``x`` in kinds also finite inputs so large that their steps may be refused, with ``z``
    zero inputs and with ``q`` quality-only ratings (both declined by step and adapt)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.standard_normal(dim).astype(np.float32)
        y = rng.standard_normal(dim).astype(np.float32)
        q = float(rng.uniform(0.1, 1.0))
        kind = kinds[i % len(kinds)]
        fb = AdaptFeedback.from_quality(q)
        if kind == "t":
            fb = fb.with_target(y)
        elif kind == "g":
            fb = fb.with_gradient(0.1 * y)
        elif kind == "p":
            fb = AdaptFeedback.from_group([y, -y], [q, 1.0 - q])
        elif kind == "x":  # ‖x‖ near the 1e19 a sample may have
            x = x * np.float32(5e17)
        elif kind == "z":
            x = np.zeros(dim, np.float32)
            fb = fb.with_target(y)
        sample = TrainingSample(x, y, q)
        out.append(sample if kind in "ox" else sample.with_feedback(fb))
    return out


def _loop(
    lora: MicroLoRA,
    samples: list[TrainingSample],
    rows: np.ndarray,
    lr: float,
    max_norm: float | None,
    pipe: TrainingPipeline | None,
    lam: float,
    xs: np.ndarray | None = None,
) -> None:
    """What the Deep loop did before replay existed, sample by sample (inputs from ``xs``
    when given)."""
    since = 0
    for i in rows.tolist():
        s = samples[i]
        x = s.input_embedding if xs is None else xs[i]
        try:
            fb = s.to_feedback()
            if not lora.step(x, fb, lr, max_norm=max_norm, module=s.module):
                continue
        except InvalidInputError:
            continue
        since += 1
        if since == EVERY:
            if pipe is not None and lam > 0.0:
                pipe.prox_step(lora, 2.0 * lr * lam * since)
            since = 0
    if since and pipe is not None and lam > 0.0:
        pipe.prox_step(lora, 2.0 * lr * lam * since)


def _for_modules(samples: list[TrainingSample], lora: MicroLoRA, seed: int) -> list[TrainingSample]:
    """Some samples for one of the adapter's modules, the others (None) for all of them."""
    rng = np.random.default_rng(seed)
    choices = [None, *lora.modules]
    return [s.with_module(choices[int(rng.integers(len(choices)))]) for s in samples]


def _assert_same(a: MicroLoRA, b: MicroLoRA) -> None:
    for m in a.modules:
        for got, want in zip(b.factors(m), a.factors(m), strict=True):
            np.testing.assert_array_equal(got, want)
    assert (b.version, b.last_update_norm, b.last_note) == (
        a.version,
        a.last_update_norm,
        a.last_note,
    )
    assert b.export_weights() == a.export_weights()  # includes the rating baseline


def _protected(lora: MicroLoRA, dim: int, seed: int, lam: float) -> TrainingPipeline:
    """A pipeline whose EWC++ importance protects a first task's inputs."""
    pipe = TrainingPipeline(TrainingConfig(ewc_lambda=lam))
    pipe.init_for_lora(lora)
    rng = np.random.default_rng(seed)
    for x in rng.standard_normal((64, dim)).astype(np.float32):
        pipe.observe(x)
    pipe.start_new_task(lora)
    return pipe


@settings(max_examples=25, deadline=None)
@given(
    dim=st.integers(4, 40),
    rank=st.integers(3, 6),
    modules=st.integers(1, 3),
    n=st.integers(1, 60),
    max_norm=st.sampled_from([None, 0.05, 10.0]),
    kinds=st.sampled_from(["otgp", "o", "tx", "otgpx", "otzq"]),
    lam=st.sampled_from([0.0, 0.5, 50.0]),
    targeted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_replay_takes_exactly_the_per_sample_steps(
    dim: int,
    rank: int,
    modules: int,
    n: int,
    max_norm: float | None,
    kinds: str,
    lam: float,
    targeted: bool,
    seed: int,
) -> None:
    rank = min(rank, dim)
    lora = _adapter(dim, rank, modules, seed)
    samples = _samples(dim, n, seed + 1, kinds)
    if targeted:
        samples = _for_modules(samples, lora, seed + 4)
    rows = np.random.default_rng(seed + 2).integers(0, n, 2 * n)  # repeats allowed
    ref, fast = lora.clone(), lora.clone()
    pipe_ref = _protected(ref, dim, seed + 3, lam) if lam else None
    pipe_fast = _protected(fast, dim, seed + 3, lam) if lam else None
    _loop(ref, samples, rows, 0.05, max_norm, pipe_ref, lam)
    xs = stack_rows([s.input_embedding for s in samples], dim)
    batch = ReplayBatch.of(samples, xs, lora.modules)
    assert batch is not None
    ewc = pipe_fast.replay_ewc(fast) if pipe_fast is not None else None
    assert (ewc is not None) == (lam > 0.0)
    kw = {"ewc": ewc, "ewc_every": EVERY, "ewc_lambda": lam}
    assert fast.replay(batch, rows, 0.05, max_norm=max_norm, **kw)
    _assert_same(ref, fast)


def test_the_baseline_of_rated_outputs_carries_over_between_epochs() -> None:
    lora = _adapter(16, 4, 2, 0)
    samples = _samples(16, 30, 1, "o")
    batch = ReplayBatch.of(samples, stack_rows([s.input_embedding for s in samples], 16))
    assert batch is not None
    ref, fast = lora.clone(), lora.clone()
    for epoch in range(3):
        rows = np.random.default_rng(epoch).permutation(30)
        _loop(ref, samples, rows, 0.1 * 0.95**epoch, 1.0, None, 0.0)
        assert fast.replay(batch, rows, 0.1 * 0.95**epoch, max_norm=1.0)
    assert ref.export_weights() != lora.export_weights()
    _assert_same(ref, fast)


@pytest.mark.parametrize(
    ("rank", "extra", "pending"),
    [(2, {}, False), (1, {}, False), (4, {"dropout": 0.1}, False), (4, {}, True)],
    ids=["fused rank 2", "fused rank 1", "dropout", "pending gradients"],
)
def test_replay_declines_what_only_the_per_sample_path_does(
    rank: int, extra: dict[str, float], pending: bool
) -> None:
    lora = _adapter(16, rank, 1, 0, **extra)
    samples = _samples(16, 8, 1)
    if pending:
        lora.adapt(samples[1].input_embedding, samples[1].to_feedback())
    before = lora.export_weights()
    batch = ReplayBatch.of(samples, stack_rows([s.input_embedding for s in samples], 16))
    assert batch is not None
    assert not lora.replay(batch, np.arange(8), 0.1, max_norm=1.0)
    assert lora.export_weights() == before


def test_quality_only_feedback_is_kept_in_the_batch_but_never_stepped() -> None:
    samples = _samples(8, 4, 0)
    samples.append(samples[0].with_feedback(AdaptFeedback.from_quality(0.7)))
    batch = ReplayBatch.of(samples, stack_rows([s.input_embedding for s in samples], 8))
    assert batch is not None
    assert batch.rating_only.tolist() == [False] * 4 + [True]
    lora = _adapter(8, 3, 1, 0)  # rank 3: the replay kernel's path (rank <= 2 steps in place)
    before = lora.export_weights()
    assert lora.replay(batch, np.array([4, 4]), 0.1, max_norm=1.0)
    assert lora.relearn(batch, np.array([4]), np.ones(1), 0.1, max_norm=1.0, mini_batch=1) == []
    assert lora.export_weights() == before


def test_a_batch_of_another_width_is_refused() -> None:
    lora = _adapter(16, 4, 1, 0)
    samples = _samples(8, 4, 0)
    batch = ReplayBatch.of(samples, stack_rows([s.input_embedding for s in samples], 8))
    assert batch is not None
    with pytest.raises(InvalidInputError, match="widths"):
        lora.replay(batch, np.arange(4), 0.1, max_norm=1.0)


def _steps_during_deep(
    monkeypatch: pytest.MonkeyPatch, samples: list[TrainingSample]
) -> tuple[int, int]:
    """``step`` calls during a Deep run over ``samples``, and the samples it trained on."""
    cfg = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(16, rank=2), deep_epochs=2, instant_lr=0.05
    )
    engine = SonaLlm(cfg, seed=0, clock=lambda: 0.0)
    calls = 0
    step = MicroLoRA.step

    def counted(self: MicroLoRA, *args: object, **kw: object) -> bool:
        nonlocal calls
        calls += 1
        return step(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(MicroLoRA, "step", counted)
    result = engine.deep_optimize(samples)
    assert result.samples_used > 0
    return calls, result.samples_used


def test_deep_replays_each_epoch_in_one_call_with_quality_only_samples_kept_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A quality-only sample cannot be replayed, but must not send the other samples back to
    the per-sample loop either (which holds the GIL for every step of a worker-thread run)."""
    samples = _samples(16, 40, 3, "otg")
    steps, used = _steps_during_deep(monkeypatch, samples)
    assert steps == 0
    quality_only = samples[0].with_feedback(AdaptFeedback.from_quality(0.9))
    assert _steps_during_deep(monkeypatch, [*samples, quality_only]) == (0, used)


def _batch(n: int = 4, dim: int = 16) -> ReplayBatch:
    samples = _samples(dim, n, 0, "ot")
    batch = ReplayBatch.of(samples, stack_rows([s.input_embedding for s in samples], dim))
    assert batch is not None
    return batch


@pytest.mark.parametrize(
    "rows",
    [np.array([0, 4]), np.array([-1]), np.array([[0, 1]]), np.array([0.0, 1.0])],
    ids=["past the end", "negative", "2-d", "floats"],
)
def test_rows_outside_the_batch_are_refused_before_any_step(rows: np.ndarray) -> None:
    lora = _adapter(16, 4, 2, 0)
    before = lora.export_weights()
    with pytest.raises(InvalidInputError, match="rows"):
        lora.replay(_batch(), rows, 0.1, max_norm=1.0)
    assert lora.export_weights() == before


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("xs", np.zeros((3, 16), np.float32), "rows"),
        ("xs", np.zeros((4, 16), np.float64), "float32"),
        ("vecs", np.zeros((4, 32), np.float32)[:, ::2], "C-contiguous"),
        ("modes", np.full(4, 2, np.int64), "mode"),
        ("weights", np.array([1.0, -1.0, 1.0, 1.0]), "weights"),
        ("weights", np.array([1.0, np.inf, 1.0, 1.0]), "weights"),
        ("qualities", np.array([0.5, 1.5, 0.5, 0.5]), r"\[0, 1\]"),
        ("targets", np.array([0, -1, -1, -1]), "targets"),  # names no module
        ("targets", np.array([-2, -1, -1, -1]), "targets"),
        ("targets", np.zeros(4, np.int32), "int64"),
        ("rating_only", np.zeros(4, np.int64), "bool"),
    ],
)
def test_a_batch_the_kernel_would_misread_cannot_be_built(
    field: str, value: np.ndarray, match: str
) -> None:
    good = _batch()
    fields = ("xs", "vecs", "modes", "targets", "weights", "qualities", "gated", "rating_only")
    parts = {f: getattr(good, f) for f in fields}
    parts[field] = value
    with pytest.raises(InvalidInputError, match=match):
        ReplayBatch(**parts)


# ---------------------------------------------------------------------- relearn (mini-batches)
def _relearn_loop(
    lora: MicroLoRA,
    samples: list[TrainingSample],
    rows: np.ndarray,
    weights: np.ndarray,
    lr: float,
    max_norm: float,
    mini: int,
    pipe: TrainingPipeline | None,
    lam: float,
    xs: np.ndarray | None = None,
) -> list[str]:
    """The Background loop's mini-batch strategies, sample by sample (inputs from ``xs``
    when given)."""
    notes: list[str] = []

    def apply(k: int) -> None:
        if not lora.apply_updates(lr * k, max_norm=max_norm):
            notes.append(lora.last_note or "")
        elif pipe is not None and lam > 0.0:
            pipe.prox_step(lora, 2.0 * (lr * k) * lam)

    batch = passed = 0
    for i, w in zip(rows.tolist(), weights.tolist(), strict=True):
        s = samples[i]
        x = s.input_embedding if xs is None else xs[i]
        try:
            if lora.adapt(x, s.to_feedback(), s.module, weight=w):
                batch += 1
        except InvalidInputError as exc:
            if "gradient overflows" not in str(exc):
                raise
            passed += 1
        if batch == mini:
            apply(batch)
            batch = 0
    if batch:
        apply(batch)
    if passed:
        notes.append(passed_over_note(passed))
    return notes


@settings(max_examples=25, deadline=None)
@given(
    dim=st.integers(4, 40),
    rank=st.integers(1, 6),
    modules=st.integers(1, 3),
    n=st.integers(1, 60),
    mini=st.sampled_from([1, 4, 16]),
    lr=st.sampled_from([0.05, 1e30]),  # 1e30: mini-batches rejected as non-finite
    kinds=st.sampled_from(["otgp", "o", "tg", "ozqg"]),
    lam=st.sampled_from([0.0, 0.5]),
    checkpointing=st.booleans(),
    targeted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_relearn_takes_exactly_the_per_sample_steps(
    dim: int,
    rank: int,
    modules: int,
    n: int,
    mini: int,
    lr: float,
    kinds: str,
    lam: float,
    checkpointing: bool,
    targeted: bool,
    seed: int,
) -> None:
    rank = min(rank, dim)
    lora = _adapter(dim, rank, modules, seed, gradient_checkpointing=checkpointing)
    samples = _samples(dim, n, seed + 1, kinds)
    if targeted:
        samples = _for_modules(samples, lora, seed + 4)
    rng = np.random.default_rng(seed + 2)
    rows = rng.integers(0, n, 2 * n)
    weights = rng.choice([0.0, 0.5, 1.0, 2.5], 2 * n)
    ref, fast = lora.clone(), lora.clone()
    pipe_ref = _protected(ref, dim, seed + 3, lam) if lam else None
    pipe_fast = _protected(fast, dim, seed + 3, lam) if lam else None
    want = _relearn_loop(ref, samples, rows, weights, lr, 1.0, mini, pipe_ref, lam)
    xs = stack_rows([s.input_embedding for s in samples], dim)
    batch = ReplayBatch.of(samples, xs, lora.modules)
    assert batch is not None
    ewc = pipe_fast.replay_ewc(fast) if pipe_fast is not None else None
    got = fast.relearn(
        batch, rows, weights, lr, max_norm=1.0, mini_batch=mini, ewc=ewc, ewc_lambda=lam
    )
    assert got == want
    # some sample the adapters can step on is drawn with a weight (zero inputs and ratings
    # alone are declined, a zero weight pulls nothing): then the huge rate is refused
    pulled = any(
        w > 0.0 and samples[i].input_embedding.any() and samples[i].to_feedback().vector is not None
        for i, w in zip(rows.tolist(), weights.tolist(), strict=True)
    )
    if lr > 1.0 and n > 1 and pulled:
        assert got  # the huge rate is refused, and said so
    _assert_same(ref, fast)


def test_relearn_passes_over_a_sample_whose_gradient_overflows_and_says_so() -> None:
    dim = 16
    lora = _adapter(dim, 4, 2, 0)
    samples = _samples(dim, 40, 1, "t")
    # finite, but s·Bᵀg overflows: a gradient near float32's largest value along B's first row
    a, bt = lora.factors(lora.modules[0])
    lora.set_factors(lora.modules[0], a, bt * np.float32(10.0))
    x = np.full(dim, 0.25, np.float32)
    grad = (np.sign(bt[0]) * 3e38).astype(np.float32)
    samples[30] = TrainingSample(x, grad, 0.9).with_feedback(
        AdaptFeedback.from_quality(0.9).with_gradient(grad)
    )
    with pytest.raises(InvalidInputError, match="gradient overflows float32"):
        lora.clone().adapt(x, samples[30].to_feedback())  # one sample alone is refused
    rows = np.arange(40)
    ref, fast, without = lora.clone(), lora.clone(), lora.clone()
    want = _relearn_loop(ref, samples, rows, np.ones(40), 0.05, 1.0, 16, None, 0.0)
    batch = ReplayBatch.of(samples, stack_rows([s.input_embedding for s in samples], dim))
    assert batch is not None
    got = fast.relearn(batch, rows, np.ones(40), 0.05, max_norm=1.0, mini_batch=16)
    assert got == want and got[-1] == passed_over_note(1)
    rest = np.delete(rows, 30)
    assert without.relearn(batch, rest, np.ones(39), 0.05, max_norm=1.0, mini_batch=16) == []
    for m in lora.modules:  # the other 39 samples learned exactly as without the 31st
        for f, r, w in zip(fast.factors(m), ref.factors(m), without.factors(m), strict=True):
            np.testing.assert_array_equal(f, r)
            np.testing.assert_array_equal(f, w)
        assert not np.array_equal(fast.factors(m)[1], lora.factors(m)[1])


def _too_large(xs: np.ndarray, rows: list[int], sq: float) -> None:
    """Rows of ``xs`` with ‖x‖² = ``sq`` (entries of 1e19), beyond ``MAX_INPUT_SQ_NORM``:
    finite, and a TrainingSample refuses them, but a ReplayBatch is built from any rows."""
    for r in rows:
        xs[r] = 0.0
        xs[r, : round(sq / 1e38)] = 1e19


# 2e38: the float32 ‖x‖² the gradient is divided by is finite and the step tiny; 4e38: it
# overflows and the step is exactly zero. Rows 1, 4, 5: target, quality-only, rated output.
@pytest.mark.parametrize("sq", [2e38, 4e38])
@pytest.mark.parametrize("modules", [1, 2, 3])
def test_replay_refuses_inputs_beyond_the_norm_limit_as_step_does(sq: float, modules: int) -> None:
    dim = 16
    lora = _adapter(dim, 4, modules, 0)
    samples = _samples(dim, 10, 1, "otgpq")
    xs = stack_rows([s.input_embedding for s in samples], dim)
    _too_large(xs, [1, 4, 5], sq)
    with pytest.raises(InvalidInputError, match="too large"):
        lora.clone().step(xs[1], samples[1].to_feedback(), 0.05)
    rows = np.array([*range(10), 1, 0, 5, 4])  # the last ones refused or declined
    ref, fast = lora.clone(), lora.clone()
    _loop(ref, samples, rows, 0.05, 1.0, None, 0.0, xs)
    batch = ReplayBatch.of(samples, xs, lora.modules)
    assert batch is not None
    assert fast.replay(batch, rows, 0.05, max_norm=1.0)
    _assert_same(ref, fast)


@pytest.mark.parametrize("sq", [2e38, 4e38])
@pytest.mark.parametrize("row", [1, 4, 5])  # target, quality-only, rated output
def test_relearn_raises_where_adapt_would_on_inputs_beyond_the_norm_limit(
    sq: float, row: int
) -> None:
    dim = 16
    lora = _adapter(dim, 4, 2, 0)
    samples = _samples(dim, 10, 1, "otgpq")
    xs = stack_rows([s.input_embedding for s in samples], dim)
    _too_large(xs, [row], sq)
    rows = np.array([0, 2, 3, 6, 7, 8, 9, row, 1])  # mini-batches of 3 applied first
    ref, fast = lora.clone(), lora.clone()
    with pytest.raises(InvalidInputError, match="too large"):
        _relearn_loop(ref, samples, rows, np.ones(9), 0.05, 1.0, 3, None, 0.0, xs)
    batch = ReplayBatch.of(samples, xs, lora.modules)
    assert batch is not None
    with pytest.raises(InvalidInputError, match="too large"):
        fast.relearn(batch, rows, np.ones(9), 0.05, max_norm=1.0, mini_batch=3)
    assert fast.version == ref.version > lora.version
    for m in lora.modules:
        for got, want in zip(fast.factors(m), ref.factors(m), strict=True):
            np.testing.assert_array_equal(got, want)


def _consolidate(
    strategy: str, monkeypatch: pytest.MonkeyPatch, *, kernel: bool
) -> tuple[list[bytes], list[str], int]:
    """Two consolidations (the second with EWC++ active) under ``strategy``: the published
    adapters' weights, the rejection notes, and how many times ``adapt`` ran."""
    from sona.background import BackgroundLoop
    from sona.config import ConsolidationStrategy
    from sona.instant import InstantLoop

    micro = MicroLoraConfig.for_hidden_dim(24, rank=2, target_modules=MODULES[:2])
    cfg = SonaLlmConfig(
        micro_lora=micro,
        consolidation_strategy=ConsolidationStrategy[strategy],
        pattern_clusters=3,
        instant_lr=0.05,
    )
    if not kernel:
        monkeypatch.setattr(MicroLoRA, "relearn", lambda *a, **k: None)
    calls = 0
    adapt = MicroLoRA.adapt

    def counted(self: MicroLoRA, *args: object, **kw: object) -> bool:
        nonlocal calls
        calls += 1
        return adapt(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(MicroLoRA, "adapt", counted)
    bg = BackgroundLoop(cfg, seed=3)
    inst = InstantLoop(cfg, seed=3, consolidated=lambda: bg.published)
    samples = _samples(24, 200, 4, "otgp")
    notes: list[str] = []
    for k in range(2):
        for i, s in enumerate(samples[100 * k : 100 * (k + 1)]):
            inst.process(100 * k + i, s)
        notes += bg.consolidate(inst.hand_over()).rejected
        if k == 0:
            bg.start_new_task()
    pub = bg.published
    weights = [pub.base.export_weights(), *(a.export_weights() for a in pub.ensemble.values())]
    monkeypatch.undo()
    return weights, notes, calls


@pytest.mark.parametrize("strategy", ["AVERAGE", "QUALITY_WEIGHTED", "BEST_ONLY", "ENSEMBLE"])
def test_mini_batch_strategies_consolidate_exactly_as_sample_by_sample(
    strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, fast_notes, fast_calls = _consolidate(strategy, monkeypatch, kernel=True)
    slow, slow_notes, slow_calls = _consolidate(strategy, monkeypatch, kernel=False)
    assert fast == slow and fast_notes == slow_notes
    assert fast_calls == 0 and slow_calls > 0  # one kernel call per adapter instead


def test_a_batch_naming_modules_in_another_order_is_refused() -> None:
    lora = _adapter(16, 4, 2, 0)
    samples = [s.with_module(MODULES[0]) for s in _samples(16, 4, 1, "t")]
    xs = stack_rows([s.input_embedding for s in samples], 16)
    batch = ReplayBatch.of(samples, xs, (MODULES[1], MODULES[0]))
    assert batch is not None
    before = lora.export_weights()
    with pytest.raises(InvalidInputError, match="order"):
        lora.replay(batch, np.arange(4), 0.1, max_norm=1.0)
    assert lora.export_weights() == before
    assert ReplayBatch.of(samples, xs, (MODULES[1],)) is None  # a module it does not cover


@settings(max_examples=20, deadline=None)
@given(
    mini=st.integers(2, 16),
    scale=st.sampled_from([3.0, 30.0, 3000.0]),
    max_norm=st.sampled_from([0.1, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_a_relearned_mini_batch_moves_no_further_than_its_samples_clipped_steps(
    mini: int, scale: float, max_norm: float, seed: int
) -> None:
    """k samples applied as k steps' worth are clipped like k steps: the mean gradient at
    max_norm, so the factors move by at most lr·k·max_norm. Clipped at max_norm·k instead, k
    identical samples with a large residual moved them k times further and overshot."""
    dim = 16
    lora = _adapter(dim, 4, 2, seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(dim).astype(np.float32)
    y = (scale * rng.standard_normal(dim)).astype(np.float32)
    fb = AdaptFeedback.from_quality(0.9).with_target(y)
    samples = [TrainingSample(x, y, 0.9).with_feedback(fb)] * mini
    batch = ReplayBatch.of(samples, stack_rows([x] * mini, dim), lora.modules)
    assert batch is not None
    before = [f.astype(np.float64) for m in lora.modules for f in lora.factors(m)]
    lr = 0.05
    assert (
        lora.relearn(batch, np.arange(mini), np.ones(mini), lr, max_norm=max_norm, mini_batch=mini)
        == []
    )
    after = [f.astype(np.float64) for m in lora.modules for f in lora.factors(m)]
    moved = np.sqrt(sum(float(np.sum((b - a) ** 2)) for a, b in zip(before, after, strict=True)))
    assert 0.0 < moved <= lr * mini * max_norm * (1 + 1e-4)
