"""The numbers of a scan: the barrier and rise of a path, and the summaries the scan stages write.

Each takes the loss (and accuracy) a scan produced and returns plain floats; :func:`path_summary` and
:func:`surface_summary` are the ``interpolate`` and ``surface`` stages' ``*_metrics.json`` (non-finite numbers
become None: strict JSON).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

from pipeline.io import finite

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.landscape.plan import LineScan


def _path_losses(losses: Sequence[float] | Tensor) -> list[float] | None:
    """The losses of a path as floats, or None when any is NaN (the path measures are then NaN).

    Raises:
        ValueError: for fewer than two losses.
    """
    values = [float(v) for v in (losses.tolist() if isinstance(losses, Tensor) else losses)]
    if len(values) < 2:
        raise ValueError(f"losses: need at least the two endpoints, got {len(values)} values")
    return None if any(math.isnan(v) for v in values) else values


def barrier(losses: Sequence[float]) -> float:
    """Loss barrier along a path: :math:`\\max_t L(t) - \\tfrac12 (L(0) + L(1))` (Frankle et al. 2020; Draxler et
    al. 2018 for the mode-connectivity setting). Non-negative since the maximum includes the endpoints; NaN when
    any loss is NaN.

    Raises:
        ValueError: for fewer than two losses.
    """
    values = _path_losses(losses)
    if values is None:
        return math.nan
    return max(values) - 0.5 * (values[0] + values[-1])


def max_rise(losses: Sequence[float]) -> float:
    r"""Largest increase of the loss along a path, :math:`\max_{t \le t'} L(t') - L(t)`: 0 when the loss never goes up
    (the monotone linear interpolation of Goodfellow et al. 2015), NaN when any loss is NaN.

    Raises:
        ValueError: for fewer than two losses.
    """
    values = _path_losses(losses)
    if values is None:
        return math.nan
    rise, lowest = 0.0, values[0]
    for v in values[1:]:
        rise = max(rise, v - lowest)
        lowest = min(lowest, v)
    return rise


def path_summary(scan: LineScan, loss: Tensor, accuracy: Tensor) -> dict:
    """The ``interpolate`` metrics of one line or path: the trained model's loss and accuracy, the loss at the
    scan's ends and its maximum; for the path to the partner the barrier and the lowest accuracy, for the path from
    init whether the loss falls monotonically (Goodfellow et al. 2015). Non-finite numbers become None."""
    trained = int(torch.nonzero(scan.coefficient == 0)[0])
    out = {
        "trained_loss": float(loss[trained]),
        "trained_accuracy": float(accuracy[trained]),
        "max_loss": finite(float(loss.max())),
        "start_loss": float(loss[0]),
        "end_loss": float(loss[-1]),
    }
    if scan.path.startswith("partner"):
        out["barrier"] = finite(barrier(loss))
        out["min_accuracy"] = float(accuracy.min())
    if scan.path == "init_final":  # Goodfellow et al. 2015: is the loss monotone from init to the trained model?
        rise = max_rise(loss)
        out["max_rise"] = finite(rise)
        out["monotonic"] = bool(rise <= 1e-6 * max(1.0, float(loss.abs().max())))
    return {k: (finite(v) if isinstance(v, float) else v) for k, v in out.items()}


def surface_summary(
    loss: Tensor,
    accuracy: Tensor,
    coords: Tensor,
    *,
    plane: str,
    info: Mapping[str, Any],
    timing: Mapping[str, float],
    chunk: int,
    curvature: pd.DataFrame | None = None,
) -> dict:
    """The ``surface`` metrics of a 2-D grid: loss and accuracy at the trained model (the grid point at the
    origin), the grid's lowest loss and where, its highest finite loss, the count of non-finite points, the basin
    fraction (share of the grid within 0.1 nats of the trained loss: a plain width measure of the basin), the
    throughput, and the plane's ``info``; with a curvature map its mean and centre |λmin/λmax| ratio."""
    center = int(torch.nonzero((coords == 0).all(dim=1))[0])
    finite_points = torch.isfinite(loss)
    best = int(torch.where(finite_points, loss, torch.full_like(loss, math.inf)).argmin())
    metrics = {
        "plane": plane,
        "points": len(coords),
        "loss_center": float(loss[center]),
        "accuracy_center": float(accuracy[center]),
        "loss_min": float(loss[best]),
        "loss_min_at": [float(coords[best, 0]), float(coords[best, 1])],
        "loss_max": finite(float(loss[finite_points].max())) if bool(finite_points.any()) else None,
        "nonfinite_points": int((~finite_points).sum()),
        "basin_fraction": float(((loss - loss[center]) <= 0.1).double().mean()),
        "points_per_second": (timing["points"] / timing["seconds"]) if timing["points"] else None,
        "chunk": chunk,
        **{k: v for k, v in info.items() if k != "plane"},
    }
    if curvature is not None:
        at_center = (curvature.alpha == 0) & (curvature.beta == 0)
        metrics["curvature_ratio_mean"] = float(curvature.ratio.mean())
        metrics["curvature_ratio_center"] = float(curvature.ratio[at_center].iloc[0]) if at_center.any() else None
    return metrics
