"""One pipeline run in the Prefect UI (:mod:`pipeline.flows.chain`): the tags every stage's runs carry, the skipped
stages recorded as Cached, and DVCLive's metrics of a running queued experiment in ``dvc exp show``.

The first tests are Prefect-free (the tags, names and DVC's graph); the stand-in pipeline below has two stages whose
commands are Prefect flows set up as the project's are (:func:`pipeline.flows.runtime.configure_prefect`), the
second logging its epochs through :class:`pipeline.live.EpochLog`, and runs under ``dvc repro``, ``landscape run``'s
finish and a queued experiment against one server, found out through its API.
"""

import json
import os
import re
import subprocess
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from test_compare import BIN, queue_status_when_done, run, standin_repo, start_queue

from pipeline.flows import chain
from pipeline.flows.runtime import free_port

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ Prefect-free


def test_the_pipeline_run_id_is_the_override_else_the_dvc_process_else_none():
    assert chain.pipeline_run_id({chain.PIPELINE_RUN_ENV: "abc123", "DVC_STAGE": "x"}, "1:2") == "abc123"
    assert chain.pipeline_run_id({}, "1:2.000") is None  # not a DVC stage: no pipeline run
    one = chain.pipeline_run_id({"DVC_STAGE": "train@mlp"}, "4242:1700000000.125")
    assert re.fullmatch(r"[0-9a-f]{12}", one)
    assert chain.pipeline_run_id({"DVC_STAGE": "hessian@mlp"}, "4242:1700000000.125") == one  # same dvc process
    assert chain.pipeline_run_id({"DVC_STAGE": "train@mlp"}, "4242:1700000099.000") != one  # a reused pid is not
    assert chain.dvc_process_key() is None  # pytest runs under no dvc process


