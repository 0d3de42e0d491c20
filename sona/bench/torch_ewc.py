"""An independent PyTorch peer: online EWC on the LoRA factors, as Avalanche computes it.

Avalanche's ``EWCPlugin(mode="online", decay_factor=γ)`` keeps one diagonal importance per
parameter: after each experience, the mean over the experience's minibatches of the squared
gradient of the task loss, folded as imp ← γ·imp + imp_new, with the parameters saved as the
anchor; while training, λ·Σ imp·(θ − θ*)² is added to the loss before ``backward``. Here the
parameters are the adapter's A and B (same initial A as sona's adapter, B = 0), the loss is
sona's target objective ½‖s·B·A·x − y*‖², the stream is the same one sona sees, one sample per
step (minibatch 1, so the importance is the mean per-sample squared gradient), SGD at the same
learning rate with the same gradient-norm clipping. Only this module imports torch, and only
when the benchmark asks for the peer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sona.bench.tasks import SubspaceSequence


def available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def task_loss_of(params: dict[str, Any], x: Any, y: Any, s: float) -> Any:
    """sona's target objective ½‖s·B·A·x − y*‖² for one sample."""
    import torch

    mu = s * (params["B"] @ (params["A"] @ x))
    return 0.5 * torch.sum((mu - y) ** 2)


def _mean_squared_grads(
    params: dict[str, Any], loss_of: Any, x_all: Any, y_all: Any, s: float
) -> dict[str, Any]:
    from torch.func import grad, vmap

    detached = {k: p.detach() for k, p in params.items()}
    per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0, None))(detached, x_all, y_all, s)
    return {k: g.pow(2).mean(dim=0) for k, g in per_sample.items()}


def online_ewc_matrix(
    seq: SubspaceSequence,
    streams: Sequence[np.ndarray],
    *,
    a_init: np.ndarray,
    scaling: float,
    learning_rate: float,
    ewc_lambda: float,
    decay_factor: float,
    max_grad_norm: float,
) -> np.ndarray:
    """R[i][j]: quality on task j after training on tasks 0..i, online EWC in torch."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.tensor(a_init, dtype=torch.float32))
    b = torch.nn.Parameter(torch.zeros(a_init.shape[1], a_init.shape[0]))
    params = {"A": a, "B": b}
    opt = torch.optim.SGD(params.values(), lr=learning_rate)
    s = float(scaling)
    importance: dict[str, Any] | None = None
    saved: dict[str, Any] | None = None

    def task_loss(x: Any, y: Any) -> Any:
        return task_loss_of({"A": a, "B": b}, x, y, s)

    n_tasks = len(streams)
    r = np.zeros((n_tasks, n_tasks))
    for t, xs in enumerate(streams):
        x_all = torch.tensor(xs)
        y_all = torch.tensor(seq.target_delta(t, xs))
        for i in range(x_all.shape[0]):
            opt.zero_grad()
            loss = task_loss(x_all[i], y_all[i])
            if importance is not None and saved is not None:
                penalty = sum(
                    (importance[k] * (p - saved[k]).pow(2)).sum() for k, p in params.items()
                )
                loss = loss + ewc_lambda * penalty
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
            opt.step()
        # after_training_exp: importances from a pass over the experience (minibatch 1, so
        # per-sample gradients, vectorised with torch.func), then the online fold
        new_imp = _mean_squared_grads(params, task_loss_of, x_all, y_all, s)
        if importance is None:
            importance = new_imp
        else:
            importance = {k: decay_factor * importance[k] + new_imp[k] for k in params}
        saved = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            dw = (s * (b @ a)).numpy()
        for j in range(n_tasks):
            r[t, j] = seq.quality_of(j, seq.held_out[j] @ dw.T)
    return r
