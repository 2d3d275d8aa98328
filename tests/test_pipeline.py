"""End-to-end behaviour of the DVC pipeline and its stages, in a temporary copy of the repository.

A real Prefect server runs on 127.0.0.1 for the module (as `landscape ui` would); one test checks the ephemeral
fallback when no server is reachable.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest
import torch
from chromium import chromium_binary, dump_dom, screenshot
from conftest import REPO, dask_cluster
from ruamel.yaml import YAML

from pipeline.cli import start_prefect_server, stop_process
from pipeline.config import HessianConfig, LandscapeConfig
from pipeline.flows.runtime import free_port
from pipeline.training.checkpoints import write_manifest

BIN = Path(sys.executable).parent

SMALL_PARAMS = {
    "data": {"dataset": "synthetic", "synthetic_samples": 200, "probe_size": 16},
    "model": {"mlp_depth": 1},
    "train": {"epochs": 2, "batch_size": 32, "checkpoint_every": 1},
    # whole sections where a stage lists single keys: DVC wants every key a stage lists under `params` in the file
    "hessian": {
        **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(HessianConfig()).items()},
        "top_k": 2,
        "max_hvps": 60,
        "trace_hvps": 6,
        "density_runs": 1,
        "density_steps": 8,
        "density_points": 50,
        "operators": ["hessian", "ggn"],
        "flatness_steps": 4,  # ascent steps and noise draws of the flatness measures: enough to test them end to end
        "pac_bayes_draws": 3,
    },
    # the whole section: DVC wants every key a stage lists under `params` to be in the file
    "landscape": {
        **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(LandscapeConfig()).items()},
        "line_points": 5,
        "path_points": 3,
        "surface_points": 5,
        "tile_size": 8,
        "chunk": 2,
        "curvature_map": 3,
    },
    "runs": {
        "mlp": {"model": "mlp", "mlp_width": 16, "track_sharpness_every": 3, "track_sharpness_unit": "steps"},
        "resnet20": {"model": "resnet20", "epochs": 1},
    },
    "repro": {"pin": True, "threads": 2, "seeds": 3},  # seed 1 is the partner, seed 2 trained by the seeds stage
}
TRAIN = {"train@mlp", "train@resnet20"}
HESSIAN = {"hessian@mlp", "hessian@resnet20"}
PARTNER = {"partner@mlp", "partner@resnet20"}
SEEDS = {"seeds@mlp", "seeds@resnet20"}
INTERPOLATE = {"interpolate@mlp", "interpolate@resnet20"}
SURFACE = {"surface@mlp", "surface@resnet20"}
SCANS = {*INTERPOLATE, *SURFACE, "landscape_figures"}
SUMMARY = {"metrics", "report"}
ALL_STAGES = {"prepare", *TRAIN, *HESSIAN, *PARTNER, *SEEDS, *SCANS, *SUMMARY}


def _check_connectivity(repo: Path, run: str, lines: pd.DataFrame, metrics: dict, *, data_dir: Path) -> None:
    """The mode-connectivity variants of one run's interpolate stage: the aligned partner is the partner's function
    (same loss at t = 1), every variant starts at the trained model (reset: with recomputed statistics), and the
    saved aligned partner reproduces the table's end point."""
    from pipeline.data import load_prepared
    from pipeline.landscape.connectivity import evaluate_model
    from pipeline.training.checkpoints import model_from_checkpoint

    def end(path: str, t: float, split: str = "train") -> float:
        return lines[(lines.path == path) & (lines.alpha == t) & (lines.split == split)].loss.item()

    for split in ("train", "test"):
        assert end("partner_aligned", 1.0, split) == pytest.approx(end("partner", 1.0, split), rel=1e-5)
        assert end("partner_aligned_repair", 0.0, split) == pytest.approx(end("partner", 0.0, split), rel=1e-5)
    statistics = lines.groupby("path").statistics.unique().map(list).to_dict()
    moved = "interpolated" if run == "resnet20" else "none"
    assert statistics["partner"] == statistics["partner_aligned"] == [moved]
    assert statistics["partner_aligned_repair"] == ["repaired"]
    if run == "resnet20":
        assert statistics["partner_aligned_reset"] == ["recomputed"] and statistics["random"] == ["stored"]
    assert metrics["align"]["status"] == "aligned" and metrics["align"]["method"] == "weights"
    assert metrics["align"]["objective_end"] >= metrics["align"]["objective_start"]
    connectivity = metrics["connectivity"]
    assert set(connectivity) == {"partner", *(p for p in set(lines.path) if p.startswith("partner_"))}
    assert metrics["barrier_aligned"] == connectivity["partner_aligned"]["train"]["loss_barrier"] >= 0
    assert metrics["barrier"] == connectivity["partner"]["train"]["loss_barrier"]
    aligned = torch.load(repo / f"artifacts/landscape/{run}/aligned_partner.pt", weights_only=True)
    assert aligned["status"] == "aligned" and set(aligned["permutations"]) == set(aligned["groups"])
    assert len(aligned["objective"]) == aligned["passes"] + 1
    data = load_prepared(data_dir)
    partner_dir = repo / "artifacts/partners" / run
    payload = torch.load(sorted(partner_dir.glob("*.pt"))[-1], weights_only=True)
    model = model_from_checkpoint(payload, data)
    model.load_state_dict(aligned["state_dict"])
    x, y = data.train_tensors()
    assert evaluate_model(model, x, y)[0] == pytest.approx(end("partner_aligned", 1.0), rel=1e-5)


