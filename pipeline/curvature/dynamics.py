r"""Training dynamics on a probe set: gradient noise scale, directional sharpness, the quadratic model of one step.

All three use the probe-set loss of :mod:`pipeline.curvature.operators`,
:math:`L(\theta) = \frac1N \sum_{i=1}^N \ell_i(\theta)` with :math:`\ell_i` the per-sample loss of
:func:`~pipeline.curvature.operators.loss_sum` (``mse`` is :math:`\lVert f - t \rVert^2`, without a factor ½).
BatchNorm runs in eval mode (running statistics fixed, checked as in the operators), so the samples are independent
and the per-sample gradients are the gradients of the :math:`\ell_i` alone. The module is never mutated.

- :func:`gradient_noise`: per-sample gradients by ``torch.func.vmap(grad(ℓ))``, their mean :math:`g`, the trace of
  their covariance and McCandlish et al.'s (2018) simple noise scale
  :math:`B_\mathrm{simple} = \mathrm{tr}\,\Sigma / \lVert g \rVert^2` ("An empirical model of large-batch training",
  eq. 2.8 and appendix A).
- :func:`directional_sharpness`, :func:`gradient_sharpness`: the Rayleigh quotient :math:`v^\top H v / \lVert v
  \rVert^2` of one Hessian-vector product, along any direction or along the gradient.
- :func:`quadratic_step_model`: the change of the loss predicted for one optimiser step by the second-order Taylor
  model at the point before the step, beside the change that actually happens.
- :func:`batch_sharpness`: the mean over mini-batches of each batch's own curvature along its own gradient,
  :math:`\mathbb{E}_B[g_B^\top H_B g_B / \lVert g_B \rVert^2]` (Andreyev & Beneventano 2024, "Edge of stochastic
  stability"), the quantity mini-batch SGD holds at :math:`2/\eta` where full-batch GD holds :math:`\lambda_{max}`.
- :func:`preconditioned_sharpness`, :func:`adam_preconditioner`, :func:`adam_threshold`: :math:`\lambda_{max}` of the
  preconditioned Hessian :math:`P^{-1}H` and Adam's stability threshold on it (Cohen et al. 2022, "Adaptive gradient
  methods at the edge of stability").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from pipeline.curvature._checks import CurvatureError
from pipeline.curvature.eigen import lanczos
from pipeline.curvature.operators import BN_MODE, CurvatureOperator, HessianOperator, ProbeSet, account, loss_sum

# --------------------------------------------------------------------------------------------------------------
# Per-sample gradients and the gradient noise scale
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradientNoise:
    r"""Statistics of the per-sample gradients :math:`g_i = \nabla \ell_i` over a probe set of ``n`` samples.

    ``trace_covariance`` uses the unbiased sample covariance,
    :math:`\mathrm{tr}\,\hat\Sigma = \frac{1}{N-1} \sum_i \lVert g_i - g \rVert^2`: the probe set is a sample of the
    data, and with :math:`N - 1` its expectation is the per-example covariance :math:`\mathrm{tr}\,\Sigma` of the
    distribution it is drawn from (the quantity in :math:`B_\mathrm{simple}`), while :math:`\lVert g \rVert^2`
    overestimates :math:`\lVert G \rVert^2` (the gradient of the whole distribution or training set) by
    :math:`\mathrm{tr}\,\Sigma / N` on average. Hence ``true_grad_norm_sq`` =
    :math:`\lVert g \rVert^2 - \mathrm{tr}\,\hat\Sigma / N`, unbiased for :math:`\lVert G \rVert^2` (may come out
    negative when the gradient is small against the noise), and ``noise_scale_debiased`` =
    :math:`\mathrm{tr}\,\hat\Sigma / (\lVert g \rVert^2 - \mathrm{tr}\,\hat\Sigma / N)`, the ratio of the two
    unbiased estimates as in McCandlish et al., appendix A (``inf`` when the denominator is not positive). When the
    probe set *is* the whole training set, :math:`g = G` and ``noise_scale`` needs no correction.
    """

    n: int  # samples in the probe set
    loss: float  # probe-set mean loss L
    gradient: dict[str, Tensor] = field(repr=False)  # name -> mean gradient g = ∇L (float64, parameter shapes)
    grad_norm_sq: float  # ‖g‖²
    trace_covariance: float  # tr Σ̂ = Σ_i ‖g_i − g‖² / (N − 1), per-sample (batch size 1) gradient covariance
    noise_scale: float  # B_simple = tr Σ̂ / ‖g‖², in samples
    true_grad_norm_sq: float  # ‖g‖² − tr Σ̂ / N, unbiased for ‖G‖²
    noise_scale_debiased: float  # tr Σ̂ / (‖g‖² − tr Σ̂ / N), in samples; inf when the denominator is <= 0
    bn_mode: str = BN_MODE  # BatchNorm uses its running statistics
    seconds: float = 0.0
    account: dict = field(default_factory=dict, compare=False)  # primitive operations spent (operators.account)


def _per_sample_fn(op: CurvatureOperator):
    """``(params, x_i, y_i) -> ({name: ∇ℓ_i}, ℓ_i)`` for one sample, ready for ``vmap`` over ``x_i, y_i``."""

    def sample_loss(params, x, y):
        outputs, y = op.forward(params, x.unsqueeze(0)), y.unsqueeze(0)  # [1, C], [1] or [1, ...]
        if op.loss == "mse" and not y.is_floating_point():
            # loss_sum's F.one_hot checks the label range with .item(), which vmap cannot trace; scatter the
            # same one-hot target instead (float targets take loss_sum's other, identical branch).
            y = torch.zeros_like(outputs).scatter(-1, y.unsqueeze(-1), 1.0)
        value = loss_sum(outputs, y, op.loss)
        return value, value.detach()

    return vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0))


def _operator(model: nn.Module, probe: ProbeSet, wrt, loss: str) -> HessianOperator:
    """A Hessian operator over ``probe`` (its repeatability check refuses training-mode BatchNorm and dropout)."""
    if not isinstance(probe, ProbeSet):
        raise CurvatureError(f"probe: expected a ProbeSet, got {type(probe).__name__}")
    return HessianOperator(model, probe, wrt=wrt, loss=loss, hvp="double_backward")


def per_sample_gradients(
    model: nn.Module, x: Tensor, y: Tensor, *, loss: str = "cross_entropy", wrt: list[str] | None = None
) -> dict[str, Tensor]:
    r"""Gradients :math:`\nabla \ell_i` of each sample's loss (not divided by N), by ``vmap`` over the samples.

    Args:
        model: the network in eval mode (BatchNorm with running statistics; checked).
        x, y: one batch of inputs ``(B, ...)`` and targets ``(B, ...)``.
        loss: ``cross_entropy`` or ``mse`` (see :func:`~pipeline.curvature.operators.loss_sum`).
        wrt: parameter names (default: all trainable ones).

    Returns:
        name -> tensor of shape ``(B, *parameter shape)`` in the parameters' dtype.

    Raises:
        CurvatureError: unknown loss or names, mismatched ``x``/``y``, a model in training mode.
    """
    op = _operator(model, ProbeSet.from_tensors(x, y, max(len(x), 1)), wrt, loss)
    ((xs, ys),) = op.probe.batches
    grads, _ = _per_sample_fn(op)(op.point, xs, ys)
    return grads


def gradient_noise(
    model: nn.Module,
    probe: ProbeSet,
    *,
    loss: str = "cross_entropy",
    wrt: list[str] | None = None,
    chunk_size: int | None = None,
) -> GradientNoise:
    r"""Mean gradient, per-sample gradient covariance trace and simple noise scale over the probe set.

    .. math::
        g = \frac1N \sum_i g_i, \quad \mathrm{tr}\,\hat\Sigma = \frac{1}{N-1} \sum_i \lVert g_i - g \rVert^2, \quad
        B_\mathrm{simple} = \frac{\mathrm{tr}\,\hat\Sigma}{\lVert g \rVert^2}

    (see :class:`GradientNoise` for :math:`N - 1` and the debiased variants). Per-sample gradients come from
    ``vmap(grad(ℓ))`` over chunks of at most ``chunk_size`` samples (default: each probe batch as it is); peak
    memory is about twice ``chunk_size`` × parameters in the parameters' dtype, plus vmap's activations. Each chunk
    is centred on its own mean and the chunks are merged in one pass with Chan et al.'s pairwise update of mean and
    squared deviations (in float64), which avoids the cancellation of
    :math:`\sum_i \lVert g_i \rVert^2 - N \lVert g \rVert^2`.

    Args:
        model: the network in eval mode (checked: training-mode BatchNorm or dropout is refused).
        probe: at least 2 samples; batches may differ in size.
        loss: ``cross_entropy`` or ``mse``.
        wrt: parameter names (default: all trainable ones).
        chunk_size: samples per ``vmap`` call, >= 1 (bounds memory); ``None`` uses the probe batches.

    Raises:
        CurvatureError: bad arguments (named in the message), a model in training mode.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise CurvatureError(f"chunk_size: must be an integer >= 1 or None, got {chunk_size!r}")
    start = time.perf_counter()
    op = _operator(model, probe, wrt, loss)
    if op.n < 2:
        raise CurvatureError(f"probe: need at least 2 samples for a gradient covariance, got {op.n}")
    per_sample = _per_sample_fn(op)
    count = 0
    mean = {n: torch.zeros(p.shape, dtype=torch.float64, device=op.device) for n, p in op.point.items()}
    squared_deviations = 0.0  # Σ_i ‖g_i − mean‖² over the samples seen so far (float64)
    loss_total = 0.0
    for x, y in op.probe.batches:
        for xs, ys in zip(x.split(chunk_size or len(x)), y.split(chunk_size or len(x))):
            grads, losses = per_sample(op.point, xs, ys)
            b = len(xs)
            op.samples += b
            loss_total += float(losses.double().sum())
            chunk_deviations = 0.0
            shift = 0.0  # ‖chunk mean − running mean‖²
            for name, g in grads.items():
                # Within the chunk in the parameters' dtype (torch's cascade summation keeps float32 sums of
                # squares to ~1e-8 relative; a float64 copy of the chunk costs 5x the time); across chunks in float64.
                chunk_mean = g.mean(dim=0)
                chunk_deviations += float((g - chunk_mean).pow_(2).sum())
                delta = chunk_mean.to(torch.float64) - mean[name]
                shift += float((delta**2).sum())
                mean[name] += delta * (b / (count + b))
            squared_deviations += chunk_deviations + shift * count * b / (count + b)
            count += b
    n = count
    grad_norm_sq = float(sum((g**2).sum() for g in mean.values()))
    trace = squared_deviations / (n - 1)
    true_norm_sq = grad_norm_sq - trace / n
    return GradientNoise(
        n=n,
        loss=loss_total / n,
        gradient=mean,
        grad_norm_sq=grad_norm_sq,
        trace_covariance=trace,
        noise_scale=trace / grad_norm_sq if grad_norm_sq > 0 else math.inf,
        true_grad_norm_sq=true_norm_sq,
        noise_scale_debiased=trace / true_norm_sq if true_norm_sq > 0 else math.inf,
        seconds=time.perf_counter() - start,
        account=account(op),
    )


