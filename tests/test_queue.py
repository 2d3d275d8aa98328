"""Experiments in parallel: ``dvc queue start -j 2`` on a queued grid, on a stand-in pipeline whose stage is a Prefect
flow set up as the project's stages are (:func:`pipeline.flows.runtime.configure_prefect`).

Queued experiments run in temporary copies of the repository (``.dvc/tmp/exps/...``), where the project's server
registry (``.prefect/server.json``) is not: ``PREFECT_API_URL`` in the environment of ``dvc queue start`` reaches
the queue's workers and every stage in them, so all experiments report to the one server outside the copies.
"""

import json
import os
import re
import subprocess
import textwrap
import urllib.request

from test_compare import BIN, queue_status_when_done, run, standin_repo, start_queue

STAGE = textwrap.dedent("""
    import json, os, pathlib, time
    from ruamel.yaml import YAML
    from pipeline.flows.runtime import configure_prefect
    url = configure_prefect()
    from prefect import flow

    @flow(name="standin")
    def standin(lr: float) -> None:
        time.sleep(3)  # long enough for two experiments to overlap
        out = pathlib.Path("reports"); out.mkdir(exist_ok=True)
        json.dump({"lr": lr, "accuracy": 0.5 + lr * 0.3, "started": started}, open(out / "metrics.json", "w"))

    started = time.time()
    lr = YAML(typ="safe").load(open("params.yaml"))["train"]["lr"]
    name = os.environ.get("DVC_EXP_NAME", "workspace")
    standin.with_options(flow_run_name=f"standin-{name}")(lr)
    print("reported to", url)
""")
DVC_YAML = textwrap.dedent("""
    stages:
      standin:
        cmd: python stage.py
        deps: [stage.py]
        params: [train]
        metrics: [reports/metrics.json]
""")


def test_two_queued_experiments_run_at_once_and_report_to_one_server(server, tmp_path):
    files = {"stage.py": STAGE, "dvc.yaml": DVC_YAML, "params.yaml": "train:\n  lr: 0.1\n", ".gitignore": "/reports/\n"}
    root = standin_repo(tmp_path / "repo", files)
    dvc = str(BIN / "dvc")
    queued = run(root, dvc, "exp", "run", "--queue", "-S", "train.lr=0.2,0.3,0.4,0.5")
    names = re.findall(r"Queued experiment '([^']+)'", queued.stdout)
    assert len(names) == 4
    os.environ["PREFECT_API_URL"] = server  # `run` passes os.environ on: `dvc queue start` and its workers get it
    try:
        start_queue(root, 2)
        status = queue_status_when_done(root, 300)
        assert status.count("Success") == 4, status
    finally:
        os.environ.pop("PREFECT_API_URL")
        run(root, dvc, "queue", "stop", check=False)

    wanted = [f"standin-{name}" for name in names]  # the server's database may hold other tests' runs too
    request = urllib.request.Request(
        f"{server}/flow_runs/filter",
        data=json.dumps({"flow_runs": {"name": {"any_": wanted}}, "limit": 50}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        flow_runs = json.load(response)
    assert sorted(r["name"] for r in flow_runs) == sorted(wanted)  # each experiment's flow run, on this one server
    assert all(r["state_type"] == "COMPLETED" for r in flow_runs)
    spans = sorted(
        (_time(r["start_time"]), _time(r["end_time"])) for r in flow_runs
    )  # two workers: some runs overlap in time
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans

    shown = json.loads(run(root, dvc, "exp", "show", "--json").stdout)
    metrics = {
        rev["name"]: rev["data"]["metrics"]["reports/metrics.json"]["data"]
        for commit in shown
        for exp in commit.get("experiments") or []
        for rev in exp["revs"]
    }
    assert sorted(m["lr"] for m in metrics.values()) == [0.2, 0.3, 0.4, 0.5]


def _time(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_the_stand_in_stage_runs_here_too(server, tmp_path):
    """The stage outside a queue: it reports to the server of ``PREFECT_API_URL`` (no copy, no experiment name)."""
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.1\n")
    (tmp_path / "stage.py").write_text(STAGE)
    done = subprocess.run(
        [str(BIN / "python"), "stage.py"],
        cwd=tmp_path,
        env={**os.environ, "PREFECT_API_URL": server},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"reported to {server}" in done.stdout
