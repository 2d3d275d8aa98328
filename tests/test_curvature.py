"""Curvature operators against dense float64 ground truth: HVP, GGN, blocks, exact weighting, repeatability."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from pipeline.curvature._checks import CurvatureError
from pipeline.curvature.operators import (
    HVP_IMPLEMENTATIONS,
    GGNOperator,
    HessianOperator,
    ProbeSet,
    dense_matrix,
    parameter_groups,
    relative_difference,
)


def flat_loss(model, x, y, loss="cross_entropy"):
    """The probe-set mean loss as a function of one flat parameter vector (the reference, no batching)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def f(theta):
        params = {n: c.view(s) for n, c, s in zip(names, theta.split(sizes), shapes)}
        out = functional_call(model, params, (x,))
        if loss == "mse":
            return ((out - nn.functional.one_hot(y, out.shape[-1]).double()) ** 2).sum(-1).mean()
        return nn.functional.cross_entropy(out, y)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, theta


@pytest.mark.parametrize("hvp", HVP_IMPLEMENTATIONS)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_hvp_matches_dense_hessian_over_unequal_batches(problem, hvp, loss):
    model, x, y = problem
    probe = ProbeSet.from_tensors(x, y, batch_size=7)  # batches of 7 and 4 samples
    assert [len(b[0]) for b in probe.batches] == [7, 4]
    op = HessianOperator(model, probe, hvp=hvp, loss=loss)
    f, theta = flat_loss(model, x, y, loss)
    dense = torch.func.hessian(f)(theta)
    assert op.dim == theta.numel() == 43
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(op.dim, generator=g, dtype=torch.float64)
        assert relative_difference(op.matvec(v), dense @ v) <= 1e-10
    assert op.products == 3
    assert relative_difference(dense_matrix(op), dense) <= 1e-10


def test_mean_of_batch_means_would_be_wrong(problem):
    """The unequal split matters: weighting the two batch means equally gives a different matrix."""
    model, x, y = problem
    f1, theta = flat_loss(model, x[:7], y[:7])
    f2, _ = flat_loss(model, x[7:], y[7:])
    biased = 0.5 * (torch.func.hessian(f1)(theta) + torch.func.hessian(f2)(theta))
    op = HessianOperator(model, ProbeSet.from_tensors(x, y, 7))
    assert relative_difference(dense_matrix(op), biased) > 1e-3


