"""The prefetch hint: compiled to a prefetch instruction, and harmless wherever it points."""

from __future__ import annotations

import platform

import numba
import numpy as np
import pytest
from sona.kernels.prefetch import prefetch


@numba.njit
def _prefetch_then_sum(v: np.ndarray) -> float:
    prefetch(v)
    return float(v.sum())


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 4096])
def test_prefetch_changes_nothing_and_reads_no_further(n: int) -> None:
    """Short vectors, a vector ending mid-line, a strided view past whose last element the
    hint reaches, and a read-only one: each keeps its values and sums as it did."""
    rng = np.random.default_rng(n)
    base = rng.standard_normal(2 * n).astype(np.float32)
    for v in (base[:n], base[::2], base[:n].copy()):
        before = v.copy()
        assert _prefetch_then_sum(v) == pytest.approx(float(before.sum()), rel=1e-5, abs=1e-5)
        np.testing.assert_array_equal(v, before)
    frozen = base[:n].copy()
    frozen.flags.writeable = False
    _prefetch_then_sum(frozen)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction")
def test_prefetch_reaches_the_machine_code_as_an_l2_prefetch() -> None:
    """The hint reaches the machine code (an L2 prefetch), not compiled away."""

    @numba.njit
    def ask(v: np.ndarray) -> None:
        prefetch(v)

    v = np.zeros(64, np.float32)
    ask(v)
    asm = ask.inspect_asm(ask.signatures[0])
    assert "prefetcht1" in asm