def _write_params(repo: Path, params: dict) -> None:
    YAML(typ="safe", pure=True).dump(params, repo / "params.yaml")


def tracked_copy(root: Path, params: dict) -> Path:
    """A fresh git + DVC checkout of the tracked files in ``root``, with ``params`` as its params.yaml."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    # The flatness sweep (sweeps/) is a pipeline of its own, tested in test_sweep_run.py; never run here, it would
    # make `dvc pull` and `dvc plots show` report its missing outputs (see README, "Sharing results").
    for name in [f for f in files if not f.startswith("sweeps/")]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    (root / "dvc.lock").unlink(missing_ok=True)  # it records outputs this repo's cache never had
    _write_params(root, params)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


@contextlib.contextmanager
def user_env(root: Path):
    """Environment of a user with the venv on PATH and a Prefect server of their own running (home in ``root``)."""
    port = free_port()
    previous = Path.cwd()
    os.chdir(root)  # the server takes its home (.prefect/) from the repo's prefect.toml
    try:
        server = start_prefect_server(port)
    finally:
        os.chdir(previous)
    try:
        yield {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        }
    finally:
        stop_process(server)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A fresh git + DVC checkout of the tracked files, with small params."""
    return tracked_copy(tmp_path_factory.mktemp("repo"), SMALL_PARAMS)


@pytest.fixture(scope="module")
def env(repo):
    """Environment of a user with the venv on PATH and a Prefect server of their own running."""
    with user_env(repo) as environment:
        yield environment


def dvc(repo, env, *args) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


@pytest.fixture(scope="module")
def built(repo, env) -> str:
    """The small pipeline run once (its ``dvc repro`` output): every test that reads a finished pipeline shares it."""
    return dvc(repo, env, "repro").stdout


