"""Provenance recorded with every checkpoint and table: git revision, library versions, host."""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def git_revision() -> str:
    """``<sha>`` of HEAD, with ``-dirty`` when tracked files differ; ``unknown`` outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=PACKAGE_DIR).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=PACKAGE_DIR).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over the library's sources (``pipeline/**/*.py`` except the Prefect flows).

    A persisted checkpoint is resumed only when this matches, so a code change never mixes into a resumed run.
    """
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if "flows" in path.relative_to(PACKAGE_DIR).parts:
            continue
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def provenance() -> dict[str, str]:
    """Versions and revision as a flat ``str -> str`` mapping (fits Parquet metadata and checkpoints)."""
    import numpy
    import torch

    from pipeline import __version__

    return {
        "git_revision": git_revision(),
        "code_fingerprint": code_fingerprint(),
        "pipeline_version": __version__,
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),
        "numpy": str(numpy.__version__),
        "platform": platform.platform(),
    }
