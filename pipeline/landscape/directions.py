"""Directions in weight space for loss-landscape plots: random (filter-normalised), PCA of a trajectory, Hessian
eigenvectors, and the difference of two models.

A direction is a ``dict[str, Tensor]`` with the names and shapes of the trainable parameters it moves; a point of a
landscape is :math:`\\theta = \\theta_0 + \\sum_j c_j d_j`. Filter normalisation follows Li et al. (2018),
"Visualizing the Loss Landscape of Neural Nets", so that plots of networks with different weight scales compare.
"""

from __future__ import annotations

import hashlib
import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

Direction = dict[str, Tensor]

NORMS = ("filter", "layer", "none")
IGNORES = ("biasbn", "none")


def _check_choice(value: str, name: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: unknown value {value!r}; allowed: {', '.join(allowed)}")


def _rescaled(d: Tensor, target_norm: Tensor) -> Tensor:
    """``d`` scaled to ``target_norm`` (a zero ``d`` stays zero rather than becoming NaN)."""
    norm = d.norm()
    return d if norm == 0 else d * (target_norm / norm)


def random_direction(
    params: Mapping[str, Tensor], *, seed: int, norm: str = "filter", ignore: str = "biasbn"
) -> Direction:
    """A Gaussian direction, normalised to the scale of ``params`` (Li et al. 2018, §4).

    Entries are :math:`\\mathcal N(0, 1)`, drawn on the CPU from ``torch.Generator().manual_seed(seed)`` in the
    insertion order of ``params`` and in each parameter's dtype, then moved to its device: the same seed gives the
    same direction on any device. Every parameter is drawn, even one zeroed below, so ``ignore`` does not change
    the other entries.

    ``norm``: ``filter`` rescales each filter :math:`d_f` (slice along dim 0 of a tensor with dim > 1) to
    :math:`\\lVert d_f \\rVert = \\lVert \\theta_f \\rVert`; ``layer`` rescales each tensor to
    :math:`\\lVert d \\rVert = \\lVert \\theta \\rVert`; ``none`` keeps the raw draw.
    ``ignore``: ``biasbn`` zeroes every parameter with dim <= 1 (biases, BatchNorm weight and bias); ``none`` keeps
    them, normalising each as one filter. (The ``loss-landscape`` code instead *copies the weights* into the
    direction for dim <= 1 under ``ignore != biasbn``, which moves those entries along :math:`\\theta` itself, a
    radial rescaling rather than a random direction; we do not.)

    Args:
        params: the trainable parameters (the point :math:`\\theta_0` that sets the scale).
        seed: seed of the CPU generator.
        norm: ``filter``, ``layer`` or ``none``.
        ignore: ``biasbn`` or ``none``.

    Returns:
        The direction, same names, shapes, dtypes and devices as ``params``.

    Raises:
        ValueError: for an unknown ``norm`` or ``ignore``.
    """
    _check_choice(norm, "norm", NORMS)
    _check_choice(ignore, "ignore", IGNORES)
    generator = torch.Generator().manual_seed(int(seed))
    out: Direction = {}
    for name, p in params.items():
        w = p.detach()
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
        if w.dim() <= 1:
            if ignore == "biasbn":
                d = torch.zeros_like(w)
            elif norm != "none":
                d = _rescaled(d, w.norm())  # one filter == the whole tensor
        elif norm == "filter":
            d_norm = d.flatten(1).norm(dim=1)
            scale = torch.where(d_norm > 0, w.flatten(1).norm(dim=1) / d_norm, torch.zeros_like(d_norm))
            d = d * scale.view((-1,) + (1,) * (w.dim() - 1))
        elif norm == "layer":
            d = _rescaled(d, w.norm())
        out[name] = d
    return out


def _flat(d: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    return torch.cat([d[n].detach().reshape(-1).to("cpu", torch.float64) for n in names])


def _unflat(v: Tensor, like: Mapping[str, Tensor]) -> Direction:
    out, start = {}, 0
    for name, t in like.items():
        out[name] = v[start : start + t.numel()].view(t.shape).to(device=t.device, dtype=t.dtype)
        start += t.numel()
    return out


def _same_point(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n].detach().cpu(), b[n].detach().cpu()) for n in a)