def test_repro_runs_every_stage_once_then_nothing(built, repo, env):
    assert stages_run(built) == ALL_STAGES
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert set(metrics) == {"mlp", "resnet20", "comparisons"}
    for run in ("mlp", "resnet20"):  # three seeds, measured alike; seed 0 is the run, seed 1 its partner
        seeds = pd.read_parquet(repo / f"reports/tables/{run}/seeds.parquet")
        assert seeds.seed_index.tolist() == [0, 1, 2] and seeds.source.tolist() == ["train", "partner", "seeds"]
        assert seeds.test_accuracy.iloc[0] == metrics[run]["train"]["test_accuracy"]
        assert seeds.test_accuracy.iloc[1] == metrics[run]["partner"]["test_accuracy"]
        assert (seeds.lambda_max > 0).all() and metrics[run]["seeds"]["lambda_max"]["n"] == 3
        interval = metrics[run]["seeds"]["lambda_max"]
        assert interval["low"] < interval["mean"] < interval["high"]
    assert set(metrics["comparisons"]["resnet20 vs mlp"]) == {
        "lambda_max",
        "trace_hutchinson",
        "test_accuracy",
        "generalization_gap",
    }
    assert metrics["mlp"]["train"]["status"] == "completed" and metrics["mlp"]["train"]["epochs"] == 2
    hessian = metrics["resnet20"]["hessian"]
    assert hessian["epoch"] == 1 and hessian["lambda_max"] > 0 and hessian["lambda_min"] <= hessian["lambda_max"]
    assert len(hessian["eigenvalues"]) == 2 and hessian["trace_hutchpp_stderr"] >= 0
    assert hessian["noise_scale"] > 0 and hessian["grad_sharpness"] is not None  # noise and flatness (issue 6)
    assert hessian["epsilon_sharpness_absolute"] >= hessian["epsilon_sharpness_relative"] >= 0
    assert hessian["pac_bayes_sigma_isotropic"] > 0 and hessian["pac_bayes_sigma_magnitude"] > 0
    spectrum = pd.read_parquet(repo / "reports/tables/mlp/hessian_spectrum.parquet")
    assert sorted(spectrum.epoch.unique()) == [0, 1, 2]  # eigenvalues at every checkpoint
    assert set(spectrum[spectrum.quantity == "trace"].epoch) == {2}  # details at the final one
    # hessian_rescaled: the measures again on Dinh et al.'s rescaling of the MLP's first ReLU layer pair
    assert set(spectrum.operator) == {"hessian", "ggn", "hessian_rescaled"} and (spectrum.bn_mode == "eval").all()
    assert set(spectrum[spectrum.operator == "hessian_rescaled"].epoch) == {2}  # at `details` only
    reparam = json.loads((repo / "reports/tables/mlp/hessian_metrics.json").read_text())["reparametrisation"]
    assert reparam["alpha"] == 10 and reparam["output_change"] < 1e-5
    assert reparam["measures"]["lambda_max"]["ratio"] > 10
    assert {"net.1", "net.3"} <= set(spectrum.group)  # per-block spectra
    for run in ("mlp", "resnet20"):
        for figure in ("hessian_sharpness", "hessian_spectrum", "hessian_density"):
            assert (repo / f"reports/figures/{run}/{figure}.png").stat().st_size > 10_000
    vectors = torch.load(repo / "artifacts/hessian/resnet20/eigenvectors.pt", weights_only=True)
    assert vectors["epoch"] == 1 and vectors["vectors"]["fc.weight"].shape == (2, 3, 64)
    assert (repo / "reports/tables/mlp/train_history.parquet").is_file()
    tracked = pd.read_parquet(repo / "reports/tables/mlp/sharpness_history.parquet")  # every 3rd of 10 steps
    assert tracked.step.tolist() == [0, 3, 6, 9] and (tracked.lambda_max > 0).all()
    assert metrics["mlp"]["train"]["tracked_steps"] == 4 and metrics["mlp"]["train"]["tracked_lambda_max"] > 0
    assert len(pd.read_parquet(repo / "reports/tables/resnet20/sharpness_history.parquet")) == 1  # epoch 0 (every 5)
    for run in ("mlp", "resnet20"):  # the scans
        for figure in ("interpolation_1d", "surface_contour", "surface_filled", "surface_3d"):
            assert (repo / f"reports/figures/{run}/{figure}.png").stat().st_size > 10_000
        lines = pd.read_parquet(repo / f"reports/tables/{run}/interpolation_1d.parquet")
        variants = ["partner_aligned", "partner_aligned_repair"] + (
            ["partner_aligned_reset"] if run == "resnet20" else []
        )
        assert sorted(set(lines.path)) == sorted(["eigen", "init_final", "partner", "random", *variants])
        assert len(lines) == 2 * (3 + 5 + 5 + 3 + 3 * len(variants)) and set(lines.split) == {"train", "test"}
        _check_connectivity(repo, run, lines, metrics[run]["interpolate"], data_dir=repo / "artifacts/data")
        surface = pd.read_parquet(repo / f"reports/tables/{run}/surface_2d.parquet")
        assert len(surface) == 25 and set(surface.split) == {"probe"}
        curvature = pd.read_parquet(repo / f"reports/tables/{run}/surface_curvature.parquet")
        assert len(curvature) == 9 and (curvature.lambda_max >= curvature.lambda_min).all()
        assert ((curvature.ratio - (curvature.lambda_min / curvature.lambda_max).abs()).abs() < 1e-12).all()
        scans = metrics[run]
        assert scans["interpolate"]["barrier"] >= 0 and scans["surface"]["points"] == 25
        assert "partner" in scans and scans["partner"]["status"] == "completed"
        # the trained model's point of every 1-D scan is the trained model: one loss per split
        trained = lines[
            ((lines.path.isin(["random", "eigen"])) & (lines.alpha == 0))
            | ((lines.path == "init_final") & (lines.alpha == 1))
            | ((lines.path == "partner") & (lines.alpha == 0))
        ]
        assert trained.groupby("split").loss.nunique().eq(1).all() and len(trained) == 8
    for figure in ("surfaces", "interpolations_random", "interpolations_partner"):
        assert (repo / f"reports/figures/{figure}.png").stat().st_size > 10_000
    assert sorted(p.name for p in (repo / "artifacts/checkpoints/mlp").glob("*.pt")) == [
        "epoch_0000.pt",
        "epoch_0001.pt",
        "epoch_0002.pt",
    ]
    page = (repo / "reports/index.html").read_text()  # the report: both runs, their numbers, seven figures
    assert page.count("<img src='data:image/png;base64,") == 7 and "<td>resnet20</td>" in page
    assert "<h2>Across seeds</h2>" in page and "<table id='comparisons'>" in page
    assert f"{metrics['mlp']['hessian']['lambda_max']:.4g}" in page
    readme = (repo / "reports/README.md").read_text()
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", readme):
        assert (repo / "reports" / link).is_file(), link
    for quantity in ("sharpness", "density", "partner_path", "random_line"):
        for run in ("mlp", "resnet20"):
            assert json.loads((repo / f"reports/plots/{quantity}/{run}.json").read_text()), (quantity, run)
    for run, epochs in (("mlp", 2), ("resnet20", 1)):  # DVCLive's view of training: a step per epoch, 0 the init
        live = json.loads((repo / f"reports/live/{run}/metrics.json").read_text())
        history = pd.read_parquet(repo / f"reports/tables/{run}/train_history.parquet").query("scope == 'epoch'")
        assert live["step"] == live["epoch"] == epochs and live["test"]["loss"] == history.test_loss.iloc[-1]
        rows = (repo / f"reports/live/{run}/plots/metrics/test/accuracy.tsv").read_text().split()
        assert rows[:2] == ["step", "accuracy"] and rows[2::2] == [str(e) for e in range(epochs + 1)]
    shown = dvc(repo, env, "plots", "show", "--json")  # every data plot resolves its fields
    assert '"errors"' not in shown.stdout and "could not find" not in shown.stderr.lower(), shown.stderr
    assert "reports/live/mlp/plots/metrics/train/loss.tsv" in shown.stdout

    second = dvc(repo, env, "repro")
    assert stages_run(second.stdout) == set()
    assert "Data and pipelines are up to date" in second.stdout

    second = dvc(repo, env, "repro")
    assert stages_run(second.stdout) == set()
    assert "Data and pipelines are up to date" in second.stdout


