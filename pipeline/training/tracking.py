r"""Sharpness during training: :math:`\lambda_{max}` beside the stability threshold, and the quadratic model of a step.

With ``train.track_sharpness_every`` the trainer calls a :class:`SharpnessTracker` at the due steps. From the
weights :math:`\theta_t` *before* step :math:`t` it measures, on the fixed probe set (BatchNorm with running
statistics, as in the ``hessian`` stage; the training forward itself is untouched):

- :math:`\lambda_{max}` of the probe-loss Hessian by Lanczos, warm-started from the previous tracked eigenvector
  (the top eigenvector moves little between nearby steps, so the warm start needs fewer products; Cohen et al.
  2021 track sharpness the same way);
- the curvature along the gradient, :math:`g^\top H g / \lVert g \rVert^2`;
- after the optimiser took the step :math:`\Delta\theta = \theta_{t+1} - \theta_t` (momentum and weight decay
  included: it is the step actually taken), the second-order prediction
  :math:`\Delta L \approx g^\top \Delta\theta + \tfrac12 \Delta\theta^\top H \Delta\theta` (for SGD,
  :math:`-\eta g^\top v + \tfrac12 \eta^2 v^\top H v`) beside the actual change of the probe loss.

Beside them, two measures of the curvature the optimiser itself is stable on:

- with ``train.track_batches``, the *batch sharpness* :math:`\mathbb{E}_B[g_B^\top H_B g_B / \lVert g_B \rVert^2]`
  over fixed mini-batches of the run's batch size (:func:`~pipeline.curvature.dynamics.batch_sharpness`):
  mini-batch SGD holds it at the threshold while :math:`\lambda_{max}` stays below (Andreyev & Beneventano 2024,
  "Edge of stochastic stability");
- for Adam, the *preconditioned sharpness* :math:`\lambda_{max}(P_t^{-1}H)` with Adam's preconditioner at the step
  (:func:`~pipeline.curvature.dynamics.adam_preconditioner`), by Lanczos on the probe set warm-started from its own
  previous vector, against :math:`(2 + 2\beta_1)/((1 - \beta_1)\eta)` (Cohen et al. 2022, "Adaptive gradient
  methods at the edge of stability"). Before Adam's first step there is no preconditioner: NaN.

Gradient descent on a quadratic is stable along a direction only when :math:`\eta\lambda < 2`; heavy-ball momentum
:math:`\beta` moves the bound to :math:`(2 + 2\beta)/\eta` and Nesterov's to :math:`(2 + 2\beta)/((1 + 2\beta)\eta)`
(Cohen et al. 2021, appendix). :func:`stability_threshold` gives the bound of the run's optimiser (NaN for Adam,
whose bound concerns the preconditioned Hessian: :func:`preconditioned_threshold`). The tracker never touches the
global random state, so a tracked run trains exactly the same weights as an untracked one.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from pipeline.config import FULL_BATCH, TrainConfig
from pipeline.curvature.dynamics import (
    adam_preconditioner,
    adam_threshold,
    batch_sharpness,
    preconditioned_sharpness,
    quadratic_step_model,
)
from pipeline.curvature.eigen import lanczos
from pipeline.curvature.operators import HessianOperator, ProbeSet, account
from pipeline.tables import SHARPNESS_HISTORY

COST = ("forwards", "gradients", "hvps")  # the tracked step's primitive operations, as cost_* columns

__all__ = [
    "SharpnessTracker",
    "stability_threshold",
    "preconditioned_threshold",
    "tracked_batch_indices",
    "tracking_due",
    "TRACK_COLUMNS",
]

# Columns of the `sharpness_history` table, in order: read from its schema (pipeline.tables), not re-listed.
TRACK_COLUMNS = tuple(SHARPNESS_HISTORY.names)


_BEFORE = ("lambda_max", "lambda_max_residual", "grad_sharpness", "grad_norm")
_BATCH = ("batch_sharpness", "batch_sharpness_stderr")  # NaN, with batch_count 0, when off or not finite
_PRECONDITIONED = ("preconditioned_sharpness", "preconditioned_residual")  # NaN unless Adam has taken a step
TRACK_BATCHES_SEED_OFFSET = 7_919  # the fixed batches' generator: train.seed + this (not the batch order's seeds)
_AFTER = (
    "probe_loss",
    "loss_after",
    "actual_change",
    "predicted_change",
    "first_order",
    "second_order",
    "model_error",
    "model_ratio",
    "step_norm",
    "step_sharpness",
    "step_cosine",
)


def stability_threshold(cfg: TrainConfig, lr: float) -> float:
    r"""The largest curvature on which the run's optimiser at learning rate ``lr`` is stable on a quadratic.

    SGD: :math:`2/\eta`; heavy ball :math:`(2 + 2\beta)/\eta`; Nesterov :math:`(2 + 2\beta)/((1 + 2\beta)\eta)`.
    NaN for Adam and for ``lr == 0`` is ``inf``.
    """
    if cfg.optimizer != "sgd":
        return math.nan
    if lr <= 0:
        return math.inf
    beta = cfg.momentum
    if cfg.nesterov:
        return (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * lr)
    return (2.0 + 2.0 * beta) / lr


def preconditioned_threshold(cfg: TrainConfig, lr: float) -> float:
    r"""Adam's bound on the preconditioned sharpness, :math:`(2 + 2\beta_1)/((1 - \beta_1)\eta)`; NaN for SGD."""
    if cfg.optimizer != "adam":
        return math.nan
    return adam_threshold(lr, cfg.adam_beta1)


