"""Linear mode connectivity as it is measured since 2022: the second model aligned to the first by a permutation of
its units, and the channel statistics along the path recomputed (BatchNorm reset) or corrected (REPAIR).

Three things make the loss on the straight path between two trained networks rise, and the field separates them:

1. **Permutation.** Two seeds learn their units in different orders (Entezari et al. 2022); :func:`align_partner`
   permutes the second model with :mod:`~pipeline.landscape.permutation` (weight or activation matching) into the
   same function with its units in the first one's order.
2. **Stale normalisation statistics.** A BatchNorm network's running statistics are averages over the data of the
   *endpoint* networks; at an interpolated point the pre-activations have other means and variances, and the
   interpolated statistics no longer normalise them. ``reset`` recomputes them at every point (train mode, no
   gradient, a cumulative average over the train split, as ``torch.optim.swa_utils.update_bn``).
3. **Variance collapse.** Averaging two networks' weights shrinks the variance of every hidden unit (Jordan et al.
   2023, "REPAIR"); ``repair`` sets each channel's mean and standard deviation at the output of each hidden layer
   to the interpolation of the endpoints' values, :math:`\\mu_t = (1-t)\\mu_A + t\\mu_B` and
   :math:`\\sigma_t = (1-t)\\sigma_A + t\\sigma_B`, for networks with and without normalisation.

The statistics of ``reset`` and ``repair`` come from one pass over the train split per path point. With
``stats_batch_size = 0`` the pass is one forward of the whole split: every layer's statistics are then exact
population statistics of the network in which every earlier layer was already corrected (no dependence on how the
data is batched). A positive batch size averages per-batch statistics, as ``update_bn`` and the REPAIR code do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from pipeline.config import ALIGN_METHODS, PATH_STATISTICS
from pipeline.errors import ModelError
from pipeline.io import finite
from pipeline.landscape.engine import _point_loss_sums, _targets_correct
from pipeline.landscape.measures import barrier
from pipeline.landscape.permutation import (
    Match,
    PermutationSpec,
    activation_matching,
    permutation_spec,
    permute,
    weight_matching,
)
from pipeline.landscape.plan import state

# What the rows of a path say about the normalisation statistics at each point.
STATISTICS_LABEL = {"interpolate": "interpolated", "reset": "recomputed", "repair": "repaired"}


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` keeps running statistics (a BatchNorm with ``track_running_stats``)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by name, detached, in one dict (:func:`~pipeline.landscape.plan.state` merged)."""
    params, buffers = state(model)
    return {**params, **buffers}


# --------------------------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Alignment:
    """The partner permuted into the run's unit order, with how it was found."""

    model: nn.Module
    spec: PermutationSpec
    match: Match
    output_change: float  # max |logits(aligned) - logits(partner)| / max |logits(partner)| on the check inputs


def align_partner(
    model: nn.Module,
    partner: nn.Module,
    method: str,
    inputs: Tensor,
    *,
    seed: int = 0,
    batch_size: int = 512,
    max_passes: int = 100,
    what: str | None = None,
) -> Alignment:
    """``partner`` with its hidden units permuted to match ``model``'s (``method``: ``weights`` or ``activations``).

    The permutation spec comes from ``model``'s forward (:func:`~pipeline.landscape.permutation.permutation_spec`);
    ``inputs`` are the samples of activation matching and of the check that the aligned partner computes the same
    function as the partner (its logits within 1e-4 of their largest magnitude; anything else is a spec that does
    not describe the network, raised rather than scanned). Neither model is changed.

    Raises:
        ValueError: for an unknown ``method``.
        pipeline.errors.ModelError: the spec cannot be derived, or the aligned partner computes another function.
    """
    if method not in ALIGN_METHODS[1:]:
        raise ValueError(f"method: unknown value {method!r}; allowed: {', '.join(ALIGN_METHODS[1:])}")
    what = what or type(model).__name__
    spec = permutation_spec(model, tuple(inputs.shape[1:]), what=what)
    trainable = {n for n, _ in model.named_parameters()}
    state_a, state_b = model_state(model), model_state(partner)
    if method == "weights":
        match = weight_matching(
            spec,
            {n: t for n, t in state_a.items() if n in trainable},
            {n: t for n, t in state_b.items() if n in trainable},
            seed=seed,
            max_passes=max_passes,
        )
    else:
        match = activation_matching(spec, model, partner, inputs, batch_size=batch_size)
    aligned = copy.deepcopy(partner)
    aligned.load_state_dict(permute(spec, state_b, match.perms))
    aligned.train(partner.training)
    check = inputs[: min(len(inputs), batch_size)]
    with torch.no_grad():
        was = partner.training, aligned.training
        partner.eval(), aligned.eval()
        before, after = partner(check).double(), aligned(check).double()
        partner.train(was[0]), aligned.train(was[1])
    change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))
    if not change <= 1e-4:
        raise ModelError(
            f"{what}: the permuted partner computes another function (logits moved by {change:.3g} of their size); "
            "the permutation spec does not describe this network"
        )
    return Alignment(aligned, spec, match, change)


