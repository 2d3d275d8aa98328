"""Training-dynamics quantities against closed forms and dense float64 Hessians: noise scale, sharpness, step model."""

import math

import pytest
import torch
from conftest import tiny_mlp
from torch import nn

from pipeline.config import ModelConfig
from pipeline.curvature._checks import CurvatureError
from pipeline.curvature.dynamics import (
    directional_sharpness,
    gradient_noise,
    gradient_sharpness,
    per_sample_gradients,
    quadratic_step_model,
)
from pipeline.curvature.operators import HessianOperator, ProbeSet, dense_matrix, relative_difference
from pipeline.training.models import build_model


@pytest.fixture
def regression():
    """Linear model with a bias and one output under MSE: L(w, b) = mean_i (x_i^T w + b - y_i)^2, exactly quadratic."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 6, generator=g, dtype=torch.float64)
    y = torch.randn(13, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(6, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 6, generator=g, dtype=torch.float64))
        model.bias.fill_(0.3)
    return model, x, y


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def resnet_with_running_stats(shape=(3, 8, 8)):
    """The project's ResNet20 on tiny inputs, BatchNorm statistics moved away from (0, 1), then eval mode."""
    torch.manual_seed(0)
    model = build_model("resnet20", ModelConfig(), shape, 4)
    with torch.no_grad():
        model.train()
        model(torch.randn(16, *shape) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


# ------------------------------------------------------------------------------------------------------------------
# Per-sample gradients and noise scale
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_noise_scale_of_linear_regression_in_closed_form(regression, chunk_size):
    """MSE per-sample loss (x^T w + b - y)^2 (no ½, as in loss_sum) has gradient 2 r_i [x_i, 1], r_i the residual."""
    model, x, y = regression
    before = state(model)
    probe = ProbeSet.from_tensors(x, y, batch_size=5)  # batches of 5, 5, 3
    noise = gradient_noise(model, probe, loss="mse", chunk_size=chunk_size)

    w, b = model.weight.detach().reshape(-1), model.bias.detach()
    r = x @ w + b - y.reshape(-1)  # (N,)
    X1 = torch.cat([x, torch.ones(13, 1, dtype=torch.float64)], dim=1)  # (N, 7): [x_i, 1]
    G = 2 * r[:, None] * X1  # (N, 7) per-sample gradients
    g = G.mean(0)
    trace = ((G - g) ** 2).sum() / (13 - 1)
    assert noise.n == 13
    assert noise.loss == pytest.approx(float((r**2).mean()), rel=1e-12)
    assert relative_difference(torch.cat([noise.gradient["weight"].reshape(-1), noise.gradient["bias"]]), g) <= 1e-12
    assert noise.grad_norm_sq == pytest.approx(float(g @ g), rel=1e-10)
    assert noise.trace_covariance == pytest.approx(float(trace), rel=1e-10)
    assert noise.noise_scale == pytest.approx(float(trace / (g @ g)), rel=1e-10)
    assert noise.true_grad_norm_sq == pytest.approx(float(g @ g - trace / 13), rel=1e-10)
    assert noise.noise_scale_debiased == pytest.approx(float(trace / (g @ g - trace / 13)), rel=1e-10)
    assert noise.bn_mode == "eval"
    assert_unchanged(model, before)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])  # mse with integer labels: one-hot targets
def test_noise_gradient_is_the_probe_gradient(problem, loss):
    model, x, y = problem
    probe = ProbeSet.from_tensors(x, y, 4)
    noise = gradient_noise(model, probe, loss=loss, chunk_size=3)
    op = HessianOperator(model, probe, loss=loss)
    assert relative_difference(op.flatten(noise.gradient), op.gradient()) <= 1e-12
    assert noise.loss == pytest.approx(op.loss_value(), rel=1e-12)
    # the covariance trace from all per-sample gradients at once, centred directly
    G = per_sample_gradients(model, x, y, loss=loss)
    flat = torch.cat([G[n].reshape(11, -1) for n in op.names], dim=1)  # (N, 43)
    assert noise.trace_covariance == pytest.approx(float(((flat - flat.mean(0)) ** 2).sum() / 10), rel=1e-10)
    # a subset of the parameters: the matching columns (last layer: 15 weights, 3 biases)
    last = gradient_noise(model, probe, loss=loss, wrt=["2.weight", "2.bias"])
    tail = flat[:, 25:]
    assert last.trace_covariance == pytest.approx(float(((tail - tail.mean(0)) ** 2).sum() / 10), rel=1e-10)


def test_vmap_per_sample_gradients_match_a_loop_on_resnet20_with_batchnorm():
    model = resnet_with_running_stats()
    before = state(model)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (5,), generator=g)
    grads = per_sample_gradients(model, x, y)
    params = [p for _, p in model.named_parameters()]
    for i in range(5):  # the unmodified module (nn.BatchNorm2d in eval mode), one sample at a time
        loop = torch.autograd.grad(
            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum"), params
        )
        for (name, _), expected in zip(model.named_parameters(), loop):
            torch.testing.assert_close(grads[name][i], expected, rtol=1e-5, atol=1e-5, msg=name)
    noise = gradient_noise(model, ProbeSet.from_tensors(x, y, 3))
    assert math.isfinite(noise.noise_scale) and noise.noise_scale > 0
    assert_unchanged(model, before)
    assert not model.training


