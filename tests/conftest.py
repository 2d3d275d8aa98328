import os
from pathlib import Path

import pytest

from pipeline.config import DataConfig, parse_params
from pipeline.data import prepare_dataset

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def make_params(runs=None, data=None, train=None, model=None):
    """A validated Params from small overrides of the defaults."""
    raw = {"data": data or {}, "train": train or {}, "model": model or {},
           "runs": runs or {"mlp": {"model": "mlp"}}}
    return parse_params(raw)


@pytest.fixture(scope="session")
def synthetic_data():
    """A tiny seeded dataset (3 classes of 1x8x8 Gaussian images) for fast training tests."""
    return prepare_dataset(DataConfig(dataset="synthetic", synthetic_samples=240, probe_size=32))


@pytest.fixture(scope="session")
def digits_data():
    return prepare_dataset(DataConfig())
