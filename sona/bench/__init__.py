"""Benchmarks behind ``sona bench``: each submodule measures one part against peers in one run."""

from __future__ import annotations

# name -> module that defines ``add_arguments(parser)`` and ``run(args) -> int``
BENCHES: dict[str, str] = {
    "kernels": "sona.bench.kernels",
    "runtime": "sona.bench.runtime",
    "learning": "sona.bench.learning",
    "forgetting": "sona.bench.forgetting",
    "soak": "sona.bench.soak",
}
