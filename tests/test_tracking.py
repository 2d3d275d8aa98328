"""Sharpness tracking during training, full-batch gradient descent and the MSE loss (issue 6)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import make_params

from pipeline.config import ConfigError, TrainConfig, build_section
from pipeline.curvature.eigen import lanczos
from pipeline.curvature.operators import HessianOperator, ProbeSet, loss_sum
from pipeline.tables import SHARPNESS_HISTORY, read_metadata
from pipeline.training.steps import batch_loss, batch_order
from pipeline.training.tracking import TRACK_COLUMNS, stability_threshold, tracking_due
from pipeline.training.trainer import Trainer, train

F64 = torch.float64


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows).drop(columns="seconds")


# ---------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "raw, key, words",
    [
        ({"batch_size": "fulll"}, "train.batch_size", ("'full'", "fulll")),
        ({"batch_size": 0}, "train.batch_size", (">= 1",)),
        ({"loss": "l1"}, "train.loss", ("cross_entropy", "mse")),
        ({"track_sharpness_unit": "minutes"}, "train.track_sharpness_unit", ("steps", "epochs")),
        ({"track_sharpness_every": -1}, "train.track_sharpness_every", (">= 0",)),
        ({"track_tol": 0.0}, "train.track_tol", ("> 0",)),
    ],
)
def test_bad_training_options_name_the_key_and_what_is_allowed(raw, key, words):
    with pytest.raises(ConfigError) as err:
        build_section(TrainConfig, raw, "train")
    message = str(err.value)
    assert message.startswith(key + ":") and "\n" not in message
    assert all(w in message for w in words), message


def test_stability_thresholds_follow_their_closed_forms():
    assert stability_threshold(TrainConfig(momentum=0.0), 0.1) == pytest.approx(20.0)
    assert stability_threshold(TrainConfig(momentum=0.9), 0.1) == pytest.approx(38.0)  # (2 + 2β)/η
    assert stability_threshold(TrainConfig(momentum=0.9, nesterov=True), 0.1) == pytest.approx(3.8 / 0.28)
    assert math.isnan(stability_threshold(TrainConfig(optimizer="adam"), 0.1))
    assert stability_threshold(TrainConfig(momentum=0.0), 0.0) == math.inf


def test_tracking_schedule_in_steps_and_epochs():
    steps = TrainConfig(track_sharpness_every=4, track_sharpness_unit="steps")
    assert [s for s in range(12) if tracking_due(steps, s, 5)] == [0, 4, 8]
    epochs = TrainConfig(track_sharpness_every=2, track_sharpness_unit="epochs")
    assert [s for s in range(30) if tracking_due(epochs, s, 5)] == [0, 10, 20]  # first step of epochs 1, 3, 5
    assert not any(tracking_due(TrainConfig(track_sharpness_every=0), s, 5) for s in range(30))


# ---------------------------------------------------------------------------------------------- loss and batches


def test_mse_training_loss_is_the_curvature_operators_per_sample_loss():
    torch.manual_seed(0)
    outputs, targets = torch.randn(7, 4, dtype=F64), torch.randint(0, 4, (7,))
    assert float(batch_loss(outputs, targets, "mse")) == pytest.approx(
        float(loss_sum(outputs, targets, "mse")) / 7, rel=1e-12
    )
    assert float(batch_loss(outputs, targets, "cross_entropy")) == pytest.approx(
        float(F.cross_entropy(outputs, targets)), rel=1e-12
    )


def test_full_batch_is_one_step_of_gradient_descent_on_the_whole_train_split(synthetic_data, tmp_path):
    assert [len(b) for b in batch_order(180, "full", 0, 1)] == [180]
    run = make_params(
        train={
            "epochs": 1,
            "batch_size": "full",
            "loss": "mse",
            "lr": 0.05,
            "momentum": 0.0,
            "weight_decay": 0.0,
            "schedule": "constant",
            "track_sharpness_every": 0,
        }
    ).run("mlp")
    trainer = Trainer(run, synthetic_data, tmp_path)
    trainer.start()
    assert trainer.steps_per_epoch == 1
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    model = trainer.model
    model.zero_grad()
    batch_loss(model(trainer.x_train), trainer.y_train, "mse").backward()
    expected = {n: before[n] - 0.05 * p.grad for n, p in model.named_parameters()}
    trainer.train_epoch()
    assert trainer.state.step == 1
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-6, atol=1e-7)
    history = pd.DataFrame(trainer.state.history)
    assert history.train_loss.iloc[-1] < history.train_loss.iloc[0]  # MSE evaluation, not cross-entropy
    x, y = trainer.x_train, trainer.y_train
    with torch.no_grad():
        trainer.model.eval()
        assert history.train_loss.iloc[-1] == pytest.approx(
            float(loss_sum(trainer.model(x), y, "mse")) / len(x), rel=1e-5
        )


# ---------------------------------------------------------------------------------------------- warm-started Lanczos


def test_warm_started_lanczos_finds_the_same_lambda_max_with_fewer_products():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=F64))
    values = torch.cat([torch.tensor([10.0, 9.0], dtype=F64), torch.linspace(-1, 5, 298, dtype=F64)])
    a = q @ torch.diag(values) @ q.T
    previous, _ = lanczos(lambda v: a @ v, 300, k_largest=1, tol=1e-8, max_matvecs=600)
    perturbation = torch.randn(300, 300, generator=gen, dtype=F64)
    b = a + 0.02 * (perturbation + perturbation.T) / 2  # the next step's Hessian: nearby
    exact = float(torch.linalg.eigvalsh(b)[-1])
    cold, _ = lanczos(lambda v: b @ v, 300, k_largest=1, tol=1e-6, max_matvecs=600, seed=1)
    warm, _ = lanczos(lambda v: b @ v, 300, k_largest=1, tol=1e-6, max_matvecs=600, v0=previous.eigenvectors[0])
    for result in (cold, warm):
        assert bool(result.converged.all())
        assert float(result.eigenvalues[0]) == pytest.approx(exact, rel=1e-6)
    assert warm.matvecs < cold.matvecs, (warm.matvecs, cold.matvecs)


def test_warm_start_on_a_network_after_one_training_step(synthetic_data):
    torch.manual_seed(0)
    from pipeline.config import ModelConfig
    from pipeline.training.models import build_model

    model = build_model("mlp", ModelConfig(mlp_width=32), synthetic_data.input_shape, synthetic_data.num_classes)
    model = model.double().eval()
    x, y = synthetic_data.probe_tensors()
    probe = ProbeSet.from_tensors(x.double(), y, 64)
    op = HessianOperator(model, probe)
    first, _ = lanczos(op.matvec, op.dim, k_largest=1, tol=1e-6, max_matvecs=400)
    grads = op.unflatten(op.gradient())
    with torch.no_grad():  # one gradient-descent step
        for name, p in model.named_parameters():
            p -= 0.05 * grads[name]
    op = HessianOperator(model, probe)
    cold, _ = lanczos(op.matvec, op.dim, k_largest=1, tol=1e-6, max_matvecs=400, seed=3)
    warm, _ = lanczos(op.matvec, op.dim, k_largest=1, tol=1e-6, max_matvecs=400, v0=first.eigenvectors[0])
    assert float(warm.eigenvalues[0]) == pytest.approx(float(cold.eigenvalues[0]), rel=1e-5)
    assert warm.matvecs < cold.matvecs, (warm.matvecs, cold.matvecs)


# ---------------------------------------------------------------------------------------------- the tracker in training


def _linear_mse_run(**train):
    settings = {
        "epochs": 6,
        "batch_size": 32,
        "loss": "mse",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 0.001,
        "schedule": "constant",
        "track_sharpness_every": 2,
        "track_sharpness_unit": "steps",
        "track_tol": 1e-6,
        "checkpoint_every": 2,
        **train,
    }
    return make_params(model={"mlp_depth": 0}, train=settings).run("mlp")


def test_linear_mse_tracking_matches_closed_forms(synthetic_data, tmp_path):
    """A linear model under MSE has a quadratic loss: H = 2/N [X 1]^T [X 1] per output, the quadratic model of a
    step is exact (up to float32 rounding), and the curvature along any direction lies within the spectrum."""
    run = _linear_mse_run()
    trainer = train(run, synthetic_data, tmp_path)
    rows = pd.DataFrame(trainer.state.sharpness)
    assert list(rows.columns) == list(TRACK_COLUMNS) and len(rows) == trainer.state.step // 2 + trainer.state.step % 2
    x, _ = synthetic_data.probe_tensors()
    design = torch.cat([x.reshape(len(x), -1).double(), torch.ones(len(x), 1, dtype=F64)], dim=1)
    exact = 2.0 * float(torch.linalg.eigvalsh(design.T @ design / len(x))[-1])
    assert rows.lambda_max.to_numpy() == pytest.approx(exact, rel=1e-4)  # constant: the Hessian does not depend on θ
    assert rows.lambda_max_converged.all()
    assert ((rows.grad_sharpness > 0) & (rows.grad_sharpness <= exact * (1 + 1e-4))).all()
    assert ((rows.step_sharpness > 0) & (rows.step_sharpness <= exact * (1 + 1e-4))).all()
    scale = rows.first_order.abs() + rows.second_order.abs()
    assert (rows.model_error.abs() <= 1e-3 * scale + 1e-6).all(), rows[["actual_change", "predicted_change"]]
    assert rows.model_ratio.to_numpy() == pytest.approx(1.0, abs=2e-2)
    assert rows.two_over_lr.to_numpy() == pytest.approx(40.0)
    assert rows.stability_threshold.to_numpy() == pytest.approx(76.0)  # heavy ball, β = 0.9
    assert not rows.warm_start.iloc[0] and rows.warm_start.iloc[1:].all()


@pytest.mark.parametrize("optimizer", [{}, {"optimizer": "adam", "lr": 0.01}], ids=["sgd", "adam"])
def test_tracking_changes_nothing_in_the_trained_weights(synthetic_data, tmp_path, optimizer):
    """Bitwise, with every measure on: λmax, the batch sharpness over fixed batches and, for Adam, the
    preconditioned sharpness read from the optimiser's state."""
    tracked = train(_linear_mse_run(**optimizer), synthetic_data, tmp_path / "tracked")
    alone = train(_linear_mse_run(track_sharpness_every=0, **optimizer), synthetic_data, tmp_path / "alone")
    assert _state_equal(tracked.model.state_dict(), alone.model.state_dict())
    columns = ["epoch", "step", "lr", "train_loss", "test_loss", "batch_loss", "grad_norm"]
    pd.testing.assert_frame_equal(
        pd.DataFrame(tracked.state.history)[columns], pd.DataFrame(alone.state.history)[columns]
    )
    assert alone.state.sharpness == [] and "tracked_steps" not in alone.summary()
    summary = tracked.summary()
    assert summary["tracked_steps"] == len(tracked.state.sharpness)
    assert summary["tracked_lambda_max"] == tracked.state.sharpness[-1]["lambda_max"]
    rows = pd.DataFrame(tracked.state.sharpness)
    assert (rows.batch_count == 5).all() and np.isfinite(rows.batch_sharpness).all()  # 180 // 32 batches: capped
    assert summary["tracked_batch_sharpness"] == rows.batch_sharpness.iloc[-1]
    adam = bool(optimizer)
    assert np.isfinite(rows.preconditioned_sharpness.iloc[1:]).all() == adam
    assert (summary["tracked_preconditioned_sharpness"] is not None) == adam
    assert (summary["batch_sharpness_over_threshold_last_quarter"] is None) == adam  # no SGD threshold for Adam


