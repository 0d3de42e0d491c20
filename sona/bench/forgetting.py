"""``sona bench forgetting``: does EWC++ keep earlier tasks while learning new ones?

The sequence of DESIGN.md: d = 96, four tasks, each with inputs from its own 6-dim subspace and
its own rank-1 correction, learned one after another through :class:`TrainingPipeline` with
target feedback. After each task i, quality on every task j gives R[i][j]; ACC and BWT are as in
Lopez-Paz & Ranzato (GEM, 2017): ACC = mean_j R[T−1][j], BWT = mean_{j<T−1} R[T−1][j] − R[j][j].
Rows: plain SGD (λ = 0), EWC++ at several λ (boundaries detected by default), joint training on
all tasks' samples shuffled together (the upper bound at that rank; ACC only), and, when torch
is installed, an independent online-EWC peer computed as Avalanche's EWCPlugin does
(:mod:`sona.bench.torch_ewc`). Every method sees the same samples in the same order per seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sona.bench import options, torch_ewc
from sona.bench.tasks import SubspaceSequence
from sona.bench.timing import dump_json, print_table
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA, MicroLoraConfig, TargetModule
from sona.training import TrainingConfig, TrainingPipeline

MODULE = TargetModule.Q_PROJ


@dataclass
class Outcome:
    """One method at one adapter rank over all seeds."""

    rank: int
    method: str
    ewc_lambda: float | None
    matrices: list[np.ndarray] = field(default_factory=list)
    boundaries: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sequential(self) -> bool:
        return not self.method.startswith("joint")

    def acc(self) -> np.ndarray:
        return np.array([acc_of(r) for r in self.matrices])

    def bwt(self) -> np.ndarray:
        return np.array([bwt_of(r) for r in self.matrices])

    def to_json(self) -> dict[str, Any]:
        acc, bwt = self.acc(), self.bwt()
        return {
            "rank": self.rank,
            "method": self.method,
            "ewc_lambda": self.ewc_lambda,
            "acc_mean": float(acc.mean()),
            "acc_sd": _sd(acc),
            "bwt_mean": float(bwt.mean()) if self.sequential else None,
            "bwt_sd": _sd(bwt) if self.sequential else None,
            "R_mean": np.mean(self.matrices, axis=0).round(4).tolist(),
            "R_per_seed": [m.round(4).tolist() for m in self.matrices],
            "boundaries_fired": self.boundaries,
            "seconds": round(self.seconds, 2),
        }


def acc_of(r: np.ndarray) -> float:
    return float(r[-1].mean())


def bwt_of(r: np.ndarray) -> float:
    t = r.shape[0]
    return float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]))


def _sd(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if values.size > 1 else 0.0


@dataclass(frozen=True)
class Setting:
    dim: int = 96
    tasks: int = 4
    subspace_dim: int = 6
    steps_per_task: int = 1500
    learning_rate: float = 0.05
    boundaries: str = "detected"  # or "explicit"


def make_stream(setting: Setting, seed: int) -> tuple[SubspaceSequence, list[np.ndarray]]:
    seq = SubspaceSequence.make(
        d=setting.dim, n_tasks=setting.tasks, subspace_dim=setting.subspace_dim, seed=seed
    )
    rng = np.random.default_rng(seed + 1000)
    return seq, [seq.inputs(t, setting.steps_per_task, rng) for t in range(setting.tasks)]


def make_lora(setting: Setting, rank: int, seed: int) -> MicroLoRA:
    cfg = MicroLoraConfig(
        in_features=setting.dim, out_features=setting.dim, rank=rank, target_modules=(MODULE,)
    )
    return MicroLoRA(cfg, seed=seed)


def sequential_matrix(
    setting: Setting,
    seq: SubspaceSequence,
    streams: Sequence[np.ndarray],
    lora: MicroLoRA,
    ewc_lambda: float,
) -> tuple[np.ndarray, list[int]]:
    """R for tasks learned one after another; also where boundaries fired (sample index)."""
    detect = setting.boundaries == "detected"
    pipe = TrainingPipeline(
        TrainingConfig(
            learning_rate=setting.learning_rate, ewc_lambda=ewc_lambda, boundary_detection=detect
        )
    )
    pipe.init_for_lora(lora)
    n = len(streams)
    r = np.zeros((n, n))
    fired: list[int] = []
    seen = 0
    for t, xs in enumerate(streams):
        if t and not detect:
            pipe.start_new_task(lora)
        ys = seq.target_delta(t, xs)
        for i in range(xs.shape[0]):
            res = pipe.train_step(lora, xs[i], AdaptFeedback.from_quality(1.0).with_target(ys[i]))
            if res.task_boundary:
                fired.append(seen)
            seen += 1
        r[t] = [seq.adapter_quality(lora, j, MODULE) for j in range(n)]
    return r, fired


def joint_matrix(
    setting: Setting,
    seq: SubspaceSequence,
    streams: Sequence[np.ndarray],
    lora: MicroLoRA,
    seed: int,
) -> tuple[np.ndarray, list[int]]:
    """All tasks' samples shuffled into one stream, same total steps; R repeats the final row."""
    pipe = TrainingPipeline(TrainingConfig(learning_rate=setting.learning_rate, ewc_lambda=0.0))
    pipe.init_for_lora(lora)
    xs = np.concatenate(streams)
    ys = np.concatenate([seq.target_delta(t, x) for t, x in enumerate(streams)])
    order = np.random.default_rng(seed + 2000).permutation(xs.shape[0])
    fired = []
    for i in order:
        res = pipe.train_step(lora, xs[i], AdaptFeedback.from_quality(1.0).with_target(ys[i]))
        if res.task_boundary:
            fired.append(int(i))
    n = len(streams)
    final = [seq.adapter_quality(lora, j, MODULE) for j in range(n)]
    return np.tile(final, (n, 1)), fired


