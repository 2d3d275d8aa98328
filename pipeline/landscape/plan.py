"""What the scan stages evaluate: the 1-D lines and paths of ``interpolate`` and the 2-D plane of ``surface``.

Every scan is anchored at the trained (final) model, :math:`\\theta(c) = \\theta_{\\mathrm{final}} + \\sum_j c_j d_j`,
so the point that stands for the trained model is evaluated with ``c = 0`` and its loss equals the trained model's
loss exactly, not up to the rounding of ``init + (final - init)``. The reported coordinate is the one a reader
expects: ``alpha`` for a direction around the trained model, ``t`` on a path (``t = 0`` init and ``t = 1`` trained
for ``init_final``; ``t = 0`` trained and ``t = 1`` the second-seed model for ``partner``).

Paths between two models move the floating-point buffers too (BatchNorm running statistics interpolate with the
weights), so both ends are the two models exactly; directions around the trained model keep the buffers fixed.

Every direction is scaled to the norm of the filter-normalised random direction (:func:`reference_norm`), so a
coordinate means the same distance in weight space whichever kind of direction it moves along.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from pipeline.config import LandscapeConfig
from pipeline.curvature.eigen import lanczos
from pipeline.curvature.operators import HessianOperator, ProbeSet
from pipeline.landscape.directions import (
    Direction,
    difference_direction,
    direction_id,
    direction_norm,
    eigenvector_directions,
    pca_directions,
    random_direction,
)
from pipeline.landscape.tiles import grid_coords

LINE_PATHS = ("init_final", "random", "eigen", "partner", "partner_aligned")


@dataclass
class LineScan:
    """One 1-D scan: ``theta_final + coefficient * direction`` (buffers moved by ``buffer_direction`` when given)."""

    path: str  # init_final | random | eigen | partner | partner_aligned
    direction: Direction
    buffer_direction: dict[str, Tensor] | None
    coefficient: Tensor  # (P,) float64: the multiplier of `direction`
    alpha: Tensor  # (P,) float64: the reported coordinate (alpha, or t on a path)
    distance: Tensor  # (P,) float64: signed distance in weight space from the point at coordinate 0
    direction_id: str = ""
    info: dict = field(default_factory=dict)

    @property
    def coords(self) -> Tensor:
        return self.coefficient.reshape(-1, 1)


def state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Detached trainable parameters and buffers of ``model``, by name."""
    return ({n: p.detach() for n, p in model.named_parameters()}, {n: b.detach() for n, b in model.named_buffers()})