def tracked_batch_indices(n: int, batch_size: int | str, count: int, seed: int) -> list[Tensor]:
    """Index batches of the batch sharpness: ``count`` disjoint batches of ``batch_size`` from ``n`` samples.

    Drawn once, without replacement, from a generator seeded by ``seed + TRACK_BATCHES_SEED_OFFSET`` (the global
    random state is not used); capped at the ``n // batch_size`` batches the split holds. ``batch_size`` ``"full"``
    gives the whole split as one batch (full-batch gradient descent), and so does a batch size above ``n``.
    ``count == 0`` gives none.
    """
    if count <= 0 or n <= 0:
        return []
    size = n if batch_size == FULL_BATCH else min(int(batch_size), n)
    if size == n:
        return [torch.arange(n)]
    count = min(count, n // size)
    generator = torch.Generator().manual_seed(seed + TRACK_BATCHES_SEED_OFFSET)
    perm = torch.randperm(n, generator=generator)
    return list(perm[: count * size].split(size))


def tracking_due(cfg: TrainConfig, step: int, steps_per_epoch: int) -> bool:
    """Whether the step with 0-based global index ``step`` is tracked (``track_sharpness_every`` steps or epochs).

    In epochs, the first step of every k-th epoch is tracked (the weights at the end of the previous epoch), so
    epoch-wise tracking starts at the initialisation, as step-wise tracking does.
    """
    every = cfg.track_sharpness_every
    if every == 0:
        return False
    if cfg.track_sharpness_unit == "steps":
        return step % every == 0
    return step % steps_per_epoch == 0 and (step // steps_per_epoch) % every == 0


class SharpnessTracker:
    """Tracks :math:`\\lambda_{max}`, :math:`g^\\top Hg/\\lVert g\\rVert^2` and the quadratic step model on a probe set.

    Usage, around one optimiser step of ``model`` (in training mode; the tracker switches to eval mode and back)::

        before = tracker.before_step(model, optimizer)  # λmax, g'Hg/|g|^2, batch and preconditioned sharpness at θ
        optimizer.step()
        row = tracker.after_step(model, before)    # the quadratic model of the step actually taken

    ``batches``: the fixed ``(x, y)`` mini-batches of the batch sharpness, on the model's device (empty: off).
    ``vector`` (the last top eigenvector, flat float64 on the CPU) is the warm start of the next λmax solve and
    ``preconditioned_vector`` that of the next preconditioned one; the trainer keeps both in its checkpoints so
    that a resumed run tracks as the uninterrupted one does.
    """

    def __init__(
        self,
        probe: ProbeSet,
        *,
        loss: str,
        tol: float,
        max_hvps: int,
        seed: int = 0,
        batches: list[tuple[Tensor, Tensor]] | tuple = (),
    ):
        self.probe = probe
        self.loss = loss
        self.tol = tol
        self.max_hvps = max_hvps
        self.seed = seed
        self.batches = list(batches)
        self.vector: Tensor | None = None
        self.preconditioned_vector: Tensor | None = None

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Curvature at the current weights; returns the measurements and a copy of the state (parameters, buffers).

        ``optimizer``: the run's optimiser, read only; a ``torch.optim.Adam`` adds the preconditioned sharpness.
        """
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            state = {name: value.detach().clone() for name, value in model.state_dict().items()}
            op = HessianOperator(model, self.probe, loss=self.loss)
            g = op.gradient()
            if not bool(torch.isfinite(g).all()):  # about to diverge: nothing to measure, nothing to warm-start
                self.vector = None
                self.preconditioned_vector = None
                return {
                    "state": state,
                    "operator": op,
                    "finite": False,
                    **{k: math.nan for k in (*_BEFORE, *_BATCH, *_PRECONDITIONED)},
                    "batch_count": 0,
                    "lambda_max_converged": False,
                    "hvps": 0,
                    "warm_start": False,
                    "seconds": time.perf_counter() - started,
                }
            warm = self.vector is not None and self.vector.shape == (op.dim,)
            top, _ = lanczos(
                op.matvec,
                op.dim,
                k_largest=1,
                tol=self.tol,
                max_matvecs=self.max_hvps,
                v0=self.vector.to(op.device) if warm else None,
                seed=self.seed,
                device=op.device,
            )
            self.vector = top.eigenvectors[0].detach().to("cpu", torch.float64).clone()
            grad_norm_sq = float(g @ g)
            grad_sharpness = float(g @ op.matvec(g)) / grad_norm_sq if grad_norm_sq > 0 else math.nan
            batch = self._batch_sharpness(model)
            preconditioned = self._preconditioned_sharpness(model, optimizer, op)
        finally:
            model.train(was_training)
        return {
            "state": state,
            "operator": op,  # at these weights: the step model reuses its gradient and retained graph
            "finite": True,
            "lambda_max": float(top.eigenvalues[0]),
            "lambda_max_residual": float(top.residuals[0]),
            "lambda_max_converged": bool(top.converged[0]),
            "hvps": int(top.matvecs),
            "warm_start": warm,
            "grad_sharpness": grad_sharpness,
            "grad_norm": math.sqrt(grad_norm_sq),
            **batch,
            **preconditioned,
            "seconds": time.perf_counter() - started,
        }

    def _batch_sharpness(self, model: nn.Module) -> dict:
        """The batch sharpness over the fixed batches (NaN and a count of 0 without batches)."""
        if not self.batches:
            return {"batch_sharpness": math.nan, "batch_sharpness_stderr": math.nan, "batch_count": 0}
        result = batch_sharpness(model, self.batches, loss=self.loss)
        return {
            "batch_sharpness": result.value,
            "batch_sharpness_stderr": result.stderr,
            "batch_count": result.batches,
        }

    def _preconditioned_sharpness(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, op: HessianOperator
    ) -> dict:
        """λmax(P⁻¹H) with Adam's preconditioner, warm-started from ``preconditioned_vector`` (NaN for another
        optimiser, before Adam's first step, or with a non-finite second moment). Its products are ``op``'s, so they
        count in the row's ``cost_hvps``."""
        off = {k: math.nan for k in _PRECONDITIONED}
        if not isinstance(optimizer, torch.optim.Adam):
            return off
        preconditioner = adam_preconditioner(optimizer, model)
        if preconditioner is None or not all(
            bool((torch.isfinite(p) & (p > 0)).all()) for p in preconditioner.values()
        ):
            self.preconditioned_vector = None
            return off
        warm = self.preconditioned_vector is not None and self.preconditioned_vector.shape == (op.dim,)
        value, residual, _, _, vector = preconditioned_sharpness(
            model,
            self.probe,
            preconditioner,
            tol=self.tol,
            max_hvps=self.max_hvps,
            v0=self.preconditioned_vector if warm else None,
            seed=self.seed,
            operator=op,
        )
        self.preconditioned_vector = vector.detach().to("cpu", torch.float64).clone()
        return {"preconditioned_sharpness": value, "preconditioned_residual": residual}

    def after_step(self, model: nn.Module, before: dict) -> dict:
        """The quadratic model of the step from ``before['state']`` to the model's current parameters."""
        started = time.perf_counter()
        row = {k: v for k, v in before.items() if k not in ("state", "finite", "operator")}
        if not before["finite"]:
            return {
                **row,
                **{k: math.nan for k in _AFTER},
                **{f"cost_{k}": account(before["operator"])[k] for k in COST},
            }
        state = before["state"]
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        current = dict(model.named_parameters())
        step = {n: current[n].detach() - state[n].to(current[n].device) for n in trainable}
        was_training = model.training
        model.eval()
        try:
            prediction = quadratic_step_model(model, self.probe, step, operator=before["operator"])
            cost = account(before["operator"])
        finally:
            model.train(was_training)
        row.update(
            {
                "probe_loss": prediction.loss_before,
                "loss_after": prediction.loss_after,
                "actual_change": prediction.actual,
                "predicted_change": prediction.predicted,
                "first_order": prediction.first_order,
                "second_order": prediction.second_order,
                "model_error": prediction.error,
                "model_ratio": prediction.ratio,
                "step_norm": prediction.step_norm,
                "step_sharpness": prediction.step_sharpness,
                "step_cosine": prediction.cosine,
                **{f"cost_{k}": cost[k] for k in COST},
                "seconds": before["seconds"] + time.perf_counter() - started,
            }
        )
        return row
