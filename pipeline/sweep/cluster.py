"""The sweep's points on a Dask cluster: what every worker must have, asked of each before any point is sent.

A point is one function call on a worker (``pipeline.flows.sweep.measure_point``): the worker unpickles the
project's code, trains with the kernels its torch was imported with, writes under the points folder, and reports
its Prefect task run to the API that the flow's settings name (Prefect 3 sends its settings with every task). Each of
these can be wrong on another machine, and each would show up late and obscurely (an unpickling traceback, points
with other bits, results written where nobody reads them, task runs missing from the UI), so :func:`check_cluster`
asks every worker of the scheduler first, with a function sent by value (it needs nothing of the project to run):

- **the project**: does ``pipeline.sweep.grid`` import, and is its code the code of this checkout (the fingerprint of
  the training and measure sources, :func:`~pipeline.sweep.grid.point_code_fingerprint`)?
- **the kernels**: torch's dispatch level and whether ``repro.pin`` is applied, as here. They are read once, when
  torch is imported, so a worker must be started with them: ``landscape worker`` does (:func:`worker_environment`).
  The thread count is set by each point itself (``repro.threads``).
- **the points folder**: does the worker see the marker file written here (a shared folder at the same path)?
- **the Prefect API**: does ``GET <url>/health`` answer from the worker?

Each problem is one line naming the worker and the fix (:class:`ClusterError`). No Prefect here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import DataError

__all__ = ["ClusterError", "check_cluster", "worker_identity", "worker_problems", "worker_environment", "local_cluster"]

CHECKOUT = Path(__file__).resolve().parents[2]
MARKER = ".cluster-check-"  # + a random hex: the file each worker must see in the points folder


class ClusterError(DataError):
    """The Dask cluster cannot run the sweep's points: no scheduler, no workers, or a worker that cannot import the
    project, runs other code or kernels, does not see the points folder or cannot reach the Prefect API. One line."""


def worker_identity() -> dict[str, str]:
    """What a worker must share with the client: the code that decides a point's numbers, and torch's kernels."""
    import pipeline
    from pipeline.repro import kernel_record
    from pipeline.sweep.grid import point_code_fingerprint

    record = kernel_record()
    return {
        "code": point_code_fingerprint(),
        "package": str(Path(pipeline.__file__).resolve().parent),
        "kernel_level": record["kernel_level"],
        "kernels_pinned": record["kernels_pinned"],
    }


# Sent to every worker by value (cloudpickle pickles a function of a module that is not imported by value), so it
# runs on a worker that cannot import the project and says so instead of failing to unpickle.
_PROBE_SOURCE = """
def probe(api_url, marker):
    import os, sys, urllib.request
    out = {"python": sys.executable, "host": os.uname().nodename}
    try:
        from pipeline.sweep.cluster import worker_identity
        out.update(worker_identity())
    except BaseException as err:
        out["import_error"] = (type(err).__name__ + ": " + str(err)).splitlines()[0][:300]
    out["sees_folder"] = bool(marker) and os.path.exists(marker)
    if api_url:
        try:
            with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=5) as response:
                out["api"] = "ok" if response.status == 200 else "HTTP %d" % response.status
        except Exception as err:
            out["api"] = (type(err).__name__ + ": " + str(err)).splitlines()[0][:200]
    return out
