"""sona: online adaptation of language models from user feedback."""

from __future__ import annotations

__version__ = "0.1.0"