def _edit(params: dict, key: str, value) -> dict:
    """``params`` with ``key`` (dotted; ``runs.<run>.<key>`` for a run override) set to ``value``."""
    changed = json.loads(json.dumps(params))
    *path, last = key.split(".")
    section = changed
    for part in path:
        section = section[part]
    section[last] = value
    return changed


# Each edit of the finished pipeline and the stages it must rerun: the rest stays cached.
EDITS = {
    "one run's override: that run's chain only, never prepare": (
        {"runs.mlp.mlp_width": 8},
        {
            "train@mlp",
            "hessian@mlp",
            "partner@mlp",
            "seeds@mlp",
            "interpolate@mlp",
            "surface@mlp",
            "landscape_figures",
            *SUMMARY,
        },
    ),
    # an analysis setting never retrains; the scans read the new eigenvectors; the seeds measure top_k = 1 whatever
    "hessian.top_k": ({"hessian.top_k": 3}, {*HESSIAN, *SCANS, *SUMMARY}),
    # the eigenvectors come out bit for bit the same: no scan reruns (the two summary stages read the whole tables
    # folder: they rerun, in seconds)
    "hessian.trace_hvps": ({"hessian.trace_hvps": 8}, {*HESSIAN, *SEEDS, "landscape_figures", *SUMMARY}),
    "landscape.surface_range: only the scans that read it": (
        {"landscape.surface_range": 0.5},
        {*SURFACE, "landscape_figures", *SUMMARY},
    ),
    # execution settings do not change the numbers: nothing reruns
    "landscape.executor, tile_size": ({"landscape.executor": "dask", "landscape.tile_size": 4}, set()),
}


def test_an_edit_reruns_only_the_stages_it_changes(built, repo, env, tmp_path):
    """Every edit of :data:`EDITS` on its own copy of the finished pipeline, the copies' ``dvc repro`` at once."""
    copies, outputs = {}, {}
    for i, (name, (edits, _)) in enumerate(EDITS.items()):
        copy = copies[name] = tmp_path / f"edit{i}"
        shutil.copytree(repo, copy, symlinks=True, ignore=shutil.ignore_patterns(".prefect"))
        changed = SMALL_PARAMS
        for key, value in edits.items():
            changed = _edit(changed, key, value)
        _write_params(copy, changed)
    names = list(EDITS)
    for pair in (names[i : i + 2] for i in range(0, len(names), 2)):  # two at a time: one per core
        running = {
            name: subprocess.Popen(
                [str(BIN / "dvc"), "repro"],
                cwd=copies[name],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for name in pair
        }
        for name, process in running.items():
            outputs[name] = process.communicate()[0]
            assert process.returncode == 0, (name, outputs[name])
    for name, output in outputs.items():
        assert stages_run(output) == EDITS[name][1], name
    top_k = copies["hessian.top_k"]
    assert len(json.loads((top_k / "reports/metrics.json").read_text())["mlp"]["hessian"]["eigenvalues"]) == 3


PREFECT_QUERY = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

async def main():
    async with get_client() as client:
        runs, found = {}, []
        while not found or len(found) % 200 == 0:  # every flow run, in pages of the server's largest limit
            page = await client.read_flow_runs(limit=200, offset=len(found))
            found += page
            if not page:
                break
        for run in found:
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                                                limit=200)
            runs.setdefault(run.name, []).append({"state": run.state_type.value, "state_name": run.state_name,
                                                  "tags": run.tags, "task_tags": [t.tags for t in tasks],
                                                  "tasks": {t.name: t.state_type.value for t in tasks}})
        artifacts = sorted({a.key for a in await client.read_artifacts(limit=200) if a.key})
    print(json.dumps({"runs": runs, "artifacts": artifacts}))

