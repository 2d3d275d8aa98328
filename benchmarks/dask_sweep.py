"""The flatness sweep on a Dask scheduler with one and with two workers, against the same sweep in one process.

    .venv/bin/python benchmarks/dask_sweep.py [--models mlp] [--epochs 15] [--seeds 0 1]

Runs ``stages/sweep.py`` on the preset's grid (``sweeps/params.yaml``: lr x batch size x ``--seeds``, for
``--models``, ``--epochs`` per point) three times into fresh points folders: ``sweep.executor: local``, then on a
``dask scheduler`` with one and with two ``landscape worker`` processes on 127.0.0.1
(:func:`pipeline.sweep.cluster.local_cluster`; worker start-up counted, up to the moment every worker has joined).
All three report to one Prefect server. Reports the total time and points/s of each, and checks that the three
``points.parquet`` tables are the same bits.

What a cluster of N machines pays per point is the one-worker line against the in-process one: the same compute,
one point at a time, plus what the cluster adds (the worker check, pickling the data and the point to the worker,
the worker's first import of the project, Prefect's task-run bookkeeping). On this 2-core machine two workers share
the two cores with ``repro.threads`` threads each, so they cannot beat one process.
"""

from __future__ import annotations

from common import REPO, markdown_table  # first: pins the kernels before torch is imported

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from ruamel.yaml import YAML

from pipeline.flows.runtime import api_reachable, free_port, start_prefect_server, stop_process
from pipeline.sweep.cluster import local_cluster


def run_sweep(params: dict, folder: Path, env: dict) -> float:
    folder.mkdir(parents=True)
    YAML(typ="safe", pure=True).dump(params, folder / "params.yaml")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "stages/sweep.py", "--params", str(folder / "params.yaml"), "--points",
         str(folder / "points"), "--out", str(folder / "out")],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"sweep in {folder} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp"])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = parser.parse_args(argv)
    base = YAML(typ="safe", pure=True).load((REPO / "sweeps/params.yaml").read_text())
    base["grid"].update(model=args.models, seed=args.seeds)
    base["train"].update(epochs=args.epochs, checkpoint_every=args.epochs)
    n = len(base["grid"]["model"]) * len(base["grid"]["lr"]) * len(base["grid"]["batch_size"]) * len(args.seeds)

    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server, url = None, env.get("PREFECT_API_URL", "")
    if not (url and api_reachable(url)):
        port = free_port()
        server, url = start_prefect_server(port), f"http://127.0.0.1:{port}/api"
    env["PREFECT_API_URL"] = url
    rows, tables = [], {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            params = {**base, "sweep": {"executor": "local", "scheduler": "", "workers": 2}}
            wall = run_sweep(params, Path(tmp) / "local", env)
            tables["one process"] = pd.read_parquet(Path(tmp) / "local/out/points.parquet")
            rows.append(["one process", 0.0, wall, wall])
            print(f"one process: {wall:.1f} s", flush=True)
            for workers in (1, 2):
                start = time.perf_counter()
                with local_cluster(REPO / "sweeps/params.yaml", workers=workers) as (address, _):
                    startup = time.perf_counter() - start
                    params = {**base, "sweep": {"executor": "dask", "scheduler": address, "workers": 2}}
                    wall = run_sweep(params, Path(tmp) / f"dask{workers}", env)
                label = f"scheduler + {workers} worker(s)"
                tables[label] = pd.read_parquet(Path(tmp) / f"dask{workers}/out/points.parquet")
                rows.append([label, startup, wall, startup + wall])
                print(f"{label}: start-up {startup:.1f} s, sweep {wall:.1f} s", flush=True)
    finally:
        if server is not None:
            stop_process(server)
    reference = tables["one process"]
    same = {label: table.equals(reference) for label, table in tables.items()}
    local_total = rows[0][3]
    print()
    print(
        markdown_table(
            [
                "where",
                "points",
                "worker start-up s",
                "sweep stage s",
                "total s",
                "points/s",
                "total / one process",
                "same bits",
            ],
            [
                [
                    label,
                    n,
                    f"{startup:.1f}",
                    f"{wall:.1f}",
                    f"{total:.1f}",
                    f"{n / total:.3f}",
                    f"{total / local_total:.2f}",
                    "yes" if same[label] else "NO",
                ]
                for label, startup, wall, total in rows
            ],
        )  # fmt: skip
    )
    overhead = (rows[1][2] - rows[0][2]) / n
    print(f"\nper point, one worker against one process (sweep stage only): {overhead:+.2f} s")
    if not all(same.values()):
        sys.exit("error: the cluster's points differ from the in-process points")


if __name__ == "__main__":
    main()
