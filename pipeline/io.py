"""Atomic file writes: write to a temporary file in the target folder, then rename over the target.

An interrupted stage therefore never leaves half a file: a reader sees the old file or the new one.
"""

from __future__ import annotations

import io

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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
