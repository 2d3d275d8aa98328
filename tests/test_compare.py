"""``landscape compare``: headline numbers and tables of two revisions (commits, the workspace, a `dvc exp`
experiment), read through dvc.api from a real git + DVC repository with a small stand-in pipeline."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest

from pipeline.report.compare import compare_metrics, compare_tables, flatten, format_metrics

BIN = Path(sys.executable).parent

MAKE = textwrap.dedent("""
    import json, pathlib
    import pandas as pd
    from ruamel.yaml import YAML
    lr = YAML(typ="safe").load(open("params.yaml"))["train"]["lr"]
    out = pathlib.Path("reports/tables/mlp"); out.mkdir(parents=True, exist_ok=True)
    epochs = range(4)
    pd.DataFrame({"run": "mlp", "scope": "epoch", "epoch": list(epochs),
                  "train_loss": [2.0 / (1 + lr * e) for e in epochs], "test_loss": [2.2 / (1 + lr * e) for e in epochs],
                  "test_accuracy": [0.5 + lr * e / 10 for e in epochs]}).to_parquet(out / "train_history.parquet")
    json.dump({"mlp": {"train": {"lr": lr, "test_accuracy": 0.5 + lr * 0.3, "status": "completed"}}},
              open("reports/metrics.json", "w"))
""")

DVC_YAML = textwrap.dedent("""
    stages:
      make:
        cmd: python make.py
        deps: [make.py]
        params: [train]
        outs: [reports/tables/mlp/train_history.parquet]
        metrics: [reports/metrics.json]