@pytest.mark.parametrize("optimizer", [{}, {"optimizer": "adam", "lr": 0.01}], ids=["sgd", "adam"])
def test_tracking_resumes_with_the_same_rows_and_warm_start(synthetic_data, tmp_path, optimizer):
    run = make_params(
        train={
            "epochs": 4,
            "batch_size": 48,
            "checkpoint_every": 1,
            "track_sharpness_every": 3,
            "track_sharpness_unit": "steps",
            "momentum": 0.0,
            **optimizer,
        }
    ).run("mlp")
    reference = train(run, synthetic_data, tmp_path / "reference")

    class Interrupt(Exception):
        pass

    def stop_in_epoch_3(step):
        if step == 2 * reference.steps_per_epoch + 1:
            raise Interrupt

    interrupted = Trainer(run, synthetic_data, tmp_path / "resumed")
    interrupted.start()
    with pytest.raises(Interrupt):
        while not interrupted.done:
            interrupted.train_epoch(on_step=stop_in_epoch_3)
    resumed = Trainer(run, synthetic_data, tmp_path / "resumed")
    assert resumed.start().startswith("resumed from epoch_0002.pt")
    assert resumed.state.track_vector is not None
    assert (resumed.state.track_preconditioned_vector is not None) == bool(optimizer)  # Adam's own warm start
    while not resumed.done:
        resumed.train_epoch()
    assert _state_equal(resumed.model.state_dict(), reference.model.state_dict())
    pd.testing.assert_frame_equal(_frame(resumed.state.sharpness), _frame(reference.state.sharpness))


