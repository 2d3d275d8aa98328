"""Batch sharpness (SGD) and preconditioned sharpness (Adam) against dense float64 Hessians, Adam's own update and a
tracked training run (Andreyev & Beneventano 2024; Cohen et al. 2022)."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_params, tiny_mlp
from torch import nn

from pipeline.curvature._checks import CurvatureError
from pipeline.curvature.dynamics import (
    adam_preconditioner,
    adam_threshold,
    batch_sharpness,
    gradient_sharpness,
    preconditioned_sharpness,
)
from pipeline.curvature.operators import HessianOperator, ProbeSet, dense_matrix
from pipeline.training.tracking import (
    TRACK_BATCHES_SEED_OFFSET,
    TRACK_COLUMNS,
    preconditioned_threshold,
    tracked_batch_indices,
)
from pipeline.training.trainer import Trainer

F64 = torch.float64
NEW_COLUMNS = (
    "batch_sharpness",
    "batch_sharpness_stderr",
    "batch_count",
    "preconditioned_sharpness",
    "preconditioned_threshold",
    "preconditioned_residual",
)


def _batches(sizes, features=4, classes=3, seed=1, float_targets=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, features, generator=g, dtype=F64)
        y = (
            torch.randn(n, classes, generator=g, dtype=F64)
            if float_targets
            else torch.randint(0, classes, (n,), generator=g)
        )
        out.append((x, y))
    return out


def _dense_ratio(model, x, y, loss):
    """g'Hg/|g|² of the batch's own mean loss, from its dense Hessian."""
    op = HessianOperator(model, ProbeSet.from_tensors(x, y, len(x)), loss=loss)
    h, g = dense_matrix(op), op.gradient()
    return float(g @ h @ g) / float(g @ g)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- batch sharpness


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_batch_sharpness_is_the_mean_of_dense_per_batch_ratios(loss):
    model = tiny_mlp().eval()
    batches = _batches((5, 4, 6))
    before = _state(model)
    result = batch_sharpness(model, batches, loss=loss)
    ratios = np.array([_dense_ratio(model, x, y, loss) for x, y in batches])
    assert result.batches == 3 and result.zero_gradient == 0
    assert result.hvps == 3 and result.gradients == 3  # one gradient (with its graph) and one product per batch
    assert np.allclose(result.per_batch, ratios, rtol=1e-10, atol=0)
    assert result.value == pytest.approx(ratios.mean(), rel=1e-10)
    assert result.stderr == pytest.approx(ratios.std(ddof=1) / math.sqrt(3), rel=1e-9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the module is never mutated


def test_batch_sharpness_of_one_full_batch_is_the_gradient_sharpness_of_that_set(problem):
    model, x, y = problem
    model.eval()
    # the probe operator splits the set into batches of 4: the same mean loss, summed in another order
    expected = gradient_sharpness(HessianOperator(model, ProbeSet.from_tensors(x, y, 4)))
    result = batch_sharpness(model, [(x, y)])
    assert result.value == pytest.approx(expected, rel=1e-10)
    assert result.batches == 1 and math.isnan(result.stderr)  # no spread from a single batch


def test_batches_with_a_zero_gradient_are_left_out_and_counted():
    """A zero linear model fits zero targets exactly: that batch has g_B = 0 and no direction."""
    model = nn.Linear(4, 3).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    model.eval()
    batches = _batches((5, 6), float_targets=True)
    zero = (batches[0][0], torch.zeros(5, 3, dtype=F64))
    result = batch_sharpness(model, [batches[0], zero, batches[1]], loss="mse")
    ratios = [_dense_ratio(model, x, y, "mse") for x, y in batches]
    assert result.batches == 2 and result.zero_gradient == 1 and result.hvps == 2 and result.gradients == 3
    assert math.isnan(result.per_batch[1])
    assert result.value == pytest.approx(sum(ratios) / 2, rel=1e-10)


def test_batch_sharpness_refuses_bad_input():
    model = tiny_mlp().eval()
    with pytest.raises(CurvatureError, match="batches: empty"):
        batch_sharpness(model, [])
    with pytest.raises(CurvatureError, match=r"batches\[0\]: expected an \(x, y\) pair"):
        batch_sharpness(model, [torch.zeros(3, 4)])
    with pytest.raises(CurvatureError, match=r"batches\[1\]: probe set: need as many targets"):
        batch_sharpness(model, [*_batches((3,)), (torch.zeros(3, 4, dtype=F64), torch.zeros(2, dtype=torch.long))])
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double().train()
    with pytest.raises(CurvatureError, match="not repeatable"):
        batch_sharpness(bn, _batches((5,)))


def test_tracked_batches_are_seeded_disjoint_and_capped():
    state = torch.get_rng_state()
    first = tracked_batch_indices(10, 3, 8, seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is not used
    assert [len(b) for b in first] == [3, 3, 3]  # capped at 10 // 3
    assert len(torch.cat(first).unique()) == 9  # without replacement
    again = tracked_batch_indices(10, 3, 8, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(4 + TRACK_BATCHES_SEED_OFFSET))[:9]
    assert torch.equal(torch.cat(first), expected)
    assert [b.tolist() for b in tracked_batch_indices(10, "full", 8, seed=4)] == [list(range(10))]
    assert tracked_batch_indices(10, 3, 0, seed=4) == []


# ---------------------------------------------------------------------------------------------- preconditioned


def test_preconditioned_sharpness_is_the_top_eigenvalue_of_dense_p_inverse_h(problem):
    model, x, y = problem
    model.eval()
    probe = ProbeSet.from_tensors(x, y, 4)
    g = torch.Generator().manual_seed(5)
    p = {n: torch.rand(w.shape, generator=g, dtype=F64) * 10 + 0.05 for n, w in model.named_parameters()}
    op = HessianOperator(model, probe)
    h, d = dense_matrix(op).numpy(), op.flatten(p).numpy()
    eig = np.linalg.eigvals(h / d[:, None])  # P^-1 H, not symmetric
    exact = float(eig.real.max())
    assert np.abs(eig.imag).max() < 1e-8 * np.abs(eig).max()  # similar to a symmetric matrix: real spectrum
    value, residual, converged, hvps, vector = preconditioned_sharpness(
        model, probe, p, tol=1e-10, max_hvps=200, seed=3
    )
    assert converged and 0 < hvps <= 200
    assert value == pytest.approx(exact, rel=1e-6)
    a = h / np.sqrt(d)[:, None] / np.sqrt(d)[None, :]  # D^-1/2 H D^-1/2
    assert float(np.linalg.eigvalsh(a)[-1]) == pytest.approx(exact, rel=1e-9)
    u = vector.numpy()
    assert np.linalg.norm(a @ u - value * u) == pytest.approx(residual, rel=1e-3, abs=1e-9)
    assert residual < 1e-6 * abs(value)
    # reusing an operator at the same weights (as the tracker does) counts the products there
    shared = HessianOperator(model, probe)
    again = preconditioned_sharpness(model, probe, p, tol=1e-10, max_hvps=200, v0=vector, operator=shared)
    assert again.value == pytest.approx(exact, rel=1e-6) and shared.products == again.hvps


def test_preconditioned_sharpness_refuses_bad_preconditioners(problem):
    model, x, y = problem
    model.eval()
    probe = ProbeSet.from_tensors(x, y, 11)
    p = {n: torch.ones_like(w) for n, w in model.named_parameters()}
    with pytest.raises(CurvatureError, match="preconditioner: must be positive"):
        preconditioned_sharpness(model, probe, {**p, "0.bias": torch.zeros(5, dtype=F64)})
    with pytest.raises(CurvatureError, match="preconditioner: names"):
        preconditioned_sharpness(model, probe, {k: v for k, v in p.items() if k != "2.weight"})
    with pytest.raises(CurvatureError, match="v0"):
        preconditioned_sharpness(model, probe, p, v0=torch.ones(3, dtype=F64))


def test_adam_preconditioner_follows_the_formula_and_adams_own_update(problem):
    model, x, y = problem
    lr, betas, eps = 0.01, (0.8, 0.95), 1e-6
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps)
    assert adam_preconditioner(optimizer, model) is None  # no second moment before the first step
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        before = {n: w.detach().clone() for n, w in model.named_parameters()}
        optimizer.step()
    p = adam_preconditioner(optimizer, model)
    t = 3
    for name, w in model.named_parameters():
        state = optimizer.state[w]
        expected = (1 - betas[0] ** t) * ((state["exp_avg_sq"] / (1 - betas[1] ** t)).sqrt() + eps)
        torch.testing.assert_close(p[name], expected, rtol=1e-12, atol=0)
        # the update Adam took is θ_t − θ_{t−1} = −η P_t⁻¹ m_t with the raw first moment m_t
        torch.testing.assert_close(w.detach() - before[name], -lr * state["exp_avg"] / p[name], rtol=1e-9, atol=1e-15)
    with pytest.raises(CurvatureError, match="optimizer: expected a torch.optim.Adam"):
        adam_preconditioner(torch.optim.SGD(model.parameters(), lr=0.1), model)


def test_adam_threshold_is_38_over_lr_at_beta1_09():
    assert adam_threshold(0.01, 0.9) == pytest.approx(3800.0, rel=1e-12)
    assert adam_threshold(0.1, 0.0) == pytest.approx(20.0)  # no momentum: gradient descent's 2/η
    assert adam_threshold(0.0, 0.9) == math.inf
    with pytest.raises(CurvatureError, match="beta1"):
        adam_threshold(0.01, 1.0)


# ---------------------------------------------------------------------------------------------- tracked training


def _run(**train):
    settings = {
        "epochs": 2,
        "batch_size": 32,
        "loss": "mse",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "schedule": "constant",
        "track_sharpness_every": 2,
        "track_sharpness_unit": "steps",
        "track_tol": 1e-6,
        "track_batches": 3,
        "checkpoint_every": 1,
        **train,
    }
    return make_params(model={"mlp_depth": 0}, train=settings).run("mlp")


def test_a_tracked_sgd_run_fills_the_batch_sharpness_columns(synthetic_data, tmp_path):
    trainer = Trainer(_run(), synthetic_data, tmp_path)
    trainer.start()
    # the trainer's fixed batches: tracked_batch_indices of the train split, measured at the initial weights
    indices = tracked_batch_indices(len(trainer.x_train), 32, 3, trainer.cfg.seed)
    batches = [(trainer.x_train[i], trainer.y_train[i]) for i in indices]
    expected = batch_sharpness(copy.deepcopy(trainer.model).eval(), batches, loss="mse")
    while not trainer.done:
        trainer.train_epoch()
    rows = pd.DataFrame(trainer.state.sharpness)
    assert list(rows.columns) == list(TRACK_COLUMNS) and set(NEW_COLUMNS) <= set(rows.columns)
    assert rows.batch_sharpness.iloc[0] == pytest.approx(expected.value, rel=1e-12)
    assert np.isfinite(rows[["batch_sharpness", "batch_sharpness_stderr"]].to_numpy()).all()
    assert (rows.batch_count == 3).all() and (rows.batch_sharpness > 0).all()
    assert rows[["preconditioned_sharpness", "preconditioned_threshold", "preconditioned_residual"]].isna().all().all()
    summary = trainer.summary()
    last = rows.iloc[-1]
    assert summary["tracked_batch_sharpness"] == last.batch_sharpness
    ratios = rows.batch_sharpness / rows.stability_threshold
    assert summary["batch_sharpness_over_threshold_max"] == pytest.approx(ratios.max(), rel=1e-12)
    quarter = ratios.iloc[len(rows) - max(len(rows) // 4, 1) :]
    assert summary["batch_sharpness_over_threshold_last_quarter"] == pytest.approx(quarter.mean(), rel=1e-12)
    lam = rows.lambda_max / rows.stability_threshold
    assert summary["lambda_max_over_threshold_max"] == pytest.approx(lam.max(), rel=1e-12)
    assert summary["tracked_preconditioned_sharpness"] is None
    assert summary["preconditioned_over_threshold_last_quarter"] is None


def test_a_tracked_adam_run_measures_the_preconditioned_sharpness_exactly(synthetic_data, tmp_path):
    """Linear model, MSE: the probe Hessian is small enough to be dense; the preconditioner is Adam's state just
    before each tracked step (captured by on_step, which runs between steps)."""
    lr = 0.01
    trainer = Trainer(_run(optimizer="adam", lr=lr), synthetic_data, tmp_path)
    trainer.start()
    captured = {}

    def capture(step):
        if step % 2 == 0:  # tracked next
            captured[step] = (
                copy.deepcopy(trainer.model).eval(),
                adam_preconditioner(trainer.optimizer, trainer.model),
            )

    while not trainer.done:
        trainer.train_epoch(on_step=capture)
    rows = pd.DataFrame(trainer.state.sharpness).set_index("step")
    assert math.isnan(rows.preconditioned_sharpness.loc[0])  # before Adam's first step: no preconditioner
    later = rows.drop(index=0)
    assert np.isfinite(later[["preconditioned_sharpness", "preconditioned_residual"]].to_numpy()).all()
    assert rows.preconditioned_threshold.to_numpy() == pytest.approx(38.0 / lr, rel=1e-12)
    assert rows.preconditioned_threshold.loc[0] == preconditioned_threshold(trainer.cfg, lr)
    assert rows.stability_threshold.isna().all() and np.isfinite(rows.batch_sharpness).all()
    x, y = synthetic_data.probe_tensors()
    checked = 0
    for step, (model, p) in captured.items():
        if step not in rows.index:
            continue
        op = HessianOperator(model, ProbeSet.from_tensors(x, y, len(x)), loss="mse")
        h, d = dense_matrix(op), op.flatten(p)
        a = h / d.sqrt()[:, None] / d.sqrt()[None, :]
        assert rows.preconditioned_sharpness.loc[step] == pytest.approx(float(torch.linalg.eigvalsh(a)[-1]), rel=1e-5)
        checked += 1
    assert checked >= 3
    summary = trainer.summary()
    assert summary["tracked_preconditioned_sharpness"] == rows.preconditioned_sharpness.iloc[-1]
    quarter = (rows.preconditioned_sharpness / rows.preconditioned_threshold).iloc[len(rows) - max(len(rows) // 4, 1) :]
    assert summary["preconditioned_over_threshold_last_quarter"] == pytest.approx(quarter.mean(), rel=1e-12)
    assert summary["sharpness_over_threshold_last_quarter"] is None  # no SGD threshold for Adam
