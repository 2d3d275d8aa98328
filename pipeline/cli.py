"""``landscape`` command line: ``check`` the params, ``run`` the pipeline or the flatness ``sweep``, open the Prefect
``ui``.

The wrapper every ``stages/*.py`` entry point runs under is :func:`pipeline.stage.stage_entry` (re-exported here).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from pipeline.config import ConfigError, load_params
from pipeline.errors import DataError
from pipeline.flows.runtime import (
    DEFAULT_PORT,
    api_reachable,
    free_port,
    port_free,
    project_server,
    start_prefect_server,
    stop_process,
    unregister,
)
from pipeline.stage import EXIT_BAD_INPUT, stage_entry, tune_malloc  # noqa: F401 - re-exported for callers

# ------------------------------------------------------------------------------------------------ commands


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the params; build every model from an import path and run one forward on zeros of the data's shape."""
    params = load_params(args.params)
    custom = [r for r in params.runs if ":" in r.model_name]
    lines = []
    if custom:
        from pipeline.data import known_shape
        from pipeline.errors import ModelError
        from pipeline.training.custom import check_model

        shape = known_shape(params.data) or _prepared_shape(Path(args.data))
        if shape is None:
            lines = [f"  {r.name}: model not checked: the input shape is known once `prepare` has run" for r in custom]
        for run in custom if shape else []:
            try:
                lines.append(f"  {run.name}: " + check_model(run.model_name, *shape, dict(run.model.model_kwargs)))
            except ModelError as err:
                raise ModelError(f"runs.{run.name}: {err}") from None
    runs = ", ".join(f"{r.name} ({r.model_name})" for r in params.runs)
    print(f"{args.params}: OK; dataset {params.data.dataset}; {len(params.runs)} run(s): {runs}")
    for line in lines:
        print(line)
    return 0


def _prepared_shape(folder: Path) -> tuple[tuple[int, int, int], int] | None:
    meta = folder / "meta.json"
    if not meta.is_file():
        return None
    found = json.loads(meta.read_text(encoding="utf-8"))
    return tuple(found["input_shape"]), int(found["num_classes"])


def cmd_run(args: argparse.Namespace) -> int:
    """``dvc repro`` with a Prefect server: reuse a reachable one, else start one for the duration of the run."""
    load_params(args.params)  # fail before anything starts
    return repro_with_prefect(args.port, args.dvc_args)


def cmd_sweep(args: argparse.Namespace) -> int:
    """``dvc repro sweeps/dvc.yaml`` (the flatness sweep, a pipeline of its own) with a Prefect server."""
    from pipeline.sweep.grid import load_sweep_params

    params = load_sweep_params("sweeps/params.yaml")  # the file sweeps/dvc.yaml reads; fail before anything starts
    print(f"sweeps/params.yaml: OK; {params.grid.size} grid points", flush=True)
    return repro_with_prefect(args.port, ["sweeps/dvc.yaml", *args.dvc_args])


def _project_server_or_start(port: int) -> tuple[str, subprocess.Popen | None]:
    """``$PREFECT_API_URL`` when it answers, else this project's server, else a new one (on ``port`` when free)."""
    explicit = os.environ.get("PREFECT_API_URL", "").strip()
    if explicit and api_reachable(explicit):
        return explicit, None
    if explicit:
        print(f"warning: PREFECT_API_URL={explicit} does not answer; using this project's server", flush=True)
    url = project_server()
    if url is not None:
        return url, None
    if not port_free(port):
        taken, port = port, free_port()
        print(f"note: 127.0.0.1:{taken} is taken (not this project's server); using {port}", flush=True)
    print(f"starting a Prefect server on 127.0.0.1:{port} ...", flush=True)
    return f"http://127.0.0.1:{port}/api", start_prefect_server(port, register=True)


