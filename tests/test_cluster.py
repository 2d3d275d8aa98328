"""The flatness sweep on a real Dask cluster, as on several machines: a ``dask scheduler`` and two ``landscape
worker`` processes (each its own process and environment, one thread, no ``PREFECT_API_URL``) on 127.0.0.1, a Prefect
server, and the sweep stage pointed at the scheduler's address.

- the points computed on the workers are the same bits as the in-process sweep's, and a rerun reuses them;
- a worker killed with SIGKILL mid-point: Dask runs the point again on a worker, the sweep completes with every
  point, still the same bits;
- the Prefect API lists one task run per point under the sweep's flow run (the workers report through the settings
  Prefect sends with each task);
- a worker that cannot import the project, runs other code or kernels, does not see the points folder or cannot
  reach the API is refused before any point is sent, in one line naming the worker.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from chromium import chromium_binary, dump_dom
from conftest import REPO, dask_cluster
from ruamel.yaml import YAML

from pipeline.config import ConfigError
from pipeline.flows.runtime import free_port
from pipeline.sweep.cluster import ClusterError, _probe, check_cluster, worker_identity, worker_problems
from pipeline.sweep.grid import parse_sweep_params

POINTS = ["mlp-lr0.02-bs16-s0", "mlp-lr0.02-bs32-s0", "mlp-lr0.05-bs16-s0", "mlp-lr0.05-bs32-s0"]


def sweep_params(path: Path, **sweep) -> Path:
    """The sweep preset at a tiny size: 4 MLP points of 3 epochs on 240 synthetic samples."""
    yaml = YAML(typ="safe", pure=True)
    params = yaml.load((REPO / "sweeps/params.yaml").read_text())
    params["data"].update(dataset="synthetic", synthetic_samples=240, probe_size=32)
    params["model"].update(mlp_depth=1, mlp_width=16)
    params["train"].update(epochs=3, checkpoint_every=3, device="cpu")
    params["hessian"].update(
        max_hvps=40, trace_hvps=8, flatness_steps=2, pac_bayes_draws=2, adaptive_m=16, adaptive_draws=2
    )
    params["hessian"].update(batch_size=32, device="cpu")
    params["grid"] = {"model": ["mlp"], "lr": [0.02, 0.05], "batch_size": [16, 32], "seed": [0]}
    params["sweep"] = {"executor": "local", "scheduler": "", "workers": 2, **sweep}
    yaml.dump(params, path)
    return path


def run_sweep(params: Path, folder: Path, env: dict, wait: bool = True):
    command = [sys.executable, "stages/sweep.py", "--params", str(params), "--points", str(folder / "points")]
    command += ["--out", str(folder / "out")]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)


def api(url: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def flow_run_of(output: str) -> str:
    """The id of the sweep's flow run, from the stage's own "View at .../runs/flow-run/<id>" line (the server's
    database may hold other tests' runs, newer ones among them)."""
    return re.search(r"/runs/flow-run/([0-9a-f-]{36})", output).group(1)


def task_runs(url: str, flow_run: str) -> dict[str, str]:
    """``{task run name: state}`` of ``flow_run``."""
    runs = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run]}}, "limit": 200})
    return {run["name"]: run["state_type"] for run in runs}


@pytest.fixture(scope="module")
def env(server):
    return {**os.environ, "PREFECT_API_URL": server}


@pytest.fixture(scope="module")
def local(tmp_path_factory, env):
    """The in-process sweep: the reference table."""
    folder = tmp_path_factory.mktemp("local")
    result = run_sweep(sweep_params(folder / "params.yaml"), folder, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return pd.read_parquet(folder / "out/points.parquet")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    params = sweep_params(tmp_path_factory.mktemp("cluster") / "params.yaml")
    with dask_cluster(params, workers=2) as (address, processes):
        yield address, processes


@pytest.fixture(scope="module")
def on_cluster(cluster, env, server, tmp_path_factory):
    """The sweep on the scheduler: its folder, its process, and its flow run's id."""
    address, _ = cluster
    folder = tmp_path_factory.mktemp("on_cluster")
    params = sweep_params(folder / "params.yaml", executor="dask", scheduler=address)
    result = run_sweep(params, folder, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, params, result, flow_run_of(result.stdout + result.stderr)


def test_the_sweep_on_a_scheduler_is_the_in_process_sweep_bitwise(local, cluster, on_cluster, env, server):
    address, _ = cluster
    folder, params, result, flow_run = on_cluster
    assert f"sweep: 2 Dask worker(s) at {address} checked" in result.stdout
    assert "Connecting to an existing Dask cluster" in result.stderr
    on_dask = pd.read_parquet(folder / "out/points.parquet")
    assert list(on_dask.experiment) == POINTS and (on_dask.status == "completed").all()
    pd.testing.assert_frame_equal(on_dask, local)  # every measure, the same bits
    assert task_runs(server, flow_run) == {
        **{name: "COMPLETED" for name in POINTS},
        "aggregate": "COMPLETED",
    }

    again = run_sweep(params, folder, env)  # finished points are never recomputed
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 already measured" in again.stderr
    assert all(f"{name}: reusing" in again.stderr for name in POINTS)
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "out/points.parquet"), local)


@pytest.mark.skipif(chromium_binary() is None, reason="Debian's chromium is not installed: no browser")
def test_the_prefect_ui_shows_the_points_the_workers_ran(on_cluster, server):
    """Prefect issue #19925 (task runs on a remote Dask cluster missing from the UI) does not hold here: the flow
    run's page counts every task run the workers ran (its timeline, drawn on a canvas, names them; its log list
    loads lazily, so the names in the DOM are not a count)."""
    _, _, _, flow_run = on_cluster
    dom = dump_dom(f"{server.removesuffix('/api')}/runs/flow-run/{flow_run}", wait_ms=60_000, height=4000)
    assert f">{len(POINTS) + 1} Task runs<" in dom  # the four points and the aggregate
    assert "Completed" in dom and any(name in dom for name in POINTS)  # the points' own log lines