# --------------------------------------------------------------------------------------------------------------
# Directional sharpness
# --------------------------------------------------------------------------------------------------------------


def _flat(op: CurvatureOperator, vector: Tensor | Mapping[str, Tensor], what: str) -> Tensor:
    """``vector`` (flat of length ``op.dim``, or name -> tensor over exactly ``op.names``) as a flat float64 vector."""
    if isinstance(vector, Mapping):
        missing = [n for n in op.names if n not in vector]
        extra = [n for n in vector if n not in op.names]
        if missing or extra:
            raise CurvatureError(
                f"{what}: names must be the operator's parameters; missing {missing[:4]}, unexpected {extra[:4]}"
            )
        wrong = [
            f"{n} {tuple(vector[n].shape)} vs {tuple(s)}" for n, s in zip(op.names, op.shapes) if vector[n].shape != s
        ]
        if wrong:
            raise CurvatureError(f"{what}: shapes differ from the parameters': {', '.join(wrong[:3])}")
        flat = op.flatten({n: vector[n].detach().to(op.device) for n in op.names})
    elif isinstance(vector, Tensor):
        if vector.shape != (op.dim,):
            raise CurvatureError(f"{what}: expected a vector of shape ({op.dim},), got {tuple(vector.shape)}")
        flat = vector.detach().to(device=op.device, dtype=torch.float64)
    else:
        raise CurvatureError(f"{what}: expected a Tensor or a dict of tensors, got {type(vector).__name__}")
    if not bool(torch.isfinite(flat).all()):
        raise CurvatureError(f"{what}: has non-finite entries")
    return flat