def test_training_mode_batchnorm_is_refused_for_per_sample_gradients():
    model = resnet_with_running_stats().train()
    x, y = torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(CurvatureError, match="not repeatable.*eval mode"):
        gradient_noise(model, ProbeSet.from_tensors(x, y, 2))


# ------------------------------------------------------------------------------------------------------------------
# Directional sharpness
# ------------------------------------------------------------------------------------------------------------------


def test_directional_sharpness_against_the_dense_hessian(problem):
    model, x, y = problem
    op = HessianOperator(model, ProbeSet.from_tensors(x, y, 7))
    H = dense_matrix(op)
    values, vectors = torch.linalg.eigh(H)
    top = vectors[:, -1]
    assert directional_sharpness(op, top) == pytest.approx(float(values[-1]), rel=1e-10)
    assert directional_sharpness(op, -3.7 * top) == pytest.approx(float(values[-1]), rel=1e-10)
    assert directional_sharpness(op, vectors[:, 0]) == pytest.approx(float(values[0]), rel=1e-8, abs=1e-12)
    g = op.gradient()
    assert gradient_sharpness(op) == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-10)
    v = torch.randn(op.dim, dtype=torch.float64)
    assert directional_sharpness(op, op.unflatten(v)) == pytest.approx(float(v @ H @ v / (v @ v)), rel=1e-10)


# ------------------------------------------------------------------------------------------------------------------
# Quadratic model of one step
# ------------------------------------------------------------------------------------------------------------------


def test_quadratic_model_is_exact_for_a_quadratic_loss(regression):
    model, x, y = regression
    before = state(model)
    probe = ProbeSet.from_tensors(x, y, 5)
    X1 = torch.cat([x, torch.ones(13, 1, dtype=torch.float64)], dim=1)
    H = 2 * X1.T @ X1 / 13  # exact Hessian over (weight, bias)
    g = HessianOperator(model, probe, loss="mse").gradient()
    gen = torch.Generator().manual_seed(8)
    random = torch.randn(7, generator=gen, dtype=torch.float64)
    eta = 0.3
    for delta in (random, -eta * g):
        step = {"weight": delta[:6].reshape(1, 6), "bias": delta[6:]}
        pred = quadratic_step_model(model, probe, step, loss="mse")
        assert pred.first_order == pytest.approx(float(g @ delta), rel=1e-12)
        assert pred.second_order == pytest.approx(float(0.5 * delta @ H @ delta), rel=1e-12)
        assert abs(pred.error) <= 1e-12 * max(1.0, pred.loss_before)
        assert pred.ratio == pytest.approx(1.0, abs=1e-10)
        assert pred.step_norm == pytest.approx(float(delta.norm()), rel=1e-12)
    # the gradient step: -η‖g‖² + ½η² gᵀHg, cosine 1
    assert pred.first_order == pytest.approx(float(-eta * g @ g), rel=1e-12)
    assert pred.second_order == pytest.approx(float(0.5 * eta**2 * g @ H @ g), rel=1e-12)
    assert pred.cosine == pytest.approx(1.0, rel=1e-12)
    assert pred.step_sharpness == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-12)
    assert_unchanged(model, before)


def test_quadratic_model_error_is_third_order_on_an_mlp(problem):
    """Cross-entropy is not quadratic: the remainder ΔL - ΔL_pred shrinks like η³ (×1/8 per halving)."""
    model, x, y = problem
    probe = ProbeSet.from_tensors(x, y, 7)
    v = {
        n: torch.randn(p.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        for n, p in model.named_parameters()
    }
    etas = [0.02 / 2**k for k in range(5)]
    preds = [quadratic_step_model(model, probe, {n: -eta * d for n, d in v.items()}) for eta in etas]
    errors = [abs(p.error) for p in preds]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(r == pytest.approx(8.0, rel=0.15) for r in ratios[1:]), ratios
    assert [abs(p.ratio - 1) for p in preds] == sorted(abs(p.ratio - 1) for p in preds)[::-1]
    assert abs(preds[-1].ratio - 1) < 1e-2
    # first order ∝ η, second order ∝ η²
    assert preds[0].first_order / preds[1].first_order == pytest.approx(2.0, rel=1e-12)
    assert preds[0].second_order / preds[1].second_order == pytest.approx(4.0, rel=1e-12)


def test_quadratic_model_at_given_params_and_for_part_of_the_parameters(problem):
    model, x, y = problem
    before = state(model)
    probe = ProbeSet.from_tensors(x, y, 7)
    other = tiny_mlp()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    step = {"2.weight": 0.05 * torch.ones(3, 5, dtype=torch.float64)}
    at_params = quadratic_step_model(model, probe, step, params=other.state_dict())
    direct = quadratic_step_model(other, probe, step)
    assert at_params.actual == pytest.approx(direct.actual, rel=1e-12)
    assert at_params.predicted == pytest.approx(direct.predicted, rel=1e-12)
    # a step in one layer only: the full Hessian with zeros elsewhere
    op = HessianOperator(model, probe)
    full = {n: torch.zeros_like(p) for n, p in model.named_parameters()} | step
    delta = op.flatten(full)
    part = quadratic_step_model(model, probe, step)
    assert part.second_order == pytest.approx(0.5 * float(delta @ dense_matrix(op) @ delta), rel=1e-10)
    assert_unchanged(model, before)


def test_quadratic_model_on_resnet20_leaves_the_model_untouched():
    model = resnet_with_running_stats()
    before = state(model)
    gen = torch.Generator().manual_seed(10)
    x, y = torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)
    probe = ProbeSet.from_tensors(x, y, 4)
    noise = gradient_noise(model, probe)
    eta = 1e-5  # this random network is sharp (g^T H g / ‖g‖² ≈ 1.7e3), so η·sharpness ≈ 0.02
    step = {n: -eta * g.float() for n, g in noise.gradient.items()}
    pred = quadratic_step_model(model, probe, step)
    assert pred.cosine == pytest.approx(1.0, rel=1e-5)
    assert pred.first_order == pytest.approx(-eta * noise.grad_norm_sq, rel=1e-4)
    assert pred.ratio == pytest.approx(1.0, abs=0.02)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------------------------------------------