def test_a_worker_killed_mid_point_loses_no_point(local, cluster, env, server, tmp_path):
    from distributed import Client

    address, _ = cluster
    params = sweep_params(tmp_path / "params.yaml", executor="dask", scheduler=address)
    sweep = run_sweep(params, tmp_path, env, wait=False)
    killed = None
    with Client(address, timeout=30, set_as_default=False) as client:
        deadline = time.monotonic() + 180
        while killed is None and time.monotonic() < deadline and sweep.poll() is None:
            busy = [worker for worker, keys in client.processing().items() if keys]
            started = [p for p in (tmp_path / "points").glob("*/checkpoints/*") if p.is_file()]
            if busy and started:  # a point is training on `busy[0]`: kill its worker process
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed = busy[0]
            time.sleep(0.05)
        stdout, stderr = sweep.communicate(timeout=600)
        assert killed is not None, "no point was seen running"
        client.wait_for_workers(2, timeout=120)  # the nanny started a new worker process
    assert sweep.returncode == 0, stderr[-3000:]
    on_dask = pd.read_parquet(tmp_path / "out/points.parquet")
    assert (on_dask.status == "completed").all() and len(on_dask) == 4
    pd.testing.assert_frame_equal(on_dask, local)  # the lost point ran again from its checkpoints: the same bits
    assert set(task_runs(server, flow_run_of(stdout + stderr))) == {*POINTS, "aggregate"}


def _shadow_project(folder: Path) -> Path:
    """A ``pipeline`` package that fails to import, first on a worker's path (a broken checkout)."""
    (folder / "pipeline").mkdir(parents=True)
    (folder / "pipeline/__init__.py").write_text("raise ImportError('broken checkout')\n")
    return folder


def test_a_worker_that_cannot_run_points_is_refused_in_one_line(env, server, tmp_path):
    shadow = _shadow_project(tmp_path / "shadow")

    def plain_worker(address):
        return [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-dashboard",
                "--host", "127.0.0.1"]  # fmt: skip

    broken = {**env, "PYTHONPATH": str(shadow)}
    params = sweep_params(tmp_path / "params.yaml")
    with dask_cluster(params, 1, broken, plain_worker, cwd=tmp_path) as (address, _):  # not in the checkout
        params = sweep_params(tmp_path / "params.yaml", executor="dask", scheduler=address)
        result = run_sweep(params, tmp_path, env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: sweep.scheduler {address}: worker tcp://127.0.0.1:")
    assert "cannot import the project (ImportError: broken checkout); install it there" in result.stderr
    assert not list((tmp_path / "points").glob("*/result.json"))


def test_every_worker_is_asked_what_it_has(cluster, server, tmp_path):
    """The probe on the real workers: the project, its kernels, the folder, the API; then the reasons to refuse."""
    from distributed import Client

    address, _ = cluster
    marker = tmp_path / "marker"
    marker.touch()
    with Client(address, timeout=30, set_as_default=False) as client:
        reports = client.run(_probe(), server, str(marker))
        elsewhere = client.run(_probe(), f"http://127.0.0.1:{free_port()}/api", str(tmp_path / "absent"))
    expected = worker_identity()
    assert len(reports) == 2
    for report in reports.values():
        assert {k: report[k] for k in expected} == expected and report["sees_folder"] and report["api"] == "ok"
    assert worker_problems(reports, expected, server) == []
    problems = worker_problems(elsewhere, expected, "http://elsewhere/api")
    assert len(problems) == 4
    assert sum("does not see the points folder" in p for p in problems) == 2
    assert sum("cannot reach the Prefect API at http://elsewhere/api" in p for p in problems) == 2

    one = next(iter(reports))
    stale = {one: {**reports[one], "code": "0" * 64, "kernel_level": "AVX512", "kernels_pinned": "false"}}
    lines = worker_problems(stale, expected, server)
    assert len(lines) == 2 and "runs other training or measure code" in lines[0]
    assert "has other CPU kernels (kernel_level AVX512, kernels_pinned false;" in lines[1]
    assert "start it with `landscape worker`" in lines[1]

    assert check_cluster(address, tmp_path / "points", server) == sorted(reports)
    assert not list((tmp_path / "points").iterdir())  # the marker is removed


def test_no_scheduler_and_bad_settings_are_one_line():
    with pytest.raises(ClusterError, match=r"^sweep.scheduler: no Dask scheduler answers at tcp://127.0.0.1:\d+"):
        check_cluster(f"tcp://127.0.0.1:{free_port()}", "/tmp", None, timeout=2)
    base = {"grid": {"model": ["mlp"]}, "hessian": {"checkpoints": "final", "details": "final"}}
    for sweep, message in (
        ({"executor": "local", "scheduler": "tcp://h:1"}, "sweep.scheduler: is read only with executor: dask"),
        ({"executor": "dask", "scheduler": "h:8786"}, "sweep.scheduler: expected a Dask address like tcp://HOST"),
        ({"executor": "slurm"}, "sweep.executor: unknown name 'slurm'; allowed: local, dask"),
        ({"workers": 0}, "sweep.workers: must be >= 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_sweep_params({**base, "sweep": sweep})
    assert parse_sweep_params({**base, "sweep": {"executor": "dask", "scheduler": "tcp://h:1"}}).sweep.scheduler