def directional_sharpness(op: CurvatureOperator, direction: Tensor | Mapping[str, Tensor]) -> float:
    r"""Curvature of the loss along ``direction``: :math:`v^\top H v / \lVert v \rVert^2` (one product).

    Equals :math:`\lambda_{max}` along the top eigenvector and lies in :math:`[\lambda_{min}, \lambda_{max}]`
    otherwise; independent of the length of :math:`v`. Works with any operator (Hessian, GGN, a diagonal block).

    Args:
        op: the operator, e.g. :class:`~pipeline.curvature.operators.HessianOperator`.
        direction: a flat vector of length ``op.dim`` or name -> tensor over exactly ``op.names``.

    Raises:
        CurvatureError: wrong shape or names, non-finite or zero ``direction``.
    """
    v = _flat(op, direction, "direction")
    norm_sq = float(v @ v)
    if norm_sq == 0.0:
        raise CurvatureError("direction: is the zero vector; its sharpness is undefined")
    return float(v @ op.matvec(v)) / norm_sq


def gradient_sharpness(op: CurvatureOperator) -> float:
    r"""Curvature along the gradient of the probe loss, :math:`g^\top H g / \lVert g \rVert^2` (one product).

    Raises:
        CurvatureError: the gradient is zero (at a stationary point the direction is undefined).
    """
    g = op.gradient()
    if float(g @ g) == 0.0:
        raise CurvatureError("gradient: is zero at this point; the sharpness along it is undefined")
    return directional_sharpness(op, g)


