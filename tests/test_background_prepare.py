"""Background.prepare's batch helpers: the held-back split and the gathered input rows."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sona.background import _RowBuffer, _split_eval
from sona.errors import InvalidInputError
from sona.feedback import AdaptFeedback
from sona.objective import measurable
from sona.sample import TrainingSample


def _sample(i: int, kind: int) -> TrainingSample:
    s = TrainingSample(np.full(4, float(i)), np.ones(3), 0.7)
    if kind == 1:
        return s.with_feedback(AdaptFeedback.from_quality(0.7).with_gradient(np.ones(3)))
    if kind == 2:
        return s.with_feedback(AdaptFeedback.from_quality(0.7))
    return s


def _split_reference(
    samples: list[tuple[int, TrainingSample]], want: int
) -> tuple[list[tuple[int, TrainingSample]], list[tuple[int, TrainingSample]]]:
    held_idx = [i for i in range(len(samples) - 1, 0, -1) if measurable(samples[i][1])][:want]
    train = [p for i, p in enumerate(samples) if i not in set(held_idx)]
    return train, [samples[i] for i in sorted(held_idx)]


@settings(max_examples=60, deadline=None)
@given(kinds=st.lists(st.sampled_from([0, 0, 0, 1, 2]), max_size=150))
def test_split_holds_back_the_newest_measurable_samples(kinds: list[int]) -> None:
    samples = [(i, _sample(i, k)) for i, k in enumerate(kinds)]
    train, held = _split_eval(samples)
    if len(samples) < 2:
        assert (train, held) == (samples, [])
        return
    want = min(64, max(1, -(-len(samples) // 10)))
    assert (train, held) == _split_reference(samples, want)


def test_row_buffer_gathers_like_stack_and_grows() -> None:
    rng = np.random.default_rng(0)
    buf = _RowBuffer(5, 3)
    for n in (0, 2, 3, 11, 4):
        samples = [TrainingSample(rng.standard_normal(5), np.ones(2), 0.5) for _ in range(n)]
        rows, projected, labelled = buf.scan(samples, n, None, None)
        assert projected is None and labelled is None
        assert rows.shape == (n, 5) and rows.dtype == np.float32 and rows.flags.c_contiguous
        want = np.stack([s.input_embedding for s in samples]) if n else np.empty((0, 5))
        np.testing.assert_array_equal(rows, want)


def test_row_buffer_refuses_an_input_of_another_width() -> None:
    buf = _RowBuffer(5, 4)
    samples = [TrainingSample(np.ones(5), np.ones(2), 0.5), TrainingSample(np.ones(6), [1, 1], 0.5)]
    with pytest.raises(InvalidInputError, match=r"shape \(5,\)"):
        buf.scan(samples, 2, None, None)


def test_a_consolidation_compiles_no_kernel_after_the_loop_is_built() -> None:
    """Run in a fresh process: kernels compiled by other tests cannot hide a gap."""
    code = """
import importlib, pkgutil
import numpy as np
import sona.kernels as pkg
from sona.background import BackgroundLoop
from sona.config import ConsolidationStrategy, SonaLlmConfig
from sona.instant import InstantLoop
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.sample import TrainingSample

def signatures():
    out = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"sona.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if hasattr(obj, "signatures"):
                out[f"{info.name}.{name}"] = len(obj.signatures)
    return out

micro = MicroLoraConfig.for_hidden_dim(64, rank=2, target_modules=(TargetModule.Q_PROJ,))
cfg = SonaLlmConfig(micro_lora=micro)
bg = BackgroundLoop(cfg, seed=0)
inst = InstantLoop(cfg, seed=0, consolidated=lambda: bg.published)
before = signatures()
rng = np.random.default_rng(0)
for k in range(3):
    for i in range(300):
        x, y = rng.standard_normal(64), rng.standard_normal(64)
        inst.process(300 * k + i, TrainingSample(x, y, 0.8))
    bg.consolidate(inst.hand_over())
    if k == 0:
        bg.start_new_task()  # folds the importance: later runs take EWC++ steps
after = signatures()
print(sorted(name for name in after if after[name] != before.get(name, 0)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