def test_run_tags_name_the_run_revision_experiment_and_stage(tmp_path):
    queued = {
        "DVC_STAGE": "train@mlp",
        "DVC_EXP_NAME": "sunny-fish",
        "DVC_EXP_BASELINE_REV": "0123456789abcdef0123",
        "DVC_ROOT": str(tmp_path),
    }
    assert chain.run_tags(queued, "r1") == ["pipeline-run:r1", "rev:0123456789ab", "exp:sunny-fish", "stage:train@mlp"]
    assert chain.run_tags({"DVC_ROOT": str(tmp_path)}) == ["rev:unknown"]  # outside git, outside DVC
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f").write_text("1")
    subprocess.run([*git, "add", "f"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "f"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert chain.run_tags({"DVC_ROOT": str(tmp_path), "DVC_STAGE": "s"}) == [f"rev:{head[:12]}", "stage:s"]
    (tmp_path / "f").write_text("2")  # a tracked file edited: the run is not of that commit alone
    assert chain.git_revision(tmp_path) == f"{head[:12]}-dirty"
    (tmp_path / "f").write_text("1")
    (tmp_path / "untracked").write_text("")
    assert chain.git_revision(tmp_path) == head[:12]
    for written in ("dvc.lock", ".gitignore", "sub/dvc.lock"):  # what dvc repro writes as it runs stages
        (tmp_path / written).parent.mkdir(exist_ok=True)
        (tmp_path / written).write_text("a")
        subprocess.run([*git, "add", written], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "dvc"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout
    for written in ("dvc.lock", ".gitignore", "sub/dvc.lock"):
        (tmp_path / written).write_text("b")
    assert chain.git_revision(tmp_path) == head[:12]


def test_flow_names_name_the_flow_each_stage_runs():
    assert chain.flow_names("train@mlp") == ("train", "train-mlp")
    assert chain.flow_names("landscape_figures") == ("landscape-figures", "landscape-figures")
    assert chain.flow_names("sweeps/dvc.yaml:sweep") == ("sweep", "sweep")
    sources = "".join(p.read_text() for p in (ROOT / "pipeline/flows").glob("*.py"))
    defined = set(re.findall(r'@pipeline_flow\(name="([^"]+)"', sources))
    assert "@flow(" not in sources  # every flow of the project is a pipeline_flow: its runs carry the run's tags
    stages = re.findall(r"^  (\w+):", (ROOT / "dvc.yaml").read_text(), flags=re.M) + ["sweep"]
    assert {chain.flow_names(s)[0] for s in stages} <= defined  # a skipped stage is recorded under its own flow


def test_stage_graph_gives_each_stage_everything_upstream_of_it(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(
        textwrap.dedent("""
        stages:
          a:
            cmd: echo a > a.txt
            outs: [a.txt]
          b:
            foreach: [x, y]
            do:
              cmd: cat a.txt > b-${item}.txt
              deps: [a.txt]
              outs:
                - b-${item}.txt
          c:
            cmd: cat b-x.txt b-y.txt > c.txt
            deps: [b-x.txt, b-y.txt]
            outs: [c.txt]
          lone:
            cmd: echo > lone.txt
            outs: [lone.txt]
        """)
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/dvc.yaml").write_text("stages:\n  d:\n    wdir: ..\n    cmd: cat c.txt > d\n    deps: [c.txt]\n")
    graph = chain.stage_graph(tmp_path)
    assert graph == {
        "a": set(),
        "b@x": {"a"},
        "b@y": {"a"},
        "c": {"a", "b@x", "b@y"},
        "lone": set(),
        "sub/dvc.yaml:d": {"a", "b@x", "b@y", "c"},
    }
    assert chain.stage_graph(tmp_path, ["c"]) == {s: graph[s] for s in ("a", "b@x", "b@y", "c")}  # (dvc repro c)
    assert chain.unrecorded(graph["c"], ["b@y", "elsewhere"]) == ["a", "b@x"]


def test_joining_fails_in_one_warning_line_never_in_the_stage(tmp_path, monkeypatch, capsys):
    """No server at the URL and no DVC repository here: the stage is tagged and goes on, with one warning line."""
    monkeypatch.chdir(tmp_path)
    environ = {chain.PIPELINE_RUN_ENV: "r9", "DVC_STAGE": "second", "DVC_ROOT": str(tmp_path)}
    try:
        tags = chain.join_pipeline_run(f"http://127.0.0.1:{free_port()}/api", environ)
        assert chain.current_run_tags() == tags  # every flow run this process starts gets them
    finally:
        chain.set_run_tags([])
    assert tags == ["pipeline-run:r9", "rev:unknown", "stage:second"]
    warning = capsys.readouterr().out.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: skipped stages not recorded in Prefect ("), warning


# ------------------------------------------------------------------------------------ the stand-in pipeline

FIRST = textwrap.dedent("""
    from pipeline.flows.runtime import configure_prefect
    configure_prefect()
    from pipeline.flows.chain import pipeline_flow

    @pipeline_flow(name="first", flow_run_name="first")
    def first() -> None:
        open("first.txt", "w").write("made by first\\n")

    first()
""")
SECOND = textwrap.dedent("""
    import json, math, pathlib, time
    from ruamel.yaml import YAML
    from pipeline.flows.runtime import configure_prefect
    configure_prefect()
    from prefect import task
    from pipeline.flows.chain import pipeline_flow
    from pipeline.live import EpochLog

    @task
    def epoch(lr: float, e: int) -> dict:
        time.sleep(train["sleep"])
        decay = math.exp(-lr * e)
        return {"scope": "epoch", "epoch": e, "train_loss": 2.0 * decay, "test_loss": 2.1 * decay,
                "train_accuracy": 1 - decay, "test_accuracy": 0.9 * (1 - decay), "lr": lr,
                "batch_loss": 2.0 * decay if e else math.nan, "grad_norm": 1.0 if e else math.nan,
                "param_norm": 3.0}

    @pipeline_flow(name="second", flow_run_name="second")
    def second() -> None:
        live = EpochLog("live")
        for e in range(train["epochs"] + 1):
            live.log(epoch(train["lr"], e))
        live.close()

    train = YAML(typ="safe").load(open("params.yaml"))["train"]
    second()
""")
DVC_YAML = textwrap.dedent("""
    stages:
      first:
        cmd: python first.py
        deps: [first.py]
        outs: [first.txt]
      second:
        cmd: python second.py
        deps: [second.py, first.txt]
        params: [train]
        metrics: [live/metrics.json]
        plots:
          - live/plots/metrics:
              x: step
""")


def _api(server: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{server}/{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _flow_runs(server: str, *tags: str) -> dict[str, dict]:
    """The flow runs with all of ``tags``, by their ``stage:`` tag (the server may hold other tests' runs too)."""
    found = _api(server, "flow_runs/filter", {"flow_runs": {"tags": {"all_": list(tags)}}, "limit": 200})
    by_stage = {}
    for flow_run in found:
        (stage,) = [t.removeprefix("stage:") for t in flow_run["tags"] if t.startswith("stage:")]
        assert stage not in by_stage, (stage, found)  # one flow run per stage and pipeline run
        by_stage[stage] = flow_run
    return by_stage


def _run_tag(flow_run: dict) -> str:
    (tag,) = [t for t in flow_run["tags"] if t.startswith("pipeline-run:")]
    return tag


@pytest.fixture
def standin(tmp_path, server):
    params = "train:\n  lr: 0.1\n  epochs: 3\n  sleep: 0.0\n"
    files = {
        "first.py": FIRST,
        "second.py": SECOND,
        "dvc.yaml": DVC_YAML,
        "params.yaml": params,
        ".gitignore": "/live/\n",
    }
    root = standin_repo(tmp_path / "repo", files)
    os.environ["PREFECT_API_URL"] = server  # `run` passes os.environ on: dvc, its stages and the queue's workers
    try:
        yield root
    finally:
        os.environ.pop("PREFECT_API_URL")


def test_one_dvc_repro_is_one_tagged_chain_and_a_skipped_stage_shows_as_cached(standin, server):
    root, dvc = standin, str(BIN / "dvc")
    head = run(root, "git", "rev-parse", "HEAD").stdout.strip()[:12]
    run(root, dvc, "repro")
    runs = _flow_runs(server, f"rev:{head}")
    assert sorted(runs) == ["first", "second"]
    one = _run_tag(runs["first"])
    assert _run_tag(runs["second"]) == one  # both stages' flow runs: one pipeline run
    assert all(r["state_name"] == "Completed" for r in runs.values())
    tasks = _api(server, "task_runs/filter", {"flow_runs": {"id": {"any_": [runs["second"]["id"]]}}, "limit": 200})
    assert len(tasks) == 4 and all(t["tags"] == [] for t in tasks)  # (a task's tags cost concurrency-slot calls)
    assert json.loads((root / "live/metrics.json").read_text())["step"] == 3  # DVCLive: step = epochs done
    loss = (root / "live/plots/metrics/train/loss.tsv").read_text().split("\n")
    assert loss[0] == "step\tloss" and [line.split("\t")[0] for line in loss[1:] if line] == ["0", "1", "2", "3"]

    params = (root / "params.yaml").read_text()  # second changes, first does not: DVC skips it
    (root / "params.yaml").write_text(params.replace("lr: 0.1", "lr: 0.2"))
    rerun = run(root, dvc, "repro")
    assert "Stage 'first' didn't change, skipping" in rerun.stdout
    again = _flow_runs(server, f"rev:{head}-dirty")
    assert sorted(again) == ["first", "second"] and _run_tag(again["first"]) == _run_tag(again["second"]) != one
    assert (again["first"]["state_type"], again["first"]["state_name"]) == ("COMPLETED", "Cached")
    assert again["second"]["state_name"] == "Completed"
    assert again["first"]["flow_id"] == runs["first"]["flow_id"]  # recorded under the stage's own flow
    assert again["first"]["state"]["message"] == chain.SKIPPED_MESSAGE and again["first"]["total_run_time"] == 0

    # `landscape run` with nothing to do: dvc repro runs no stage, then every stage is recorded under the run's id
    (root / "params.yaml").write_text(params)
    run(root, dvc, "repro")  # (back to the committed params: restored from the run cache, nothing runs)
    run_id = uuid.uuid4().hex[:12]  # (as landscape run makes it; the server's database outlives this test)
    environ = {**os.environ, chain.PIPELINE_RUN_ENV: run_id}
    assert "skipping" in subprocess.run([dvc, "repro"], cwd=root, env=environ, capture_output=True, text=True).stdout
    assert chain.finish_pipeline_run(run_id, root, ["dvc.yaml"], server) == ["first", "second"]
    cached = _flow_runs(server, f"pipeline-run:{run_id}")
    assert {s: r["state_name"] for s, r in cached.items()} == {"first": "Cached", "second": "Cached"}
    assert chain.finish_pipeline_run(run_id, root, ["dvc.yaml"], server) == []  # recorded once


def test_a_running_queued_experiment_shows_its_epoch_in_dvc_exp_show_and_its_runs_carry_its_name(standin, server):
    root, dvc = standin, str(BIN / "dvc")
    head = run(root, "git", "rev-parse", "HEAD").stdout.strip()
    run(root, dvc, "repro")  # first.txt in the cache: the experiment's copy skips first
    queued = run(root, dvc, "exp", "run", "--queue", "-S", "train.epochs=12", "-S", "train.sleep=1.5")
    (name,) = re.findall(r"Queued experiment '([^']+)'", queued.stdout)
    seen = []  # (state, step) of the experiment in `dvc exp show --json` while it runs
    try:
        start_queue(root, 1)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any(state == "running" and (step or 0) > 3 for state, step in seen):
            seen += [(state, _step(rev)) for state, rev in _exps(root) if rev["name"] == name]
            time.sleep(1)
        status = queue_status_when_done(root, 240)
        assert status.count("Success") == 1, status
    finally:
        run(root, dvc, "queue", "stop", check=False)
    # the metrics of the experiment still running, mid-training: past the 3 epochs of the copy's checked-out files
    running = [step for state, step in seen if state == "running" and step is not None]
    assert any(3 < step < 12 for step in running), seen
    assert [(state, _step(rev)) for state, rev in _exps(root) if rev["name"] == name] == [("success", 12)]

    runs = _flow_runs(server, f"exp:{name}")
    assert sorted(runs) == ["first", "second"] and _run_tag(runs["first"]) == _run_tag(runs["second"])
    assert f"rev:{head[:12]}" in runs["second"]["tags"]  # the experiment's baseline commit
    assert (runs["first"]["state_name"], runs["second"]["state_name"]) == ("Cached", "Completed")
    plots = json.loads(run(root, dvc, "plots", "show", "--json").stdout)
    assert not plots.get("errors") and any("train/loss.tsv" in key for key in plots["data"]), plots.get("errors")


def _exps(root) -> list[tuple[str | None, dict]]:
    """(executor state, rev) of every experiment in `dvc exp show --json`."""
    shown = json.loads(run(root, str(BIN / "dvc"), "exp", "show", "--json").stdout)
    return [
        ((exp.get("executor") or {}).get("state"), rev)
        for commit in shown
        for exp in commit.get("experiments") or []
        for rev in exp["revs"]
    ]


def _step(rev: dict) -> int | None:
    """The DVCLive step of an experiment's ``live/metrics.json``, None before it has one."""
    return (rev["data"].get("metrics") or {}).get("live/metrics.json", {}).get("data", {}).get("step")
