"""The wrapper every ``stages/*.py`` entry point runs under (:func:`stage_entry`).

Bad input ends the process with one ``error: ...`` line and exit code 2, never a traceback, whether it is found
while the params are read or inside a flow; SIGINT and SIGTERM end it within seconds, with its children; the
``repro`` section pins the CPU kernels before torch is imported. Nothing here imports torch or Prefect.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from pipeline.config import ConfigError
from pipeline.flows.runtime import STOPPING, debug_enabled

EXIT_BAD_INPUT = 2
STOP_GRACE_SECONDS = 3.0  # after SIGINT/SIGTERM: finally-blocks get this long, then the process ends regardless


def tune_malloc() -> None:
    """Fix glibc's malloc thresholds (as MALLOC_MMAP_THRESHOLD_=16 MiB, MALLOC_TRIM_THRESHOLD_=1 GiB).

    With the default dynamic thresholds every forward pass of the first network pays page faults for its
    activations (measured here: ResNet20 forward on 512 samples 15–22 ms instead of ~10 ms).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    libc.mallopt(m_mmap_threshold, 16 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024)


def _params_path(argv: Sequence[str] | None, default: str) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params", default=default)
    return parser.parse_known_args(argv)[0].params


def _die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM to this process when its parent (``dvc``) exits, so a stage never
    outlives the ``dvc repro`` that started it."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def kill_children() -> None:
    """End every process this one started (Dask workers, a temporary Prefect server): SIGTERM, then SIGKILL."""
    try:
        import psutil
    except ImportError:  # psutil comes with dask.distributed; without it there are no Dask workers either
        return
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=1.0)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass


def _on_stop_signal(signum: int, frame) -> None:
    """SIGINT/SIGTERM: unwind with KeyboardInterrupt (atomic writes clean up), and end the process within
    :data:`STOP_GRACE_SECONDS` whatever Prefect's shutdown is waiting for (a server that went away, say)."""
    import threading

    def force_exit() -> None:
        time.sleep(STOP_GRACE_SECONDS)
        _stopped(signum)

    if not STOPPING:  # the first signal unwinds; a second one just waits for the watchdog
        STOPPING.append(signum)
        threading.Thread(target=force_exit, daemon=True).start()
        raise KeyboardInterrupt


def _stopped(signum: int) -> None:
    """Print the one line, end the children, and exit with 128 + the signal number (no atexit: Prefect's shutdown
    may wait on a server that is gone)."""
    name = signal.Signals(signum).name
    kill_children()
    print(
        f"error: stopped by {name}; finished work is kept (atomic writes), a rerun resumes", file=sys.stderr, flush=True
    )
    os._exit(128 + signum)


FINISHED: list[bool] = []  # set when the stage's main returned: the exit can skip the interpreter's teardown


def _skip_teardown() -> None:
    """After a stage that finished: end the process once every exit hook has run (Prefect's services have drained
    their logs and events to the server, files are closed) without the interpreter's teardown of its modules, which
    for torch and Prefect costs about a second per stage (measured: ``import torch`` alone, 0.8 s to exit)."""
    if FINISHED and not debug_enabled():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _server_went_away(err: BaseException) -> bool:
    if "httpx" not in sys.modules:  # no Prefect client was ever used
        return False
    from pipeline.flows.runtime import is_connection_error

    return is_connection_error(err)


def user_error(err: BaseException) -> bool:
    """True for the errors a user fixes (bad params or input files, an unreachable server): one line, exit 2."""
    from pipeline.errors import DataError

    return isinstance(err, (ConfigError, DataError))


