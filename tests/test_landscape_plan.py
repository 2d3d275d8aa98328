"""What the scan stages evaluate (pipeline.landscape.plan): anchoring at the trained model, the paths between models
with their BatchNorm statistics, direction lengths, planes, the curvature map against a dense Hessian, and the
path summaries (barrier, monotonicity)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError, LandscapeConfig, ModelConfig
from pipeline.curvature.operators import HessianOperator, ProbeSet, dense_matrix
from pipeline.landscape.directions import direction_norm
from pipeline.landscape.engine import evaluate_points
from pipeline.landscape.measures import barrier, max_rise
from pipeline.landscape.plan import (
    curvature_at,
    curvature_coords,
    line_scans,
    plane_directions,
    reference_norm,
    state,
    surface_coords,
    symmetric_axis,
)
from pipeline.training.models import build_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def resnet(seed, bn_seed, dtype=torch.float64):
    """A ResNet20 for 8x8 inputs whose BatchNorm running statistics differ from the defaults (seeded)."""
    torch.manual_seed(seed)
    model = build_model("resnet20", ModelConfig(), (1, 8, 8), 10).to(dtype)
    g = torch.Generator().manual_seed(bn_seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8, generator=g, dtype=dtype) * 2 + 0.5)
    return model.eval()


def data(n=20, seed=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def direct_loss(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def evaluate(final, scan, x, y):
    params, buffers = state(final)
    return evaluate_points(
        final,
        params,
        buffers,
        [scan.direction],
        scan.coords,
        x,
        y,
        chunk=1,
        buffer_directions=[scan.buffer_direction] if scan.buffer_direction else None,
    )


def test_axes_put_the_trained_model_on_the_grid():
    axis = symmetric_axis(41, 1.0)
    assert axis[20].item() == 0.0 and axis[0] == -1.0 and axis[-1] == 1.0 and len(axis) == 41
    torch.testing.assert_close(axis, -axis.flip(0), rtol=0, atol=0)
    cfg = LandscapeConfig(surface_points=5, surface_range=0.5, curvature_map=3)
    axis, coords = surface_coords(cfg)
    assert coords.shape == (25, 2) and coords[12].tolist() == [0.0, 0.0]
    assert coords[:5, 0].tolist() == [-0.5] * 5 and coords[:5, 1].tolist() == axis.tolist()  # alpha varies slowest
    assert curvature_coords(cfg).tolist()[4] == [0.0, 0.0] and len(curvature_coords(cfg)) == 9
    assert curvature_coords(LandscapeConfig(curvature_map=1)).tolist() == [[0.0, 0.0]]
    for key, value in (("line_points", 40), ("surface_points", 2)):
        with pytest.raises(ConfigError, match=f"landscape.{key}: must be odd"):
            LandscapeConfig(**{key: value})


def test_line_scans_anchor_at_the_trained_model_and_paths_carry_batchnorm_statistics():
    final, init, partner = resnet(0, 10), resnet(1, 11), resnet(2, 12)
    before = {k: v.clone() for k, v in final.state_dict().items()}
    cfg = LandscapeConfig(line_points=5, path_points=5, line_range=0.5)
    vectors = {
        "vectors": {
            n: torch.randn((2, *p.shape), generator=torch.Generator().manual_seed(4), dtype=p.dtype)
            for n, p in final.named_parameters()
        },
        "eigenvalues": [3.0, 2.0],
    }
    scans = {s.path: s for s in line_scans(final, cfg, init=init, eigenvectors=vectors, partner=partner)}
    assert list(scans) == ["init_final", "random", "eigen", "partner"]
    x, y = data()
    trained = evaluate(final, scans["random"], x, y)[0][2]
    for path, s in scans.items():
        loss, _ = evaluate(final, s, x, y)
        at_trained = int(torch.nonzero(s.coefficient == 0)[0])
        assert loss[at_trained].item() == trained.item(), path  # exactly the trained model, not up to rounding
        assert math.isclose(loss[at_trained].item(), direct_loss(final, x, y), rel_tol=1e-12)
    # init -> final: t = 0 is the initial model, BatchNorm statistics included; t = 1 the trained one
    s = scans["init_final"]
    assert s.alpha.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and s.coefficient.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    loss, accuracy = evaluate(final, s, x, y)
    assert math.isclose(loss[0].item(), direct_loss(init, x, y), rel_tol=1e-10)
    params, buffers = state(final)
    weights_only, _ = evaluate_points(final, params, buffers, [s.direction], s.coords[:1], x, y, chunk=1)
    assert abs(weights_only.item() - direct_loss(init, x, y)) > 1e-3  # the statistics had to move too
    # final -> partner: t = 1 is the second model
    s = scans["partner"]
    loss, _ = evaluate(final, s, x, y)
    assert math.isclose(loss[-1].item(), direct_loss(partner, x, y), rel_tol=1e-10)
    assert s.distance[-1].item() == pytest.approx(direction_norm(s.direction))
    # directions around the trained model share one length, the filter-normalised random direction's
    length = reference_norm(params, cfg)
    for path in ("random", "eigen"):
        assert direction_norm(scans[path].direction) == pytest.approx(length, rel=1e-10)
        assert scans[path].buffer_direction is None
        torch.testing.assert_close(scans[path].distance, scans[path].alpha * length)
    weights = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in final.parameters() if p.dim() > 1))
    assert length == pytest.approx(weights, rel=1e-10)  # filter norms = weight filter norms, biases/BN ignored
    assert all(torch.equal(before[k], v) for k, v in final.state_dict().items())


def test_planes():
    final = resnet(0, 10)
    trajectory = [resnet(s, 20 + s) for s in (1, 2, 3)]
    cfg = LandscapeConfig()
    length = reference_norm(state(final)[0], cfg)
    (dx, dy), info = plane_directions(final, cfg)
    assert info["seeds"] == [0, 1] and not torch.equal(dx["conv1.weight"], dy["conv1.weight"])
    again, _ = plane_directions(final, cfg)
    assert all(torch.equal(again[0][n], dx[n]) for n in dx)  # seeded
    (px, py), info = plane_directions(final, LandscapeConfig(plane="pca"), trajectory=trajectory)
    assert len(info["explained_variance"]) == 2 and info["explained_variance"][0] >= info["explained_variance"][1]
    for d in (px, py):
        assert direction_norm(d) == pytest.approx(length, rel=1e-10)
    flat = [torch.cat([d[n].reshape(-1) for n in d]) for d in (px, py)]
    assert abs(float(flat[0] @ flat[1])) < 1e-8 * length**2  # orthogonal
    with pytest.raises(ValueError, match="eigen plane needs"):
        plane_directions(final, LandscapeConfig(plane="eigen"))


def test_curvature_map_point_matches_the_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(11, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (11,), generator=g)
    probe = ProbeSet.from_tensors(x, y, 7)
    d = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    point = curvature_at(model, [d], [0.3], probe, tol=1e-10, max_hvps=200)
    shifted = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    shifted.load_state_dict({n: p + 0.3 * d[n] for n, p in before.items()})
    eigenvalues = torch.linalg.eigvalsh(dense_matrix(HessianOperator(shifted, probe)))
    assert point["lambda_max"] == pytest.approx(float(eigenvalues[-1]), rel=1e-8)
    assert point["lambda_min"] == pytest.approx(float(eigenvalues[0]), rel=1e-6, abs=1e-10)
    assert point["ratio"] == pytest.approx(abs(float(eigenvalues[0] / eigenvalues[-1])), rel=1e-6)
    assert point["converged"] and point["hvps"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_path_summaries():
    assert barrier([0.1, 0.5, 0.3]) == pytest.approx(0.5 - 0.2)
    assert max_rise([2.0, 1.0, 0.5, 0.1]) == 0.0  # monotone
    assert max_rise([2.0, 0.5, 0.9, 0.1]) == pytest.approx(0.4)
    assert max_rise(torch.tensor([1.0, 1.5, 0.2])) == pytest.approx(0.5)
    assert math.isnan(max_rise([1.0, float("nan")]))
    with pytest.raises(ValueError, match="losses: need at least the two endpoints"):
        max_rise([1.0])


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"splits": ["val"]}, "landscape.splits[0]"),
        ({"splits": []}, "landscape.splits"),
        ({"scheduler": "tcp://10.0.0.1:8786"}, "landscape.scheduler"),
        ({"executor": "dask", "scheduler": "10.0.0.1"}, "landscape.scheduler"),
    ],
)
def test_landscape_config_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        LandscapeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    assert str(err.value).startswith(key + ":") and "\n" not in str(err.value)
