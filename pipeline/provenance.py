"""Provenance recorded with every checkpoint and table: git revision, library versions, host."""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Iterable

PACKAGE_DIR = Path(__file__).resolve().parent


def git_revision_of(root: str | Path, exclude: Iterable[str] = (), digits: int | None = None) -> str:
    """``<sha>`` of HEAD in the git checkout holding ``root`` (its first ``digits`` hex digits), with ``-dirty`` when
    tracked files differ, other than those the pathspecs ``exclude`` leave out; ``unknown`` outside a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=root
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", *exclude],
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
        ).stdout.strip()
        return sha[:digits] + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@lru_cache(maxsize=1)
def git_revision() -> str:
    """``<sha>`` of HEAD of this package's checkout, with ``-dirty`` when tracked files differ; ``unknown`` outside a
    git checkout."""
    return git_revision_of(PACKAGE_DIR)


# The sources whose code decides the trained weights: the training wing, the data it trains on, the kernel pinning.
# Config semantics are covered by the run config itself, so adding a config section for a later stage does not
# invalidate persisted checkpoints. (The tracking rows come from the wing too: ``training/tracking.py``.)
TRAINING_SOURCES = ("training", "data.py", "repro.py")


def _sources(names) -> list[Path]:
    """The ``*.py`` files of ``names`` (package-relative files, or folders read recursively), in a fixed order."""
    files = []
    for name in names:
        path = PACKAGE_DIR / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def source_fingerprint(names) -> str:
    """sha256 over the sources of ``names`` (see :func:`_sources`), each keyed by its package-relative path."""
    digest = hashlib.sha256()
    for path in _sources(names):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over the sources that decide the trained weights (:data:`TRAINING_SOURCES`: the training wing,
    ``data.py``, ``repro.py``).

    A persisted checkpoint is resumed only when this matches, so a change to training code never mixes into a
    resumed run.
    """
    return source_fingerprint(TRAINING_SOURCES)


def provenance() -> dict[str, str]:
    """Versions and revision as a flat ``str -> str`` mapping (fits Parquet metadata and checkpoints)."""
    import numpy
    import torch

    from pipeline import __version__
    from pipeline.repro import kernel_record

    return {
        "git_revision": git_revision(),
        "code_fingerprint": code_fingerprint(),
        "pipeline_version": __version__,
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),
        "numpy": str(numpy.__version__),
        "platform": f"{platform.system()}-{platform.machine()}",  # no kernel release: same bytes on every host
        **kernel_record(),  # kernel level, pinning, threads, CPU model: what decides the bits
    }