# --------------------------------------------------------------------------------------------------------------
# Quadratic model of one optimiser step
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPrediction:
    r"""One step :math:`\Delta\theta` from :math:`\theta`: the second-order Taylor model beside the actual change.

    .. math::
        \Delta L_\mathrm{pred} = \underbrace{g^\top \Delta\theta}_\text{first\_order}
        + \underbrace{\tfrac12 \Delta\theta^\top H \Delta\theta}_\text{second\_order}, \qquad
        \Delta L = L(\theta + \Delta\theta) - L(\theta)

    For SGD, :math:`\Delta\theta = -\eta v`: first order :math:`-\eta\, g^\top v`, second order
    :math:`\tfrac12 \eta^2 v^\top H v`. ``error`` = :math:`\Delta L - \Delta L_\mathrm{pred}` is the third- and
    higher-order remainder, :math:`O(\lVert \Delta\theta \rVert^3)`; ``ratio`` = :math:`\Delta L / \Delta
    L_\mathrm{pred}` tends to 1 as the step shrinks. Ratios and sharpness are NaN for a zero step.
    """

    loss_before: float  # L(θ)
    loss_after: float  # L(θ + Δθ)
    actual: float  # ΔL = L(θ + Δθ) − L(θ)
    first_order: float  # gᵀΔθ
    second_order: float  # ½ ΔθᵀHΔθ
    predicted: float  # first_order + second_order
    error: float  # actual − predicted
    ratio: float  # actual / predicted
    step_norm: float  # ‖Δθ‖
    gradient_norm: float  # ‖g‖
    step_sharpness: float  # ΔθᵀHΔθ / ‖Δθ‖², the directional sharpness along the step
    cosine: float  # −gᵀΔθ / (‖g‖ ‖Δθ‖): 1 for a plain gradient-descent step
    bn_mode: str = BN_MODE


def _move_to(op: CurvatureOperator, params: Mapping[str, Tensor]) -> None:
    """Place the (fresh, unused) operator at ``params``: parameters and/or buffers by name, e.g. a state dict."""
    op._gradient = None
    for name, value in params.items():
        for where in (op.point, op.fixed, op.buffers):
            if name in where:
                if value.shape != where[name].shape:
                    raise CurvatureError(
                        f"params: {name} has shape {tuple(value.shape)}, the model's is {tuple(where[name].shape)}"
                    )
                where[name] = value.detach().to(device=where[name].device, dtype=where[name].dtype).clone()
                break
        else:
            raise CurvatureError(f"params: unknown name {name!r}; expected the model's parameter or buffer names")