def symmetric_axis(points: int, half_range: float) -> Tensor:
    """``points`` float64 values evenly spaced on ``[-half_range, half_range]``; for an odd count the middle value
    is exactly 0 (the trained model is a grid point)."""
    axis = torch.linspace(-half_range, half_range, points, dtype=torch.float64)
    if points % 2:
        axis[points // 2] = 0.0
    return axis


def reference_norm(params: Mapping[str, Tensor], cfg: LandscapeConfig) -> float:
    """Norm of the filter-normalised random direction of seed ``cfg.seed`` (for ``norm: filter`` and ``ignore:
    biasbn`` it is the norm of the weights of dim > 1): the common length of every scan direction."""
    return direction_norm(random_direction(params, seed=cfg.seed, norm=cfg.norm, ignore=cfg.ignore))


def scaled(direction: Mapping[str, Tensor], length: float) -> Direction:
    """``direction`` rescaled to norm ``length`` (in float64, stored in each tensor's dtype)."""
    norm = direction_norm(direction)
    if norm == 0:
        raise ValueError("direction: is zero and cannot be rescaled")
    return {n: (t.double() * (length / norm)).to(t.dtype) for n, t in direction.items()}


def _float_buffers(buffers: Mapping[str, Tensor]) -> list[str]:
    return [n for n, b in buffers.items() if b.is_floating_point()]


def path_scan(
    path: str, final: tuple[dict, dict], other: tuple[dict, dict], points: int, *, other_is_start: bool
) -> LineScan:
    """The straight path between the trained model and ``other`` (weights and floating-point buffers)."""
    params, buffers = final
    other_params, other_buffers = other
    d = difference_direction(params, other_params)
    names = _float_buffers(buffers)
    db = {n: other_buffers[n] - buffers[n] for n in names} if names else None
    t = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    # init_final: theta(t) = final + (1 - t) (init - final); partner: theta(t) = final + t (partner - final)
    coefficient = 1.0 - t if other_is_start else t.clone()
    if other_is_start:
        coefficient[-1] = 0.0
    else:
        coefficient[0] = 0.0
    length = direction_norm(d)
    distance = t * length
    return LineScan(path, d, db, coefficient, t, distance, direction_id(d), {"length": length})


def line_scans(
    final: nn.Module,
    cfg: LandscapeConfig,
    *,
    init: nn.Module | None = None,
    eigenvectors: Mapping | None = None,
    partner: nn.Module | None = None,
    aligned: nn.Module | None = None,
) -> list[LineScan]:
    """The 1-D scans of the ``interpolate`` stage, in the order of :data:`LINE_PATHS` (those whose inputs are given).

    Args:
        final: the trained model (the anchor of every scan).
        cfg: the ``landscape`` section (points, ranges, seed, normalisation).
        init: the model at initialisation (``init_final`` path), or None.
        eigenvectors: the payload of ``artifacts/hessian/<run>/eigenvectors.pt`` (``eigen`` line), or None.
        partner: the same run trained from another seed (``partner`` path), or None.
        aligned: the partner with its units permuted to this run's order (``partner_aligned`` path), or None.
    """
    params, buffers = state(final)
    scans = []
    if init is not None:
        scans.append(path_scan("init_final", (params, buffers), state(init), cfg.path_points, other_is_start=True))
    length = reference_norm(params, cfg)
    alpha = symmetric_axis(cfg.line_points, cfg.line_range)
    d = random_direction(params, seed=cfg.seed, norm=cfg.norm, ignore=cfg.ignore)
    scans.append(
        LineScan(
            "random",
            d,
            None,
            alpha,
            alpha.clone(),
            alpha * length,
            direction_id(d),
            {"length": length, "seed": cfg.seed},
        )
    )
    if eigenvectors is not None:
        v = scaled(eigenvector_directions(eigenvectors, 1)[0], length)
        scans.append(
            LineScan(
                "eigen",
                v,
                None,
                alpha,
                alpha.clone(),
                alpha * length,
                direction_id(v),
                {"length": length, "eigenvalue": float(eigenvectors["eigenvalues"][0])},
            )
        )
    if partner is not None:
        scans.append(path_scan("partner", (params, buffers), state(partner), cfg.path_points, other_is_start=False))
    if aligned is not None:
        scans.append(
            path_scan("partner_aligned", (params, buffers), state(aligned), cfg.path_points, other_is_start=False)
        )
    return scans


def plane_directions(
    final: nn.Module, cfg: LandscapeConfig, *, trajectory: Sequence[nn.Module] = (), eigenvectors: Mapping | None = None
) -> tuple[list[Direction], dict]:
    """The two directions of the ``surface`` plane (``cfg.plane``), each of the reference length.

    Returns:
        ``([dx, dy], info)``; ``info`` holds the length, and the explained variance ratios (pca) or eigenvalues
        (eigen).

    Raises:
        ValueError: for a pca plane without a trajectory spanning two dimensions, or an eigen plane without two
            stored eigenvectors.
    """
    params, _ = state(final)
    length = reference_norm(params, cfg)
    info: dict = {"plane": cfg.plane, "length": length}
    if cfg.plane == "random":
        dirs = [random_direction(params, seed=cfg.seed + i, norm=cfg.norm, ignore=cfg.ignore) for i in range(2)]
        info["seeds"] = [cfg.seed, cfg.seed + 1]
    elif cfg.plane == "pca":
        points = [state(m)[0] for m in trajectory]
        dirs, ratios = pca_directions(points, params, 2, ignore=cfg.ignore)
        dirs = [scaled(d, length) for d in dirs]
        info["explained_variance"] = ratios
    else:
        if eigenvectors is None:
            raise ValueError("eigenvectors: the eigen plane needs the hessian stage's eigenvectors.pt")
        dirs = [scaled(d, length) for d in eigenvector_directions(eigenvectors, 2)]
        info["eigenvalues"] = [float(v) for v in list(eigenvectors["eigenvalues"])[:2]]
    return dirs, info


def surface_coords(cfg: LandscapeConfig) -> tuple[Tensor, Tensor]:
    """The grid axis and the ``(n*n, 2)`` row-major coordinates (alpha varies slowest) of the surface."""
    axis = symmetric_axis(cfg.surface_points, cfg.surface_range)
    return axis, grid_coords([axis, axis])


def curvature_coords(cfg: LandscapeConfig) -> Tensor:
    """The coarse sub-grid of the curvature map: ``curvature_map`` points per axis over the same square."""
    axis = (
        symmetric_axis(cfg.curvature_map, cfg.surface_range)
        if cfg.curvature_map > 1
        else torch.zeros(1, dtype=torch.float64)
    )
    return grid_coords([axis, axis])


def curvature_at(
    model: nn.Module,
    directions: Sequence[Mapping[str, Tensor]],
    coords: Sequence[float],
    probe: ProbeSet,
    *,
    tol: float = 1e-2,
    max_hvps: int = 200,
    seed: int = 0,
    loss: str = "cross_entropy",
) -> dict:
    """λmax, λmin and |λmin/λmax| of the probe-set Hessian at ``theta_final + sum_j c_j d_j`` (thick-restart
    Lanczos, both ends from one Krylov basis; BatchNorm in eval mode). The model is not modified.

    Returns:
        ``{"lambda_max", "lambda_min", "ratio", "hvps", "converged"}``.
    """
    shifted = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, p in shifted.named_parameters():
            for c, d in zip(coords, directions):
                if name in d and c != 0:
                    p.add_(d[name].to(p.dtype), alpha=float(c))
    operator = HessianOperator(shifted, probe, loss=loss)
    largest, smallest = lanczos(
        operator.matvec, operator.dim, k_largest=1, k_smallest=1, tol=tol, max_matvecs=max_hvps, seed=seed
    )
    lmax, lmin = float(largest.eigenvalues[0]), float(smallest.eigenvalues[0])
    ratio = abs(lmin / lmax) if lmax != 0 else math.nan
    return {
        "lambda_max": lmax,
        "lambda_min": lmin,
        "ratio": ratio,
        "hvps": int(operator.products),
        "converged": bool(largest.converged.all() and smallest.converged.all()),
    }
