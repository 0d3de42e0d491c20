"""Where the demo writes: ``--out`` checked before anything runs, files moved in at the end.

A demo runs for a while before it writes anything, so an unusable ``--out`` (a path under
``/proc``, an existing regular file, a read-only directory) is found first, by creating the
directory and a file in it, rather than after the runs. The files are written into a staging
directory inside ``--out`` and moved into place once all of them exist, so a demo that is
interrupted or fails leaves neither half-written files nor a directory it created for nothing;
one that succeeds leaves no file of an earlier run's beside its own.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

FILES = ("report.json", "quality.png", "latency.png", "supervision.png")
"""Every file the demo may write into ``--out``."""


class OutputError(ValueError):
    """``--out`` cannot hold the demo's files."""


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


class Output:
    """The ``--out`` directory of one demo invocation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._created: list[Path] = []  # directories this invocation made, deepest first

    def prepare(self) -> None:
        """Create the directory (and missing parents) and check a file can be written in it;
        raise :class:`OutputError` with the reason if not, leaving nothing behind."""
        out = self.path
        missing = [p for p in (out, *out.parents) if not p.exists() and not p.is_symlink()]
        try:
            out.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise OutputError(f"--out {out}: exists and is not a directory") from None
        except OSError as exc:
            self._remove_created(missing)
            raise OutputError(
                f"--out {out}: cannot create the directory ({_reason(exc)})"
            ) from None
        self._created = [p for p in missing if p.is_dir()]
        for name in FILES:
            if (out / name).is_dir():
                self.discard()
                raise OutputError(f"--out {out}: {name} there is a directory")
        try:
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as exc:
            self.discard()
            raise OutputError(f"--out {out}: cannot write files there ({_reason(exc)})") from None

    def staging(self) -> Path:
        """A fresh directory inside ``--out`` to write the files into before :meth:`commit`."""
        return Path(tempfile.mkdtemp(prefix=".sona-demo-", dir=self.path))

    def commit(self, staging: Path) -> None:
        """Move every file written in ``staging`` into ``--out`` and remove ``staging``.

        A file of the demo's (:data:`FILES`) that this run did not write is removed: an
        earlier run's ``supervision.png`` (with ``--chaos``) left beside the new report would
        pass for a plot of this run. Other files in ``--out`` are left alone."""
        written: set[str] = set()
        for item in sorted(staging.iterdir()):
            item.replace(self.path / item.name)
            written.add(item.name)
        staging.rmdir()
        for name in FILES:
            stale = self.path / name
            if name not in written and (stale.is_file() or stale.is_symlink()):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
        self._created = []

    def discard(self, staging: Path | None = None) -> None:
        """Remove ``staging`` and the directories :meth:`prepare` created (if still empty)."""
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        self._remove_created(self._created)
        self._created = []

    @staticmethod
    def _remove_created(dirs: list[Path]) -> None:
        for d in dirs:
            with contextlib.suppress(OSError):
                d.rmdir()