def quadratic_step_model(
    model: nn.Module,
    probe: ProbeSet,
    step: Mapping[str, Tensor],
    *,
    params: Mapping[str, Tensor] | None = None,
    loss: str = "cross_entropy",
    hvp: str = "double_backward",
    operator: HessianOperator | None = None,
) -> StepPrediction:
    r"""Predicted and actual change of the probe loss for the step ``step`` taken from the model's parameters.

    Cost: one gradient, one Hessian-vector product and two loss evaluations over the probe set. The Hessian and
    gradient span only the parameters named in ``step`` (the others, and all buffers, stay at their values at
    :math:`\theta`), so BatchNorm running statistics that training moved along with the step are *not* part of
    :math:`\Delta\theta`; pass them in ``params`` to choose which statistics the probe loss uses.

    Args:
        model: the network in eval mode (checked); its parameters are :math:`\theta` unless ``params`` is given.
        probe: the probe set (loss = mean over all its samples).
        step: name -> :math:`\Delta\theta` (= :math:`\theta_{next} - \theta`, e.g. :math:`-\eta v`), trainable
            parameter names with the parameters' shapes; parameters left out do not move.
        params: name -> value of parameters and/or buffers at :math:`\theta` (e.g. a checkpoint's state dict),
            replacing the model's own; names left out keep the model's values. The model is not modified.
        loss: ``cross_entropy`` or ``mse``.
        hvp: the Hessian-vector product implementation; ``double_backward`` holds one batch's graph at a time and
            costs the same as the others for a single product.
        operator: a :class:`HessianOperator` of this model and probe set already at :math:`\theta` over the
            parameters of ``step`` (e.g. the one a tracked eigen-solve just used): its gradient and retained graph
            are reused, which saves a gradient, the repeatability check and the graph of the product. ``params``,
            ``loss`` and ``hvp`` are then the operator's.

    Returns:
        :class:`StepPrediction`. For float32 models ``actual`` carries the rounding of the two losses
        (about 1e-7 × L); use a float64 copy of the model for steps whose ΔL is that small.

    Raises:
        CurvatureError: unknown, buffer or frozen names in ``step``, shapes that differ, non-finite entries,
            unknown names in ``params``, a model in training mode.
    """
    if not isinstance(step, Mapping) or not step:
        raise CurvatureError(f"step: expected a non-empty dict of name -> tensor, got {type(step).__name__}")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    buffers = {n for n, _ in model.named_buffers()}
    unknown = [n for n in step if n not in trainable]
    if unknown:
        kind = (
            "buffers, not parameters (the step moves parameters only)"
            if all(n in buffers for n in unknown)
            else f"not trainable parameters of the model; it has {', '.join(trainable[:6])}"
            + (", ..." if len(trainable) > 6 else "")
        )
        raise CurvatureError(f"step: {unknown[:4]} are {kind}")
    wrt = [n for n in trainable if n in step]
    if not isinstance(probe, ProbeSet):
        raise CurvatureError(f"probe: expected a ProbeSet, got {type(probe).__name__}")
    if operator is not None:
        if list(operator.names) != wrt or operator.probe.size != probe.size:
            raise CurvatureError(
                f"operator: spans {len(operator.names)} parameters over {operator.probe.size} samples; the step "
                f"needs {len(wrt)} parameters over {probe.size}"
            )
        op = operator
    else:
        op = HessianOperator(model, probe, wrt=wrt, loss=loss, hvp=hvp, check=False)
        if params is not None:
            _move_to(op, params)
        op.check_repeatable()
    delta = _flat(op, {n: step[n] for n in wrt}, "step")

    g = op.gradient()
    step_norm_sq = float(delta @ delta)
    curvature = float(delta @ op.matvec(delta)) if step_norm_sq > 0 else 0.0  # ΔθᵀHΔθ
    first, second = float(g @ delta), 0.5 * curvature
    moved = {n: op.point[n] + d for n, d in op.unflatten(delta).items()}
    with torch.no_grad():
        before = op.loss_value()
        after = float(sum(op.batch_loss(moved, x, y) for x, y in op.probe.batches))
    actual, predicted = after - before, first + second
    step_norm, grad_norm = math.sqrt(step_norm_sq), float(g.norm())
    return StepPrediction(
        loss_before=before,
        loss_after=after,
        actual=actual,
        first_order=first,
        second_order=second,
        predicted=predicted,
        error=actual - predicted,
        ratio=actual / predicted if predicted != 0 else math.nan,
        step_norm=step_norm,
        gradient_norm=grad_norm,
        step_sharpness=curvature / step_norm_sq if step_norm_sq > 0 else math.nan,
        cosine=-first / (grad_norm * step_norm) if grad_norm * step_norm > 0 else math.nan,
    )


