"""The package installs under one import name and nothing else lands at the top level."""

from __future__ import annotations

import importlib.util
import subprocess
import sys


def test_subpackages_import_under_sona() -> None:
    import sona.actors
    import sona.kernels

    import sona

    assert sona.actors.__name__ == "sona.actors"
    assert sona.kernels.__name__ == "sona.kernels"


def test_no_top_level_actors_or_kernels() -> None:
    code = (
        "import importlib.util, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
        "print(importlib.util.find_spec('actors'), importlib.util.find_spec('kernels'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert out.stdout.strip() == "None None"
    assert importlib.util.find_spec("sona.kernels") is not None
