r"""Function-preserving rescalings of a network (Dinh et al. 2017): the test a flatness measure must pass.

A ReLU is positively homogeneous, :math:`\mathrm{relu}(\alpha z) = \alpha\,\mathrm{relu}(z)` for :math:`\alpha > 0`,
so multiplying one layer's weights and bias by α and dividing the next layer's weights by α leaves the network's
function unchanged, while the Hessian block of the first layer is scaled by :math:`1/\alpha^2` and that of the
second by :math:`\alpha^2`: λmax, the trace and the ε-sharpness in a ball can be made as large as one likes at the
same minimum. A layer followed by a BatchNorm is scale-invariant in the same way: scaling its output by α and the
BatchNorm's running mean by α, running variance and ε by :math:`\alpha^2` changes nothing in eval mode (and in train
mode the batch statistics scale by themselves).

- :func:`relu_pairs`, :func:`norm_pairs`: where such rescalings apply in a model (found in ``nn.Sequential``
  containers and ``convK``/``bnK`` sibling pairs);
- :func:`dinh_rescale`: a rescaled copy (the model itself is never modified);
- :func:`output_change`: the largest change of the outputs over a probe set, to check that the function is kept.

Reference: L. Dinh, R. Pascanu, S. Bengio, Y. Bengio, "Sharp minima can generalize for deep nets", ICML 2017.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from pipeline.curvature._checks import CurvatureError, check_positive
from pipeline.curvature.operators import ProbeSet

__all__ = ["HOMOGENEOUS", "relu_pairs", "norm_pairs", "dinh_rescale", "output_change"]

HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity)  # f(a z) = a f(z) for a > 0
_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _sequential_runs(model: nn.Module):
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            yield [(f"{prefix}.{name}" if prefix else name, child) for name, child in children]


def relu_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(first, second)`` module names of affine layers with only positively homogeneous activations between them,
    in the same ``nn.Sequential`` (an MLP's hidden layers): Dinh et al.'s layer pairs, in order."""
    pairs = []
    for run in _sequential_runs(model):
        for i, (name, child) in enumerate(run):
            if not isinstance(child, nn.Linear):
                continue
            j = i + 1
            saw_activation = False
            while j < len(run) and isinstance(run[j][1], HOMOGENEOUS):
                saw_activation = saw_activation or isinstance(run[j][1], (nn.ReLU, nn.LeakyReLU))
                j += 1
            if saw_activation and j < len(run) and isinstance(run[j][1], nn.Linear):
                pairs.append((name, run[j][0]))
    return pairs


def norm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer, norm)`` names of an affine layer whose output goes straight into a BatchNorm: adjacent in an
    ``nn.Sequential``, or siblings named ``convK`` / ``bnK`` (the ResNets of :mod:`pipeline.training.models`)."""
    modules = dict(model.named_modules())
    pairs = []
    for run in _sequential_runs(model):
        for (name, child), (next_name, following) in zip(run, run[1:]):
            if isinstance(child, _AFFINE) and isinstance(following, _NORMS):
                pairs.append((name, next_name))
    for name, module in modules.items():
        found = re.fullmatch(r"(.*?)(conv)(\d+)", name.rsplit(".", 1)[-1])
        if not isinstance(module, _AFFINE) or not found:
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        sibling = (f"{parent}." if parent else "") + f"bn{found.group(3)}"
        if isinstance(modules.get(sibling), _NORMS):
            pairs.append((name, sibling))
    return sorted(set(pairs), key=lambda p: list(modules).index(p[0]))


def dinh_rescale(
    model: nn.Module, alpha: float, *, pairs: list[tuple[str, str]] | None = None, kind: str = "relu"
) -> nn.Module:
    """A deep copy of ``model`` with the same function and rescaled weights.

    ``kind="relu"``: for each ``(first, second)`` of ``pairs`` (default: the first of :func:`relu_pairs`), the first
    layer's weight and bias times α, the second's weight divided by α. ``kind="norm"``: for each ``(layer, norm)``
    (default: all of :func:`norm_pairs`), the layer's weight and bias times α, the BatchNorm's running mean times α,
    its running variance and ε times α² (exact in eval mode).

    Raises:
        CurvatureError: α not positive, an unknown ``kind``, or no pair to rescale (the message says what it
            looked for).
    """
    alpha = check_positive("alpha", alpha)
    if kind not in ("relu", "norm"):
        raise CurvatureError(f"kind: unknown name {kind!r}; allowed: relu, norm")
    if pairs is None:
        found = relu_pairs(model) if kind == "relu" else norm_pairs(model)
        pairs = found[:1] if kind == "relu" else found
    if not pairs:
        what = "Linear -> ReLU -> Linear in an nn.Sequential" if kind == "relu" else "a layer followed by BatchNorm"
        raise CurvatureError(f"dinh_rescale: no {kind} pair in {type(model).__name__} (looked for {what})")
    copied = copy.deepcopy(model)
    modules = dict(copied.named_modules())
    with torch.no_grad():
        for first, second in pairs:
            layer, other = modules[first], modules[second]
            layer.weight.mul_(alpha)
            if getattr(layer, "bias", None) is not None:
                layer.bias.mul_(alpha)
            if kind == "relu":
                other.weight.div_(alpha)
            else:
                if other.running_mean is None or other.running_var is None:
                    raise CurvatureError(f"dinh_rescale: {second} keeps no running statistics (track_running_stats)")
                other.running_mean.mul_(alpha)
                other.running_var.mul_(alpha**2)
                other.eps = other.eps * alpha**2
    return copied


def output_change(a: nn.Module, b: nn.Module, probe: ProbeSet) -> float:
    """``max |f_a(x) - f_b(x)| / max |f_a(x)|`` over the probe set (both in their current mode, no gradients)."""
    num = den = 0.0
    with torch.no_grad():
        for x, _ in probe.batches:
            fa, fb = a(x), b(x)
            num = max(num, float((fa - fb).abs().max()))
            den = max(den, float(fa.abs().max()))
    return num / den if den > 0 else num