# --------------------------------------------------------------------------------------------------------------
# Batch sharpness (SGD) and preconditioned sharpness (Adam)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSharpness:
    r"""The mean over mini-batches of :math:`g_B^\top H_B g_B / \lVert g_B \rVert^2`, with its spread and cost.

    :math:`g_B` and :math:`H_B` are the gradient and Hessian of the batch's *own* mean loss
    :math:`L_B = \frac{1}{|B|} \sum_{i \in B} \ell_i`, not of the probe set. Batches whose gradient is exactly zero
    have no direction and are left out of the mean (``zero_gradient`` counts them); a non-finite gradient (a run
    about to diverge) makes ``value`` NaN.
    """

    value: float  # E_B[g_B'H_B g_B / |g_B|^2] over the `batches` batches used; NaN when none is usable
    stderr: float  # standard error of that mean: std (N - 1 normalised) / sqrt(batches); NaN with fewer than 2
    batches: int  # batches in the mean (0 when a gradient is non-finite)
    per_batch: tuple[float, ...] = field(repr=False)  # the ratio of every given batch, in order; NaN where left out
    hvps: int = 0  # Hessian-vector products spent: one per batch with a finite, non-zero gradient
    gradients: int = 0  # mini-batch gradients spent (each with the graph its one product backpropagates through)
    zero_gradient: int = 0  # batches left out because g_B = 0
    bn_mode: str = BN_MODE
    seconds: float = 0.0


def _gradient_with_graph(op: HessianOperator) -> Tensor:
    """The flat gradient of ``op``'s loss from the graph its reverse-over-reverse products reuse (one gradient in
    all: the product along it needs no second pass)."""
    _, grads = op._retained_graph()
    flat = torch.cat([g.detach().reshape(-1) for g in grads]).to(torch.float64)
    op._gradient = flat  # what op.gradient() would compute again without the graph
    return flat.clone()


def batch_sharpness(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    *,
    loss: str = "cross_entropy",
    wrt: list[str] | None = None,
) -> BatchSharpness:
    r"""Batch sharpness :math:`\mathbb{E}_B\big[g_B^\top H_B g_B / \lVert g_B \rVert^2\big]` over the given batches.

    Andreyev & Beneventano (2024, "Edge of stochastic stability") show that mini-batch SGD does not hold
    :math:`\lambda_{max}` of the full loss at :math:`2/\eta` as full-batch gradient descent does (Cohen et al. 2021):
    the quantity it stabilises is this expectation over batches of the curvature of each batch's loss along the
    batch's own gradient, the direction of the step SGD takes. Every batch gets a
    :class:`~pipeline.curvature.operators.HessianOperator` of its own (the batch alone, BatchNorm in eval mode, the
    model's repeatability checked once); its gradient comes from the graph that the one product along it reuses, so
    each batch costs one gradient and one product. For a single batch holding the whole training set this is
    :func:`gradient_sharpness` of that set.

    Args:
        model: the network in eval mode (checked: training-mode BatchNorm or dropout is refused).
        batches: ``(x, y)`` pairs, each one mini-batch of inputs and targets (sizes may differ), e.g. fixed
            batches of the run's batch size; at least one.
        loss: ``cross_entropy`` or ``mse`` (see :func:`~pipeline.curvature.operators.loss_sum`).
        wrt: parameter names (default: all trainable ones).

    Returns:
        :class:`BatchSharpness`; ``stderr`` treats the batches as independent draws of a random batch.

    Raises:
        CurvatureError: no batches, a batch that is not an ``(x, y)`` pair of equal, non-zero length, unknown
            ``loss`` or names, a model in training mode.
    """
    batches = list(batches)
    if not batches:
        raise CurvatureError("batches: empty; need at least one (x, y) mini-batch")
    start = time.perf_counter()
    per_batch: list[float] = []
    hvps = gradients = zero = 0
    finite = True
    for i, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise CurvatureError(f"batches[{i}]: expected an (x, y) pair of tensors, got {type(batch).__name__}")
        x, y = batch
        try:
            probe = ProbeSet.from_tensors(x, y, max(len(x), 1))
        except CurvatureError as err:
            raise CurvatureError(f"batches[{i}]: {err}") from None
        # reverse_over_reverse: the graph of the gradient serves the one product along it
        op = HessianOperator(model, probe, wrt=wrt, loss=loss, check=(i == 0))
        g = _gradient_with_graph(op)
        gradients += 1
        if not bool(torch.isfinite(g).all()):
            finite = False
            per_batch.append(math.nan)
            continue
        norm_sq = float(g @ g)
        if norm_sq == 0.0:
            zero += 1
            per_batch.append(math.nan)
            continue
        per_batch.append(float(g @ op.matvec(g)) / norm_sq)
        hvps += 1
    used = [r for r in per_batch if not math.isnan(r)]
    n = len(used)
    if not finite or n == 0:
        value = stderr = math.nan
    else:
        value = math.fsum(used) / n
        stderr = math.sqrt(math.fsum((r - value) ** 2 for r in used) / (n - 1) / n) if n > 1 else math.nan
    return BatchSharpness(
        value=value,
        stderr=stderr,
        batches=n if finite else 0,
        per_batch=tuple(per_batch),
        hvps=hvps,
        gradients=gradients,
        zero_gradient=zero,
        seconds=time.perf_counter() - start,
    )


