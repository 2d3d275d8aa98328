"""Where flows report, and the Prefect server's lifecycle.

A stage reports to ``$PREFECT_API_URL`` when it is set, else to the server that ``landscape run`` or ``landscape ui``
started for this project (recorded in ``.prefect/server.json`` with its process id), else it runs in ephemeral mode
after one warning line. It never reports to whatever else answers on 127.0.0.1:4200 (another clone's server, say).

:func:`configure_prefect` must run before Prefect is imported, because Prefect reads its settings at import time.
Nothing here imports Prefect at module level.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_PORT = 4200  # where `landscape ui` serves unless told otherwise
REGISTRY = Path(".prefect") / "server.json"  # the project's own server: {"url", "pid"}, relative to the project root
# A stage's API calls: fail within seconds when the server is gone, instead of minutes of retries.
CLIENT_SETTINGS = {"PREFECT_CLIENT_MAX_RETRIES": "1", "PREFECT_API_REQUEST_TIMEOUT": "10"}


def debug_enabled() -> bool:
    """``LANDSCAPE_DEBUG=1``: errors a user can fix show their traceback too."""
    return os.environ.get("LANDSCAPE_DEBUG", "").strip() not in ("", "0", "false")


def api_reachable(url: str, timeout: float = 1.0) -> bool:
    """True when ``GET {url}/health`` answers 200 within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def project_server(root: str | Path = ".") -> str | None:
    """The API URL of the server this project started (``.prefect/server.json``) when it still runs and answers."""
    path = Path(root) / REGISTRY
    try:
        entry = json.loads(path.read_text())
        url, pid = str(entry["url"]), int(entry["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if _pid_alive(pid) and api_reachable(url) else None


def start_prefect_server(port: int, timeout: float = 90.0, *, register: bool = False) -> subprocess.Popen:
    """Start ``prefect server start`` on 127.0.0.1:``port`` in the background and wait until it answers.

    With ``register`` the server is recorded in ``.prefect/server.json`` as this project's (stages find it there).
    """
    url = f"http://127.0.0.1:{port}/api"
    # The UI asks the server where the API is; Prefect's default answer is port 4200 whatever `--port` says, so on
    # any other port the pages would show another server's runs (or none).
    env = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
        "PREFECT_UI_API_URL": url,
    }
    env.pop("PREFECT_API_URL", None)
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    Path(".prefect").mkdir(exist_ok=True)
    log = open(Path(".prefect") / "server.log", "ab")
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while not api_reachable(url):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_process(server)
            raise RuntimeError(f"Prefect server did not start on 127.0.0.1:{port}; see .prefect/server.log")
        time.sleep(0.5)
    if register:
        from pipeline.io import write_json

        write_json(REGISTRY, {"url": url, "pid": server.pid})
    return server


def stop_process(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group of ``process`` (a server started in its own session), SIGKILL after ``timeout``."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def unregister(server: subprocess.Popen) -> None:
    """Drop ``.prefect/server.json`` when it names ``server``."""
    try:
        if int(json.loads(REGISTRY.read_text())["pid"]) == server.pid:
            REGISTRY.unlink()
    except (OSError, ValueError, KeyError, TypeError):
        pass


def configure_prefect(*, need_server: bool = False) -> str | None:
    """Point Prefect at ``$PREFECT_API_URL``, else at this project's server (:func:`project_server`).

    With ``need_server`` (tasks on Dask workers: in ephemeral mode each worker process would start a temporary
    server of its own, and its task runs would be lost), a missing server is started on a free port of 127.0.0.1
    for the life of this process, announced with one line on stderr.

    Returns the API URL in use, or None for ephemeral mode (announced with one warning line on stderr).

    The stage then joins its pipeline run (:func:`pipeline.flows.chain.join_pipeline_run`): its flow runs are
    tagged with the run's id, revision, experiment and stage, and the stages upstream of it that DVC skipped are
    recorded as such.
    """
    url = _choose_server(need_server=need_server)
    from pipeline.flows.chain import join_pipeline_run

    join_pipeline_run(url)
    return url


def _choose_server(*, need_server: bool) -> str | None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for key, value in CLIENT_SETTINGS.items():
        os.environ.setdefault(key, value)
    explicit = os.environ.get("PREFECT_API_URL", "").strip()
    url = explicit or project_server()
    if url and api_reachable(url):
        os.environ["PREFECT_API_URL"] = url
        return url
    os.environ.pop("PREFECT_API_URL", None)
    where = f"at {explicit}" if explicit else "for this project (start one with `landscape ui`)"
    if need_server:
        port = free_port()
        print(
            f"note: no Prefect server reachable {where}; starting one on 127.0.0.1:{port} for this stage "
            "(Dask workers report to it)",
            file=sys.stderr,
            flush=True,
        )
        server = start_prefect_server(port)
        atexit.register(stop_process, server)
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        return os.environ["PREFECT_API_URL"]
    print(f"warning: no Prefect server reachable {where}; running in ephemeral mode", file=sys.stderr, flush=True)
    return None


SERVER_LOST: list[str] = []  # the API URL, once the server stopped answering during this process
# The signal stopping this stage, set by its SIGINT/SIGTERM handler (pipeline.stage): while it is set, Prefect's
# crash reports are not repeated on the console.
STOPPING: list[int] = []


def is_connection_error(err: BaseException | None) -> bool:
    """True when ``err`` (or an exception it was raised from) is a failed connection to the Prefect API."""
    import httpx

    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, (httpx.TransportError, ConnectionError, TimeoutError)):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def note_server_lost(err: BaseException | None = None) -> None:
    """The server went away: say so once (one warning line), and stop Prefect sending logs to it (each failed
    send would print an error of its own)."""
    if SERVER_LOST:
        return
    url = os.environ.get("PREFECT_API_URL", "the Prefect API")
    SERVER_LOST.append(url)
    what = f" ({type(err).__name__})" if err is not None else ""
    print(
        f"warning: the Prefect server at {url} went away{what}; the stage goes on without it",
        file=sys.stderr,
        flush=True,
    )
    logging.raiseExceptions = False  # Prefect's log sender reports each failed batch on stderr unless this is off
    from prefect.logging.handlers import APILogHandler

    for logger in [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]:
        for handler in list(getattr(logger, "handlers", [])):
            if isinstance(handler, APILogHandler):
                logger.removeHandler(handler)


def say_lost_server_once_in_log_sends() -> None:
    """Prefect's log sender writes ``--- Error logging to API ---`` and the error on stderr for every batch it fails
    to send; when it is the first to find the server gone, that is the lost server, said once by
    :func:`note_server_lost`, and the batches after it are dropped. Other send errors print as Prefect prints them.

    Written against prefect 3.9's ``APILogWorker._handle_batch`` (pinned in ``constraints.txt``).
    """
    from prefect.logging.handlers import APILogWorker

    original = APILogWorker._handle_batch
    if getattr(original, "says_lost_server_once", False):
        return

    async def _handle_batch(self, items: list[bytes]) -> None:
        if SERVER_LOST:
            return
        try:
            await self._client.request(
                "POST", "/logs/", content=b"[" + b",".join(items) + b"]", headers={"Content-Type": "application/json"}
            )
        except Exception as err:
            if is_connection_error(err):
                note_server_lost(err)
                return
            if logging.raiseExceptions and sys.stderr:
                sys.stderr.write(f"--- Error logging to API ---\n{err}\n")

    _handle_batch.says_lost_server_once = True
    APILogWorker._handle_batch = _handle_batch


def _user_error_names() -> set[str]:
    from pipeline.config import ConfigError
    from pipeline.errors import DataError

    names, todo = set(), [ConfigError, DataError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


class UserErrorConsoleFilter(logging.Filter):
    """Keeps Prefect's console quiet about errors a user fixes (ConfigError, DataError and their subclasses).

    Prefect logs a failing task or flow with a traceback on the console (twice, for the task and its flow) and its
    final state naming the error; the stage then prints the one ``error: ...`` line itself
    (``pipeline.stage.stage_entry``). The records still reach
    the Prefect API, so the UI shows the failure with its traceback. A server that goes away is said once
    (:func:`note_server_lost`) instead of in every retry. ``LANDSCAPE_DEBUG=1`` shows everything.
    """

    _NAMED = re.compile(r"\b([A-Z]\w*Error)\b")
    _STOPPED = ("aborted by a termination signal", "Execution was interrupted")  # Prefect's own SIGTERM/SIGINT report

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and is_connection_error(error):  # the server went away: one line, from note_server_lost
            note_server_lost(error)
            return False
        if record.name.startswith("prefect") and (
            STOPPING and record.levelno >= logging.WARNING or any(text in record.getMessage() for text in self._STOPPED)
        ):
            return False  # "Crash detected! Execution was aborted by a termination signal", thrice: the stage says it
        if (
            SERVER_LOST
            and record.levelno >= logging.WARNING
            and (record.name not in ("prefect.flow_runs", "prefect.task_runs") or "Connect" in record.getMessage())
        ):
            return False  # Prefect's retries of the lost server (events, logs): said once already
        if not record.name.startswith("prefect"):
            return True
        names = _user_error_names()
        if error is not None and type(error).__name__ in names:
            return False
        return not any(name in names for name in self._NAMED.findall(record.getMessage()))


def quiet_user_errors_on_console() -> None:
    """Add :class:`UserErrorConsoleFilter` to Prefect's console handlers (set up when Prefect is imported), and
    have Prefect's log sender say a lost server once (:func:`say_lost_server_once_in_log_sends`)."""
    if debug_enabled():
        return
    say_lost_server_once_in_log_sends()
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in ("prefect", "prefect._internal"))]
    for handler in [h for logger in loggers for h in logger.handlers]:
        if isinstance(handler, logging.StreamHandler) and not any(
            isinstance(f, UserErrorConsoleFilter) for f in handler.filters
        ):
            handler.addFilter(UserErrorConsoleFilter())
