"""Writes the files next to it with the sona it runs under; they were made at commit 9438faf.

Run from a checkout of that commit: ``python make.py OUT``. It saves an adapter, runs a durable
runtime (two target modules, some samples for one of them), writes a numbered checkpoint, logs
twelve more samples, writes ``checkpoint.sona`` and dies by SIGKILL, leaving the directory as a
crash would. The sample log's write-ahead file was then folded into ``samples.sqlite3``
(``PRAGMA wal_checkpoint(TRUNCATE)``; ``journal_mode=DELETE``) so the log is one file.
"""

from __future__ import annotations

import os
import signal
import sys

import anyio
import numpy as np

from sona import AdaptFeedback, MicroLoraConfig, SonaLlmConfig, SonaRuntime, TargetModule
from sona.lora import MicroLoRA

Q = TargetModule.Q_PROJ
V = TargetModule.V_PROJ


def main(out: str) -> None:
    cfg = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(16, target_modules=(Q, V)),
        background_min_samples=4,
        background_interval_ms=20,
        checkpoint_interval_s=3600.0,
        replay_capacity=64,
    )
    lora = MicroLoRA(cfg.micro_lora, seed=3)
    x = np.linspace(-1, 1, 16).astype(np.float32)
    lora.adapt(x, AdaptFeedback.from_quality(1.0).with_target(x))
    lora.apply_updates(0.1)
    lora.save(os.path.join(out, "adapter.sona"))

    async def run() -> None:
        rng = np.random.default_rng(1)
        async with SonaRuntime(cfg, seed=1, checkpoint_dir=os.path.join(out, "state")) as rt:
            for i in range(60):
                x = rng.standard_normal(16).astype(np.float32)
                fb = AdaptFeedback.from_quality(0.9).with_target(0.1 * x)
                await rt.adapt(x, fb, module=Q if i % 3 == 0 else None)
            await rt.consolidate()
            await rt.deep_optimize()
            await rt.checkpoint()
            for i in range(12):  # logged after the numbered checkpoint: a restore replays them
                x = rng.standard_normal(16).astype(np.float32)
                fb = AdaptFeedback.from_quality(0.9).with_target(0.1 * x)
                await rt.adapt(x, fb, module=Q if i % 2 else None)
            await rt.drain()
            await rt._durable.writer.flush()
            await rt.checkpoint(os.path.join(out, "checkpoint.sona"))
            os.kill(os.getpid(), signal.SIGKILL)

    anyio.run(run)


if __name__ == "__main__":
    main(sys.argv[1])
