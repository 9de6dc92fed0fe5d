"""User-facing errors: one line that names the field and the fix.

The CLI prints these without a traceback (unless ``--debug``); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class LmforgeError(Exception):
    """An error caused by the user's input (config, files, shapes), not by a bug in lmforge."""


class ConfigError(LmforgeError, ValueError):
    """A config value or key is wrong (also a ValueError: library callers that catch bad values keep working)."""


class CheckpointError(LmforgeError):
    """A checkpoint directory is missing files, tensors, or has an unsupported architecture."""


class NonFiniteError(LmforgeError):
    """Training went inf/NaN (loss, gradients or weights): the run stops, and nothing non-finite is saved."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