def test_sgd_step_model_on_a_network_holds_for_small_steps(synthetic_data, tmp_path):
    run = make_params(
        train={
            "epochs": 2,
            "lr": 0.01,
            "momentum": 0.0,
            "weight_decay": 0.0,
            "schedule": "constant",
            "track_sharpness_every": 1,
            "track_sharpness_unit": "steps",
        }
    ).run("mlp")
    rows = pd.DataFrame(train(run, synthetic_data, tmp_path).state.sharpness)
    # plain SGD on a mini-batch: first order = -η g_probe·g_batch; the model predicts the probe loss change
    assert (rows.step_cosine.abs() <= 1 + 1e-9).all()
    assert (rows.lr * rows.lambda_max / 2 < 1).all()  # far from the edge of stability here
    relative = rows.model_error.abs() / rows.first_order.abs()
    assert relative.median() < 0.05, relative.describe()
    assert (rows.lambda_max >= rows.grad_sharpness * (1 - 1e-3)).all()


def test_the_train_stage_writes_the_sharpness_table(synthetic_data, tmp_path):
    from pipeline.flows.train import write_train_outputs

    run = _linear_mse_run(epochs=2)
    trainer = train(run, synthetic_data, tmp_path / "ckpt")
    write_train_outputs.fn(
        trainer,
        tmp_path / "train_history.parquet",
        tmp_path / "train_metrics.json",
        tmp_path / "sharpness_history.parquet",
    )
    table = pd.read_parquet(tmp_path / "sharpness_history.parquet")
    assert list(table.columns) == SHARPNESS_HISTORY.names and len(table) == len(trainer.state.sharpness)
    assert read_metadata(tmp_path / "sharpness_history.parquet")["run"]["train"]["loss"] == "mse"