""")


def run(repo, *args, check=True):
    result = subprocess.run(list(args), cwd=repo, env=_env(), capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def standin_repo(root: Path, files: dict[str, str]) -> Path:
    """A new git + DVC repository at ``root`` holding ``files`` (path -> text), committed: a stand-in pipeline."""
    root.mkdir()
    run(root, "git", "init", "-q")
    run(root, str(BIN / "dvc"), "init", "-q")
    run(root, str(BIN / "dvc"), "config", "core.analytics", "false")
    for name, text in files.items():
        (root / name).write_text(text)
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "stand-in")
    return root


def start_queue(repo, jobs: int) -> None:
    """`dvc queue start -j JOBS`, returning once the workers are started (not when they are done: the workers
    outlive the command and keep its output open, so their output goes to a file, not to a pipe `run` waits on)."""
    with open(Path(repo) / ".dvc/tmp/queue-start.log", "w") as log:
        started = subprocess.run(
            [str(BIN / "dvc"), "queue", "start", "-j", str(jobs)], cwd=repo, env=_env(), stdout=log, stderr=log
        )
    assert started.returncode == 0, (Path(repo) / ".dvc/tmp/queue-start.log").read_text()


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }


def set_lr(repo, lr):
    (repo / "params.yaml").write_text(f"train:\n  lr: {lr}\nruns:\n  mlp:\n    model: mlp\n")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """Two commits (lr 0.1, then 0.2), the stand-in pipeline run at each, outputs in the DVC cache only."""
    root = tmp_path_factory.mktemp("compare")
    run(root, "git", "init", "-q")
    run(root, str(BIN / "dvc"), "init", "-q")
    run(root, str(BIN / "dvc"), "config", "core.analytics", "false")
    (root / "make.py").write_text(MAKE)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / ".gitignore").write_text("/reports/\n")
    for lr in (0.1, 0.2):
        set_lr(root, lr)
        run(root, str(BIN / "dvc"), "repro", "-q")
        run(root, "git", "add", "-A")
        run(root, "git", "commit", "-qm", f"lr {lr}")
    return root


def landscape(repo, *args):
    return run(repo, str(BIN / "landscape"), "compare", *args, check=False)


def test_headline_numbers_of_two_commits_with_deltas(repo):
    result = landscape(repo, "HEAD~1", "HEAD")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "reports/metrics.json: HEAD~1 -> HEAD (2 of 3 differ)"
    row = next(line for line in lines if line.startswith("mlp.train.test_accuracy"))
    assert row.split()[1:] == ["0.53", "0.56", "+0.03", "(+5.7%)"]
    assert any(line.split()[:3] == ["mlp.train.lr", "0.1", "0.2"] for line in lines)
    assert "status" not in result.stdout  # unchanged rows only with --all
    assert "mlp.train.status" in landscape(repo, "HEAD~1", "HEAD", "--all").stdout
    # the workspace against HEAD, by default
    assert landscape(repo).stdout.splitlines()[1] == "no headline number differs"
    set_lr(repo, 0.4)
    run(repo, str(BIN / "dvc"), "repro", "-q")
    try:
        frame = compare_metrics("HEAD", None, repo)
        assert frame.set_index("key").loc["mlp.train.lr", "delta"] == pytest.approx(0.2)
    finally:
        set_lr(repo, 0.2)
        run(repo, str(BIN / "dvc"), "repro", "-q")


def test_one_table_row_by_row_and_an_overlay_plot(repo, tmp_path):
    result = landscape(
        repo, "HEAD~1", "HEAD", "--table", "train_history", "--run", "mlp", "--plot", str(tmp_path / "overlay.png")
    )
    assert result.returncode == 0, result.stderr
    assert "reports/tables/mlp/train_history.parquet: HEAD~1 -> HEAD: 3 of 4 rows differ" in result.stdout
    assert mpimg.imread(tmp_path / "overlay.png").shape[0] > 100


def test_an_experiment_is_a_revision_too(repo):
    run(repo, str(BIN / "dvc"), "exp", "run", "-q", "-S", "train.lr=0.3", "-n", "lr03")
    try:
        result = landscape(repo, "HEAD", "lr03")
        assert result.returncode == 0, result.stderr
        assert any(line.split()[:3] == ["mlp.train.lr", "0.2", "0.3"] for line in result.stdout.splitlines())
    finally:
        run(repo, "git", "checkout", "-q", "--", "params.yaml")
        run(repo, str(BIN / "dvc"), "checkout", "-q", "--force", check=False)


def queue_status_when_done(repo, timeout: float) -> str:
    """`dvc queue status` once nothing is queued or running any more (or after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        status = run(repo, str(BIN / "dvc"), "queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status) or time.monotonic() > deadline:
            return status
        time.sleep(2)


def test_a_queued_sweep_runs_every_grid_point_and_each_is_a_revision(repo):
    """The README's sweep recipe: `dvc exp run --queue` with a grid of -S values, then `dvc queue start`."""
    dvc = str(BIN / "dvc")
    queued = run(repo, dvc, "exp", "run", "--queue", "-S", "train.lr=0.5,0.6", "-S", "+train.batch_size=32,64")
    names = re.findall(r"Queued experiment '([^']+)'", queued.stdout)
    assert len(names) == 4
    try:
        start_queue(repo, 1)
        status = queue_status_when_done(repo, 240)
        assert status.count("Success") == 4, status
        shown = json.loads(run(repo, dvc, "exp", "show", "--json").stdout)
        exps = {}  # experiment name -> (lr, batch size, test accuracy)
        for commit in shown:
            for exp in commit.get("experiments") or []:
                for rev in exp["revs"]:
                    data = rev["data"]
                    train = data["params"]["params.yaml"]["data"]["train"]
                    metric = data["metrics"]["reports/metrics.json"]["data"]["mlp"]["train"]["test_accuracy"]
                    if rev.get("name") in names:  # (an earlier test's experiment may be there too)
                        exps[rev["name"]] = (train["lr"], train["batch_size"], metric)
        assert sorted(v[:2] for v in exps.values()) == [(0.5, 32), (0.5, 64), (0.6, 32), (0.6, 64)]
        assert all(acc == pytest.approx(0.5 + lr * 0.3) for lr, _, acc in exps.values())
        name = next(n for n, v in exps.items() if v[:2] == (0.6, 32))
        result = landscape(repo, "HEAD", name)  # a queued experiment is a revision for compare too
        assert any(line.split()[:3] == ["mlp.train.lr", "0.2", "0.6"] for line in result.stdout.splitlines())
    finally:
        run(repo, dvc, "queue", "stop", check=False)
        run(repo, dvc, "exp", "remove", "--all-commits", "-q", check=False)


def test_unknown_revision_and_missing_table_are_one_line_errors(repo):
    result = landscape(repo, "no-such-rev", "HEAD")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        "error: no-such-rev: unknown revision (not a commit, branch, tag or `dvc exp` experiment of .)\n"
    )
    result = landscape(repo, "HEAD~1", "HEAD", "--table", "hessian_spectrum", "--run", "mlp")
    assert result.returncode == 1 and "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: reports/tables/mlp/hessian_spectrum.parquet: not found at revision HEAD~1")