def stage_entry(
    main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None, *, params: str = "params.yaml"
) -> None:
    """Run a stage's ``main`` as every ``stages/*.py`` does.

    - The ``repro`` section of ``--params`` (default ``params``) pins the CPU kernels and threads before torch is
      imported (:mod:`pipeline.repro`), so stage modules import torch-using modules inside ``main`` only.
    - A ConfigError or DataError, raised before or inside a flow, ends with one ``error: ...`` line and exit code 2;
      the traceback only with ``LANDSCAPE_DEBUG=1``.
    - SIGINT/SIGTERM stop the stage within a few seconds, with its children; it also ends when ``dvc`` does.
    """
    tune_malloc()
    _die_with_parent()
    atexit.register(_skip_teardown)  # registered first, so it runs last: after Prefect's and every other exit hook
    signal.signal(signal.SIGTERM, _on_stop_signal)
    signal.signal(signal.SIGINT, _on_stop_signal)
    try:
        from pipeline import repro

        repro.apply_from_params(_params_path(argv, params))
        main(argv)
        FINISHED.append(True)
    except KeyboardInterrupt:
        _stopped(STOPPING[0] if STOPPING else signal.SIGINT)
    except Exception as err:  # noqa: BLE001 - user errors become one line; anything else is a bug: traceback
        if not debug_enabled() and _server_went_away(err):
            url = os.environ.get("PREFECT_API_URL", "the Prefect API")
            print(
                f"error: the Prefect server at {url} went away mid-stage; finished work is kept (checkpoints, "
                "tiles, points), a rerun resumes",
                file=sys.stderr,
                flush=True,
            )
            kill_children()
            os._exit(1)  # not sys.exit: Prefect's shutdown would retry the lost server for minutes
        if not user_error(err) or debug_enabled():
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


# --------------------------------------------------------------------------------------------------------------
# The shared stage arguments
# --------------------------------------------------------------------------------------------------------------

# Where the stages read and write, by argument name: dvc.yaml passes every path explicitly; these defaults are the
# same layout, so a stage run by hand finds the same files. ``{run}`` is the ``--run`` value.
STAGE_PATHS: dict[str, tuple[str, str]] = {
    "data": ("artifacts/data", "prepared data (the prepare stage)"),
    "checkpoints": ("artifacts/checkpoints/{run}", "the run's checkpoints (train@<run>)"),
    "partner": ("artifacts/partners/{run}", "the partner's checkpoints (partner@<run>)"),
    "seeds": ("artifacts/seeds/{run}", "checkpoints of the other seeds (kept across runs)"),
    "vectors": ("artifacts/hessian/{run}", "top Hessian eigenvectors of the final checkpoint (hessian@<run>)"),
    "tables": ("reports/tables/{run}", "the run's tables and *_metrics.json"),
    "figures": ("reports/figures/{run}", "the run's figures"),
    "metrics": ("reports/metrics.json", "every run's headline numbers (the metrics stage)"),
    "live": ("reports/live/{run}", "DVCLive's per-epoch metrics.json and plots/metrics/*.tsv (train@<run>)"),
}


def stage_arguments(
    doc: str | None,
    argv: Sequence[str] | None,
    *paths: str,
    run: bool = True,
    params: str = "params.yaml",
    load: Callable[[str], object] | None = None,
    **defaults: str | tuple[str, str],
) -> tuple[argparse.Namespace, object]:
    """Parse a stage's command line: ``--params``, ``--run`` (when ``run``) and one ``Path`` option per name of
    ``paths`` (defaults and help from :data:`STAGE_PATHS`, or ``defaults[name]``: a template or ``(template,
    help)``); then load the params (``load``, default :func:`pipeline.config.load_params`).

    The params are read before unknown arguments are refused: a run name split by the shell then ends with the
    project's one line about the params, not argparse's. Returns ``(args, params)``, every path filled in.
    """
    from pipeline.config import load_params

    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--params", default=params, help="validated before any work")
    if run:
        parser.add_argument("--run", required=True, help="a key of `runs` in params.yaml")
    spec = {}
    for name in (*paths, *(n for n in defaults if n not in paths)):
        given = defaults.get(name, STAGE_PATHS.get(name))
        if given is None:
            raise KeyError(f"stage argument {name!r}: not in STAGE_PATHS; give its default")
        template, help_text = given if isinstance(given, tuple) else (given, STAGE_PATHS.get(name, ("", ""))[1])
        spec[name] = template
        parser.add_argument(f"--{name}", type=Path, help=f"{help_text}; default: {template}".lstrip("; "))
    args, extra = parser.parse_known_args(argv)
    loaded = (load or load_params)(args.params)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    for name, template in spec.items():
        if getattr(args, name) is None:
            setattr(args, name, Path(template.format(run=getattr(args, "run", ""))))
    return args, loaded
