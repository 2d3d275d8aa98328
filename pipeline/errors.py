"""Errors a user can fix, each one line: a stage prints ``error: <message>`` and exits 2, never a traceback."""

from __future__ import annotations


class DataError(RuntimeError):
    """A dataset, checkpoint or other input file cannot be used; ``str(error)`` is one line naming the key or file
    and the fix."""


class ModelError(DataError):
    """A model from an import path cannot be used (not importable, not callable, not a module, no parameters, wrong
    output shape); one line naming the path and what was found."""
