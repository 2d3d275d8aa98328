"""The surface scan on a Dask LocalCluster (prefect-dask) against the same scan in one process.

    .venv/bin/python benchmarks/dask_grid.py [--points 21] [--workers 2] [--tile-size 64] [--runs mlp resnet20]

Runs ``stages/surface.py`` for each run twice, once with ``landscape.executor: local`` and once with ``executor:
dask`` (a LocalCluster of ``--workers`` single-threaded processes on 127.0.0.1, each with cores / workers torch
threads), on a ``points`` x ``points`` grid of the probe set around the trained weights (``make run`` first), into a
temporary folder. Reports grid points per second of the tile loop (from the stage's ``surface_metrics.json``: after
the cluster is up, so it compares evaluation throughput) and the wall-clock time of the whole stage (process,
Prefect, cluster start-up and shut-down included), and checks that both tables agree. Both stages report to one
Prefect server (a running one, or one started here), as Dask workers must.
"""

from __future__ import annotations

from common import REPO, markdown_table

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from ruamel.yaml import YAML

from pipeline.cli import start_prefect_server, stop_process
from pipeline.flows.runtime import api_reachable


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_stage(run: str, params: dict, folder: Path, env: dict) -> tuple[float, dict, pd.DataFrame]:
    folder.mkdir(parents=True)
    YAML(typ="safe", pure=True).dump(params, folder / "params.yaml")
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "stages/surface.py",
            "--params",
            str(folder / "params.yaml"),
            "--run",
            run,
            "--tables",
            str(folder / "tables"),
            "--work",
            str(folder / "tiles"),
            "--figures",
            str(folder / "figures"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"surface@{run} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((folder / "tables" / "surface_metrics.json").read_text())
    return wall, metrics, pd.read_parquet(folder / "tables" / "surface_2d.parquet")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=21, help="grid points per axis (odd)")
    parser.add_argument("--workers", type=int, default=2, help="Dask LocalCluster processes")
    parser.add_argument("--tile-size", type=int, default=64, help="points per tile (task), the same for both")
    parser.add_argument("--runs", nargs="+", default=["mlp", "resnet20"])
    args = parser.parse_args(argv)
    base = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())
    for run in args.runs:
        if not (REPO / "artifacts" / "checkpoints" / run).is_dir():
            raise SystemExit(f"artifacts/checkpoints/{run}: missing; run `make run` first")

    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = None
    url = env.get("PREFECT_API_URL") or "http://127.0.0.1:4200/api"
    if not api_reachable(url):
        port = _free_port()
        server = start_prefect_server(port)
        url = f"http://127.0.0.1:{port}/api"
    env["PREFECT_API_URL"] = url
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for run in args.runs:
                results = {}
                for executor in ("local", "dask"):
                    params = json.loads(json.dumps(base))
                    params["landscape"].update(
                        {
                            "surface_points": args.points,
                            "tile_size": args.tile_size,
                            "executor": executor,
                            "workers": args.workers,
                            "scheduler": "",
                        }
                    )
                    results[executor] = run_stage(run, params, Path(tmp) / f"{run}-{executor}", env)
                    print(
                        f"{run} {executor}: {results[executor][1]['points_per_second']:.1f} points/s, "
                        f"stage {results[executor][0]:.1f} s",
                        flush=True,
                    )
                (wall_l, m_l, t_l), (wall_d, m_d, t_d) = results["local"], results["dask"]
                difference = float(((t_d.loss - t_l.loss).abs() / t_l.loss.abs()).max())
                rows.append(
                    [
                        run,
                        f"{args.points}x{args.points}",
                        m_l["chunk"],
                        f"{m_l['points_per_second']:.1f}",
                        f"{m_d['points_per_second']:.1f}",
                        f"{m_d['points_per_second'] / m_l['points_per_second']:.2f}x",
                        f"{wall_l:.1f}",
                        f"{wall_d:.1f}",
                        f"{wall_l / wall_d:.2f}x",
                        f"{difference:.1e}",
                    ]
                )
    finally:
        if server is not None:
            stop_process(server)
    print()
    print(
        markdown_table(
            [
                "model",
                "grid",
                "chunk",
                "one process points/s",
                f"Dask x{args.workers} points/s",
                "throughput ratio",
                "one process stage s",
                "Dask stage s",
                "stage speed-up",
                "max rel. difference",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
