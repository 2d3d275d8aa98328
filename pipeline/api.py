"""The numbers without DVC: curvature and loss-landscape scans of any ``nn.Module`` on tensors you hold.

A handful of functions over the same library the stages run, with the same defaults (the ``hessian`` and
``landscape`` sections of ``params.yaml``), so with the same model, samples and settings they give the stages'
numbers (``tests/test_api.py`` compares them)::

    from pipeline import api

    spectrum = api.hessian_spectrum(model, x, y, top_k=5)      # Lanczos: spectrum.eigenvalues, .lambda_min
    trace = api.hessian_trace(model, x, y)                      # Hutch++: trace.value, trace.stderr
    density = api.spectral_density(model, x, y)                 # SLQ: density.grid, density.density
    surface = api.loss_surface(model, x, y, surface_points=21)  # random filter-normalised plane: surface.loss
    path = api.interpolate(model_a, model_b, x, y)              # straight line: path.loss, path.barrier
    sharp = api.adaptive_sharpness(model, x, y, norm="inf")     # Auto-PGD, m-sharpness: sharp.value
    rescaled = api.rescale(model, 10.0)                         # Dinh et al.: the same function, other weights

Keyword settings are the keys of the ``hessian`` section (curvature functions) or the ``landscape`` section
(scans), validated the same way (``hessian.top_k: must be >= 1, got 0``). The model is evaluated as it is
(its device and dtype) in eval mode (BatchNorm on its running statistics), through a view: the module you pass is
never changed. ``loss`` is ``cross_entropy`` (integer targets) or ``mse``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.config import HessianConfig, LandscapeConfig, build_section
from pipeline.curvature.analysis import eigen_solve
from pipeline.curvature.density import slq, smooth_density
from pipeline.curvature.flatness import AdaptiveSharpness
from pipeline.curvature.flatness import adaptive_sharpness as _adaptive_sharpness
from pipeline.curvature.operators import OPERATORS, CurvatureOperator, ProbeSet
from pipeline.curvature.reparam import dinh_rescale
from pipeline.curvature.trace import hutchinson, hutchpp
from pipeline.landscape.engine import evaluation_view
from pipeline.landscape.measures import barrier
from pipeline.landscape.plan import path_scan, plane_directions, state, surface_coords
from pipeline.landscape.tiles import scan

__all__ = [
    "Spectrum",
    "Trace",
    "Density",
    "Surface",
    "Path",
    "hessian_spectrum",
    "hessian_trace",
    "spectral_density",
    "loss_surface",
    "interpolate",
    "adaptive_sharpness",
    "rescale",
]


@dataclass
class Spectrum:
    eigenvalues: list[float]  # the top ``top_k``, descending
    lambda_min: float | None  # the smallest eigenvalue (``lambda_min: true``), else None
    residuals: list[float]  # ‖Hv − λv‖ of each top pair
    converged: bool  # every pair within ``tol``
    eigenvectors: dict[str, Tensor]  # parameter name -> (top_k, *shape) unit eigenvectors
    products: int  # operator-vector products spent
    method: str


@dataclass
class Trace:
    value: float
    stderr: float
    method: str
    products: int


@dataclass
class Density:
    grid: list[float]  # eigenvalue axis
    density: list[float]  # smoothed spectral density on ``grid``
    nodes: Tensor  # (runs, steps) Ritz values of the SLQ runs
    weights: Tensor  # (runs, steps) their quadrature weights (each run sums to 1 / runs)
    products: int


@dataclass
class Surface:
    axis: Tensor  # (n,) coordinates of each grid axis
    loss: Tensor  # (n, n) mean loss, ``loss[i, j]`` at (axis[i], axis[j])
    accuracy: Tensor  # (n, n) accuracy (NaN for regression targets)
    directions: list[dict[str, Tensor]]  # the plane's two directions


@dataclass
class Path:
    t: Tensor  # (points,) from 0 (model_a) to 1 (model_b)
    loss: Tensor  # (points,) mean loss
    accuracy: Tensor  # (points,)
    barrier: float  # max loss on the path − mean of its two ends


def _operator(model: nn.Module, inputs: Tensor, targets: Tensor, cfg: HessianConfig, operator: str, loss: str):
    if operator not in OPERATORS:
        raise ValueError(f"operator: unknown name {operator!r}; allowed: {', '.join(OPERATORS)}")
    view = evaluation_view(model)
    probe = ProbeSet.from_tensors(inputs, targets, cfg.batch_size)
    extra = {"hvp": cfg.hvp} if operator == "hessian" else {}
    return OPERATORS[operator](view, probe, loss=loss, **extra)


def hessian_spectrum(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    operator: str = "hessian",
    loss: str = "cross_entropy",
    **hessian,
) -> Spectrum:
    """Top ``top_k`` eigenpairs (and ``lambda_min``) of the Hessian (or ``operator="ggn"``) of the mean loss over
    ``inputs``; by ``method`` (``lanczos`` default, ``power``, ``arpack``) to ``tol``, within ``max_hvps``."""
    cfg = build_section(HessianConfig, hessian, "hessian")
    op: CurvatureOperator = _operator(model, inputs, targets, cfg, operator, loss)
    top, bottom = eigen_solve(op, cfg, cfg.top_k, cfg.lambda_min, cfg.seed)
    vectors = [op.unflatten(v) for v in top.eigenvectors]
    return Spectrum(
        eigenvalues=[float(v) for v in top.eigenvalues],
        lambda_min=float(bottom.eigenvalues[0]) if bottom is not None else None,
        residuals=[float(r) for r in top.residuals],
        converged=bool(top.converged.all()) and (bottom is None or bool(bottom.converged.all())),
        eigenvectors={n: torch.stack([v[n] for v in vectors]).detach() for n in op.names},
        products=op.products,
        method=top.method,
    )


def hessian_trace(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    estimator: str = "hutchpp",
    operator: str = "hessian",
    loss: str = "cross_entropy",
    **hessian,
) -> Trace:
    """Trace of the Hessian (or GGN) by the ``estimator`` ``hutchpp`` (Meyer et al. 2021) or ``hutchinson``,
    ``trace_hvps`` products, with the stage's probe seeds."""
    if estimator not in ("hutchinson", "hutchpp"):
        raise ValueError(f"estimator: unknown name {estimator!r}; allowed: hutchinson, hutchpp")
    cfg = build_section(HessianConfig, hessian, "hessian")
    op = _operator(model, inputs, targets, cfg, operator, loss)
    if estimator == "hutchinson":
        est = hutchinson(op.matvec, op.dim, samples=cfg.trace_hvps, seed=cfg.seed + 11, device=op.device)
    else:
        est = hutchpp(op.matvec, op.dim, matvecs=cfg.trace_hvps, seed=cfg.seed + 13, device=op.device)
    return Trace(float(est.value), float(est.stderr), est.method, op.products)