def test_linear_least_squares_closed_form():
    """Mean squared error of a linear model with one output: H = 2 X^T X / N exactly."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 6, generator=g, dtype=torch.float64)
    y = torch.randn(13, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False).double()
    op = HessianOperator(model, ProbeSet.from_tensors(x, y, 5), loss="mse")
    assert relative_difference(dense_matrix(op), 2 * x.T @ x / 13) <= 1e-12


def test_ggn_matches_dense_jacobian_form(problem):
    model, x, y = problem
    op = GGNOperator(model, ProbeSet.from_tensors(x, y, 7))
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = torch.func.jacrev(lambda p: functional_call(model, p, (x,)))(params)  # {name: (N, C, *shape)}
    J = torch.cat([jac[n].reshape(11, 3, -1) for n in names], dim=-1)  # (N, C, P)
    p = functional_call(model, params, (x,)).softmax(-1)
    H_out = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # (N, C, C)
    dense = torch.einsum("ncp,ncd,ndq->pq", J, H_out, J) / 11
    G = dense_matrix(op)
    assert relative_difference(G, dense) <= 1e-10
    assert torch.linalg.eigvalsh(G).min() >= -1e-12  # positive semi-definite


def test_ggn_equals_hessian_for_linear_least_squares():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    y = torch.randn(9, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(5, 1).double()
    probe = ProbeSet.from_tensors(x, y, 4)
    H = dense_matrix(HessianOperator(model, probe, loss="mse"))
    G = dense_matrix(GGNOperator(model, probe, loss="mse"))
    assert relative_difference(G, H) <= 1e-12


def test_block_operator_is_the_diagonal_block(problem):
    model, x, y = problem
    probe = ProbeSet.from_tensors(x, y, 7)
    full = dense_matrix(HessianOperator(model, probe))
    groups = parameter_groups(model)
    assert list(groups) == ["0", "2"]
    block = dense_matrix(HessianOperator(model, probe, wrt=groups["2"]))
    assert block.shape == (18, 18)
    assert relative_difference(block, full[25:, 25:]) <= 1e-10


def test_parameter_groups_of_a_resnet():
    from pipeline.config import ModelConfig
    from pipeline.training.models import build_model

    model = build_model("resnet20", ModelConfig(), (3, 32, 32), 10)
    blocks = parameter_groups(model, "block")
    assert list(blocks)[:3] == ["conv1", "bn1", "layer1.0"] and list(blocks)[-1] == "fc"
    assert len(blocks) == 12
    assert sum(len(v) for v in blocks.values()) == len(list(model.parameters()))
    assert len(parameter_groups(model, "module")) == 19 + 19 + 1
    with pytest.raises(CurvatureError, match="groups: unknown level 'layer'"):
        parameter_groups(model, "layer")


def conv_bn_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()


def test_batchnorm_in_eval_mode_leaves_model_untouched():
    model = conv_bn_net()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    model.train()
    model(x)  # non-trivial running statistics
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = HessianOperator(model, ProbeSet.from_tensors(x, y, 4))
    dense_matrix(op)
    GGNOperator(model, ProbeSet.from_tensors(x, y, 4)).matvec(torch.ones(op.dim, dtype=torch.float64))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_training_mode_batchnorm_is_refused():
    model = conv_bn_net().train()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(CurvatureError, match=r"not repeatable .*BatchNorm2d '1'.*eval mode"):
        HessianOperator(model, ProbeSet.from_tensors(x, torch.zeros(6, dtype=torch.long), 3))


def test_dropout_is_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).double().train()
    x = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(CurvatureError, match=r"two forward passes differ.*Dropout '1'"):
        HessianOperator(model, ProbeSet.from_tensors(x, torch.zeros(6, dtype=torch.long), 3))


def test_bad_arguments(problem):
    model, x, y = problem
    probe = ProbeSet.from_tensors(x, y, 7)
    with pytest.raises(CurvatureError, match="hvp: unknown implementation 'magic'"):
        HessianOperator(model, probe, hvp="magic")
    with pytest.raises(CurvatureError, match="wrt: unknown parameter names"):
        HessianOperator(model, probe, wrt=["nope.weight"])
    with pytest.raises(CurvatureError, match=r"expected a vector of shape \(43,\)"):
        HessianOperator(model, probe).matvec(torch.zeros(42, dtype=torch.float64))
    with pytest.raises(CurvatureError, match="as many targets"):
        ProbeSet.from_tensors(x, y[:3], 4)


@pytest.mark.parametrize("hvp", HVP_IMPLEMENTATIONS)
def test_eval_batchnorm_hessian_matches_the_module_itself(hvp):
    """The affine rewrite of eval-mode BatchNorm gives the Hessian of the unmodified nn.BatchNorm2d network."""
    model = conv_bn_net()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    model.train()
    model(x * 2 + 1)  # running statistics far from (0, 1)
    model.eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    op = HessianOperator(model, ProbeSet.from_tensors(x, y, 4), hvp=hvp)
    assert isinstance(op.model[1], type(model[1])) is False and isinstance(model[1], nn.BatchNorm2d)
    f, theta = flat_loss(model, x, y)
    assert relative_difference(dense_matrix(op), torch.func.hessian(f)(theta)) <= 1e-10
    assert (
        relative_difference(
            dense_matrix(GGNOperator(model, ProbeSet.from_tensors(x, y, 4))),
            dense_matrix(GGNOperator(model, ProbeSet.from_tensors(x, y, 9))),
        )
        <= 1e-12
    )
