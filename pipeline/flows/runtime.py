"""Where flows report: a reachable Prefect server, or ephemeral mode after one warning line.

Must run before Prefect is imported, because Prefect reads its settings at import time.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import urllib.error
import urllib.request

DEFAULT_API_URL = "http://127.0.0.1:4200/api"  # where `landscape ui` serves


def api_reachable(url: str, timeout: float = 1.0) -> bool:
    """True when ``GET {url}/health`` answers 200 within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def configure_prefect(*, need_server: bool = False) -> str | None:
    """Point Prefect at ``$PREFECT_API_URL`` (or the local `landscape ui` server) when it answers.

    With ``need_server`` (tasks on Dask workers: in ephemeral mode each worker process would start a temporary
    server of its own, and its task runs would be lost), a missing server is started on a free port of 127.0.0.1
    for the life of this process, announced with one line on stderr.

    Returns the API URL in use, or None for ephemeral mode (announced with one warning line on stderr).
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    explicit = os.environ.get("PREFECT_API_URL", "").strip()
    url = explicit or DEFAULT_API_URL
    if api_reachable(url):
        os.environ["PREFECT_API_URL"] = url
        return url
    os.environ.pop("PREFECT_API_URL", None)
    where = f"at {explicit}" if explicit else f"at {DEFAULT_API_URL} (start one with `landscape ui`)"
    if need_server:
        from pipeline.cli import start_prefect_server, stop_process

        port = _free_port()
        print(f"note: no Prefect server reachable {where}; starting one on 127.0.0.1:{port} for this stage "
              "(Dask workers report to it)", file=sys.stderr, flush=True)
        server = start_prefect_server(port)
        atexit.register(stop_process, server)
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        return os.environ["PREFECT_API_URL"]
    print(f"warning: no Prefect server reachable {where}; running in ephemeral mode", file=sys.stderr, flush=True)
    return None
