"""The consolidated state readers see, published by swapping one reference.

The Background loop builds a new :class:`Published` from its own copies and replaces the old
one in a single assignment, so a reader (the host's inference path) sees either the old or the
new adapters, never a half-written one.
"""

from __future__ import annotations

import numpy as np

from sona.lora import MicroLoRA
from sona.lora_config import TargetModule


class Published:
    """Consolidated adapter, optional per-cluster ensemble and its routing centroids."""

    __slots__ = ("base", "centroids", "ensemble", "version")

    def __init__(
        self,
        base: MicroLoRA,
        ensemble: dict[int, MicroLoRA] | None = None,
        centroids: np.ndarray | None = None,
        version: int = 0,
    ) -> None:
        self.base = base
        self.ensemble = ensemble or {}
        self.centroids = centroids
        self.version = version

    def route(self, x: np.ndarray) -> np.ndarray:
        """Nearest-centroid cluster of each row of ``x`` (2-D); -1 without centroids."""
        c = self.centroids
        if c is None or c.shape[0] == 0:
            return np.full(x.shape[0], -1, np.intp)
        d = np.einsum("ij,ij->i", c, c)[None, :] - 2.0 * (x @ c.T)
        return np.asarray(np.argmin(d, axis=1), dtype=np.intp)

    def add_into(self, x: np.ndarray, module: TargetModule, out: np.ndarray) -> None:
        """out += the consolidated delta for ``x`` (1-D or 2-D)."""
        self.base.forward_add(x, module, out)
        if self.ensemble:
            rows = x[None, :] if x.ndim == 1 else x
            self._add_routed(rows, module, out[None, :] if out.ndim == 1 else out)

    def predict(self, x: np.ndarray, module: TargetModule) -> np.ndarray:
        """The consolidated delta for each row of ``x`` (2-D), in a new array."""
        out = self.base.forward(x, module)
        if self.ensemble:
            self._add_routed(x, module, out)
        return out

    def _add_routed(self, rows: np.ndarray, module: TargetModule, dest: np.ndarray) -> None:
        """dest += each row's cluster adapter's delta (2-D ``rows`` and ``dest``)."""
        labels = self.route(rows)
        for label, adapter in self.ensemble.items():
            mask = labels == label
            if mask.any():
                dest[mask] += adapter.forward(rows[mask], module)