def spectral_density(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    operator: str = "hessian",
    loss: str = "cross_entropy",
    **hessian,
) -> Density:
    """Spectral density by stochastic Lanczos quadrature: ``density_runs`` runs of ``density_steps`` steps,
    smoothed with Gaussians of ``density_sigma`` (relative to the spectrum's width) on ``density_points`` points."""
    cfg = build_section(HessianConfig, hessian, "hessian")
    if cfg.density_runs == 0:
        raise ValueError("density_runs: must be >= 1 for a density")
    op = _operator(model, inputs, targets, cfg, operator, loss)
    found = slq(op.matvec, op.dim, runs=cfg.density_runs, steps=cfg.density_steps, seed=cfg.seed + 17, device=op.device)
    grid, values = smooth_density(found, points=cfg.density_points, relative_sigma=cfg.density_sigma)
    return Density([float(g) for g in grid], [float(v) for v in values], found.nodes, found.weights, op.products)


def adaptive_sharpness(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    kind: str = "worst",
    norm: str = "2",
    loss: str = "cross_entropy",
    **hessian,
) -> AdaptiveSharpness:
    """Adaptive sharpness (Kwon et al. 2021; Andriushchenko et al. 2023) as the ``hessian`` stage measures it: the
    ``kind`` ``worst`` (Auto-PGD, ``flatness_steps`` steps, m-sharpness over batches of ``adaptive_m``) or
    ``average`` (``adaptive_draws`` draws), ``norm`` ``"2"`` or ``"inf"``, ρ = ``adaptive_l2`` / ``adaptive_linf``
    (worst) or ``adaptive_average``; invariant under function-preserving rescalings (:func:`rescale`)."""
    cfg = build_section(HessianConfig, hessian, "hessian")
    rho = cfg.adaptive_average if kind == "average" else cfg.adaptive_l2 if norm == "2" else cfg.adaptive_linf
    return _adaptive_sharpness(
        evaluation_view(model),
        ProbeSet.from_tensors(inputs, targets, cfg.batch_size),
        rho=rho,
        norm=norm,
        kind=kind,
        m=cfg.adaptive_m,
        steps=cfg.flatness_steps,
        draws=cfg.adaptive_draws,
        seed=cfg.seed + 29,
        loss=loss,
    )


