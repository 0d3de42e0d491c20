"""Files written by an earlier sona still load: an adapter, a checkpoint file and a checkpoint
directory as a crash left it (numbered checkpoints, a sample log with rows after the newest).

They were made at commit 9438faf by ``tests/data/format_9438faf/make.py``; a change that stops
reading them breaks every host's saved state, and must be a deliberate, versioned one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_helpers import identity_holds

from sona.cli import main as cli_main
from sona.lora import MicroLoRA
from sona.lora_config import TargetModule
from sona.runtime import SonaRuntime

DATA = Path(__file__).parent / "data" / "format_9438faf"
Q = TargetModule.Q_PROJ
V = TargetModule.V_PROJ


def test_an_adapter_file_loads() -> None:
    lora = MicroLoRA.load(DATA / "adapter.sona")
    assert lora.modules == (Q, V) and lora.seed == 3
    assert np.abs(lora.delta_weight(Q)).max() > 0.0


async def _restored(source: Path) -> tuple[int, Any, Any]:
    rt = SonaRuntime.restore(source)
    assert rt.restored is not None
    replayed = len(rt.restored.replayed)
    async with rt:
        await rt.drain()
        before = rt.stats()
        await rt.consolidate()  # the restored state consolidates like any other
        return replayed, before, rt.stats()


@pytest.mark.anyio
async def test_a_checkpoint_file_restores() -> None:
    replayed, st, after = await _restored(DATA / "checkpoint.sona")
    assert replayed == 0
    assert st.submitted_count == st.instant_count == 72 and identity_holds(st)
    assert identity_holds(after)


@pytest.mark.anyio
async def test_a_directory_a_crash_left_restores_and_replays_its_log(tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(DATA / "state", state)  # a restore writes to the directory it continues
    replayed, st, after = await _restored(state)
    assert replayed == 12  # logged after the newest numbered checkpoint
    assert st.submitted_count == st.instant_count == 72 and identity_holds(st)
    assert identity_holds(after)


def test_sona_inspect_reads_them_without_writing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(DATA / "state", state)
    before = sorted(p.name for p in state.iterdir())
    for path in (DATA / "adapter.sona", DATA / "checkpoint.sona", state):
        assert cli_main(["inspect", str(path)]) == 0
    assert sorted(p.name for p in state.iterdir()) == before