def evaluate(
    setting: Setting,
    ranks: Sequence[int],
    lambdas: Sequence[float],
    seeds: Sequence[int],
    torch_lambdas: Sequence[float],
    *,
    progress: bool = False,
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for rank in ranks:
        rows = [Outcome(rank, "plain SGD", 0.0)]
        rows += [Outcome(rank, "EWC++", lam) for lam in lambdas]
        rows.append(Outcome(rank, "joint (shuffled)", None))
        rows += [Outcome(rank, "torch online EWC (Avalanche)", lam) for lam in torch_lambdas]
        for seed in seeds:
            seq, streams = make_stream(setting, seed)
            for row in rows:
                t0 = time.perf_counter()
                lora = make_lora(setting, rank, seed)
                if row.method.startswith("torch"):
                    a, _ = lora.factors(MODULE)
                    assert row.ewc_lambda is not None
                    r = torch_ewc.online_ewc_matrix(
                        seq,
                        streams,
                        a_init=a.copy(),
                        scaling=lora.scaling,
                        learning_rate=setting.learning_rate,
                        ewc_lambda=row.ewc_lambda,
                        decay_factor=TrainingConfig().online_ewc_gamma,
                        max_grad_norm=TrainingConfig().max_grad_norm,
                    )
                    fired: list[int] = []
                elif row.method.startswith("joint"):
                    r, fired = joint_matrix(setting, seq, streams, lora, seed)
                else:
                    assert row.ewc_lambda is not None
                    r, fired = sequential_matrix(setting, seq, streams, lora, row.ewc_lambda)
                row.matrices.append(r)
                row.boundaries.append(fired)
                row.seconds += time.perf_counter() - t0
                if progress:  # on stderr: stdout carries only the report (--json parses)
                    print(
                        f"  rank {rank} seed {seed} {row.method} λ={row.ewc_lambda}: "
                        f"ACC {acc_of(r):.3f} BWT {bwt_of(r):+.3f}",
                        file=sys.stderr,
                        flush=True,
                    )
        outcomes += rows
    return outcomes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.remember_parser(parser)
    count = options.positive_int
    lambdas = options.floats_in(0.0, lo_open=False)
    parser.add_argument(
        "--ranks",
        type=options.positive_ints,
        default="2,4",
        help="adapter ranks, comma-separated (each at most --dim)",
    )
    parser.add_argument("--lambdas", type=lambdas, default="1,10,100", help="EWC++ strengths")
    parser.add_argument(
        "--seeds", type=count, default=3, help="number of seeds (3: seeds 0, 1 and 2)"
    )
    parser.add_argument(
        "--steps-per-task",
        type=count,
        default=1500,
        help="training samples per task, one update each",
    )
    parser.add_argument("--lr", type=options.positive_float, default=0.05, help="learning rate")
    parser.add_argument(
        "--dim",
        type=options.dense_dim,
        default=96,
        help="hidden size; at least --tasks × --subspace-dim (the tasks' input subspaces are "
        "mutually orthogonal)",
    )
    parser.add_argument(
        "--tasks",
        type=options.int_in(2),
        default=4,
        help="tasks learned one after another (at least 2: BWT compares earlier tasks with the "
        "last)",
    )
    parser.add_argument(
        "--subspace-dim",
        type=count,
        default=6,
        help="dimension of each task's own input subspace",
    )
    parser.add_argument(
        "--boundaries",
        choices=("detected", "explicit"),
        default="detected",
        help="EWC++ task boundaries: detected from the inputs, or start_new_task per task",
    )
    parser.add_argument(
        "--torch-lambdas",
        type=options.floats_in(0.0, lo_open=False, allow_empty=True),
        default="0,1,10,100",
        help="peer strengths ('' to skip the peer)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument(
        "--progress", action="store_true", help="print each run on stderr as it ends"
    )


def run(args: argparse.Namespace) -> int:
    ranks: list[int] = args.ranks
    if args.tasks * args.subspace_dim > args.dim:
        options.refuse(
            args,
            f"--tasks {args.tasks} × --subspace-dim {args.subspace_dim} = "
            f"{args.tasks * args.subspace_dim} exceeds --dim {args.dim} (each task's inputs "
            "need a subspace of their own)",
        )
    if max(ranks) > args.dim:
        options.refuse(args, f"argument --ranks: rank {max(ranks)} exceeds --dim {args.dim}")
    setting = Setting(
        dim=args.dim,
        tasks=args.tasks,
        subspace_dim=args.subspace_dim,
        steps_per_task=args.steps_per_task,
        learning_rate=args.lr,
        boundaries=args.boundaries,
    )
    torch_ok = not args.no_torch and torch_ewc.available()
    torch_lambdas: list[float] = args.torch_lambdas if torch_ok else []
    seeds = list(range(args.seeds))
    outcomes = evaluate(setting, ranks, args.lambdas, seeds, torch_lambdas, progress=args.progress)
    payload = {
        "setting": setting.__dict__,
        "seeds": seeds,
        "torch_peer": torch_ok,
        "results": [o.to_json() for o in outcomes],
    }
    if args.json:
        dump_json(payload)
        return 0
    _print(setting, outcomes, seeds, torch_ok)
    return 0


def _print(setting: Setting, outcomes: list[Outcome], seeds: list[int], torch_ok: bool) -> None:
    switches = [t * setting.steps_per_task for t in range(1, setting.tasks)]
    rows = []
    for o in outcomes:
        acc, bwt = o.acc(), o.bwt()
        lam = "-" if o.ewc_lambda is None else f"{o.ewc_lambda:g}"
        fired = describe_boundaries(o, switches, setting.boundaries) if o.method == "EWC++" else "-"
        if o.method.startswith("joint"):
            fired = f"{sum(len(b) for b in o.boundaries)} fired"
        rows.append(
            [
                o.rank,
                o.method,
                lam,
                f"{acc.mean():.3f} ± {_sd(acc):.3f}",
                f"{bwt.mean():+.3f} ± {_sd(bwt):.3f}" if o.sequential else "-",
                fired,
                o.seconds,
            ]
        )
    print_table(
        f"Forgetting: d={setting.dim}, {setting.tasks} tasks × {setting.steps_per_task} samples, "
        f"lr {setting.learning_rate}, boundaries {setting.boundaries}, seeds {seeds} "
        "(mean ± sd)",
        ["rank", "method", "λ", "ACC", "BWT", "boundary lag", "seconds"],
        rows,
    )
    if not torch_ok:
        print("torch peer skipped (torch not installed or --no-torch)")
    for rank in sorted({o.rank for o in outcomes}):
        table: list[list[Any]] = []
        for o in (o for o in outcomes if o.rank == rank):
            mean = np.mean(o.matrices, axis=0)
            lam = "-" if o.ewc_lambda is None else f"{o.ewc_lambda:g}"
            if not o.sequential:
                table.append([o.method, lam, "final", *map(float, mean[-1])])
                continue
            for i, row in enumerate(mean):
                table.append([o.method if i == 0 else "", lam if i == 0 else "", i + 1, *row])
        labels = [f"task {j + 1}" for j in range(setting.tasks)]
        print_table(
            f"R[i][j], rank {rank}: quality on task j after training task i (mean over seeds)",
            ["method", "λ", "after task", *labels],
            [[*r[:3], *map(float, r[3:])] for r in table],
        )


def describe_boundaries(o: Outcome, switches: list[int], mode: str) -> str:
    """Detection lag per switch over seeds, plus the switches no boundary followed (missed)
    and the boundaries that followed no switch (extra). With explicit boundaries nothing is
    detected: each task starts with ``start_new_task``."""
    if mode == "explicit":
        return "explicit"
    lags: list[int] = []
    spurious = 0
    for fired in o.boundaries:
        for f in fired:
            near = [f - s for s in switches if 0 <= f - s < 200]
            if near:  # the latest switch before it, when tasks are shorter than 200 samples
                lags.append(min(near))
            else:
                spurious += 1
    missed = len(switches) * len(o.boundaries) - len(lags)
    text = f"{min(lags)}–{max(lags)}" if lags else "none detected"
    notes = [f"missed {missed}"] * bool(missed) + [f"extra {spurious}"] * bool(spurious)
    if notes:
        text += f" ({', '.join(notes)})"
    return text
