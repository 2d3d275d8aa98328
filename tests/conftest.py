import os
from pathlib import Path

from pipeline import repro

# The suite runs with the pipeline's default kernel settings (repro.pin, repro.threads), set before torch is
# imported: its numbers are then the same bits on every machine, as the stages' are.
repro.apply(pin=True, threads=2)
# With two test workers on two cores (pytest-xdist), a two-thread OpenMP region spin-waits for a descheduled partner
# thread for milliseconds at every op: threads that wait sleep instead (the stage processes the tests start inherit
# it). It decides no numbers: only how an idle thread waits.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.config import DataConfig, parse_params
from pipeline.data import prepare_dataset

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A stage run from a test's own folder does not see the repo's prefect.toml; give its ephemeral server the project's
# start-up allowance (prefect.toml: 60 s) instead of Prefect's 20 s, which a loaded 2-core machine can exceed.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")


def make_params(runs=None, data=None, train=None, model=None):
    """A validated Params from small overrides of the defaults."""
    raw = {"data": data or {}, "train": train or {}, "model": model or {}, "runs": runs or {"mlp": {"model": "mlp"}}}
    return parse_params(raw)


@pytest.fixture(scope="session")
def synthetic_data():
    """A tiny seeded dataset (3 classes of 1x8x8 Gaussian images) for fast training tests."""
    return prepare_dataset(DataConfig(dataset="synthetic", synthetic_samples=240, probe_size=32))


@pytest.fixture(scope="session")
def digits_data():
    return prepare_dataset(DataConfig())


def tiny_mlp(activation: type[torch.nn.Module] = torch.nn.Tanh) -> torch.nn.Module:
    """4 -> 5 -> 3 with a smooth activation: 43 parameters, float64."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), activation(), torch.nn.Linear(5, 3)).double()


@pytest.fixture
def problem():
    """The tiny MLP with 11 seeded samples of 4 features and 3 classes (float64): small enough for dense Hessians."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=g)
    return tiny_mlp(), x, y


# The files whose tests run stage processes, longest first. With pytest-xdist (``-n auto --dist loadfile`` in
# pyproject.toml: one file per worker at a time, so a module's fixtures, e.g. the one pipeline run that
# test_pipeline.py shares, are built once) they start first, and the short files fill the other worker around them.
LONG_FILES = (
    "test_pipeline.py",
    "test_faults.py",
    "test_repro.py",
    "test_compare.py",
    "test_training.py",
    "test_bounds.py",
    "test_sweep_run.py",
    "test_cluster.py",
    "test_offline_plots.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: order within a file is kept


from pipeline.sweep.cluster import local_cluster as dask_cluster  # noqa: E402, F401 - the tests' cluster


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 for the module (its home, and log, in a temporary folder): its API URL."""
    from pipeline.flows.runtime import free_port, start_prefect_server, stop_process

    home = tmp_path_factory.mktemp("prefect")
    previous = Path.cwd()
    os.chdir(home)  # the server's log goes to ./.prefect
    try:
        process = start_prefect_server(free_port())
    finally:
        os.chdir(previous)
    yield f"http://127.0.0.1:{process.args[-1]}/api"
    stop_process(process)
