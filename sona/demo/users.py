"""Simulated users: noisy, delayed and sometimes missing feedback in the forms a host gets.

For every request the application serves an answer (the base output plus the adapter's delta)
and, as a sampling LLM app would, shows a few candidate answers around it. Then each user does
one of three things:

- nothing (``missing``): most answers are never rated;
- corrects the answer (``corrections``): the desired output, slightly imperfect, sent as a
  target (``AdaptFeedback.with_target``) — rare and valuable;
- rates the candidates (the rest): each rating is the true quality plus noise, sent as group
  feedback (``AdaptFeedback.from_group``).

Feedback arrives after a random delay (geometric, in requests), so it often describes an answer
the adapter has already moved away from, and some of it lands after traffic moved on to the
next domain.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass

import numpy as np

from sona.demo.world import DemoWorld, Traffic
from sona.feedback import AdaptFeedback


@dataclass(frozen=True, slots=True)
class UserModel:
    """How users behave; every probability is per request."""

    candidates: int = 4  # answers shown per request (the group size)
    sampling_noise: float = 0.5  # candidate spread, relative to the base output's RMS
    rating_noise: float = 0.01  # standard deviation added to each true quality
    correction_noise: float = 0.05  # relative error of a user's correction
    missing: float = 0.2  # no feedback at all
    corrections: float = 0.1  # a correction instead of ratings
    mean_delay: float = 20.0  # requests until the feedback arrives (geometric)

    def describe(self) -> dict[str, float]:
        return {
            "candidates_per_group": self.candidates,
            "sampling_noise_x_output_rms": self.sampling_noise,
            "rating_noise_sd": self.rating_noise,
            "correction_noise": self.correction_noise,
            "missing_probability": self.missing,
            "correction_probability": self.corrections,
            "mean_delay_requests": self.mean_delay,
        }


@dataclass(frozen=True, slots=True)
class Feedback:
    """One piece of feedback on the way to the runtime."""

    due: int  # the request step at which it arrives
    served: int  # the request step it is about
    x: np.ndarray
    feedback: AdaptFeedback
    form: str  # "group" or "correction"


@dataclass(slots=True)
class FeedbackCounts:
    requests: int = 0
    missing: int = 0
    groups: int = 0
    corrections: int = 0
    delivered: int = 0
    delay_sum: int = 0

    @property
    def awaiting(self) -> int:
        return self.groups + self.corrections - self.delivered

    def describe(self) -> dict[str, float]:
        given = self.groups + self.corrections
        return {
            "requests": self.requests,
            "missing": self.missing,
            "rated_groups": self.groups,
            "corrections": self.corrections,
            "delivered": self.delivered,
            "mean_delay_requests": round(self.delay_sum / given, 2) if given else 0.0,
        }


class SimulatedUsers:
    """Turns served answers into feedback that arrives later (or never)."""

    def __init__(self, model: UserModel, *, seed: int) -> None:
        if model.candidates < 2:
            raise ValueError("a rated group needs at least 2 candidates")
        self.model = model
        self.rng = np.random.default_rng(seed)
        self.counts = FeedbackCounts()
        self._queue: list[tuple[int, int, Feedback]] = []
        self._order = itertools.count()

    def serve(self, step: int, traffic: Traffic, n: int, deltas: np.ndarray) -> None:
        """Requests ``step`` … ``step + n - 1`` were answered with base + ``deltas``."""
        m = self.model
        rng = self.rng
        rows = slice(step, step + n)
        x = traffic.x[rows]
        base_out = traffic.base_out[rows]
        self.counts.requests += n
        fate = rng.random(n)
        corrects = fate < m.corrections
        rates = fate >= m.corrections + m.missing
        self.counts.missing += int(n - corrects.sum() - rates.sum())
        p = 1.0 / (1.0 + m.mean_delay)
        delays = rng.geometric(p, n) - 1
        if corrects.any():
            idx = np.flatnonzero(corrects)
            want = traffic.correction(step + idx)
            size = np.linalg.norm(want, axis=1, keepdims=True) / math.sqrt(want.shape[1])
            noisy = want + m.correction_noise * size * rng.standard_normal(want.shape)
            for j, i in enumerate(idx):
                fb = AdaptFeedback.from_quality(1.0).with_target(noisy[j].astype(np.float32))
                self._push(step, int(i), int(delays[i]), x[i], fb, "correction")
        if rates.any():
            idx = np.flatnonzero(rates)
            scale = np.sqrt(np.mean(base_out[idx] ** 2, axis=1))
            noise = rng.standard_normal((idx.size, m.candidates, base_out.shape[1]))
            cands = deltas[idx][:, None, :] + m.sampling_noise * scale[:, None, None] * noise
            cands = cands.astype(np.float32)
            true_q = DemoWorld.rate(base_out[idx], traffic.ideal_out[step + idx], cands)
            rated = np.clip(true_q + m.rating_noise * rng.standard_normal(true_q.shape), 0.0, 1.0)
            for j, i in enumerate(idx):
                fb = AdaptFeedback.from_group(cands[j], rated[j])
                self._push(step, int(i), int(delays[i]), x[i], fb, "group")

    def _push(
        self,
        step: int,
        offset: int,
        delay: int,
        x: np.ndarray,
        fb: AdaptFeedback,
        form: str,
    ) -> None:
        served = step + offset
        item = Feedback(served + delay, served, x, fb, form)
        heapq.heappush(self._queue, (item.due, next(self._order), item))
        if form == "group":
            self.counts.groups += 1
        else:
            self.counts.corrections += 1
        self.counts.delay_sum += delay

    def due(self, step: int) -> list[Feedback]:
        """Feedback that has arrived by request ``step`` (inclusive), oldest first."""
        out: list[Feedback] = []
        queue = self._queue
        while queue and queue[0][0] <= step:
            out.append(heapq.heappop(queue)[2])
        self._delivered(out)
        return out

    def flush(self) -> list[Feedback]:
        """Everything still on its way (the run is over: late feedback still counts)."""
        out = [item for _, _, item in sorted(self._queue)]
        self._queue.clear()
        self._delivered(out)
        return out

    def _delivered(self, items: list[Feedback]) -> None:
        self.counts.delivered += len(items)
