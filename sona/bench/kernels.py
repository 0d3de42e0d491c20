"""``sona bench kernels``: MicroLoRA forward and adapt against numpy (and torch) in one run.

sona is measured through its public API (input validation included): ``forward``, and for one
sample ``step`` (adapt and apply fused), for a batch ``adapt`` per sample + ``apply_updates``.
Single calls are timed as ``functools.partial`` objects, so sona pays for one Python call per
sample, like the peers, and not for a wrapper around it.
The numpy rows compute the same thing the obvious way (``B @ (A @ x)``, outer products for the
gradients) and a tuned way (``np.dot`` into preallocated outputs with B transposed). torch CPU
is included when it is importable.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from sona.bench import options
from sona.bench.timing import Timing, dump_json, print_table, time_calls
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA, MicroLoraConfig, TargetModule

Q = TargetModule.Q_PROJ
LR = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.remember_parser(parser)
    parser.add_argument(
        "--ranks", type=options.positive_ints, default="1,2,8", help="comma-separated adapter ranks"
    )
    parser.add_argument(
        "--dims",
        type=options.adapter_dims,
        default="768,4096",
        help="comma-separated hidden sizes (each at least the largest rank)",
    )
    parser.add_argument(
        "--batches", type=options.positive_ints, default="1,32", help="comma-separated batch sizes"
    )
    parser.add_argument(
        "--samples", type=options.positive_int, default=2000, help="timed samples per cell"
    )
    parser.add_argument("--no-torch", action="store_true", help="skip torch even if installed")


def run(args: argparse.Namespace) -> int:
    ranks: list[int] = args.ranks
    dims: list[int] = args.dims
    batches: list[int] = args.batches
    if max(ranks) > min(dims):
        options.refuse(
            args,
            f"argument --ranks: rank {max(ranks)} does not fit hidden size {min(dims)} of "
            "--dims (an adapter's rank is at most its hidden size)",
        )
    torch = _torch() if not args.no_torch else None
    rows: list[dict[str, Any]] = []
    for op in ("forward", "adapt"):
        for rank in ranks:
            for dim in dims:
                for batch in batches:
                    rows.append(_cell(op, rank, dim, batch, args.samples, torch))
    if args.json:
        dump_json({"torch": None if torch is None else torch.__version__, "rows": rows})
        return 0
    columns = [
        "op",
        "rank",
        "dim",
        "batch",
        "sona p50",
        "sona p99",
        "numpy p50",
        "tuned p50",
        "torch p50",
        "numpy/sona",
        "tuned/sona",
        "torch/sona",
    ]
    table = [
        [r["op"], r["rank"], r["dim"], r["batch"], _med(r["sona"]), r["sona"]["p99_us"],
         _med(r["numpy"]), _med(r["numpy_tuned"]), _med(r["torch"]),
         r["speedup_numpy"], r["speedup_numpy_tuned"], r["speedup_torch"]]
        for r in rows
    ]  # fmt: skip
    print_table(
        "MicroLoRA kernels, µs per call (median / p99); ratios = peer / sona", columns, table
    )
    return 0


def _cell(op: str, rank: int, dim: int, batch: int, samples: int, torch: Any) -> dict[str, Any]:
    rng = np.random.default_rng(rank * 7919 + dim + batch)
    cfg = MicroLoraConfig.for_hidden_dim(dim, rank=rank, alpha=2.0 * rank, target_modules=(Q,))
    lora = MicroLoRA(cfg, seed=0)
    a0, bt0 = lora.factors(Q)
    lora.set_factors(Q, a0, rng.standard_normal(bt0.shape).astype(np.float32) * 0.01)
    x = (rng.standard_normal((batch, dim)) / np.sqrt(dim)).astype(np.float32)
    target = rng.standard_normal((batch, dim)).astype(np.float32) * 0.01
    xin: np.ndarray = x[0] if batch == 1 else x
    inner = 10 if dim <= 1024 else 5
    if op == "forward":
        fns = _forward_fns(lora, xin, torch)
    else:
        fns = _adapt_fns(lora, x, target, torch)
        inner = 1
    timed = time_calls({name: fn for name, fn in fns.items() if fn}, samples=samples, inner=inner)
    res = {name: timed.get(name) for name in fns}
    sona = res["sona"]
    assert sona is not None
    return {
        "op": op, "rank": rank, "dim": dim, "batch": batch,
        **{k: (None if v is None else {"median_us": v.median_us, "p99_us": v.p99_us})
           for k, v in res.items()},
        "speedup_numpy": _ratio(res["numpy"], sona),
        "speedup_numpy_tuned": _ratio(res["numpy_tuned"], sona),
        "speedup_torch": _ratio(res["torch"], sona),
    }  # fmt: skip


def _med(cell: dict[str, float] | None) -> float:
    return float("nan") if cell is None else cell["median_us"]


def _ratio(peer: Timing | None, sona: Timing) -> float:
    return float("nan") if peer is None else round(peer.median_us / sona.median_us, 2)


def _forward_fns(
    lora: MicroLoRA, x: np.ndarray, torch: Any
) -> dict[str, Callable[[], object] | None]:
    a, bt = lora.factors(Q)
    s = np.float32(lora.scaling)
    b = np.ascontiguousarray(bt.T) * s  # scale folded in, B as (out, rank)
    batched = x.ndim == 2
    h = np.empty((x.shape[0], a.shape[0]) if batched else a.shape[0], np.float32)
    out = np.empty((x.shape[0], bt.shape[1]) if batched else bt.shape[1], np.float32)

    def numpy_plain() -> object:
        return (x @ a.T) @ b.T if batched else b @ (a @ x)

    def numpy_tuned() -> object:
        if batched:
            np.dot(x, a.T, out=h)
        else:
            np.dot(a, x, out=h)
        return np.dot(h, bt, out=out)

    fns: dict[str, Callable[[], object] | None] = {
        "sona": partial(lora.forward, x, Q),  # the call itself, no extra Python frame
        "numpy": numpy_plain,
        "numpy_tuned": numpy_tuned,
        "torch": None,
    }
    if torch is not None:
        ta, tb, tx = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(x)

        def torch_fwd() -> object:
            with torch.no_grad():
                return (tx @ ta.T) @ tb.T if batched else tb @ (ta @ tx)

        fns["torch"] = torch_fwd
    return fns


def _adapt_fns(
    lora: MicroLoRA, x: np.ndarray, target: np.ndarray, torch: Any
) -> dict[str, Callable[[], object] | None]:
    """One supervised step over the batch: accumulate every sample's gradient, apply the mean."""
    feedbacks = [AdaptFeedback.from_quality(1.0).with_target(t) for t in target]
    rows = list(x)
    s = float(lora.scaling)
    a_np, bt_np = (arr.copy() for arr in lora.factors(Q))

    def sona_batch() -> object:
        for xi, fb in zip(rows, feedbacks, strict=True):
            lora.adapt(xi, fb, Q)
        return lora.apply_updates(LR)

    # One sample: the fused accumulate-and-apply the Instant loop uses, timed as the call itself
    # (the numpy and torch rows are one Python call each, too).
    sona_step = partial(lora.step, rows[0], feedbacks[0], LR, module=Q) if len(rows) == 1 else None

    def numpy_step(a: np.ndarray = a_np, bt: np.ndarray = bt_np) -> object:
        n = x.shape[0]
        h = x @ a.T  # (n, r)
        mu = s * (h @ bt)  # (n, out)
        g = mu - target
        d_bt = s * (h.T @ g) if n > 1 else s * np.outer(h[0], g[0])
        d_a = s * ((g @ bt.T).T @ x) if n > 1 else s * np.outer(bt @ g[0], x[0])
        norm = np.sqrt(np.sum(d_a * d_a) + np.sum(d_bt * d_bt)) / n
        step = LR * min(1.0, 1.0 / norm) / n if norm > 0 else LR / n
        a -= step * d_a
        bt -= step * d_bt
        return a

    fns: dict[str, Callable[[], object] | None] = {
        "sona": sona_batch if sona_step is None else sona_step,
        "numpy": numpy_step,
        "numpy_tuned": None,
        "torch": None,
    }
    if torch is not None:
        ta, tbt = torch.from_numpy(a_np.copy()), torch.from_numpy(bt_np.copy())
        tx, tt = torch.from_numpy(x), torch.from_numpy(target)

        def torch_step() -> object:
            with torch.no_grad():
                n = tx.shape[0]
                h = tx @ ta.T
                g = s * (h @ tbt) - tt
                d_bt = s * (h.T @ g)
                d_a = s * ((g @ tbt.T).T @ tx)
                norm = float(torch.sqrt((d_a * d_a).sum() + (d_bt * d_bt).sum())) / n
                step = LR * min(1.0, 1.0 / norm) / n if norm > 0 else LR / n
                ta.sub_(step * d_a)
                tbt.sub_(step * d_bt)
            return ta

        fns["torch"] = torch_step
    return fns


def _torch() -> Any:
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch
