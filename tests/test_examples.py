"""Every example runs as is and exits 0."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == [
        "custom_embedder.py",
        "embed_in_app.py",
        "subscribe_events.py",
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("embed_in_app.py", ["held-out quality", "accounting", "holds"]),
        ("subscribe_events.py", ["crashed", "restarted", "events seen", "holds"]),
        ("custom_embedder.py", ["applied=True", "deep run", "instant 100"]),
    ],
)
def test_example_runs_and_exits_0(name: str, expected: list[str], tmp_path: Path) -> None:
    # run from an unrelated directory, as a user would after installing sona
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for text in expected:
        assert text in proc.stdout, (text, proc.stdout)
    assert "DOES NOT HOLD" not in proc.stdout


def _readme_snippets() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^ *```python\n(.*?)^ *```", text, flags=re.S | re.M)


def test_readme_has_sync_and_async_snippets() -> None:
    snippets = _readme_snippets()
    assert any("SonaLlm(" in s for s in snippets)
    assert any("async with SonaRuntime(" in s for s in snippets)


@pytest.mark.parametrize("index", range(len(_readme_snippets())))
def test_readme_snippet_runs(index: int, tmp_path: Path) -> None:
    code = textwrap.dedent(_readme_snippets()[index])
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, code + proc.stdout + proc.stderr
