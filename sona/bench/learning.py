"""``sona bench learning``: how fast each feedback form learns, measured on held-out inputs.

One task (d = 256, isotropic unit inputs, a frozen random base whose quality is 0.83, a hidden
rank-2 correction); a rank-2 adapter learns it through :class:`TrainingPipeline` from one form
of feedback per run, one update per sample:

- target: the desired correction y* (quality 1);
- gradient: the host's ∂½‖μ − y*‖²/∂μ = μ(x) − y*;
- rated output: one answer μ(x) + noise, rated by the task's quality (advantage-weighted);
- group of 4: four such answers for one input, rated together;
- quality only: the adapter explores on the forward pass and gets only the rating.

The frozen base (nothing learned) and the ideal correction (quality 1 by construction) bracket
the curves. Noise for rated answers has the adapter's own exploration scale.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sona.bench import options
from sona.bench.tasks import LinearTask
from sona.bench.timing import dump_json, print_table
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA, MicroLoraConfig, TargetModule
from sona.training import TrainingConfig, TrainingPipeline

MODULE = TargetModule.Q_PROJ
FORMS = ("target", "gradient", "rated output", "group of 4", "quality only")
# Per form, the best of the rates tried at d = 256 (0.02 to 2.0). Rated output loses quality at
# every one of them, least at the smallest. Quality only learns, slowly, with exploration noise
# of twice the output's per-coordinate size (see --explore-std) and about 30,000 updates.
DEFAULT_LR = {
    "target": 0.05,
    "gradient": 0.05,
    "rated output": 0.02,
    "group of 4": 0.5,
    "quality only": 0.03,
}

Feedback = Callable[[np.ndarray], AdaptFeedback | None]


@dataclass
class Curve:
    form: str
    learning_rate: float
    updates: list[int] = field(default_factory=list)
    quality: list[list[float]] = field(default_factory=list)  # per checkpoint, per seed
    applied: list[int] = field(default_factory=list)  # per seed
    seconds: float = 0.0

    def mean(self) -> np.ndarray:
        return np.array([np.mean(q) for q in self.quality])


def _feedback_for(
    form: str, task: LinearTask, lora: MicroLoRA, rng: np.random.Generator
) -> Feedback:
    """How a host would produce this form of feedback for input x."""
    cfg = lora.config
    n_out = cfg.out_features

    def answers(x: np.ndarray, k: int) -> np.ndarray:
        sigma = cfg.explore_std * float(np.linalg.norm(x)) / math.sqrt(n_out)
        mu = lora.forward(x, MODULE)
        return (mu + sigma * rng.standard_normal((k, n_out))).astype(np.float32)

    def target(x: np.ndarray) -> AdaptFeedback:
        return AdaptFeedback.from_quality(1.0).with_target(task.target_delta(x))

    def gradient(x: np.ndarray) -> AdaptFeedback:
        grad = lora.forward(x, MODULE) - task.target_delta(x)
        return AdaptFeedback.from_quality(1.0).with_gradient(grad)

    def rated(x: np.ndarray) -> AdaptFeedback:
        y = answers(x, 1)[0]
        q = float(task.rate(x, y))
        return AdaptFeedback.from_quality(q).with_output(y)

    def group(x: np.ndarray) -> AdaptFeedback:
        ys = answers(x, 4)
        qs = task.rate(np.broadcast_to(x, ys.shape), ys)
        return AdaptFeedback.from_group(ys, [float(q) for q in qs])

    def quality(x: np.ndarray) -> AdaptFeedback:
        y = lora.forward(x, MODULE, explore=True)
        return AdaptFeedback.from_quality(float(task.rate(x, y)))

    table: dict[str, Feedback] = {
        "target": target,
        "gradient": gradient,
        "rated output": rated,
        "group of 4": group,
        "quality only": quality,
    }
    return table[form]


def learning_curve(
    form: str,
    *,
    updates: int,
    every: int,
    learning_rate: float,
    seeds: Sequence[int],
    dim: int = 256,
    explore_std: float = 0.5,
) -> Curve:
    curve = Curve(form, learning_rate)
    checkpoints = checkpoints_for(updates, every)
    at = {n: i for i, n in enumerate(checkpoints)}
    curve.updates = checkpoints
    curve.quality = [[] for _ in checkpoints]
    t0 = time.perf_counter()
    for seed in seeds:
        task = LinearTask.make(d=dim, rank=2, base_quality=0.83, seed=seed)
        cfg = MicroLoraConfig(
            in_features=dim,
            out_features=dim,
            rank=2,
            target_modules=(MODULE,),
            explore_std=explore_std,
        )
        lora = MicroLoRA(cfg, seed=seed)
        pipe = TrainingPipeline(TrainingConfig(learning_rate=learning_rate))
        make = _feedback_for(form, task, lora, np.random.default_rng(seed + 500))
        xs = task.inputs(updates)
        applied = 0
        curve.quality[0].append(task.adapter_quality(lora, MODULE))
        for i in range(updates):
            fb = make(xs[i])
            assert fb is not None
            applied += pipe.train_step(lora, xs[i], fb).applied
            k = at.get(i + 1)
            if k is not None:
                curve.quality[k].append(task.adapter_quality(lora, MODULE))
        curve.applied.append(applied)
    curve.seconds = time.perf_counter() - t0
    return curve


def checkpoints_for(updates: int, every: int) -> list[int]:
    """Where a curve is measured: before the first update, every ``every`` updates, and after
    the last one whether or not ``every`` divides ``updates``, so that the final quality is
    the quality after all of them."""
    marks = list(range(0, updates + 1, every))
    if marks[-1] != updates:
        marks.append(updates)
    return marks


def summarize(curve: Curve, base: float) -> dict[str, Any]:
    """Quality reached, its peak, and the updates each milestone took (None: not reached)."""
    mean = curve.mean()
    peak_i = int(np.argmax(mean))
    gain = float(mean[peak_i] - base)

    def first_reaching(level: float) -> int | None:
        hit = np.nonzero(mean >= level)[0]
        return int(curve.updates[hit[0]]) if hit.size else None

    final = curve.quality[-1]
    return {
        "form": curve.form,
        "learning_rate": curve.learning_rate,
        "final_quality": float(np.mean(final)),
        "final_sd": float(np.std(final, ddof=1)) if len(final) > 1 else 0.0,
        "peak_quality": float(mean[peak_i]),
        "updates_to_peak": int(curve.updates[peak_i]),
        "updates_to_90pct_of_gain": first_reaching(base + 0.9 * gain) if gain > 0 else None,
        "updates_to_half_of_ideal_gap": first_reaching(base + 0.5 * (1.0 - base)),
        # the curve ends after the last update (checkpoints_for), so this is the total
        "applied_fraction": float(np.mean(curve.applied)) / max(curve.updates[-1], 1),
        "seconds": round(curve.seconds, 2),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.remember_parser(parser)
    count = options.positive_int
    parser.add_argument("--updates", type=count, default=10_000, help="updates per form")
    parser.add_argument(
        "--every",
        type=count,
        default=250,
        help="evaluate every N updates (and after the last one)",
    )
    parser.add_argument(
        "--seeds",
        type=count,
        default=3,
        help="number of seeds, each a task and an adapter of its own (3: seeds 0, 1 and 2)",
    )
    parser.add_argument(
        "--dim",
        type=options.dense_dim,
        default=256,
        help="hidden size of the task and of the rank-2 adapter",
    )
    parser.add_argument(
        "--forms",
        type=_forms,
        default=",".join(FORMS),
        help=f"comma-separated subset of: {', '.join(FORMS)}",
    )
    parser.add_argument(
        "--quality-updates", type=count, default=30_000, help="updates for the quality-only form"
    )
    parser.add_argument(
        "--explore-std",
        type=options.positive_float,
        default=2.0,
        help="exploration noise for quality only",
    )
    for form, lr in DEFAULT_LR.items():
        flag = "--lr-" + form.split()[0]
        parser.add_argument(
            flag, type=options.positive_float, default=lr, help=f"learning rate for {form}"
        )


def _forms(text: str) -> list[str]:
    forms = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in forms if f not in FORMS]
    if unknown or not forms:
        raise argparse.ArgumentTypeError(
            f"unknown forms {unknown}; choose from {', '.join(FORMS)}"
            if unknown
            else f"names no form; choose from {', '.join(FORMS)}"
        )
    return forms


def run(args: argparse.Namespace) -> int:
    forms: list[str] = args.forms
    seeds = list(range(args.seeds))
    base = float(
        np.mean(
            [
                LinearTask.make(d=args.dim, rank=2, seed=s).quality_of(
                    np.zeros((512, args.dim), np.float32)
                )
                for s in seeds
            ]
        )
    )
    ideal = float(
        np.mean(
            [
                (lambda t: t.quality_of(t.target_delta(t.held_out)))(
                    LinearTask.make(d=args.dim, rank=2, seed=s)
                )
                for s in seeds
            ]
        )
    )
    curves = [
        learning_curve(
            form,
            updates=args.quality_updates if form == "quality only" else args.updates,
            every=args.every,
            learning_rate=getattr(args, "lr_" + form.split()[0]),
            seeds=seeds,
            dim=args.dim,
            explore_std=args.explore_std if form == "quality only" else 0.5,
        )
        for form in forms
    ]
    summaries = [summarize(c, base) for c in curves]
    if args.json:
        dump_json(
            {
                "dim": args.dim,
                "seeds": seeds,
                "frozen_base_quality": base,
                "ideal_quality": ideal,
                "forms": summaries,
                "curves": [
                    {"form": c.form, "updates": c.updates, "quality_mean": c.mean().tolist()}
                    for c in curves
                ],
            }
        )
        return 0
    rows: list[list[Any]] = [["frozen base", "-", base, base, "-", "-", "-", "-"]]
    for s in summaries:
        rows.append(
            [
                s["form"],
                s["learning_rate"],
                f"{s['final_quality']:.3f} ± {s['final_sd']:.3f}",
                s["peak_quality"],
                s["updates_to_peak"],
                _opt(s["updates_to_90pct_of_gain"]),
                _opt(s["updates_to_half_of_ideal_gap"]),
                s["applied_fraction"],
            ]
        )
    rows.append(["ideal correction", "-", ideal, ideal, "-", "-", "-", "-"])
    print_table(
        f"Learning: held-out quality, d={args.dim}, rank 2, {args.updates} updates "
        f"({args.quality_updates} for quality only), seeds {seeds} (mean ± sd)",
        [
            "feedback",
            "lr",
            "final quality",
            "peak",
            "updates to peak",
            "updates to 90% of gain",
            "updates to half the gap",
            "applied",
        ],
        rows,
    )
    marks = curve_marks(curves)
    print_table(
        "Learning curves: mean held-out quality after N updates (- : not run that long)",
        ["feedback", *(str(m) for m in marks)],
        [[c.form, *_at_marks(c, marks)] for c in curves],
    )
    return 0


def curve_marks(curves: Sequence[Curve]) -> list[int]:
    """The columns of the curves table: round numbers of updates at which some curve was
    measured, and each curve's last update. Curves may differ in length (quality only runs
    longer) and so in where they were measured."""
    wanted = [0, 250, 500, 1000, 2000, 3000, 5000, 10_000, 20_000, 50_000]
    have = {n for c in curves for n in c.updates}
    marks = {m for m in wanted if m in have} | {c.updates[-1] for c in curves}
    return sorted(marks)


def _at_marks(curve: Curve, marks: Sequence[int]) -> list[float]:
    """The curve's mean quality at each mark, NaN (shown as -) where it was not measured."""
    mean = curve.mean()
    at = {n: float(mean[i]) for i, n in enumerate(curve.updates)}
    return [at.get(m, float("nan")) for m in marks]


def _opt(v: int | None) -> str:
    return "not reached" if v is None else str(v)