def _run_forwarding_signals(command: list[str], env: dict[str, str]) -> int:
    """Run ``command``; SIGINT/SIGTERM go on to it (and its stages stop within seconds, see :func:`stage_entry`)."""
    child = subprocess.Popen(command, env=env)
    forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def repro_with_prefect(port: int, dvc_args: Sequence[str]) -> int:
    """Run ``dvc repro DVC_ARGS`` reporting to this project's Prefect server, started for the run when needed."""
    import uuid

    from pipeline.flows.chain import PIPELINE_RUN_ENV, finish_pipeline_run

    url, server = _project_server_or_start(port)
    run_id = uuid.uuid4().hex[:12]
    print(
        f"Prefect UI: {url.removesuffix('/api')}  (this run's flow runs carry the tag pipeline-run:{run_id})",
        flush=True,
    )
    # Stages call `python`: make it this environment's interpreter even when the venv is not activated.
    env = {
        **os.environ,
        "PREFECT_API_URL": url,
        PIPELINE_RUN_ENV: run_id,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    try:
        code = _run_forwarding_signals(["dvc", "repro", *dvc_args], env)
        if code == 0:  # the stages DVC skipped, as Cached flow runs of this run (a failed run skipped nothing)
            targets = [a for a in dvc_args if not a.startswith("-")] or ["dvc.yaml"]  # (dvc repro's default)
            try:
                skipped = finish_pipeline_run(run_id, ".", targets, url)
            except Exception as err:  # noqa: BLE001 - the record is for the UI; the run itself succeeded
                print(f"warning: skipped stages not recorded in Prefect ({type(err).__name__}: {err})", flush=True)
            else:
                print(f"recorded {len(skipped)} skipped (cached) stage(s) in Prefect", flush=True)
        return code
    finally:
        if server is not None:
            stop_process(server)
            unregister(server)
            print("stopped the Prefect server; `landscape ui` shows these runs again", flush=True)


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the Prefect UI and API on 127.0.0.1 until interrupted; stages of this project report to it."""
    if project_server() is not None:
        print(f"error: this project's Prefect server already runs at {project_server()}", file=sys.stderr)
        return 1
    if not port_free(args.port):
        print(f"error: 127.0.0.1:{args.port} is taken by another program; choose another with --port", file=sys.stderr)
        return 1
    server = start_prefect_server(args.port, register=True)
    print(f"Prefect UI: http://127.0.0.1:{args.port}  (Ctrl-C to stop; stages run meanwhile report here)", flush=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_process(server)
        unregister(server)


def cmd_worker(args: argparse.Namespace) -> int:
    """Become a ``dask worker`` of the scheduler at ``args.address`` with this project's kernel settings.

    The ``repro`` section of ``--params`` (pinned kernels, threads) is put in the worker's environment, because torch
    reads it once, at import; the sweep's cluster check refuses a worker without it. One task at a time per worker
    process (``--nthreads 1``): a point or tile uses ``repro.threads`` torch threads of its own.
    """
    from pipeline.config import ReproConfig, build_section, read_yaml
    from pipeline.sweep.cluster import worker_environment

    raw = read_yaml(args.params)
    if not isinstance(raw, dict):
        raise ConfigError("", f"{args.params}: expected a mapping of sections, got {type(raw).__name__}")
    repro = build_section(ReproConfig, raw.get("repro") or {}, "repro")
    env = worker_environment(repro.pin, repro.threads, os.environ.get("PREFECT_API_URL") or None)
    command = [
        sys.executable,
        "-m",
        "distributed.cli.dask_worker",
        args.address,
        "--nthreads",
        "1",
        "--nworkers",
        str(args.nworkers),
        "--no-dashboard",
        *args.dask_args,
    ]
    print(
        f"landscape worker: {' '.join(command[3:])} ({args.params}: repro pin {repro.pin}, threads {repro.threads})",
        flush=True,
    )
    os.execve(sys.executable, command, env)
    return 1  # not reached


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.report import compare

    labels = (args.rev_a, args.rev_b if args.rev_b is not None else "workspace")
    if args.table is None and args.plot is None:
        frame = compare.compare_metrics(args.rev_a, args.rev_b, args.repo, timing=args.timing)
        print(f"{compare.METRICS}: {labels[0]} -> {labels[1]} ({int(frame.changed.sum())} of {len(frame)} differ)")
        print(compare.format_metrics(frame, changed_only=not args.all))
        return 0
    name = args.table or "train_history"
    run = args.run or load_params(args.repo / "params.yaml").runs[0].name
    tables = {
        label: compare.read_table(run, name, rev, args.repo) for label, rev in zip(labels, (args.rev_a, args.rev_b))
    }
    if args.table is not None:
        merged = compare.compare_tables(*tables.values())
        differ = compare.differing_rows(merged, timing=args.timing)
        print(
            f"reports/tables/{run}/{name}.parquet: {labels[0]} -> {labels[1]}: {len(differ)} of {len(merged)} rows differ"  # noqa: E501
        )
        if not differ.empty:
            with pd_options():
                print(differ.to_string(index=False, max_rows=60))
    if args.plot is not None:
        from pipeline.report.compare import plot_overlay

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
    check.add_argument("--data", default="artifacts/data", help="prepared data (input shape of datasets from files)")
    check.set_defaults(func=cmd_check)
    run = sub.add_parser("run", help="run the pipeline (dvc repro) with a local Prefect server")
    run.add_argument("--params", default="params.yaml")
    run.add_argument("--port", type=int, default=DEFAULT_PORT)
    run.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed on to `dvc repro` (e.g. -f, a stage)")
    run.set_defaults(func=cmd_run)
    sweep = sub.add_parser("sweep", help="run the flatness sweep (dvc repro sweeps/dvc.yaml) with a Prefect server")
    sweep.add_argument("--port", type=int, default=DEFAULT_PORT)
    sweep.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed on to `dvc repro` (e.g. -f)")
    sweep.set_defaults(func=cmd_sweep)
    compare = sub.add_parser("compare", help="headline numbers (or one table) of two revisions side by side")
    compare.add_argument("rev_a", nargs="?", default="HEAD", help="git revision or `dvc exp` name (default HEAD)")
    compare.add_argument("rev_b", nargs="?", default=None, help="second revision (default: the working tree)")
    compare.add_argument("--table", help="compare reports/tables/<run>/<TABLE>.parquet row by row instead")
    compare.add_argument("--run", help="the run of --table (default: the first run in params.yaml)")
    compare.add_argument("--plot", type=Path, help="write an overlay figure of --table (default train_history)")
    compare.add_argument("--all", action="store_true", help="list unchanged numbers too")
    compare.add_argument(
        "--timing", action="store_true", help="count wall-clock numbers (seconds, tracking_seconds, ...) as changes too"
    )
    compare.add_argument("--repo", type=Path, default=Path("."))
    compare.set_defaults(func=cmd_compare)
    worker = sub.add_parser("worker", help="run a Dask worker for the sweep or the scans, with the project's kernels")
    worker.add_argument("address", help="the scheduler, tcp://HOST:PORT (dask scheduler prints it)")
    worker.add_argument("--params", default="sweeps/params.yaml", help="whose repro section the worker applies")
    worker.add_argument("--nworkers", type=int, default=1, help="worker processes on this machine")
    worker.set_defaults(func=cmd_worker, dask_args=[])  # other options go on to `dask worker` (e.g. --host)
    ui = sub.add_parser("ui", help="start the Prefect server and UI on 127.0.0.1")
    ui.add_argument("--port", type=int, default=DEFAULT_PORT)
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in ("run", "sweep"):  # `landscape run -f`: options for `dvc repro` pass through
        args.dvc_args = [*extra, *args.dvc_args]
    elif extra and args.command == "worker":  # `landscape worker ADDRESS --host ...`: options for `dask worker`
        args.dask_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        sys.exit(args.func(args))
    except (ConfigError, DataError) as err:  # DataError: e.g. a model from an import path that cannot be used
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except RuntimeError as err:  # e.g. the Prefect server could not start, an unknown revision (CompareError)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
