"""Writing files: atomic writes, strict (finite) JSON, figures.

Every write goes to a temporary file in the target folder and is then renamed over the target, so an interrupted
stage never leaves half a file: a reader sees the old file or the new one. JSON is strict: a non-finite number is
written as ``null`` (:func:`finite`, :func:`finite_tree`). Figures are PNGs whose bytes depend on the figure alone
(:func:`save_figure`). matplotlib is imported only when a figure is written.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

DPI = 120  # every PNG of the pipeline


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def save_torch(path: str | Path, payload: Any) -> None:
    """``torch.save`` atomically; the payload must be loadable with ``torch.load(weights_only=True)``."""
    import torch

    # through memory: torch.save names the archive's root folder after the file it writes to, so saving straight to
    # the randomly named temporary file would make equal payloads differ in bytes (and DVC see a changed output)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())


def finite(value: Any, default: Any = None) -> float | Any:
    """``value`` as a float when it is a finite real number (not a bool), else ``default``.

    The one rule for numbers that enter ``metrics.json`` and the tables' summaries: strict JSON has no NaN or
    infinity, so a missing or non-finite number becomes ``None`` (or ``default``, e.g. NaN inside a data frame).
    """
    if value is None or isinstance(value, bool):
        return default
    try:
        value = float(value)
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) else default


def finite_tree(tree: Any) -> Any:
    """``tree`` (mappings, lists, tuples, scalars) as plain JSON values: every non-finite float replaced by
    ``None``, numpy scalars as Python ``int``/``float``; strings, bools and ``None`` kept."""
    if isinstance(tree, Mapping):
        return {k: finite_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [finite_tree(v) for v in tree]
    if isinstance(tree, bool) or tree is None or isinstance(tree, str):
        return tree
    if isinstance(tree, numbers.Integral):
        return int(tree)
    if isinstance(tree, numbers.Real):
        return float(tree) if math.isfinite(tree) else None
    return tree


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG atomically (folders made as needed) and close it, also on error.

    Every figure of the pipeline goes through here. The PNG carries no ``Software`` tag, so its bytes depend on the
    figure alone, not on the matplotlib version (DVC then sees an unchanged figure as unchanged).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png", metadata={"Software": None})
    finally:
        pyplot().close(fig)
    return path


def plot_placeholder(path: str | Path, *, run: str, message: str) -> Path:
    """A figure that says why there is nothing to draw (e.g. a diverged run), so every declared output exists."""
    fig, ax = pyplot().subplots(figsize=(5, 2.5))
    ax.axis("off")
    ax.text(0.5, 0.5, f"{run}: {message}", ha="center", va="center", wrap=True)
    return save_figure(fig, path)