# --------------------------------------------------------------------------------------------------------------
# Paths with recomputed or corrected statistics
# --------------------------------------------------------------------------------------------------------------


def interpolate_state(a: Mapping[str, Tensor], b: Mapping[str, Tensor], t: float) -> dict[str, Tensor]:
    """:math:`a + t (b - a)` for every floating-point tensor (as the scan engine computes a path point, coefficient
    in the tensor's dtype); other tensors (``num_batches_tracked``) from ``a``."""
    return {
        n: (x + torch.tensor(t, dtype=torch.float64).to(x.dtype) * (b[n] - x)) if x.is_floating_point() else x
        for n, x in a.items()
    }


def _channel_dims(out: Tensor) -> list[int]:
    return [0, *range(2, out.dim())]


class _ChannelStatistics:
    """Per-channel mean and variance of one layer's outputs over a dataset, summed in float64."""

    def __init__(self):
        self.n, self.sum, self.squares = 0, 0.0, 0.0

    def add(self, out: Tensor) -> None:
        x = out.detach().double().movedim(1, 0).reshape(out.shape[1], -1)
        self.n += x.shape[1]
        self.sum = self.sum + x.sum(1)
        self.squares = self.squares + (x * x).sum(1)

    def mean_std(self) -> tuple[Tensor, Tensor]:
        mean = self.sum / self.n
        return mean, (self.squares / self.n - mean * mean).clamp_min(0).sqrt()


def _hooked(model: nn.Module, sites: Sequence[str], hook) -> list:
    modules = dict(model.named_modules())
    missing = [s for s in sites if s not in modules]
    if missing:
        raise ModelError(f"{missing[0]!r}: not a module of {type(model).__name__}; cannot correct its statistics")
    return [modules[s].register_forward_hook(hook(s)) for s in sites]


def site_statistics(
    model: nn.Module, sites: Sequence[str], x: Tensor, *, batch_size: int = 512
) -> dict[str, tuple[Tensor, Tensor]]:
    """Mean and standard deviation (population, float64) of every channel at the output of each module of
    ``sites``, over the inputs ``x`` (model in eval mode; it is not changed)."""
    stats = {s: _ChannelStatistics() for s in sites}
    handles = _hooked(model, sites, lambda s: lambda module, inputs, out: stats[s].add(out))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for xb in x.split(batch_size):
                model(xb)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {s: v.mean_std() for s, v in stats.items()}


class _Repair:
    """Forward hooks that set each site's channel means and standard deviations to targets: in ``collect`` mode from
    the statistics of the batch at hand (recorded as a cumulative average over batches), else the recorded ones."""

    def __init__(self, targets: Mapping[str, tuple[Tensor, Tensor]]):
        self.targets = targets
        self.collect = True
        self.recorded: dict[str, list] = {}

    def hook(self, site: str):
        def apply(module, inputs, out: Tensor) -> Tensor:
            dims = _channel_dims(out)
            shape = [1, out.shape[1]] + [1] * (out.dim() - 2)
            if self.collect:
                x = out.double()
                mean, var = x.mean(dims), x.var(dims, correction=0)
                seen = self.recorded.setdefault(site, [0, torch.zeros_like(mean), torch.zeros_like(var)])
                seen[0] += 1
                seen[1] += (mean - seen[1]) / seen[0]
                seen[2] += (var - seen[2]) / seen[0]
            else:
                _, mean, var = self.recorded[site]
            target_mean, target_std = self.targets[site]
            std = var.sqrt()
            scale = torch.where(std > 0, target_std / std.clamp_min(1e-300), torch.ones_like(std))
            shift = target_mean - mean * scale
            return out * scale.to(out.dtype).reshape(shape) + shift.to(out.dtype).reshape(shape)

        return apply


def _batches(x: Tensor, batch_size: int) -> tuple[Tensor, ...]:
    return (x,) if batch_size <= 0 else x.split(batch_size)


