"""The consolidation timing tool runs end to end and restores everything it patched."""

from __future__ import annotations

import pytest
from sona.kernels import lora as k_lora

import sona.merge
from sona.bench import consolidation


def test_the_tool_reports_every_section_and_unpatches(capsys: pytest.CaptureFixture[str]) -> None:
    merge, forward = sona.merge.merge_adapters, k_lora.forward_batch
    args = ["--dim", "32", "--samples", "60", "--runs", "2", "--stages", "--gil"]
    assert consolidation.main(args) == 0
    out = capsys.readouterr().out
    for label in ("steady", "merge live into consolidated", "outside Numba kernels", "stalled"):
        assert label in out
    assert sona.merge.merge_adapters is merge and k_lora.forward_batch is forward


def test_patched_restores_after_an_error() -> None:
    class Owner:
        @staticmethod
        def f() -> int:
            return 1

    original = Owner.f
    with (
        pytest.raises(RuntimeError),
        consolidation._patched([(Owner, "f")], lambda _name, fn: lambda: 2 * fn()),
    ):
        assert Owner.f() == 2
        raise RuntimeError
    assert Owner.f is original