asyncio.run(main())
"""


def test_the_prefect_api_records_every_stage_with_its_task_runs_and_artifacts(built, repo, env):
    result = subprocess.run([sys.executable, "-c", PREFECT_QUERY], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    recorded = json.loads(result.stdout)
    runs = recorded["runs"]
    expected = {
        "prepare-synthetic",
        "metrics",
        "landscape-figures",
        "report",
        *{
            f"{stage}-{run}"
            for stage in ("train", "hessian", "partner", "seeds", "interpolate", "surface")
            for run in ("mlp", "resnet20")
        },
    }
    assert expected <= set(runs)
    for name in expected:
        assert any(r["state"] == "COMPLETED" for r in runs[name]), (name, runs[name])

    def completed(name):  # task runs of every completed run of a flow (a rerun may find its tiles on disk)
        return {task: state for r in runs[name] if r["state"] == "COMPLETED" for task, state in r["tasks"].items()}

    assert {f"surface-tile-{i:04d}" for i in range(4)} <= set(completed("surface-resnet20"))
    assert set(completed("surface-resnet20").values()) == {"COMPLETED"}
    assert {"curvature-epoch-0000", "curvature-epoch-0002"} <= set(completed("hessian-mlp"))
    assert "epochs-to-checkpoint-1" in completed("train-mlp")
    assert {"random-train-tile-0000", "partner-test-tile-0000"} <= set(completed("interpolate-mlp"))
    assert {"figure-training", "figure-spectra", "plot-exports", "write-documents"} <= set(completed("report"))
    # one pipeline run: every stage of the built `dvc repro` carries its id (prepare ran in that repro only)
    (prepare,) = [r for r in runs["prepare-synthetic"] if r["state_name"] == "Completed" and len(r["tags"]) > 1]
    (run_tag,) = [t for t in prepare["tags"] if t.startswith("pipeline-run:")]
    chained = [r for rs in runs.values() for r in rs if run_tag in r["tags"]]
    assert {t for r in chained for t in r["tags"] if t.startswith("stage:")} == {f"stage:{s}" for s in ALL_STAGES}
    assert {t for r in chained for t in r["tags"] if t.startswith("rev:")} == {"rev:unknown"}  # (no commit here)
    assert all(r["state_name"] == "Completed" for r in chained)
    assert not any(tags for r in chained for tags in r["task_tags"])  # flow runs only (pipeline.flows.chain)
    assert {
        "metrics",
        "surface-resnet20",
        "interpolate-mlp",
        "hessian-mlp",
        "train-mlp",
        "report-summary",
        "report-table",
    } <= set(recorded["artifacts"])


NO_CHROMIUM = "Debian's chromium is not installed (`apt-get install chromium`): no browser to load the pages in"


@pytest.mark.skipif(chromium_binary() is None, reason=NO_CHROMIUM)
def test_the_report_opens_in_a_browser_with_every_figure_decoded(built, repo, env, tmp_path):
    index = repo / "reports/index.html"
    dom = dump_dom(index)
    images = re.findall(r"<img [^>]*>", dom)
    assert len(images) == 7 and all('src="data:image/png;base64,' in img for img in images)
    assert 'data-figures="7/7"' in dom  # the page's own check: every <img> complete with a natural width
    assert "broken" not in re.findall(r"<figure[^>]*>", dom)[0]
    for run in ("mlp", "resnet20"):
        assert f"<td>{run}</td>" in dom
    shot = screenshot(index, tmp_path / "report.png", height=3000)
    assert mpimg.imread(shot).shape[:2] == (3000, 1400)


@pytest.mark.skipif(chromium_binary() is None, reason=NO_CHROMIUM)
def test_the_prefect_ui_runs_page_shows_every_stage_flow_run(built, repo, env):
    ui = env["PREFECT_API_URL"].removesuffix("/api")
    with urllib.request.urlopen(f"{ui}/ui-settings", timeout=10) as response:  # the pages ask this server's API
        assert json.load(response)["api_url"] == env["PREFECT_API_URL"]
    dom = dump_dom(f"{ui}/runs", wait_ms=60_000, height=10_000)  # virtual time: seconds of real time
    shown = set(
        re.findall(
            r"\b((?:train|hessian|partner|interpolate|surface)-(?:mlp|resnet20)|prepare-synthetic|"
            r"landscape-figures|metrics|report)\b",
            dom,
        )
    )
    expected = {
        "prepare-synthetic",
        "landscape-figures",
        "metrics",
        "report",
        *{
            f"{stage}-{run}"
            for stage in ("train", "hessian", "partner", "interpolate", "surface")
            for run in ("mlp", "resnet20")
        },
    }
    assert expected <= shown, sorted(expected - shown)
    assert "Completed" in dom


def test_a_dvc_remote_round_trip_restores_everything_and_nothing_reruns(built, repo, env, tmp_path):
    dvc(repo, env, "remote", "add", "-d", "roundtrip", str(tmp_path / "remote"))
    try:
        dvc(repo, env, "push")
        for path in (
            ".dvc/cache",
            "artifacts",
            "reports/tables",
            "reports/figures",
            "reports/metrics.json",
            "reports/plots",
            "reports/index.html",
            "reports/README.md",
        ):
            target = repo / path
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        dvc(repo, env, "pull")
        assert (repo / "artifacts/checkpoints/resnet20/epoch_0001.pt").is_file()
        assert (repo / "reports/tables/mlp/surface_2d.parquet").is_file() and (repo / "reports/index.html").is_file()
        assert "Data and pipelines are up to date" in dvc(repo, env, "status").stdout
        assert stages_run(dvc(repo, env, "repro").stdout) == set()  # no retraining, no rescanning
    finally:
        dvc(repo, env, "remote", "remove", "roundtrip")


def _stage(repo, env, *args):
    return subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True)


@pytest.mark.parametrize(
    "edit, key",
    [
        ({"train": {"lr": -1}}, "train.lr"),
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer"),
        ({"data": {"dataset": "imagenet"}}, "data.dataset"),
        ({"runs": {"mlp": {"model": "vgg"}}}, "runs.mlp.model"),
    ],
)
def test_a_stage_with_bad_params_exits_2_with_one_line_and_touches_nothing(repo, env, tmp_path, edit, key):
    bad = json.loads(json.dumps(SMALL_PARAMS))
    for section, values in edit.items():
        bad[section].update(values)
    params = tmp_path / "bad.yaml"
    YAML(typ="safe", pure=True).dump(bad, params)
    out = tmp_path / "tables"
    out.mkdir()
    (out / "train_metrics.json").write_text("{}")
    for args in (["stages/train.py", "--run", "mlp", "--tables", str(out)], ["stages/prepare.py", "--out", str(out)]):
        result = _stage(repo, env, *args, "--params", str(params))
        assert result.returncode == 2
        assert result.stderr.startswith(f"error: {key}: ") and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert sorted(p.name for p in out.iterdir()) == ["train_metrics.json"]
        assert (out / "train_metrics.json").read_text() == "{}"
    check = subprocess.run([str(BIN / "landscape"), "check", "--params", str(params)], capture_output=True, text=True)
    assert check.returncode == 2 and check.stderr.startswith(f"error: {key}: ")


def test_hessian_stage_errors_are_one_line(repo, env, tmp_path):
    no_checkpoints = _stage(
        repo,
        env,
        "stages/hessian.py",
        "--run",
        "mlp",
        "--checkpoints",
        str(tmp_path / "none"),
        "--tables",
        str(tmp_path / "t"),
    )
    assert no_checkpoints.returncode == 2 and "Traceback" not in no_checkpoints.stderr
    assert no_checkpoints.stderr.strip().endswith(
        "no readable checkpoints (epoch_*.pt); run `dvc repro train@mlp` first"
    )
    bad = json.loads(json.dumps(SMALL_PARAMS))
    bad["hessian"]["method"] = "eigsh"
    params = tmp_path / "bad.yaml"
    YAML(typ="safe", pure=True).dump(bad, params)
    result = _stage(repo, env, "stages/hessian.py", "--run", "mlp", "--params", str(params))
    assert result.returncode == 2
    assert result.stderr == "error: hessian.method: unknown name 'eigsh'; allowed: lanczos, power, arpack\n"


def test_a_scan_resumes_from_its_tiles_and_runs_the_same_on_dask(built, repo, env, tmp_path):
    reference = pd.read_parquet(repo / "reports/tables/resnet20/surface_2d.parquet")
    tiles = repo / "artifacts/landscape/resnet20/surface_tiles"
    assert sorted(p.name for p in tiles.glob("tile_*.pt")) == [f"tile_{i:06d}.pt" for i in range(4)]  # 25 points / 8
    for i in (1, 3):  # a half-finished scan
        (tiles / f"tile_{i:06d}.pt").unlink()
    resumed = _stage(
        repo,
        env,
        "stages/surface.py",
        "--run",
        "resnet20",
        "--tables",
        str(tmp_path / "resumed"),
        "--figures",
        str(tmp_path / "figures"),
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "2 of 4 tiles found on disk (resuming)" in resumed.stdout + resumed.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "resumed/surface_2d.parquet"), reference)  # bitwise

    dask = YAML(typ="safe", pure=True).load((repo / "params.yaml").read_text())  # as the repro above ran it
    dask["landscape"].update({"executor": "dask", "workers": 2})
    params = tmp_path / "dask.yaml"
    YAML(typ="safe", pure=True).dump(dask, params)

    def surface(name: str):  # the resnet20 surface with `params`, into tmp_path/<name>
        tables, work, figures = (str(tmp_path / f"{name}{suffix}") for suffix in ("", "_tiles", "_figures"))
        args = ("--run", "resnet20", "--params", str(params), "--tables", tables, "--work", work, "--figures", figures)
        return _stage(repo, env, "stages/surface.py", *args)

    result = surface("dask")
    assert result.returncode == 0, result.stderr
    assert "dask LocalCluster x2" in result.stdout + result.stderr
    on_dask = pd.read_parquet(tmp_path / "dask/surface_2d.parquet")
    pd.testing.assert_frame_equal(
        on_dask.drop(columns=["loss", "accuracy"]), reference.drop(columns=["loss", "accuracy"])
    )
    # workers run one thread each: the same function, summed in another order
    assert ((on_dask.loss - reference.loss).abs() <= 1e-5 * reference.loss.abs()).all()
    assert (on_dask.accuracy == reference.accuracy).all()

    # through a scheduler's address: a `dask scheduler` and two `landscape worker` processes (as on two machines),
    # whose torch has the kernels and threads of the params' repro section: the same bits as in this process
    with dask_cluster(repo / "params.yaml", workers=2) as (address, _):
        dask["landscape"].update({"executor": "dask", "scheduler": address})
        YAML(typ="safe", pure=True).dump(dask, params)
        result = surface("scheduler")
    assert result.returncode == 0, result.stderr
    assert f"dask {address}" in result.stdout + result.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "scheduler/surface_2d.parquet"), reference)  # bitwise


def _diverged_copy(source: Path, folder: Path) -> Path:
    """A copy of the checkpoints in ``source`` whose newest one has diverged: NaN weights, status ``diverged``, and a
    manifest that vouches for the file's bytes, as the trainer records a diverged run."""
    shutil.copytree(source, folder)
    last = sorted(folder.glob("epoch_*.pt"))[-1]
    payload = torch.load(last, weights_only=True)
    payload["model"] = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in payload["model"].items()
    }
    payload["status"] = "diverged"
    torch.save(payload, last)
    write_manifest(folder)
    return folder


