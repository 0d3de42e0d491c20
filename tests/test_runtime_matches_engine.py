"""SonaRuntime is the synchronous engine run as supervised actors: given the same calls, with
the loops run only when asked, both report the same results, serve bit-identical outputs and
keep the same counters, also when a consolidation fails half-way and is retried. What the
actors add (mailboxes, a worker thread for consolidation and Deep runs, the inline path for an
idle Instant loop) must not change what is learned."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted import OPS_FAILING, Script, apply, apply_engine, config, learning, same_outputs

from sona.config import ConsolidationStrategy
from sona.engine import SonaLlm
from sona.runtime import SonaRuntime


@pytest.mark.parametrize("strategy", list(ConsolidationStrategy))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS_FAILING, seed=st.integers(0, 2**16))
def test_the_runtime_learns_what_the_engine_learns(
    ops: list[tuple[str, int]], strategy: ConsolidationStrategy, seed: int
) -> None:
    async def main() -> None:
        engine = SonaLlm(config(strategy), seed=seed)
        script = Script(seed).domain(seed)
        async with SonaRuntime(config(strategy), seed=seed) as rt:
            for op in ops:
                state = script.rng.bit_generator.state
                reported = await apply(rt, script, op)
                script.rng.bit_generator.state = state
                assert apply_engine(engine, script, op) == reported, op
                assert same_outputs(engine, rt), op
                # the runtime's failed consolidation restarted its Background loop
                assert learning(engine.stats()) == {**learning(rt.stats()), "restarts": 0}, op

    anyio.run(main)
