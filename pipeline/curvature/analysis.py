"""The curvature report of one model at one point: eigenvalues, trace, spectral density, GGN and per-group spectra.

This is the glue between the operators (:mod:`pipeline.curvature.operators`) and the matrix-free solvers
(:mod:`pipeline.curvature.spectral`), driven by a :class:`~pipeline.config.HessianConfig`. It returns tidy rows
(the ``hessian_spectrum`` and ``hessian_density`` schemas of :mod:`pipeline.tables`) and the top eigenvectors as a
``dict[str, Tensor]``; it knows nothing about checkpoints, files, DVC or Prefect.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from pipeline.config import HessianConfig
from pipeline.curvature import spectral
from pipeline.curvature.operators import OPERATORS, CurvatureOperator, ProbeSet, parameter_groups

BN_MODE = "eval"  # BatchNorm uses its running statistics; recorded with every result
ALL = "all"  # the `group` of quantities over the whole parameter vector

log = logging.getLogger(__name__)


@dataclass
class CurvatureReport:
    """What :func:`analyse` found at one point."""

    rows: list[dict] = field(default_factory=list)  # hessian_spectrum rows (without run/checkpoint columns)
    density: list[dict] = field(default_factory=list)  # hessian_density rows (without run/checkpoint columns)
    eigenvalues: Tensor | None = None  # (k,) top Hessian eigenvalues, descending
    eigenvectors: dict[str, Tensor] | None = None  # name -> (k, *shape): the matching unit eigenvectors
    hvps: int = 0  # products spent, all operators together


def _row(operator: str, group: str, quantity: str, index: int, value: float, *, stderr=math.nan, residual=math.nan,
         hvps: int = 0, method: str = "", seconds: float = 0.0, converged: bool = True) -> dict:
    return {"operator": operator, "group": group, "quantity": quantity, "index": index, "value": float(value),
            "stderr": float(stderr), "residual": float(residual), "hvps": int(hvps), "method": method,
            "converged": bool(converged), "seconds": float(seconds)}


def eigen_solve(op: CurvatureOperator, cfg: HessianConfig, k: int, smallest: bool, seed: int):
    """Top ``k`` eigenpairs (and the smallest one when ``smallest``) of ``op`` by ``cfg.method``.

    Returns ``(largest, smallest_or_None)`` :class:`~pipeline.curvature.spectral.EigenResult` s. ``power`` finds
    the eigenvalues of largest magnitude (as PyHessian does); its smallest eigenvalue comes from power iteration
    on the shifted operator :math:`H - \\lambda_1 I`, whose dominant eigenvalue is :math:`\\lambda_{min} - \\lambda_1`.
    """
    k = min(k, op.dim)
    smallest = smallest and op.dim > k
    if cfg.method == "lanczos":
        return spectral.lanczos(op.matvec, op.dim, k_largest=k, k_smallest=int(smallest), tol=cfg.tol,
                                max_matvecs=cfg.max_hvps, seed=seed, device=op.device)
    if cfg.method == "arpack":
        return spectral.arpack(op.matvec, op.dim, k_largest=k, k_smallest=int(smallest), tol=cfg.tol, seed=seed,
                               device=op.device)
    top = spectral.power_iteration(op.matvec, op.dim, k=k, max_iter=cfg.power_iters, tol=cfg.tol, seed=seed,
                                   device=op.device)
    if not smallest:
        return top, None
    shift = float(top.eigenvalues.abs().max())
    shifted = spectral.power_iteration(lambda v: op.matvec(v) - shift * v, op.dim, k=1, max_iter=cfg.power_iters,
                                       tol=cfg.tol, seed=seed + 1, device=op.device)
    shifted.eigenvalues = shifted.eigenvalues + shift
    shifted.matvecs += top.matvecs
    return top, shifted


def analyse(model: nn.Module, probe: ProbeSet, cfg: HessianConfig, *, details: bool,
            on_step: Callable[[str], None] | None = None) -> CurvatureReport:
    """Curvature of the probe-set loss of ``model`` (already in eval mode, on its device and dtype).

    Always: probe loss and gradient norm, top ``cfg.top_k`` Hessian eigenpairs and (``cfg.lambda_min``) the
    smallest eigenvalue. With ``details``: trace estimates, SLQ density, the GGN (when in ``cfg.operators``), and the
    top ``cfg.group_top_k`` eigenvalues of each parameter group's diagonal Hessian block (``cfg.groups``).
    """
    say = on_step or (lambda message: log.info(message))
    report = CurvatureReport()
    hessian = OPERATORS["hessian"](model, probe, hvp=cfg.hvp)
    start = time.perf_counter()
    grad = hessian.gradient()
    report.rows += [
        _row("hessian", ALL, "loss", 0, hessian.loss_value(), seconds=time.perf_counter() - start),
        _row("hessian", ALL, "grad_norm", 0, float(grad.norm()), seconds=time.perf_counter() - start),
        _row("hessian", ALL, "dim", 0, hessian.dim),
    ]
    operators: list[tuple[str, CurvatureOperator]] = [("hessian", hessian)]
    if details and "ggn" in cfg.operators:
        operators.append(("ggn", OPERATORS["ggn"](model, probe)))
    for name, op in operators:
        _spectrum(report, name, ALL, op, cfg, cfg.top_k, cfg.lambda_min, say, keep_vectors=(name == "hessian"))
        if details:
            _trace(report, name, op, cfg, say)
            _density(report, name, op, cfg, say)
    if details and cfg.groups != "none":
        for group, names in parameter_groups(model, cfg.groups).items():
            op = OPERATORS["hessian"](model, probe, wrt=names, hvp=cfg.hvp, check=False)
            _spectrum(report, "hessian", group, op, cfg, cfg.group_top_k, False, say, keep_vectors=False)
            report.hvps += op.products
    report.hvps += sum(op.products for _, op in operators)
    report.rows.append(_row("hessian", ALL, "products", 0, report.hvps, hvps=report.hvps,
                            seconds=time.perf_counter() - start))
    return report


def _spectrum(report, name, group, op, cfg, k, smallest, say, keep_vectors) -> None:
    start = time.perf_counter()
    before = op.products
    top, bottom = eigen_solve(op, cfg, k, smallest, cfg.seed)
    seconds = time.perf_counter() - start
    hvps = op.products - before
    for i, (value, residual, ok) in enumerate(zip(top.eigenvalues, top.residuals, top.converged)):
        report.rows.append(_row(name, group, "eigenvalue", i, value, residual=residual, hvps=hvps,
                                method=top.method, seconds=seconds, converged=bool(ok)))
    if bottom is not None:
        report.rows.append(_row(name, group, "lambda_min", 0, bottom.eigenvalues[0], residual=bottom.residuals[0],
                                hvps=hvps, method=bottom.method, seconds=seconds, converged=bool(bottom.converged[0])))
    where = f"{name}" + ("" if group == ALL else f"[{group}]")
    text = ", ".join(f"{float(v):.4g}" for v in top.eigenvalues)
    extra = f"; lambda_min {float(bottom.eigenvalues[0]):.4g}" if bottom is not None else ""
    say(f"{where}: top {len(top.eigenvalues)} eigenvalues {text}{extra} ({top.method}, {hvps} products, {seconds:.1f} s)")
    if not bool(top.converged.all()) or (bottom is not None and not bool(bottom.converged.all())):
        say(f"warning: {where}: not converged to tol {cfg.tol} within {cfg.max_hvps} products; residuals are in the table")
    if keep_vectors:
        report.eigenvalues = top.eigenvalues.clone()
        vectors = [op.unflatten(v) for v in top.eigenvectors]
        report.eigenvectors = {n: torch.stack([v[n] for v in vectors]).detach().to("cpu", torch.float32)
                               for n in op.names}


def _trace(report, name, op, cfg, say) -> None:
    for method in cfg.trace:
        start = time.perf_counter()
        if method == "hutchinson":
            est = spectral.hutchinson(op.matvec, op.dim, samples=cfg.trace_hvps, seed=cfg.seed + 11, device=op.device)
        else:
            est = spectral.hutchpp(op.matvec, op.dim, matvecs=cfg.trace_hvps, seed=cfg.seed + 13, device=op.device)
        seconds = time.perf_counter() - start
        report.rows.append(_row(name, ALL, "trace", 0, est.value, stderr=est.stderr, hvps=est.matvecs,
                                method=est.method, seconds=seconds))
        say(f"{name}: trace {est.value:.5g} ± {est.stderr:.2g} ({est.method}, {est.matvecs} products, {seconds:.1f} s)")


def _density(report, name, op, cfg, say) -> None:
    if cfg.density_runs == 0:
        return
    start = time.perf_counter()
    density = spectral.slq(op.matvec, op.dim, runs=cfg.density_runs, steps=cfg.density_steps, seed=cfg.seed + 17,
                           device=op.device)
    grid, values = spectral.smooth_density(density, points=cfg.density_points, relative_sigma=cfg.density_sigma)
    seconds = time.perf_counter() - start
    report.density += [{"operator": name, "kind": "node", "lambda": float(node), "density": math.nan,
                        "weight": float(weight)}
                       for node, weight in zip(density.nodes.reshape(-1), density.weights.reshape(-1))]
    report.density += [{"operator": name, "kind": "smoothed", "lambda": float(x), "density": float(d),
                        "weight": math.nan} for x, d in zip(grid, values)]
    report.rows.append(_row(name, ALL, "density_mass", 0, float(density.weights.sum()), hvps=density.matvecs,
                            method="slq", seconds=seconds))
    say(f"{name}: spectral density from {cfg.density_runs} x {cfg.density_steps} Lanczos steps "
        f"({density.matvecs} products, {seconds:.1f} s)")