def test_flatten_and_compare_tables():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}
    a = pd.DataFrame({"run": ["m", "m", "m"], "epoch": [0, 1, 1], "loss": [1.0, 0.5, 0.4]})
    b = pd.DataFrame({"run": ["m", "m", "m"], "epoch": [0, 1, 2], "loss": [1.0, 0.25, 0.1]})
    merged = compare_tables(a, b)
    both = merged[merged.only_in == ""].sort_values("epoch")
    assert both.loss_delta.tolist() == [0.0, -0.25]  # matched on (run, epoch, order within the key)
    assert both.loss_a.tolist() == [1.0, 0.5] and both.loss_b.tolist() == [1.0, 0.25]
    assert merged[merged.only_in == "a"].loss_a.tolist() == [0.4]  # the second epoch-1 row of a
    assert merged[merged.only_in == "b"].epoch.tolist() == [2]
    frame = pd.DataFrame([{"key": "x", "A": 2.0, "B": 3.0, "delta": 1.0, "changed": True}])
    assert format_metrics(frame).splitlines()[2].split() == ["x", "2", "3", "+1", "(+50.0%)"]


def test_wall_clock_numbers_are_not_counted_as_changes(monkeypatch, tmp_path):
    from pipeline.report import compare

    assert all(compare.is_timing(k) for k in ("mlp.train.seconds", "tracking_seconds", "seconds", "wall_s"))
    assert not any(compare.is_timing(k) for k in ("mlp.train.train_loss", "lambda_max", "timestep", "epochs"))
    runs = [
        {"mlp": {"train": {"seconds": 12.5, "tracking_seconds": 3.0, "test_loss": 0.1}}},
        {"mlp": {"train": {"seconds": 13.0, "tracking_seconds": 2.5, "test_loss": 0.1}}},
    ]
    monkeypatch.setattr(compare, "read_bytes", lambda path, rev, repo: json.dumps(runs[int(rev)]).encode())
    assert int(compare.compare_metrics("0", "1", tmp_path).changed.sum()) == 0  # identical results: nothing differs
    assert int(compare.compare_metrics("0", "1", tmp_path, timing=True).changed.sum()) == 2
    runs[1]["mlp"]["train"]["test_loss"] = 0.2
    assert compare.compare_metrics("0", "1", tmp_path).query("changed").key.tolist() == ["mlp.train.test_loss"]
    a = pd.DataFrame({"epoch": [0, 1], "loss": [1.0, 0.5], "seconds": [0.1, 0.2]})
    b = pd.DataFrame({"epoch": [0, 1], "loss": [1.0, 0.5], "seconds": [0.3, 0.1]})
    assert compare.differing_rows(compare_tables(a, b)).empty
    assert len(compare.differing_rows(compare_tables(a, b), timing=True)) == 2
    b.loc[1, "loss"] = 0.4
    assert compare.differing_rows(compare_tables(a, b)).epoch.tolist() == [1]
