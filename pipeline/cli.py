"""``landscape`` command line: ``check`` the params, ``run`` the pipeline or the flatness ``sweep``, open the Prefect
``ui``.

Also :func:`stage_entry`, the wrapper every ``stages/*.py`` entry point runs under: bad input ends the process
with one ``error: ...`` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from pipeline.config import ConfigError, load_params

EXIT_BAD_INPUT = 2


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


def stage_entry(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a stage's ``main``; a ConfigError or DataError becomes one stderr line and exit code 2."""
    from pipeline.data import DataError

    tune_malloc()
    try:
        main(argv)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


# ------------------------------------------------------------------------------------------------ commands


def cmd_check(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    runs = ", ".join(f"{r.name} ({r.model_name})" for r in params.runs)
    print(f"{args.params}: OK; dataset {params.data.dataset}; {len(params.runs)} run(s): {runs}")
    return 0


def start_prefect_server(port: int, timeout: float = 90.0) -> subprocess.Popen:
    """Start ``prefect server start`` on 127.0.0.1:``port`` in the background and wait until it answers."""
    from pipeline.flows.runtime import api_reachable

    url = f"http://127.0.0.1:{port}/api"
    # The UI asks the server where the API is; Prefect's default answer is port 4200 whatever `--port` says, so on
    # any other port the pages would show another server's runs (or none).
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true",
           "PREFECT_UI_API_URL": url}
    env.pop("PREFECT_API_URL", None)
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    Path(".prefect").mkdir(exist_ok=True)
    log = open(Path(".prefect") / "server.log", "ab")
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not api_reachable(url):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_process(server)
            raise RuntimeError(f"Prefect server did not start on 127.0.0.1:{port}; see .prefect/server.log")
        time.sleep(0.5)
    return server


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def cmd_run(args: argparse.Namespace) -> int:
    """``dvc repro`` with a Prefect server: reuse a reachable one, else start one for the duration of the run."""
    load_params(args.params)  # fail before anything starts
    return repro_with_prefect(args.port, args.dvc_args)


def cmd_sweep(args: argparse.Namespace) -> int:
    """``dvc repro sweeps/dvc.yaml`` (the flatness sweep, a pipeline of its own) with a Prefect server."""
    from pipeline.sweep_run import load_sweep_params

    params = load_sweep_params("sweeps/params.yaml")  # the file sweeps/dvc.yaml reads; fail before anything starts
    print(f"sweeps/params.yaml: OK; {params.grid.size} grid points", flush=True)
    return repro_with_prefect(args.port, ["sweeps/dvc.yaml", *args.dvc_args])


def repro_with_prefect(port: int, dvc_args: Sequence[str]) -> int:
    """Run ``dvc repro DVC_ARGS`` reporting to a reachable Prefect server, else to one started for the run."""
    from pipeline.flows.runtime import api_reachable

    url = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{port}/api"
    server = None
    if not api_reachable(url):
        url = f"http://127.0.0.1:{port}/api"
        print(f"starting a Prefect server on 127.0.0.1:{port} ...", flush=True)
        server = start_prefect_server(port)
    print(f"Prefect UI: {url.removesuffix('/api')}  (flow runs of this pipeline appear there)", flush=True)
    # Stages call `python`: make it this environment's interpreter even when the venv is not activated.
    env = {**os.environ, "PREFECT_API_URL": url,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        return subprocess.call(["dvc", "repro", *dvc_args], env=env)
    finally:
        if server is not None:
            stop_process(server)
            print("stopped the Prefect server; `landscape ui` shows these runs again", flush=True)


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the Prefect UI and API on 127.0.0.1 until interrupted."""
    server = start_prefect_server(args.port)
    print(f"Prefect UI: http://127.0.0.1:{args.port}  (Ctrl-C to stop; stages run meanwhile report here)",
          flush=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_process(server)


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline import compare

    labels = (args.rev_a, args.rev_b if args.rev_b is not None else "workspace")
    if args.table is None and args.plot is None:
        frame = compare.compare_metrics(args.rev_a, args.rev_b, args.repo)
        print(f"{compare.METRICS}: {labels[0]} -> {labels[1]} ({int(frame.changed.sum())} of {len(frame)} differ)")
        print(compare.format_metrics(frame, changed_only=not args.all))
        return 0
    name = args.table or "train_history"
    run = args.run or load_params(args.repo / "params.yaml").runs[0].name
    tables = {label: compare.read_table(run, name, rev, args.repo) for label, rev in zip(labels, (args.rev_a, args.rev_b))}
    if args.table is not None:
        merged = compare.compare_tables(*tables.values())
        deltas = [c for c in merged.columns if c.endswith("_delta")]
        differ = merged[(merged[deltas].fillna(0).abs() > 0).any(axis=1) | (merged.only_in != "")]
        print(f"reports/tables/{run}/{name}.parquet: {labels[0]} -> {labels[1]}: {len(differ)} of {len(merged)} rows differ")
        if not differ.empty:
            with pd_options():
                print(differ.to_string(index=False, max_rows=60))
    if args.plot is not None:
        from pipeline.compare import plot_overlay

        print(f"wrote {plot_overlay(tables, name, args.plot)}")
    return 0


def pd_options():
    import pandas as pd

    return pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 6)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="landscape", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate params.yaml and exit (0: valid, 2: invalid)")
    check.add_argument("--params", default="params.yaml")
    check.set_defaults(func=cmd_check)
    run = sub.add_parser("run", help="run the pipeline (dvc repro) with a local Prefect server")
    run.add_argument("--params", default="params.yaml")
    run.add_argument("--port", type=int, default=4200)
    run.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed on to `dvc repro` (e.g. -f, a stage)")
    run.set_defaults(func=cmd_run)
    sweep = sub.add_parser("sweep", help="run the flatness sweep (dvc repro sweeps/dvc.yaml) with a Prefect server")
    sweep.add_argument("--port", type=int, default=4200)
    sweep.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed on to `dvc repro` (e.g. -f)")
    sweep.set_defaults(func=cmd_sweep)
    compare = sub.add_parser("compare", help="headline numbers (or one table) of two revisions side by side")
    compare.add_argument("rev_a", nargs="?", default="HEAD", help="git revision or `dvc exp` name (default HEAD)")
    compare.add_argument("rev_b", nargs="?", default=None, help="second revision (default: the working tree)")
    compare.add_argument("--table", help="compare reports/tables/<run>/<TABLE>.parquet row by row instead")
    compare.add_argument("--run", help="the run of --table (default: the first run in params.yaml)")
    compare.add_argument("--plot", type=Path, help="write an overlay figure of --table (default train_history)")
    compare.add_argument("--all", action="store_true", help="list unchanged numbers too")
    compare.add_argument("--repo", type=Path, default=Path("."))
    compare.set_defaults(func=cmd_compare)
    ui = sub.add_parser("ui", help="start the Prefect server and UI on 127.0.0.1")
    ui.add_argument("--port", type=int, default=4200)
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except RuntimeError as err:  # e.g. the Prefect server could not start, an unknown revision (CompareError)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
