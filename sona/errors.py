"""Exception types sona raises at its API boundary.

Every invalid argument is a ``ValueError`` or ``TypeError`` subclass raised at the call, before
any state changes, with a message naming the argument and what was expected.
"""

from __future__ import annotations


class InvalidInputError(ValueError):
    """An argument has the wrong shape, holds NaN/inf, or is outside its documented range."""


class UnknownModuleError(InvalidInputError):
    """A module was named that the adapter does not target."""


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


class FormatError(ValueError):
    """Bytes or a file are not a valid sona adapter/checkpoint (corrupt, truncated, foreign)."""


class ConfigMismatchError(FormatError):
    """Valid adapter bytes whose configuration differs from the adapter importing them."""


class CheckpointDirError(ValueError):
    """A ``checkpoint_dir`` that cannot be used: another runtime holds it, it holds the
    state of an earlier run (continue that with ``SonaRuntime.restore``), or its checkpoints
    lost the sample log that holds the samples acknowledged after them."""
