"""Headless Chromium helpers for browser tests (not a test module).

Uses Debian's ``chromium`` (or ``chromium-browser``) from PATH; tests should
skip when :func:`chromium_binary` returns ``None``. Every call starts a fresh
browser with a throw-away profile and lets JS-rendered pages settle through
``--virtual-time-budget``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

__all__ = ["ChromiumError", "chromium_binary", "dump_dom", "screenshot", "to_url"]

TIMEOUT_S = 120.0

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

_URL_SCHEMES = ("http://", "https://", "file://", "data:", "about:")


class ChromiumError(RuntimeError):
    """Chromium is missing, timed out or exited with an error."""


def chromium_binary() -> str | None:
    """Path of ``chromium`` or ``chromium-browser`` on PATH, else None."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def to_url(target: str | os.PathLike[str]) -> str:
    """URLs pass through; file paths become absolute ``file://`` URLs."""
    text = os.fspath(target)
    if text.lower().startswith(_URL_SCHEMES):
        return text
    path = Path(text).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(path)
    return path.as_uri()


def _run(args: list[str], url: str, wait_ms: int, timeout_s: float) -> str:
    binary = chromium_binary()
    if binary is None:
        raise ChromiumError("chromium not found on PATH (tried chromium, chromium-browser)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True) as profile:
        cmd = [
            binary,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={int(wait_ms)}",
            *args,
            url,
        ]
        # Own process group, so a timeout also ends the renderer/zygote
        # children that would otherwise outlive the killed launcher.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            raise ChromiumError(
                f"chromium did not finish within {timeout_s:.0f} s loading {url} (virtual time budget {wait_ms} ms)"
            ) from None
        if proc.returncode != 0:
            tail = "\n".join(err.strip().splitlines()[-15:])
            raise ChromiumError(f"chromium exited with {proc.returncode} loading {url}:\n{tail}")
        return out


def dump_dom(
    url: str | os.PathLike[str],
    *,
    wait_ms: int = 5000,
    timeout_s: float = TIMEOUT_S,
    width: int = 1400,
    height: int = 2000,
) -> str:
    """Serialized DOM of the page after ``wait_ms`` of (virtual) time, in a ``width`` x ``height`` window
    (virtual scrollers render only the rows that fit)."""
    # Without running every compositor stage, a single-page app (the Prefect UI) is often dumped before its list
    # rows render, however long the budget.
    return _run(
        ["--dump-dom", "--run-all-compositor-stages-before-draw", f"--window-size={int(width)},{int(height)}"],
        to_url(url),
        wait_ms,
        timeout_s,
    )


def screenshot(
    url: str | os.PathLike[str],
    out_png: Path,
    *,
    width: int = 1400,
    height: int = 2000,
    wait_ms: int = 5000,
    timeout_s: float = TIMEOUT_S,
) -> Path:
    """PNG screenshot of the page (viewport ``width`` x ``height``) at ``out_png``."""
    out_png = Path(out_png).expanduser().resolve()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    out_png.unlink(missing_ok=True)
    _run(
        [f"--screenshot={out_png}", f"--window-size={int(width)},{int(height)}"],
        to_url(url),
        wait_ms,
        timeout_s,
    )
    if not out_png.is_file() or out_png.stat().st_size == 0:
        raise ChromiumError(f"chromium wrote no screenshot to {out_png}")
    return out_png