"""


def _probe():
    namespace: dict[str, Any] = {"__name__": "landscape_worker_probe"}  # not in sys.modules: pickled by value
    exec(compile(_PROBE_SOURCE, "<landscape worker probe>", "exec"), namespace)
    return namespace["probe"]


def worker_problems(
    reports: Mapping[str, Mapping[str, Any]], expected: Mapping[str, str], api_url: str | None
) -> list[str]:
    """One line per worker that cannot run the points, from the ``reports`` of the probe (``{worker address:
    report}``) against ``expected`` (:func:`worker_identity` here); empty when every worker can."""
    problems = []
    for address, report in sorted(reports.items()):
        where = f"worker {address} ({report.get('host', '?')})"
        if "import_error" in report:
            problems.append(
                f"{where} cannot import the project ({report['import_error']}); install it there "
                "(pip install -e <checkout>) and start the worker with `landscape worker`"
            )
            continue
        if report.get("code") != expected["code"]:
            problems.append(
                f"{where} runs other training or measure code ({report.get('package')}, code "
                f"{str(report.get('code'))[:12]}; here {expected['code'][:12]}); check out the same revision there"
            )
        kernels = ("kernel_level", "kernels_pinned")
        if any(report.get(k) != expected[k] for k in kernels):
            theirs = ", ".join(f"{k} {report.get(k)}" for k in kernels)
            ours = ", ".join(f"{k} {expected[k]}" for k in kernels)
            problems.append(
                f"{where} has other CPU kernels ({theirs}; here {ours}): its points would train other bits; start "
                "it with `landscape worker`, which applies the params' repro section before torch is imported"
            )
        if not report.get("sees_folder"):
            problems.append(
                f"{where} does not see the points folder (its marker file is missing there); mount the shared "
                "folder at the same absolute path on every machine"
            )
        if api_url and report.get("api") != "ok":
            problems.append(
                f"{where} cannot reach the Prefect API at {api_url} ({report.get('api')}); serve it on an address "
                "the workers reach (prefect server start --host 0.0.0.0) and set PREFECT_API_URL to it"
            )
    return problems


def check_cluster(
    address: str, folder: str | Path, api_url: str | None, *, timeout: float = 30.0, key: str = "sweep.scheduler"
) -> list[str]:
    """Ask every worker of the scheduler at ``address`` (see the module docstring); return the worker addresses.

    Args:
        address: the scheduler, ``tcp://HOST:PORT``.
        folder: the points folder the workers must see (created here).
        api_url: the Prefect API the task runs report to (None: not checked).
        timeout: seconds to wait for the scheduler and for a first worker.

    Raises:
        ClusterError: one line, for the first problem (and how many more there are).
    """
    from distributed import Client

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{MARKER}{uuid.uuid4().hex}"
    marker.touch()
    try:
        try:
            client = Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as err:
            raise ClusterError(
                f"{key}: no Dask scheduler answers at {address} within {timeout:g} s ({type(err).__name__}); start "
                "one there (dask scheduler) or fix the address"
            ) from None
        with client:
            try:
                client.wait_for_workers(1, timeout=timeout)
            except TimeoutError:
                raise ClusterError(
                    f"{key}: the scheduler at {address} has no workers after {timeout:g} s; start one per machine "
                    f"with `landscape worker {address}`"
                ) from None
            reports = client.run(_probe(), api_url, str(marker))
    finally:
        marker.unlink(missing_ok=True)
    problems = worker_problems(reports, worker_identity(), api_url)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ClusterError(f"{key} {address}: {problems[0]}{more}")
    return sorted(reports)


def worker_environment(pin: bool, threads: int, api_url: str | None = None) -> dict[str, str]:
    """The environment ``landscape worker`` starts ``dask worker`` with: the kernels of ``repro`` (read when torch
    is imported), glibc's malloc thresholds (as a stage has), passive OpenMP waiting, analytics off, and
    ``PREFECT_API_URL`` when given."""
    from pipeline.repro import kernel_environment

    env = {
        **os.environ,
        **kernel_environment(pin, threads),
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "16777216"),
        "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_", "1073741824"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Several workers share a machine's cores, each with repro.threads threads: an OpenMP thread that waits
        # for a descheduled partner sleeps instead of spinning for milliseconds at every op (measured: two workers
        # on two cores, 217.5 s spinning against 40.3 s passive for 8 points; the same bits: it decides no number).
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextlib.contextmanager
def local_cluster(
    params: Path, workers: int = 2, env: dict | None = None, worker_command=None, cwd: str | Path | None = None
):
    """A real ``dask scheduler`` and ``workers`` separate ``landscape worker`` processes (each one thread, its own
    environment: ``env`` or this one without ``PREFECT_API_URL``) on 127.0.0.1, as on several machines: what the
    tests and ``benchmarks/dask_sweep.py`` run, and a way to try the cluster path on one machine.

    Yields ``(address, processes)``: the scheduler's address and the worker processes (their nannies). A
    ``worker_command(address)`` gives the command line of the workers instead (e.g. a plain ``dask worker``), run
    in ``cwd`` (default: the checkout).
    """
    from distributed import Client

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    base = {k: v for k, v in (env or os.environ).items() if k != "PREFECT_API_URL"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--no-dashboard"],
        env=base, **quiet,
    )  # fmt: skip
    processes = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or scheduler.poll() is not None:
                    raise RuntimeError(f"dask scheduler did not start on {address}") from None
                time.sleep(0.2)
        for _ in range(workers):
            command = (
                worker_command(address)
                if worker_command
                else [str(bin_dir / "landscape"), "worker", address, "--params", str(params), "--host", "127.0.0.1"]
            )
            processes.append(subprocess.Popen(command, cwd=cwd or CHECKOUT, env=dict(base), **quiet))
        if worker_command is None:
            with Client(address, timeout=30, set_as_default=False) as client:
                client.wait_for_workers(workers, timeout=120)
        yield address, processes
    finally:
        for process in [*processes, scheduler]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