def test_a_diverged_run_is_recorded_by_the_scans_not_a_failure(built, repo, env, tmp_path):
    checkpoints = _diverged_copy(repo / "artifacts/checkpoints/mlp", tmp_path / "checkpoints")
    out = {"--tables": tmp_path / "t", "--figures": tmp_path / "f", "--work": tmp_path / "w" / "tiles"}
    result = _stage(
        repo,
        env,
        "stages/surface.py",
        "--run",
        "mlp",
        "--checkpoints",
        str(checkpoints),
        *[str(a) for kv in out.items() for a in kv],
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "t/surface_metrics.json").read_text()) == {"status": "diverged"}
    assert pd.read_parquet(tmp_path / "t/surface_2d.parquet").empty
    assert (tmp_path / "w/surface_directions.pt").is_file() and (tmp_path / "w/tiles").is_dir()
    for kind in ("contour", "filled", "3d"):
        assert (tmp_path / f"f/surface_{kind}.png").stat().st_size > 1000


def test_a_diverged_partner_leaves_the_path_unaligned_and_is_recorded(built, repo, env, tmp_path):
    partner = _diverged_copy(repo / "artifacts/partners/mlp", tmp_path / "partner")
    out = {"--tables": tmp_path / "t", "--figures": tmp_path / "f", "--work": tmp_path / "w" / "tiles"}
    result = _stage(
        repo,
        env,
        "stages/interpolate.py",
        "--run",
        "mlp",
        "--partner",
        str(partner),
        *[str(a) for kv in out.items() for a in kv],
    )
    assert result.returncode == 0, result.stderr
    assert (
        "the partner's weights are not finite; no alignment and no statistics variants" in result.stdout + result.stderr
    )
    metrics = json.loads((tmp_path / "t/interpolate_metrics.json").read_text())
    assert metrics["align"] == {"method": "weights", "status": "partner diverged"} and metrics["barrier"] is None
    assert set(metrics["connectivity"]) == {"partner"}
    assert torch.load(tmp_path / "w/aligned_partner.pt", weights_only=True)["status"] == "partner diverged"
    lines = pd.read_parquet(tmp_path / "t/interpolation_1d.parquet")
    assert not lines.path.str.startswith("partner_").any() and lines[lines.path == "random"].loss.notna().all()