def reset_statistics(model: nn.Module, x: Tensor, *, batch_size: int = 0) -> None:
    """Recompute every BatchNorm's running statistics of ``model`` in place: reset, momentum ``None`` (a cumulative
    average over batches), one train-mode pass over ``x`` without gradients, back to the previous mode. The same as
    ``torch.optim.swa_utils.update_bn`` over batches of ``batch_size`` (0 = all of ``x`` in one batch)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was = model.training
    model.train()
    try:
        with torch.no_grad():
            for xb in _batches(x, batch_size):
                model(xb)
    finally:
        model.train(was)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


def evaluate_model(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 512, loss: str = "cross_entropy"):
    """Mean loss (float64 of the outputs, as the scan engine) and accuracy of ``model`` in eval mode over ``(x, y)``."""
    was = model.training
    model.eval()
    total, correct = 0.0, 0.0
    try:
        with torch.no_grad():
            for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
                out = model(xb).unsqueeze(0)
                total += float(_point_loss_sums(out, yb, loss)[0])
                correct += float(_targets_correct(out, yb)[0])
    finally:
        model.train(was)
    return total / len(x), correct / len(x)


def statistics_path(
    model: nn.Module,
    other: nn.Module,
    ts: Tensor,
    mode: str,
    stats_inputs: Tensor,
    splits: Mapping[str, tuple[Tensor, Tensor]],
    *,
    sites: Sequence[str] = (),
    batch_size: int = 512,
    stats_batch_size: int = 0,
    loss: str = "cross_entropy",
    on_point=None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Loss and accuracy on each split at the points :math:`\\theta_A + t(\\theta_B - \\theta_A)` of the straight path
    from ``model`` (t = 0) to ``other`` (t = 1), with the normalisation statistics of ``mode``:

    - ``interpolate``: the buffers interpolate with the weights (the path of the scan engine);
    - ``reset``: every BatchNorm's running statistics recomputed at the point over ``stats_inputs``
      (:func:`reset_statistics`), so at t = 0 and 1 the endpoints *with recomputed statistics*;
    - ``repair``: at the output of each module of ``sites`` every channel's mean and standard deviation over
      ``stats_inputs`` set to :math:`(1-t)` times model A's plus :math:`t` times model B's (measured on the endpoint
      models as they are), so at t = 0 and 1 the endpoints themselves (to float rounding).

    Neither model is changed. Returns ``{split: (loss, accuracy)}``, each ``(len(ts),)`` float64.
    """
    if mode not in ("interpolate", *PATH_STATISTICS):
        raise ValueError(f"mode: unknown value {mode!r}; allowed: interpolate, {', '.join(PATH_STATISTICS)}")
    if mode == "repair" and not sites:
        raise ValueError("sites: repair needs the modules whose outputs it corrects")
    state_a, state_b = model_state(model), model_state(other)
    scratch = copy.deepcopy(model)
    targets = {}
    if mode == "repair":
        at_a = site_statistics(model, sites, stats_inputs, batch_size=batch_size)
        at_b = site_statistics(other, sites, stats_inputs, batch_size=batch_size)
        targets = {s: (at_a[s], at_b[s]) for s in sites}
    results = {
        name: (torch.zeros(len(ts), dtype=torch.float64), torch.zeros(len(ts), dtype=torch.float64)) for name in splits
    }
    for i, t in enumerate(ts.tolist()):
        scratch.load_state_dict(interpolate_state(state_a, state_b, t))
        handles = []
        if mode == "reset":
            reset_statistics(scratch, stats_inputs, batch_size=stats_batch_size)
        elif mode == "repair":
            repair = _Repair(
                {s: ((1 - t) * ma + t * mb, (1 - t) * sa + t * sb) for s, ((ma, sa), (mb, sb)) in targets.items()}
            )
            handles = _hooked(scratch, sites, repair.hook)
            scratch.eval()
            with torch.no_grad():
                for xb in _batches(stats_inputs, stats_batch_size):
                    scratch(xb)
            repair.collect = False
        try:
            for name, (x, y) in splits.items():
                value, accuracy = evaluate_model(scratch, x, y, batch_size=batch_size, loss=loss)
                results[name][0][i], results[name][1][i] = value, accuracy
        finally:
            for h in handles:
                h.remove()
        if on_point is not None:
            on_point(i)
    return results


# --------------------------------------------------------------------------------------------------------------
# Numbers of a path
# --------------------------------------------------------------------------------------------------------------


def connectivity_summary(ts: Tensor, loss: Tensor, accuracy: Tensor) -> dict:
    """The barrier numbers of one path on one split, as the mode-connectivity papers give them: the loss barrier
    :math:`\\max_t L(t) - \\frac12 (L(0) + L(1))` (nats), the accuracy barrier
    :math:`100 \\cdot (\\frac12 (a(0) + a(1)) - \\min_t a(t))` (percentage points), the endpoints' and the midpoint's
    loss and accuracy (t = 0.5, or the point nearest it)."""
    mid = int(torch.argmin((ts.double() - 0.5).abs()))
    acc = [float(a) for a in accuracy]
    return {
        "loss_barrier": finite(barrier(loss)),
        "accuracy_barrier": finite(100.0 * (0.5 * (acc[0] + acc[-1]) - min(acc))),
        "start_loss": finite(float(loss[0])),
        "end_loss": finite(float(loss[-1])),
        "midpoint_loss": finite(float(loss[mid])),
        "start_accuracy": acc[0],
        "end_accuracy": acc[-1],
        "midpoint_accuracy": acc[mid],
        "midpoint_t": float(ts[mid]),
    }
