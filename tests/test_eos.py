"""The edge-of-stability preset (Cohen et al. 2021): slow, run with `pytest -m slow` (about a minute)."""

import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.slow
def test_full_batch_gradient_descent_hovers_at_two_over_lr(tmp_path):
    import edge_of_stability

    result = edge_of_stability.run(REPO / "presets" / "edge_of_stability.yaml", "eos", tmp_path)
    assert result["status"] == "completed"
    assert result["initial_lambda_max"] < 0.5 * result["two_over_lr"]  # it starts well below 2/η ...
    assert result["max_lambda_max"] >= result["two_over_lr"]  # ... sharpens progressively up to it ...
    assert abs(result["last_quarter_lambda_max_over_two_over_lr"] - 1) <= 0.15  # ... and hovers there
    assert result["mean_hvps_per_tracked_step"] < result["cold_start_hvps"]  # warm starts pay off
    assert json.loads((tmp_path / "eos.json").read_text())["at_edge_of_stability"] is True
    assert (tmp_path / "eos.png").stat().st_size > 10_000