def pca_directions(
    trajectory: Sequence[Mapping[str, Tensor]], final: Mapping[str, Tensor], k: int = 2, *, ignore: str = "biasbn"
) -> tuple[list[Direction], list[float]]:
    """Top-``k`` principal directions of a training trajectory around its end point (Li et al. 2018, §7).

    Rows of :math:`M` are the flattened :math:`\\theta_i - \\theta_{\\mathrm{final}}` (not centred, as in Li et
    al.; a checkpoint equal to ``final`` is skipped); the directions are the top right singular vectors of
    :math:`M` (float64 SVD), unit norm over all parameters, each signed so that its largest-magnitude entry is
    positive. The explained variance ratio of direction ``i`` is :math:`\\sigma_i^2 / \\sum_j \\sigma_j^2`.

    Args:
        trajectory: checkpoints' parameters, each with the names and shapes of ``final``.
        final: the end point.
        k: number of directions (>= 1).
        ignore: ``biasbn`` zeroes the dim <= 1 entries before the SVD (so the directions have none); ``none``.

    Returns:
        (directions, explained variance ratios), ``k`` of each.

    Raises:
        ValueError: for a bad ``k`` or ``ignore``, mismatched names or shapes, or a trajectory that spans fewer than
            ``k`` dimensions around ``final``.
    """
    _check_choice(ignore, "ignore", IGNORES)
    if k < 1:
        raise ValueError(f"k: need >= 1 directions, got {k}")
    names = list(final)
    for i, point in enumerate(trajectory):
        if list(point) != names or any(point[n].shape != final[n].shape for n in names):
            raise ValueError(f"trajectory: checkpoint {i} does not have the names and shapes of final")
    keep = torch.cat([torch.full((final[n].numel(),), ignore == "none" or final[n].dim() > 1) for n in names])
    end = _flat(final, names)
    rows = [(_flat(point, names) - end) * keep for point in trajectory if not _same_point(point, final)]
    rows = [r for r in rows if bool(r.any())]
    if len(rows) < k:
        raise ValueError(f"trajectory: {len(rows)} non-zero differences from final, need at least k = {k}")
    _, sigma, vh = torch.linalg.svd(torch.stack(rows), full_matrices=False)
    if not sigma[k - 1] > sigma[0] * 1e-12:
        raise ValueError(f"trajectory: the differences span fewer than k = {k} dimensions")
    total = float((sigma**2).sum())
    directions, ratios = [], []
    for i in range(k):
        v = vh[i]
        if v[v.abs().argmax()] < 0:  # SVD signs are arbitrary; fix them so the result is deterministic
            v = -v
        directions.append(_unflat(v, final))
        ratios.append(float(sigma[i] ** 2) / total)
    return directions, ratios


def eigenvector_directions(payload: Mapping, k: int = 2) -> list[Direction]:
    """The first ``k`` Hessian eigenvectors saved by the hessian stage, as unit-norm directions.

    Args:
        payload: the dict of ``artifacts/hessian/<run>/eigenvectors.pt``, with ``vectors = {name: Tensor(m, *shape)}``
            (eigenvector ``i`` is ``{name: vectors[name][i]}``, by decreasing eigenvalue).
        k: how many (1 <= k <= m).

    Returns:
        ``k`` directions, each renormalised to unit norm over all parameters (stored in float32, they are unit
        norm only to float32 rounding).

    Raises:
        ValueError: for a payload without ``vectors`` or with inconsistent counts, or ``k`` outside ``1..m``.
    """
    vectors = payload.get("vectors") if isinstance(payload, Mapping) else None
    if not vectors:
        raise ValueError("payload: expected a dict with a non-empty 'vectors' mapping name -> Tensor(m, *shape)")
    counts = {int(v.shape[0]) for v in vectors.values()}
    if len(counts) != 1:
        raise ValueError(f"payload: 'vectors' hold different numbers of eigenvectors per parameter: {sorted(counts)}")
    stored = counts.pop()
    if not 1 <= k <= stored:
        raise ValueError(f"k: must be between 1 and the {stored} stored eigenvectors, got {k}")
    out = []
    for i in range(k):
        d = {name: v[i].detach().clone() for name, v in vectors.items()}
        norm = direction_norm(d)
        if norm == 0:
            raise ValueError(f"payload: eigenvector {i} is zero")
        out.append({name: (t.double() / norm).to(t.dtype) for name, t in d.items()})
    return out


def difference_direction(start: Mapping[str, Tensor], end: Mapping[str, Tensor]) -> Direction:
    """:math:`d = \\theta_{\\mathrm{end}} - \\theta_{\\mathrm{start}}`, so ``start + 1 * d == end``.

    Raises:
        ValueError: when the names or shapes differ.
    """
    if list(start) != list(end) or any(start[n].shape != end[n].shape for n in start):
        raise ValueError("end: must have the same parameter names (in order) and shapes as start")
    return {n: end[n].detach() - start[n].detach() for n in start}


def direction_norm(d: Mapping[str, Tensor]) -> float:
    """:math:`\\lVert d \\rVert_2` over all entries of all tensors, accumulated in float64."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in d.values()))


def direction_id(d: Mapping[str, Tensor]) -> str:
    """Content address of a direction: the first 16 hex digits of the sha256 of its names (sorted), shapes, dtypes
    and bytes. Equal directions get equal ids on any device; any change, even one ulp, changes the id."""
    digest = hashlib.sha256()
    for name in sorted(d):
        t = d[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        # bytes through uint8, which also works for dtypes numpy lacks (bfloat16)
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
