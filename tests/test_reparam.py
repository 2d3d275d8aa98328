"""Dinh et al.'s function-preserving rescalings: which measures move with the parametrisation and which do not."""

import pytest
import torch
from torch import nn

from pipeline.config import HessianConfig
from pipeline.curvature._checks import CurvatureError
from pipeline.curvature.analysis import RESCALED, analyse
from pipeline.curvature.eigen import lanczos
from pipeline.curvature.flatness import adaptive_sharpness, epsilon_sharpness, pac_bayes_sigma
from pipeline.curvature.operators import HessianOperator, ProbeSet
from pipeline.curvature.reparam import dinh_rescale, norm_pairs, output_change, relu_pairs
from pipeline.curvature.trace import hutchpp
from pipeline.metrics import hessian_headline
from pipeline.training.models import MLP, ResNet

F64 = torch.float64
ALPHA = 10.0


@pytest.fixture(scope="module")
def trained_mlp():
    """A ReLU MLP 12 -> 16 -> 16 -> 3 in float64, trained by full-batch GD to a low loss on 90 samples."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 12, generator=g, dtype=F64)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 1).long()) % 3
    torch.manual_seed(0)
    model = MLP(12, 3, [16, 16]).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, ProbeSet.from_tensors(x, y, 45)


def lambda_max(model, probe, wrt=None):
    op = HessianOperator(model, probe, wrt=wrt)
    return float(lanczos(op.matvec, op.dim, k_largest=1, tol=1e-10, max_matvecs=op.dim)[0].eigenvalues[0])


def trace(model, probe):
    op = HessianOperator(model, probe)
    return hutchpp(op.matvec, op.dim, matvecs=op.dim * 3, seed=0).value  # exact: more products than dimensions


def test_the_rescaling_keeps_the_function_and_leaves_the_model_alone(trained_mlp):
    model, probe = trained_mlp
    before = {n: p.clone() for n, p in model.state_dict().items()}
    assert relu_pairs(model) == [("net.1", "net.3"), ("net.3", "net.5")]
    rescaled = dinh_rescale(model, ALPHA)
    assert output_change(model, rescaled, probe) <= 1e-6
    assert torch.equal(rescaled.net[1].weight, model.net[1].weight * ALPHA)
    assert torch.equal(rescaled.net[3].weight, model.net[3].weight / ALPHA)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_lambda_max_trace_and_ball_sharpness_move_adaptive_and_magnitude_sigma_do_not(trained_mlp):
    model, probe = trained_mlp
    rescaled = dinh_rescale(model, ALPHA)
    assert output_change(model, rescaled, probe) <= 1e-6

    def ratio(f):
        return f(rescaled) / f(model)

    assert ratio(lambda m: lambda_max(m, probe)) > 10
    assert ratio(lambda m: trace(m, probe)) > 10
    assert ratio(lambda m: epsilon_sharpness(m, probe, epsilon=0.5, seed=1).increase) > 10
    for norm, rho in (("2", 0.1), ("inf", 0.01)):  # worst case: the same starts (seed), m-sharpness over 2 batches
        worst = ratio(lambda m: adaptive_sharpness(m, probe, rho=rho, norm=norm, m=45, seed=2).value)
        assert abs(worst - 1) < 0.01, norm
        average = ratio(lambda m: adaptive_sharpness(m, probe, rho=0.2, norm=norm, kind="average", seed=3).value)
        assert abs(average - 1) < 0.01, norm
    sigma = ratio(lambda m: pac_bayes_sigma(m, probe, magnitude_aware=True, bound=0.05, rtol=1e-4, seed=4).sigma)
    assert abs(sigma - 1) < 0.01
    iso = ratio(lambda m: pac_bayes_sigma(m, probe, magnitude_aware=False, bound=0.05, rtol=1e-4, seed=4).sigma)
    assert abs(iso - 1) > 0.1  # the isotropic sigma is not invariant


def test_a_batchnorm_network_is_invariant_to_the_scale_of_the_layer_before_each_norm():
    torch.manual_seed(0)
    model = ResNet(1, 4, blocks_per_stage=1, widths=(4, 8, 8)).double()
    x = torch.randn(24, 1, 8, 8, dtype=F64)
    model.train()
    for _ in range(3):  # running statistics that are not the initial ones
        model(x)
    model.eval()
    pairs = norm_pairs(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [a for a, _ in pairs] == convs  # every convolution feeds a BatchNorm
    rescaled = dinh_rescale(model, ALPHA, kind="norm")
    probe = ProbeSet.from_tensors(x, torch.zeros(24, dtype=torch.long), 12)
    assert output_change(model, rescaled, probe) <= 1e-12
    # f(alpha w) = f(w) for each convolution's weights: their Hessian block at alpha w is H(w) / alpha^2
    weights = [f"{n}.weight" for n in convs]
    ratio = lambda_max(rescaled, probe, weights) / lambda_max(model, probe, weights)
    assert ratio == pytest.approx(1 / ALPHA**2, rel=1e-6)


def test_no_pair_is_a_one_line_error():
    with pytest.raises(CurvatureError, match="no relu pair"):
        dinh_rescale(nn.Sequential(nn.Linear(3, 2)), ALPHA)
    with pytest.raises(CurvatureError, match="alpha"):
        dinh_rescale(nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)), 0.0)


def test_analyse_reports_every_measure_of_the_rescaled_network(trained_mlp):
    model, probe = trained_mlp
    cfg = HessianConfig(
        top_k=1, lambda_min=False, trace=("hutchpp",), trace_hvps=30, density_runs=0, groups="none", noise=False,
        flatness=("epsilon", "pac_bayes", "adaptive"), adaptive_m=45, reparam_alpha=ALPHA,
    )  # fmt: skip
    report = analyse(model, probe, cfg, details=True)
    rows = __import__("pandas").DataFrame(report.rows).assign(epoch=1, checkpoint="final.pt")
    assert set(rows[rows.operator == RESCALED].quantity) >= {"eigenvalue", "trace", "adaptive_sharpness"}
    head = hessian_headline(rows, 0.1)["reparametrisation"]
    assert head["alpha"] == ALPHA and head["pair"] == ["net.1", "net.3"] and head["output_change"] < 1e-5
    m = head["measures"]
    assert m["lambda_max"]["ratio"] > 10 and m["epsilon_sharpness_absolute"]["ratio"] > 10
    for key in ("adaptive_sharpness_worst_l2", "adaptive_sharpness_worst_linf"):
        assert abs(m[key]["ratio"] - 1) < 0.01, key
    assert m["lambda_max"]["before"] == hessian_headline(rows, 0.1)["lambda_max"]