def test_scan_stage_errors_are_one_line(repo, env, tmp_path):
    result = _stage(repo, env, "stages/interpolate.py", "--run", "mlp", "--partner", str(tmp_path / "none"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("no readable checkpoints (epoch_*.pt); run `dvc repro partner@mlp` first")
    bad = json.loads(json.dumps(SMALL_PARAMS))
    bad["landscape"]["plane"] = "hessian"
    params = tmp_path / "bad.yaml"
    YAML(typ="safe", pure=True).dump(bad, params)
    result = _stage(repo, env, "stages/surface.py", "--run", "mlp", "--params", str(params))
    assert result.returncode == 2
    assert result.stderr == "error: landscape.plane: unknown name 'hessian'; allowed: random, pca, eigen\n"


def test_unknown_run_name_and_missing_data_are_one_line_errors(repo, env, tmp_path):
    result = _stage(repo, env, "stages/train.py", "--run", "nope")
    assert result.returncode == 2 and "runs: no run named 'nope'" in result.stderr
    missing = _stage(
        repo,
        env,
        "stages/train.py",
        "--run",
        "mlp",
        "--data",
        str(tmp_path / "absent"),
        "--checkpoints",
        str(tmp_path / "ck"),
        "--tables",
        str(tmp_path / "t"),
    )
    assert missing.returncode == 2, missing.stderr
    assert "absent" in missing.stderr and "Traceback" not in missing.stderr


def test_landscape_check_accepts_the_repository_params():
    result = subprocess.run(
        [str(BIN / "landscape"), "check", "--params", str(REPO / "params.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 0 and "OK" in result.stdout


def test_a_stage_without_a_reachable_server_warns_once_and_runs_ephemeral(repo, env, tmp_path):
    unreachable = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    result = _stage(repo, unreachable, "stages/prepare.py", "--out", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: no Prefect server")]
    assert len(warnings) == 1 and "ephemeral" in warnings[0]
    assert (tmp_path / "data" / "data.pt").is_file()


def test_landscape_run_uses_a_reachable_server_and_runs_dvc_repro(built, repo, env):
    result = subprocess.run([str(BIN / "landscape"), "run"], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"Prefect UI: {env['PREFECT_API_URL'].removesuffix('/api')}" in result.stdout
    assert "starting a Prefect server" not in result.stdout  # reused the running one
    assert "Data and pipelines are up to date" in result.stdout
    # nothing ran: every stage is recorded as a Cached flow run of this pipeline run, under its own flow
    (run_id,) = re.findall(r"carry the tag pipeline-run:(\w+)", result.stdout)
    assert f"recorded {len(ALL_STAGES)} skipped (cached) stage(s) in Prefect" in result.stdout
    query = subprocess.run([sys.executable, "-c", PREFECT_QUERY], env=env, capture_output=True, text=True)
    runs = json.loads(query.stdout)["runs"]
    cached = {n: r for n, rs in runs.items() for r in rs if f"pipeline-run:{run_id}" in r["tags"]}
    assert {t for r in cached.values() for t in r["tags"] if t.startswith("stage:")} == {
        f"stage:{s}" for s in ALL_STAGES
    }
    assert {r["state_name"] for r in cached.values()} == {"Cached"} and "train-mlp" in cached and "report" in cached


def test_the_python_api_gives_the_stages_numbers(built, repo):
    """``pipeline.api`` on the trained MLP, its partner and the prepared samples, with the params' sections as
    settings: the eigenvalues, traces and scans the stages wrote to their tables."""
    from pipeline import api
    from pipeline.data import load_prepared

    data = load_prepared(repo / "artifacts/data")
    final = torch.load(repo / "artifacts/checkpoints/mlp/epoch_0002.pt", weights_only=False)
    partner = torch.load(sorted((repo / "artifacts/partners/mlp").glob("epoch_*.pt"))[-1], weights_only=False)
    from pipeline.training.checkpoints import model_from_checkpoint

    model, other = model_from_checkpoint(final, data), model_from_checkpoint(partner, data)
    x, y = data.probe_tensors()
    hessian = {k: v for k, v in SMALL_PARAMS["hessian"].items()}
    landscape = {k: v for k, v in SMALL_PARAMS["landscape"].items()}
    table = pd.read_parquet(repo / "reports/tables/mlp/hessian_spectrum.parquet")
    rows = table[(table.epoch == 2) & (table.operator == "hessian") & (table.group == "all")]
    spectrum = api.hessian_spectrum(model, x, y, **hessian)
    assert spectrum.eigenvalues == rows[rows.quantity == "eigenvalue"].sort_values("index").value.tolist()
    assert spectrum.lambda_min == rows[rows.quantity == "lambda_min"].value.item()
    for method in ("hutchinson", "hutchpp"):
        trace = api.hessian_trace(model, x, y, estimator=method, **hessian)
        assert trace.value == rows[(rows.quantity == "trace") & (rows.method == method)].value.item()
    density = api.spectral_density(model, x, y, **hessian)
    stored = pd.read_parquet(repo / "reports/tables/mlp/hessian_density.parquet")
    smoothed = stored[(stored.epoch == 2) & (stored.operator == "hessian") & (stored.kind == "smoothed")]
    assert density.density == pytest.approx(smoothed["density"].tolist(), rel=1e-12)
    surface = api.loss_surface(model, x, y, **landscape)
    grid = pd.read_parquet(repo / "reports/tables/mlp/surface_2d.parquet").sort_values(["alpha", "beta"])
    assert surface.loss.reshape(-1).tolist() == pytest.approx(grid.loss.tolist(), rel=1e-6)
    xt, yt = data.train_tensors()
    path = api.interpolate(model, other, xt, yt, **landscape)
    lines = pd.read_parquet(repo / "reports/tables/mlp/interpolation_1d.parquet")
    stage = lines[(lines.path == "partner") & (lines.split == "train")].sort_values("alpha")
    assert path.loss.tolist() == pytest.approx(stage.loss.tolist(), rel=1e-6)
    metrics = json.loads((repo / "reports/metrics.json").read_text())["mlp"]["interpolate"]
    assert path.barrier == pytest.approx(metrics["barrier"], rel=1e-6, abs=1e-9)