def test_bad_arguments(problem):
    model, x, y = problem
    probe = ProbeSet.from_tensors(x, y, 7)
    op = HessianOperator(model, probe)
    with pytest.raises(CurvatureError, match=r"chunk_size: must be an integer >= 1"):
        gradient_noise(model, probe, chunk_size=0)
    with pytest.raises(CurvatureError, match="probe: need at least 2 samples"):
        gradient_noise(model, ProbeSet.from_tensors(x[:1], y[:1], 1))
    with pytest.raises(CurvatureError, match="loss: unknown name 'hinge'"):
        gradient_noise(model, probe, loss="hinge")
    with pytest.raises(CurvatureError, match="probe: expected a ProbeSet"):
        gradient_noise(model, (x, y))
    with pytest.raises(CurvatureError, match="direction: is the zero vector"):
        directional_sharpness(op, torch.zeros(op.dim, dtype=torch.float64))
    with pytest.raises(CurvatureError, match=r"direction: expected a vector of shape \(43,\), got \(42,\)"):
        directional_sharpness(op, torch.ones(42, dtype=torch.float64))
    with pytest.raises(CurvatureError, match=r"direction: names must be .*missing \['2.bias'\]"):
        directional_sharpness(op, {n: p for n, p in model.named_parameters() if n != "2.bias"})
    with pytest.raises(CurvatureError, match="direction: has non-finite entries"):
        directional_sharpness(op, torch.full((op.dim,), math.nan, dtype=torch.float64))
    with pytest.raises(CurvatureError, match=r"step: \['nope'\] are not trainable parameters"):
        quadratic_step_model(model, probe, {"nope": torch.zeros(1)})
    with pytest.raises(CurvatureError, match=r"step: shapes differ .*2.bias \(4,\) vs \(3,\)"):
        quadratic_step_model(model, probe, {"2.bias": torch.zeros(4, dtype=torch.float64)})
    with pytest.raises(CurvatureError, match="step: expected a non-empty dict"):
        quadratic_step_model(model, probe, {})
    with pytest.raises(CurvatureError, match="params: unknown name 'nope'"):
        quadratic_step_model(model, probe, {"2.bias": torch.zeros(3)}, params={"nope": torch.zeros(1)})
    bn = resnet_with_running_stats()
    xb, yb = torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(CurvatureError, match=r"step: \['bn1.running_mean'\] are buffers, not parameters"):
        quadratic_step_model(bn, ProbeSet.from_tensors(xb, yb, 2), {"bn1.running_mean": torch.zeros(16)})


def test_the_step_model_reuses_the_operator_of_the_eigen_solve(problem):
    """Given the operator a tracked solve used at θ, the step model spends one product and one forward more, no
    gradient, and predicts what a fresh operator predicts."""
    from pipeline.curvature.operators import account

    model, x, y = problem
    probe = ProbeSet.from_tensors(x, y, 7)
    step = {n: 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
    fresh = quadratic_step_model(model, probe, step)
    op = HessianOperator(model, probe)
    op.gradient(), op.matvec(torch.ones(op.dim, dtype=torch.float64))
    before = account(op)
    reused = quadratic_step_model(model, probe, step, operator=op)
    after = account(op)
    assert after["hvps"] - before["hvps"] == 1 and after["gradients"] == before["gradients"]
    # one forward: the loss at θ (the loss at the moved point is evaluated outside the operator)
    assert after["forwards"] - before["forwards"] == pytest.approx(1)
    for field in ("loss_before", "loss_after", "first_order", "second_order", "step_norm", "cosine"):
        assert getattr(reused, field) == pytest.approx(getattr(fresh, field), rel=1e-10, abs=1e-14), field
    with pytest.raises(CurvatureError, match="operator: spans"):
        quadratic_step_model(model, probe, {n: step[n] for n in list(step)[:1]}, operator=op)