def rescale(model: nn.Module, alpha: float, *, kind: str = "relu") -> nn.Module:
    """A copy of ``model`` with the same function and rescaled weights (Dinh et al. 2017): ``relu``, the first
    Linear → ReLU → Linear pair times α and 1/α; ``norm``, every layer before a BatchNorm times α (its running
    statistics and ε follow). λmax, the trace and ε-sharpness in a ball move with α; adaptive sharpness does not."""
    return dinh_rescale(model, alpha, kind=kind)


def loss_surface(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    directions: list[dict[str, Tensor]] | None = None,
    loss: str = "cross_entropy",
    **landscape,
) -> Surface:
    """Loss and accuracy on the ``surface_points`` × ``surface_points`` grid over ``[-surface_range,
    surface_range]²`` of the plane through the model spanned by ``directions`` (two ``{name: tensor}`` mappings of
    the model's parameters); by default two filter-normalised random directions (Li et al. 2018) of seeds
    ``seed`` and ``seed + 1``, as the ``surface`` stage's random plane."""
    cfg = build_section(LandscapeConfig, landscape, "landscape")
    view = evaluation_view(model)
    params, buffers = state(view)
    if directions is None:
        directions, _ = plane_directions(view, cfg)
    elif len(directions) != 2:
        raise ValueError(f"directions: a plane needs two, got {len(directions)}")
    axis, coords = surface_coords(cfg)
    chunk = cfg.chunk or None
    values, accuracy = scan(
        view,
        params,
        buffers,
        directions,
        coords,
        inputs,
        targets,
        None,
        chunk=chunk,
        batch_size=cfg.batch_size,
        loss=loss,
    )
    n = len(axis)
    return Surface(axis, values.reshape(n, n), accuracy.reshape(n, n), list(directions))


def interpolate(
    model_a: nn.Module, model_b: nn.Module, inputs: Tensor, targets: Tensor, *, loss: str = "cross_entropy", **landscape
) -> Path:
    """Loss on the straight line from ``model_a`` to ``model_b`` (weights and floating-point buffers, such as
    BatchNorm statistics, interpolated alike) at ``path_points`` points, and its barrier: the ``partner`` path of the
    ``interpolate`` stage."""
    cfg = build_section(LandscapeConfig, landscape, "landscape")
    view_a, view_b = evaluation_view(model_a), evaluation_view(model_b)
    line = path_scan("partner", state(view_a), state(view_b), cfg.path_points, other_is_start=False)
    params, buffers = state(view_a)
    values, accuracy = scan(
        view_a,
        params,
        buffers,
        [line.direction],
        line.coords,
        inputs,
        targets,
        None,
        chunk=cfg.chunk or None,
        batch_size=cfg.batch_size,
        buffer_directions=[line.buffer_direction] if line.buffer_direction else None,
        loss=loss,
    )
    return Path(line.alpha, values, accuracy, barrier(values.tolist()))