class PreconditionedSharpness(NamedTuple):
    r""":math:`\lambda_{max}(P^{-1}H)` from :func:`preconditioned_sharpness` (unpacks as a 5-tuple)."""

    value: float  # top eigenvalue of D^{-1/2} H D^{-1/2}, = lambda_max(P^{-1} H)
    residual: float  # ||A u - lambda u|| of the symmetric A = D^{-1/2} H D^{-1/2} at its top eigenvector u
    converged: bool  # the Lanczos residual met tol
    hvps: int  # Hessian-vector products spent (the explicit residual included)
    vector: Tensor  # u: the top eigenvector of A (flat float64, unit norm), the warm start of the next solve


def preconditioned_sharpness(
    model: nn.Module,
    probe: ProbeSet,
    preconditioner: Mapping[str, Tensor],
    *,
    loss: str = "cross_entropy",
    tol: float = 1e-3,
    max_hvps: int = 200,
    v0: Tensor | None = None,
    seed: int = 0,
    operator: HessianOperator | None = None,
) -> PreconditionedSharpness:
    r"""Top eigenvalue of the preconditioned probe-set Hessian :math:`P^{-1}H` for a positive diagonal :math:`P = D`.

    :math:`P^{-1}H` is not symmetric, but it is similar to :math:`A = D^{-1/2} H D^{-1/2}`
    (:math:`P^{-1}H = D^{-1/2} A D^{1/2}`), which is: the same eigenvalues, real, and Lanczos finds the top one from
    products :math:`A u = D^{-1/2} H (D^{-1/2} u)`. For a preconditioned step :math:`\theta \leftarrow \theta -
    \eta P^{-1} m` this is the curvature that decides stability on a quadratic, as :math:`\lambda_{max}(H)` does for
    SGD; Cohen et al. (2022, "Adaptive gradient methods at the edge of stability") find that full-batch Adam trains
    with it at :func:`adam_threshold` (:math:`P` from :func:`adam_preconditioner`). The eigenvector of :math:`P^{-1}H`
    is :math:`D^{-1/2} u`.

    Args:
        model: the network in eval mode (checked unless ``operator`` is given).
        probe: the probe set (loss = mean over all its samples).
        preconditioner: name -> diagonal of :math:`P` (positive and finite) over exactly the operator's parameters
            (default: all trainable ones), with their shapes.
        loss: ``cross_entropy`` or ``mse``.
        tol: relative Ritz-residual tolerance of the Lanczos solve (see :func:`~pipeline.curvature.eigen.lanczos`).
        max_hvps: products allowed, explicit residual included.
        v0: warm start, e.g. the previous ``vector`` (flat, ``dim`` entries); ``None``: a seeded Gaussian.
        seed: seed of that start vector (the global random state is never used).
        operator: a :class:`HessianOperator` of this model and probe set already at the current weights (e.g. the
            one a tracked :math:`\lambda_{max}` solve just used): its retained graph is reused and its account
            counts these products too. ``loss`` is then the operator's.

    Returns:
        :class:`PreconditionedSharpness` ``(value, residual, converged, hvps, vector)``.

    Raises:
        CurvatureError: names or shapes of ``preconditioner`` that differ from the parameters', an entry that is not
            positive and finite, a ``v0`` of the wrong shape, a model in training mode.
    """
    if operator is None:
        op = HessianOperator(model, probe, loss=loss)
    else:
        if not isinstance(operator, HessianOperator) or operator.probe.size != probe.size:
            raise CurvatureError(
                f"operator: expected a HessianOperator over the {probe.size} probe samples, got "
                f"{type(operator).__name__}" + (f" over {operator.probe.size}" if hasattr(operator, "probe") else "")
            )
        op = operator
    diagonal = _flat(op, preconditioner, "preconditioner")
    if not bool((diagonal > 0).all()):
        raise CurvatureError(
            f"preconditioner: must be positive; {int((diagonal <= 0).sum())} of {op.dim} entries are <= 0"
        )
    scale = diagonal.rsqrt()  # D^{-1/2}
    if v0 is not None:
        if not isinstance(v0, Tensor) or v0.shape != (op.dim,):
            raise CurvatureError(f"v0: expected a vector of shape ({op.dim},), got {tuple(getattr(v0, 'shape', ()))}")
        v0 = v0.detach().to(device=op.device, dtype=torch.float64)
    top, _ = lanczos(
        lambda u: scale * op.matvec(scale * u),
        op.dim,
        k_largest=1,
        tol=tol,
        max_matvecs=max_hvps,
        v0=v0,
        seed=seed,
        device=op.device,
    )
    return PreconditionedSharpness(
        value=float(top.eigenvalues[0]),
        residual=float(top.residuals[0]),
        converged=bool(top.converged[0]),
        hvps=int(top.matvecs),
        vector=top.eigenvectors[0].detach().clone(),
    )


