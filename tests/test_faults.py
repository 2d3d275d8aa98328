"""Faults end in one line or are survived: errors raised inside a flow, SIGINT/SIGTERM, the parent (``dvc``) dying,
the Prefect server going away mid-stage, and a stranger's server on the default port.

Each stage runs as a real subprocess on a tiny project in a temporary folder, as DVC runs it.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipeline.flows import runtime

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages"


def _params(folder: Path, *, epochs: int = 400, probe_size: int = 64) -> Path:
    text = (REPO / "params.yaml").read_text()
    text = text[: text.index("\nruns:")] + f"\nruns:\n  mlp:\n    model: mlp\n    epochs: {epochs}\n"
    text = text.replace("probe_size: 512 ", f"probe_size: {probe_size} ")
    (folder / "params.yaml").write_text(text)
    return folder / "params.yaml"


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "LANDSCAPE_DEBUG")}
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


def _stage(folder: Path, name: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(STAGES / f"{name}.py"), "--params", "params.yaml", *args],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project with its data prepared (the MLP trains for long enough to be interrupted)."""
    folder = tmp_path_factory.mktemp("faults")
    _params(folder)
    done = subprocess.run(
        [sys.executable, str(STAGES / "prepare.py"), "--params", "params.yaml", "--out", "artifacts/data"],
        cwd=folder,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return folder


def _wait_for(process: subprocess.Popen, text: str, timeout: float = 120.0) -> str:
    """Read ``process``'s output until a line contains ``text``; returns what was read."""
    seen, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        seen.append(line)
        if text in line or time.monotonic() > deadline:
            break
    return "".join(seen)


def _train(project: Path, **popen) -> subprocess.Popen:
    return _stage(
        project,
        "train",
        "--run",
        "mlp",
        "--checkpoints",
        "artifacts/checkpoints/mlp",
        "--tables",
        "reports/tables/mlp",
        **popen,
    )


def test_an_error_raised_inside_a_flow_prints_one_line(tmp_path):
    _params(tmp_path, probe_size=99999)  # passes the params check; found by prepare_dataset, inside the flow
    done = subprocess.run(
        [sys.executable, str(STAGES / "prepare.py"), "--params", "params.yaml", "--out", "out"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output and "DataError" not in output
    assert [line for line in output.splitlines() if "error" in line.lower()] == [
        "error: data.probe_size: 99999 requested but the train split of digits has only 1347 samples; use <= 1347"
    ]
    assert not (tmp_path / "out").exists()
    debug = subprocess.run(
        [sys.executable, str(STAGES / "prepare.py"), "--params", "params.yaml", "--out", "out"],
        cwd=tmp_path,
        env=_env(LANDSCAPE_DEBUG="1"),
        capture_output=True,
        text=True,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # the debug switch shows where


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_stage_within_seconds_with_its_children(project, signum):
    stage = _train(project, env=_env())
    _wait_for(stage, "epoch 3/")
    children = psutil.Process(stage.pid).children(recursive=True)  # the temporary Prefect server of ephemeral mode
    sent = time.monotonic()
    stage.send_signal(signum)
    rest = stage.communicate(timeout=30)[0]
    assert time.monotonic() - sent < 8.0  # typically 1 s; the watchdog ends it after STOP_GRACE_SECONDS regardless
    assert stage.returncode == 128 + signum
    assert f"error: stopped by {signal.Signals(signum).name}; finished work is kept" in rest
    assert "Traceback" not in rest and "Crash detected" not in rest
    time.sleep(0.5)
    assert not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not list((project / "artifacts" / "checkpoints" / "mlp").glob(".*tmp"))  # nothing half-written


def test_the_stage_ends_when_its_parent_does(project):
    """``dvc`` killed under its stage: the kernel's parent-death signal ends the stage too (no orphan)."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import subprocess, sys, time\n"
                f"child = subprocess.Popen([sys.executable, {str(STAGES / 'train.py')!r}, '--params', 'params.yaml', "
                "'--run', 'mlp', '--checkpoints', 'artifacts/checkpoints/mlp', '--tables', 'reports/tables/mlp'], "
                "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                "print(child.pid, flush=True)\n"
                "time.sleep(600)\n"
            ),
        ],
        cwd=project,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    stage = psutil.Process(int(parent.stdout.readline()))
    time.sleep(8.0)  # well into training
    parent.kill()
    parent.wait()
    stage.wait(timeout=10)  # raises psutil.TimeoutExpired if the stage outlives its parent


def test_losing_the_prefect_server_mid_stage_ends_in_seconds_with_one_line(project):
    port = runtime.free_port()
    server = runtime.start_prefect_server(port)
    try:
        stage = _train(project, env=_env(PREFECT_API_URL=f"http://127.0.0.1:{port}/api"))
        _wait_for(stage, "epoch 3/")
    finally:
        runtime.stop_process(server, timeout=5)
    # The stage goes on without the server and finishes its epochs (their pace depends on the machine and its
    # load), then ends: within seconds of its last epoch, not after minutes of retries.
    lines, last_epoch, deadline = [], None, time.monotonic() + 300
    for line in stage.stdout:
        lines.append(line)
        if "epoch 400/400" in line:
            last_epoch = time.monotonic()
        assert time.monotonic() < deadline, "the stage did not end"
    stage.wait(timeout=60)
    rest = "".join(lines)
    assert last_epoch is not None and time.monotonic() - last_epoch < 30.0, rest[-2000:]
    assert stage.returncode == 1 and "Traceback" not in rest and "ConnectError(" not in rest
    problems = [line for line in rest.splitlines() if "error" in line.lower() or "warning" in line.lower()]
    url = f"http://127.0.0.1:{port}/api"
    assert problems[-1] == (
        f"error: the Prefect server at {url} went away mid-stage; finished work is kept "
        "(checkpoints, tiles, points), a rerun resumes"
    )
    assert len(problems) <= 2 and all(url in line for line in problems)


def test_a_log_send_that_finds_the_server_gone_says_so_once(monkeypatch, capsys):
    """Prefect's log sender is often the first to find the server gone: that is the one warning line, not its own
    ``--- Error logging to API ---`` for every batch (a race the end-to-end test above only sometimes hits)."""
    import asyncio
    import logging

    import httpx
    from prefect.logging.handlers import APILogWorker

    monkeypatch.setattr(runtime, "SERVER_LOST", [])
    monkeypatch.setattr(logging, "raiseExceptions", True)
    monkeypatch.setattr(APILogWorker, "_handle_batch", APILogWorker._handle_batch)  # restored after the test
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.delenv("LANDSCAPE_DEBUG", raising=False)
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    for logger in loggers:  # the lost server takes Prefect's API log handlers off them: put them back after
        monkeypatch.setattr(logger, "handlers", list(getattr(logger, "handlers", [])), raising=False)
    runtime.quiet_user_errors_on_console()

    class Client:
        calls = 0

        async def request(self, *args, **kwargs):
            Client.calls += 1
            raise httpx.ConnectError("All connection attempts failed")

    worker = APILogWorker.__new__(APILogWorker)
    worker._client = Client()
    for _ in range(3):
        asyncio.run(worker._handle_batch([b'{"message": "x"}']))
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "warning: the Prefect server at http://127.0.0.1:9/api went away (ConnectError); the stage goes on without it"
    ]
    assert Client.calls == 1  # the batches after it are dropped, not sent to a server known to be gone


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_stages_report_only_to_this_projects_server(tmp_path, monkeypatch):
    stranger = http.server.HTTPServer(("127.0.0.1", 0), _Health)  # answers /api/health like a Prefect server
    threading.Thread(target=stranger.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{stranger.server_port}/api"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    try:
        assert runtime.api_reachable(url)
        assert runtime.project_server() is None  # no registry: nothing is probed, ephemeral mode
        (tmp_path / ".prefect").mkdir()
        (tmp_path / ".prefect" / "server.json").write_text(json.dumps({"url": url, "pid": 2**22 + 12345}))
        assert runtime.project_server() is None  # the recorded server's process is gone: a stranger took the port
        (tmp_path / ".prefect" / "server.json").write_text(json.dumps({"url": url, "pid": os.getpid()}))
        assert runtime.project_server() == url  # this project's (live) server
        monkeypatch.setenv("PREFECT_API_URL", url)
        assert runtime.configure_prefect() == url  # explicit PREFECT_API_URL wins
    finally:
        stranger.shutdown()
