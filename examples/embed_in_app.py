"""sona inside an asyncio service: it answers requests, collects feedback and learns while
it serves.

The "model" is one frozen linear layer (a stand-in for a projection inside an LLM); sona adds
its low-rank delta to that layer's output. Clients send text requests through a queue, get an
answer, and later some of them send feedback: a correction (the output they wanted) or a
rating of the answer they got. The service hands feedback to the runtime and never waits for
learning: ``SonaRuntime`` runs its three loops as supervised actors beside the request handler.

Run it as is: ``python examples/embed_in_app.py``. It prints held-out quality before and after,
the runtime's statistics and the accounting identity, and exits 0.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import sys
from dataclasses import dataclass

import numpy as np
import structlog

from sona import (
    AdaptFeedback,
    HashingEmbedder,
    MicroLoraConfig,
    SonaLlmConfig,
    SonaRuntime,
    TargetModule,
    TrainingSample,
)

DIM = 128
MODULE = TargetModule.Q_PROJ
REQUESTS = 1500
CLIENTS = 8

TOPICS = {
    "billing": ["refund my order {n}", "why was I charged twice for {n}", "invoice {n} is wrong"],
    "account": ["reset my password", "change the email on account {n}", "unlock user {n}"],
    "shipping": ["where is parcel {n}", "delivery {n} is late", "change the address of {n}"],
}


@dataclass
class Answer:
    request_id: int
    output: np.ndarray  # the layer output the answer came from


class World:
    """What the service cannot see: the output users actually want for a request."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.base = (rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32)
        u = rng.standard_normal((DIM, 2))
        v = rng.standard_normal((DIM, 2))
        self.wanted = self.base + (0.15 * u @ v.T).astype(np.float32)

    def quality(self, x: np.ndarray, output: np.ndarray) -> float:
        """Cosine between the output and the one users want, mapped to [0, 1]."""
        ideal = self.wanted @ x
        cos = float(output @ ideal) / (np.linalg.norm(output) * np.linalg.norm(ideal) + 1e-12)
        return (1.0 + cos) / 2.0


class Service:
    """Answers requests with base + sona's delta; turns feedback into learning."""

    def __init__(self, rt: SonaRuntime, base: np.ndarray) -> None:
        self.rt = rt
        self.base = base
        self.embedder = HashingEmbedder()
        self.ids = itertools.count(1)
        self.recent: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id -> (input, delta)

    def embed(self, text: str) -> np.ndarray:
        return self.embedder.embed(text, DIM)

    async def answer(self, text: str) -> Answer:
        x = self.embed(text)
        delta = self.rt.forward(x, MODULE)  # microseconds: the published adapter + live delta
        rid = next(self.ids)
        self.recent[rid] = (x, delta)
        return Answer(rid, self.base @ x + delta)

    async def rate(self, request_id: int, quality: float) -> None:
        """A rating of the answer given (advantage-weighted toward good answers)."""
        x, delta = self.recent.pop(request_id)
        await self.rt.submit(TrainingSample(x, delta, quality))

    async def correct(self, request_id: int, wanted_output: np.ndarray) -> None:
        """The output the user wanted: learn it as a target (in the adapter's output space)."""
        x, _ = self.recent.pop(request_id)
        target = wanted_output - self.base @ x
        await self.rt.adapt(x, AdaptFeedback.from_quality(1.0).with_target(target))


async def client(
    name: int, service: Service, world: World, queue: asyncio.Queue[str], rng: random.Random
) -> None:
    """Takes requests from the queue; rates some answers, corrects a few, ignores the rest."""
    while True:
        text = await queue.get()
        try:
            answer = await service.answer(text)
            await asyncio.sleep(rng.uniform(0.0, 0.002))  # the user reads the answer
            x = service.embed(text)
            roll = rng.random()
            if roll < 0.3:
                await service.correct(answer.request_id, world.wanted @ x)
            elif roll < 0.7:
                await service.rate(answer.request_id, world.quality(x, answer.output))
            else:
                service.recent.pop(answer.request_id, None)  # never rated
        finally:
            queue.task_done()


def held_out_quality(service: Service, world: World, texts: list[str]) -> float:
    scores = []
    for text in texts:
        x = service.embed(text)
        scores.append(world.quality(x, service.base @ x + service.rt.forward(x, MODULE)))
    return float(np.mean(scores))


def requests(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        template = rng.choice(rng.choice(list(TOPICS.values())))
        out.append(template.format(n=rng.randrange(10_000)))
    return out


async def main() -> int:
    rng = random.Random(0)
    world = World(np.random.default_rng(0))
    config = SonaLlmConfig(
        instant_lr=0.05,
        micro_lora=MicroLoraConfig.for_hidden_dim(DIM, rank=2, target_modules=(MODULE,)),
    )
    held_out = requests(random.Random(1), 200)
    async with SonaRuntime(config, seed=0) as rt:
        service = Service(rt, world.base)
        before = held_out_quality(service, world, held_out)
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=64)
        workers = [
            asyncio.create_task(client(i, service, world, queue, random.Random(i)))
            for i in range(CLIENTS)
        ]
        for text in requests(rng, REQUESTS):
            await queue.put(text)
        await queue.join()
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await rt.drain()
        after = held_out_quality(service, world, held_out)
        stats = rt.stats()
    print(f"served {REQUESTS} requests with {CLIENTS} concurrent clients")
    print(f"held-out quality: {before:.3f} before, {after:.3f} after")
    print(
        f"instant updates {stats.instant_count} (skipped {stats.skipped_count}), "
        f"background runs {stats.background_count}, deep runs {stats.deep_count}, "
        f"mean instant latency {stats.instant_avg_latency_us:.1f} µs"
    )
    holds = stats.submitted_count == (
        stats.instant_count + stats.skipped_count + stats.dropped_samples + stats.dead_lettered
    )
    print(
        f"accounting: submitted {stats.submitted_count} == applied {stats.instant_count} + "
        f"skipped {stats.skipped_count} + dropped {stats.dropped_samples} + "
        f"dead-lettered {stats.dead_lettered}: {'holds' if holds else 'DOES NOT HOLD'}"
    )
    return 0 if holds else 1


def configure_logging() -> None:
    """The host configures logging, never the library: warnings from sona go to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(processor=structlog.dev.ConsoleRenderer(colors=False))
    )
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    structlog.configure(
        processors=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
    )


if __name__ == "__main__":
    configure_logging()
    sys.exit(asyncio.run(main()))