def adam_preconditioner(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Tensor] | None:
    r"""Adam's diagonal preconditioner at its current state: :math:`P_t = (1 - \beta_1^t)\,\mathrm{diag}(\sqrt{\hat
    v_t} + \epsilon)`, with :math:`\hat v_t = v_t / (1 - \beta_2^t)` the bias-corrected second moment after
    :math:`t` steps.

    With it Adam's update is :math:`\theta_{t+1} = \theta_t - \eta P_t^{-1} m_t` for the raw first moment
    :math:`m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t` (Cohen et al. 2022, section 2), the form whose stability
    threshold is :func:`adam_threshold`. Read from ``exp_avg_sq`` (``max_exp_avg_sq`` with amsgrad), ``step``,
    ``betas`` and ``eps`` of each parameter's state and group; computed in float64. The optimiser is not modified.

    Args:
        optimizer: a ``torch.optim.Adam`` (or subclass) over the model's trainable parameters.
        model: the network; its trainable parameter names key the result.

    Returns:
        name -> :math:`\mathrm{diag}\,P_t` (float64, the parameter's shape), or ``None`` before the first step
        (no second moment yet).

    Raises:
        CurvatureError: another optimiser, a trainable parameter the optimiser does not hold, or one without state
            while others have it.
    """
    if not isinstance(optimizer, torch.optim.Adam):
        raise CurvatureError(f"optimizer: expected a torch.optim.Adam, got {type(optimizer).__name__}")
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    outside = [n for n, p in named if id(p) not in groups]
    if outside:
        raise CurvatureError(f"optimizer: does not hold the model's parameters {outside[:4]}")
    stepped = [n for n, p in named if "exp_avg_sq" in optimizer.state.get(p, {})]
    if not stepped:
        return None
    if len(stepped) < len(named):
        missing = [n for n, _ in named if n not in stepped]
        raise CurvatureError(f"optimizer: no second moment for {missing[:4]} while other parameters have one")
    out: dict[str, Tensor] = {}
    for name, p in named:
        state, group = optimizer.state[p], groups[id(p)]
        t = float(state["step"])
        if t < 1:
            return None
        beta1, beta2 = (float(b) for b in group["betas"])
        second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        v_hat = second.detach().to(torch.float64) / (1.0 - beta2**t)
        out[name] = (1.0 - beta1**t) * (v_hat.sqrt() + float(group["eps"]))
    return out


def adam_threshold(lr: float, beta1: float) -> float:
    r"""Adam's stability threshold on the preconditioned sharpness: :math:`(2 + 2\beta_1) / ((1 - \beta_1)\,\eta)`.

    The heavy-ball bound :math:`(2 + 2\beta)/\eta` for momentum written as an exponential moving average,
    :math:`m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t` (Cohen et al. 2022): :math:`38/\eta` at :math:`\beta_1 = 0.9`.
    ``inf`` for ``lr <= 0``.

    Raises:
        CurvatureError: ``beta1`` outside :math:`[0, 1)`.
    """
    if not 0.0 <= beta1 < 1.0:
        raise CurvatureError(f"beta1: must be in [0, 1), got {beta1!r}")
    if lr <= 0:
        return math.inf
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
