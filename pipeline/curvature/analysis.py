"""The curvature report of one model at one point: eigenvalues, trace, spectral density, GGN and per-group spectra.

This is the glue between the operators (:mod:`pipeline.curvature.operators`) and the matrix-free solvers
(:mod:`pipeline.curvature.eigen`), driven by a :class:`~pipeline.config.HessianConfig`. It returns tidy rows
(the ``hessian_spectrum`` and ``hessian_density`` schemas of :mod:`pipeline.tables`) and the top eigenvectors as a
``dict[str, Tensor]``; it knows nothing about checkpoints, files, DVC or Prefect.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from pipeline.config import ConfigError, HessianConfig
from pipeline.curvature.density import slq, smooth_density
from pipeline.curvature.dynamics import gradient_noise, gradient_sharpness
from pipeline.curvature.eigen import arpack, lanczos, power_iteration
from pipeline.curvature.flatness import adaptive_sharpness, epsilon_sharpness, pac_bayes_sigma
from pipeline.curvature.operators import (  # noqa: F401
    BN_MODE,
    OPERATORS,
    CurvatureOperator,
    ProbeSet,
    account,
    parameter_groups,
    spent,
)
from pipeline.curvature.reparam import dinh_rescale, output_change, relu_pairs
from pipeline.curvature.trace import hutchinson, hutchpp

ALL = "all"  # the `group` of quantities over the whole parameter vector
RESCALED = "hessian_rescaled"  # the `operator` of the quantities measured on Dinh et al.'s rescaled network

log = logging.getLogger(__name__)

# Largest float64 Krylov basis (Lanczos, SLQ) a solve may hold: a bound on memory checked before any product.
KRYLOV_MEMORY_LIMIT = 16 * 2**30


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_dimensions(model: nn.Module, cfg: HessianConfig, what: str = "the model") -> int:
    """Check the ``hessian`` keys that must fit the parameter count of ``model`` (``what`` names it in messages),
    before any product: no value is silently clipped. Works on a model on the ``meta`` device (no weights needed).

    Returns:
        The parameter count (the dimension of the Hessian).

    Raises:
        ConfigError: one line naming the key, the dimension and what was asked, for ``top_k`` (+ ``lambda_min``)
        above the dimension, ``group_top_k`` above the smallest group's, ``density_steps`` above the dimension,
        or a Krylov basis over :data:`KRYLOV_MEMORY_LIMIT`.
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    dim = sum(p.numel() for p in named.values())
    wanted = cfg.top_k + int(cfg.lambda_min)
    if wanted > dim:
        extra = " less one for lambda_min" if cfg.lambda_min else ""
        raise ConfigError(
            "hessian.top_k",
            f"must be <= {dim - int(cfg.lambda_min)} (the {dim} parameters of {what}{extra}), got {cfg.top_k}",
        )
    basis = min(max(2 * wanted + 10, 30), dim) * dim * 8  # lanczos's default basis, float64
    if cfg.method == "lanczos" and basis > KRYLOV_MEMORY_LIMIT:
        raise ConfigError(
            "hessian.top_k",
            f"{cfg.top_k} needs a Lanczos basis of about {_gib(basis)} for the {dim} "
            f"parameters of {what}; allowed up to {_gib(KRYLOV_MEMORY_LIMIT)}",
        )
    if cfg.density_runs and cfg.density_steps > dim:
        raise ConfigError(
            "hessian.density_steps",
            f"must be <= {dim} (the parameters of {what}: a Krylov space has "
            f"no more dimensions), got {cfg.density_steps}",
        )
    if cfg.density_runs and cfg.density_steps * dim * 8 > KRYLOV_MEMORY_LIMIT:
        raise ConfigError(
            "hessian.density_steps",
            f"{cfg.density_steps} steps need a basis of about "
            f"{_gib(cfg.density_steps * dim * 8)} for the {dim} parameters of "
            f"{what}; allowed up to {_gib(KRYLOV_MEMORY_LIMIT)}",
        )
    if cfg.groups != "none":
        sizes = {
            group: sum(named[n].numel() for n in names) for group, names in parameter_groups(model, cfg.groups).items()
        }
        group = min(sizes, key=sizes.get)
        if cfg.group_top_k > sizes[group]:
            raise ConfigError(
                "hessian.group_top_k",
                f"must be <= {sizes[group]} (the parameters of group {group!r} "
                f"of {what}, the smallest at groups: {cfg.groups}), got "
                f"{cfg.group_top_k}",
            )
    return dim


@dataclass
class CurvatureReport:
    """What :func:`analyse` found at one point."""

    rows: list[dict] = field(default_factory=list)  # hessian_spectrum rows (without run/checkpoint columns)
    density: list[dict] = field(default_factory=list)  # hessian_density rows (without run/checkpoint columns)
    eigenvalues: Tensor | None = None  # (k,) top Hessian eigenvalues, descending
    eigenvectors: dict[str, Tensor] | None = None  # name -> (k, *shape): the matching unit eigenvectors
    hvps: int = 0  # products spent, all operators together


def _row(
    operator: str,
    group: str,
    quantity: str,
    index: int,
    value: float,
    *,
    stderr=math.nan,
    residual=math.nan,
    hvps: int = 0,
    method: str = "",
    seconds: float = 0.0,
    converged: bool = True,
    cost: dict | None = None,
) -> dict:
    """One ``hessian_spectrum`` row; ``cost`` is what its computation spent (:func:`spent`), ``hvps`` the products
    when there is no ``cost``."""
    cost = cost or {}
    return {
        "operator": operator,
        "group": group,
        "quantity": quantity,
        "index": index,
        "value": float(value),
        "stderr": float(stderr),
        "residual": float(residual),
        "hvps": int(cost.get("hvps", hvps)),
        "forwards": float(cost.get("forwards", 0.0)),
        "gradients": float(cost.get("gradients", 0.0)),
        "samples": int(cost.get("samples", 0)),
        "method": method,
        "converged": bool(converged),
        "seconds": float(seconds),
    }


def cost_text(cost: dict, seconds: float) -> str:
    """``"30 products, 1 gradient, 2.4 s"``: the non-zero primitive counts of ``cost`` and the wall time."""
    names = {"hvps": "products", "gradients": "gradients", "forwards": "forwards", "samples": "per-sample gradients"}
    parts = [f"{cost[k]:.4g} {label}" for k, label in names.items() if cost.get(k)]
    return ", ".join([*parts, f"{seconds:.1f} s"])


def eigen_solve(
    op: CurvatureOperator, cfg: HessianConfig, k: int, smallest: bool, seed: int, key: str = "hessian.top_k"
):
    """Top ``k`` eigenpairs (and the smallest one when ``smallest``) of ``op`` by ``cfg.method``.

    Returns ``(largest, smallest_or_None)`` :class:`~pipeline.curvature.EigenResult` s. ``power`` finds
    the eigenvalues of largest magnitude (as PyHessian does); its smallest eigenvalue comes from power iteration
    on the shifted operator :math:`H - \\lambda_1 I`, whose dominant eigenvalue is :math:`\\lambda_{min} - \\lambda_1`.

    Raises:
        ConfigError: naming ``key`` when ``k`` (plus the smallest one) exceeds ``op.dim``; never clipped silently.
    """
    if k + int(smallest) > op.dim:
        extra = " less one for lambda_min" if smallest else ""
        raise ConfigError(
            key, f"must be <= {op.dim - int(smallest)} (the operator's {op.dim} parameters{extra}), got {k}"
        )
    if cfg.method == "lanczos":
        return lanczos(
            op.matvec,
            op.dim,
            k_largest=k,
            k_smallest=int(smallest),
            tol=cfg.tol,
            max_matvecs=cfg.max_hvps,
            seed=seed,
            device=op.device,
        )
    if cfg.method == "arpack":
        return arpack(
            op.matvec, op.dim, k_largest=k, k_smallest=int(smallest), tol=cfg.tol, seed=seed, device=op.device
        )
    top = power_iteration(op.matvec, op.dim, k=k, max_iter=cfg.power_iters, tol=cfg.tol, seed=seed, device=op.device)
    if not smallest:
        return top, None
    shift = float(top.eigenvalues.abs().max())
    shifted = power_iteration(
        lambda v: op.matvec(v) - shift * v,
        op.dim,
        k=1,
        max_iter=cfg.power_iters,
        tol=cfg.tol,
        seed=seed + 1,
        device=op.device,
    )
    shifted.eigenvalues = shifted.eigenvalues + shift
    shifted.matvecs += top.matvecs
    return top, shifted


def analyse(
    model: nn.Module,
    probe: ProbeSet,
    cfg: HessianConfig,
    *,
    details: bool,
    on_step: Callable[[str], None] | None = None,
    loss: str = "cross_entropy",
) -> CurvatureReport:
    """Curvature of the probe-set loss of ``model`` (already in eval mode, on its device and dtype).

    Always: probe loss and gradient norm, top ``cfg.top_k`` Hessian eigenpairs and (``cfg.lambda_min``) the
    smallest eigenvalue. With ``details``: trace estimates, SLQ density, the GGN (when in ``cfg.operators``), and the
    top ``cfg.group_top_k`` eigenvalues of each parameter group's diagonal Hessian block (``cfg.groups``), and the
    flatness measures of ``cfg.flatness``, and (``cfg.reparam_alpha`` > 0, for a network with a ReLU layer pair) the
    same measures on Dinh et al.'s rescaled copy of the network, as rows of operator ``hessian_rescaled``. With
    ``cfg.noise``, at every point: the gradient noise scale and the
    curvature along the gradient. ``loss`` is the run's training loss (``cross_entropy`` or ``mse``).
    """
    say = on_step or (lambda message: log.info(message))
    check_dimensions(model, cfg)  # before any product: a top_k above the dimension is an error, never clipped
    report = CurvatureReport()
    start = time.perf_counter()  # the operator's repeatability check (two forwards of a batch) counts as well
    hessian = OPERATORS["hessian"](model, probe, hvp=cfg.hvp, loss=loss)
    before = {**account(hessian), "forwards": 0.0}
    grad = hessian.gradient()
    loss_value = hessian.loss_value()
    seconds, cost = time.perf_counter() - start, spent(hessian, before)
    report.rows += [
        _row("hessian", ALL, "loss", 0, loss_value, seconds=seconds, cost=cost),
        _row("hessian", ALL, "grad_norm", 0, float(grad.norm()), seconds=seconds, cost=cost),
        _row("hessian", ALL, "dim", 0, hessian.dim),
    ]
    if cfg.noise:
        _noise(report, model, probe, hessian, say)
    operators: list[tuple[str, CurvatureOperator]] = [("hessian", hessian)]
    if details and "ggn" in cfg.operators:
        operators.append(("ggn", OPERATORS["ggn"](model, probe, loss=loss)))
    for name, op in operators:
        _spectrum(report, name, ALL, op, cfg, cfg.top_k, cfg.lambda_min, say, keep_vectors=(name == "hessian"))
        if details:
            _trace(report, name, op, cfg, say)
            _density(report, name, op, cfg, say)
    if details and cfg.groups != "none":
        for group, names in parameter_groups(model, cfg.groups).items():
            op = OPERATORS["hessian"](model, probe, wrt=names, hvp=cfg.hvp, check=False, loss=loss)
            _spectrum(report, "hessian", group, op, cfg, cfg.group_top_k, False, say, keep_vectors=False)
            report.hvps += op.products
    if details and cfg.flatness:
        _flatness(report, model, probe, hessian, cfg, say)
    if details and cfg.reparam_alpha > 0:
        _reparam(report, model, probe, cfg, say, loss)
    report.hvps += sum(op.products for _, op in operators)
    report.rows.append(
        _row("hessian", ALL, "products", 0, report.hvps, hvps=report.hvps, seconds=time.perf_counter() - start)
    )
    return report


def _spectrum(report, name, group, op, cfg, k, smallest, say, keep_vectors) -> None:
    start, before = time.perf_counter(), account(op)
    top, bottom = eigen_solve(
        op, cfg, k, smallest, cfg.seed, "hessian.top_k" if group == ALL else "hessian.group_top_k"
    )
    seconds, cost = time.perf_counter() - start, spent(op, before)
    for i, (value, residual, ok) in enumerate(zip(top.eigenvalues, top.residuals, top.converged)):
        report.rows.append(
            _row(
                name,
                group,
                "eigenvalue",
                i,
                value,
                residual=residual,
                method=top.method,
                seconds=seconds,
                converged=bool(ok),
                cost=cost,
            )
        )
    if bottom is not None:
        report.rows.append(
            _row(
                name,
                group,
                "lambda_min",
                0,
                bottom.eigenvalues[0],
                residual=bottom.residuals[0],
                method=bottom.method,
                seconds=seconds,
                converged=bool(bottom.converged[0]),
                cost=cost,
            )
        )
    where = f"{name}" + ("" if group == ALL else f"[{group}]")
    text = ", ".join(f"{float(v):.4g}" for v in top.eigenvalues)
    extra = f"; lambda_min {float(bottom.eigenvalues[0]):.4g}" if bottom is not None else ""
    say(f"{where}: top {len(top.eigenvalues)} eigenvalues {text}{extra} ({top.method}, {cost_text(cost, seconds)})")
    if not bool(top.converged.all()) or (bottom is not None and not bool(bottom.converged.all())):
        say(
            f"warning: {where}: not converged to tol {cfg.tol} within {cfg.max_hvps} products; residuals are in the table"  # noqa: E501
        )
    if keep_vectors:
        report.eigenvalues = top.eigenvalues.clone()
        vectors = [op.unflatten(v) for v in top.eigenvectors]
        report.eigenvectors = {
            n: torch.stack([v[n] for v in vectors]).detach().to("cpu", torch.float32) for n in op.names
        }


def _trace(report, name, op, cfg, say) -> None:
    for method in cfg.trace:
        start, before = time.perf_counter(), account(op)
        if method == "hutchinson":
            est = hutchinson(op.matvec, op.dim, samples=cfg.trace_hvps, seed=cfg.seed + 11, device=op.device)
        else:
            est = hutchpp(op.matvec, op.dim, matvecs=cfg.trace_hvps, seed=cfg.seed + 13, device=op.device)
        seconds, cost = time.perf_counter() - start, spent(op, before)
        report.rows.append(
            _row(name, ALL, "trace", 0, est.value, stderr=est.stderr, method=est.method, seconds=seconds, cost=cost)
        )
        say(f"{name}: trace {est.value:.5g} ± {est.stderr:.2g} ({est.method}, {cost_text(cost, seconds)})")


def _density(report, name, op, cfg, say) -> None:
    if cfg.density_runs == 0:
        return
    start, before = time.perf_counter(), account(op)
    density = slq(
        op.matvec, op.dim, runs=cfg.density_runs, steps=cfg.density_steps, seed=cfg.seed + 17, device=op.device
    )
    grid, values = smooth_density(density, points=cfg.density_points, relative_sigma=cfg.density_sigma)
    seconds, cost = time.perf_counter() - start, spent(op, before)
    report.density += [
        {"operator": name, "kind": "node", "lambda": float(node), "density": math.nan, "weight": float(weight)}
        for node, weight in zip(density.nodes.reshape(-1), density.weights.reshape(-1))
    ]
    report.density += [
        {"operator": name, "kind": "smoothed", "lambda": float(x), "density": float(d), "weight": math.nan}
        for x, d in zip(grid, values)
    ]
    report.rows.append(
        _row(
            name,
            ALL,
            "density_mass",
            0,
            float(density.weights.sum()),
            method="slq",
            seconds=seconds,
            cost=cost,
        )
    )
    say(
        f"{name}: spectral density from {cfg.density_runs} x {cfg.density_steps} Lanczos steps "
        f"({cost_text(cost, seconds)})"
    )


def _noise(report, model, probe, hessian, say) -> None:
    """Gradient noise (McCandlish et al. 2018) and the curvature along the gradient, g'Hg/|g|^2 (one product)."""
    start = time.perf_counter()
    noise = gradient_noise(model, probe, loss=hessian.loss)
    seconds = time.perf_counter() - start
    cost = noise.account
    report.rows += [
        _row(
            "hessian",
            ALL,
            "noise_trace_covariance",
            0,
            noise.trace_covariance,
            method="per_sample",
            seconds=seconds,
            cost=cost,
        ),  # noqa: E501
        _row("hessian", ALL, "noise_scale", 0, noise.noise_scale, method="per_sample", seconds=seconds, cost=cost),
    ]
    start, before = time.perf_counter(), account(hessian)
    value = gradient_sharpness(hessian) if noise.grad_norm_sq > 0 else math.nan
    sharp_seconds, sharp_cost = time.perf_counter() - start, spent(hessian, before)
    report.rows.append(
        _row("hessian", ALL, "grad_sharpness", 0, value, method="rayleigh", seconds=sharp_seconds, cost=sharp_cost)
    )
    say(
        f"gradient noise: tr(Sigma) {noise.trace_covariance:.4g}, B_simple {noise.noise_scale:.4g} samples "
        f"({cost_text(cost, seconds)}); g'Hg/|g|^2 {value:.4g} ({cost_text(sharp_cost, sharp_seconds)})"
    )


def _flatness(report, model, probe, hessian, cfg, say) -> None:
    """Epsilon-sharpness in an L2 ball and in Keskar's box (top eigenvector as an extra start), PAC-Bayes sigma,
    adaptive sharpness."""
    if "epsilon" in cfg.flatness:
        v1 = ()
        if report.eigenvectors is not None:
            v1 = (hessian.flatten({n: vectors[0] for n, vectors in report.eigenvectors.items()}),)
        for neighbourhood, epsilon in (("absolute", cfg.flatness_radius), ("relative", cfg.flatness_box)):
            start = time.perf_counter()
            sharp = epsilon_sharpness(
                model,
                probe,
                epsilon=epsilon,
                neighbourhood=neighbourhood,
                steps=cfg.flatness_steps,
                directions=v1,
                seed=cfg.seed + 19,
                loss=hessian.loss,
            )
            seconds = time.perf_counter() - start
            cost = sharp.account
            report.rows += [
                _row(
                    "hessian",
                    ALL,
                    "epsilon_sharpness",
                    0,
                    sharp.increase,
                    method=neighbourhood,
                    seconds=seconds,
                    cost=cost,
                ),  # noqa: E501
                _row(
                    "hessian",
                    ALL,
                    "epsilon_sharpness_keskar",
                    0,
                    sharp.keskar,
                    method=neighbourhood,
                    seconds=seconds,
                    cost=cost,
                ),  # noqa: E501
            ]
            say(
                f"epsilon-sharpness ({neighbourhood}, epsilon {epsilon:g}): loss +{sharp.increase:.4g} "
                f"(Keskar {sharp.keskar:.4g}; {cost_text(cost, seconds)})"
            )
    if "pac_bayes" in cfg.flatness:
        for magnitude in (False, True):
            start = time.perf_counter()
            flat = pac_bayes_sigma(
                model,
                probe,
                bound=cfg.pac_bayes_bound,
                magnitude_aware=magnitude,
                draws=cfg.pac_bayes_draws,
                seed=cfg.seed + 23,
                loss=hessian.loss,
            )
            seconds = time.perf_counter() - start
            method = "magnitude" if magnitude else "isotropic"
            report.rows.append(
                _row(
                    "hessian", ALL, "pac_bayes_sigma", 0, flat.sigma, method=method, seconds=seconds, cost=flat.account
                )
            )
            say(
                f"PAC-Bayes sigma ({method}): {flat.sigma:.4g} keeps the expected loss within "
                f"+{cfg.pac_bayes_bound:g} ({cost_text(flat.account, seconds)})"
            )
    if "adaptive" in cfg.flatness:
        _adaptive(report, model, probe, cfg, say, hessian.loss)


def _adaptive(report, model, probe, cfg, say, loss) -> None:
    """Adaptive sharpness: the worst case (m-sharpness, Auto-PGD) and the average case, l2 and l-inf."""
    for kind, norm, rho in (
        ("worst", "2", cfg.adaptive_l2),
        ("worst", "inf", cfg.adaptive_linf),
        ("average", "2", cfg.adaptive_average),
        ("average", "inf", cfg.adaptive_average),
    ):
        start = time.perf_counter()
        sharp = adaptive_sharpness(
            model,
            probe,
            rho=rho,
            norm=norm,
            kind=kind,
            m=cfg.adaptive_m,
            steps=cfg.flatness_steps,
            draws=cfg.adaptive_draws,
            seed=cfg.seed + 29,
            loss=loss,
        )
        seconds = time.perf_counter() - start
        method = f"{kind}_l{norm}"
        report.rows.append(
            _row(
                "hessian", ALL, "adaptive_sharpness", 0, sharp.value, method=method, seconds=seconds, cost=sharp.account
            )
        )
        batches = f", m {sharp.m}, {len(sharp.per_batch)} batches" if kind == "worst" else f", {sharp.draws} draws"
        say(
            f"adaptive sharpness ({kind} case, l{norm}, rho {rho:g}{batches}): loss +{sharp.value:.4g} "
            f"({cost_text(sharp.account, seconds)})"
        )


def _reparam(report, model, probe, cfg, say, loss) -> None:
    """Every measure again on Dinh et al.'s rescaling of the first ReLU layer pair by ``cfg.reparam_alpha``."""
    pairs = relu_pairs(model)
    if not pairs:
        say("reparametrisation: no ReLU layer pair (Linear -> ReLU -> Linear) in this network; not measured")
        return
    pair, alpha = pairs[0], cfg.reparam_alpha
    rescaled = dinh_rescale(model, alpha, pairs=[pair])
    change = output_change(model, rescaled, probe)
    reduced = dataclasses.replace(cfg, groups="none", density_runs=0, operators=("hessian",), reparam_alpha=0.0)
    say(f"reparametrisation: {pair[0]} x {alpha:g}, {pair[1]} / {alpha:g}; outputs change by {change:.2g} (relative)")
    sub = analyse(rescaled, probe, reduced, details=True, on_step=lambda m: say(f"rescaled: {m}"), loss=loss)
    report.hvps += sub.hvps
    report.rows.append(_row(RESCALED, ALL, "reparam_alpha", 0, alpha, method=",".join(pair)))
    report.rows.append(_row(RESCALED, ALL, "reparam_output_change", 0, change, method="max_abs_relative"))
    report.rows += [{**row, "operator": RESCALED} for row in sub.rows if row["quantity"] not in ("products", "dim")]


def eigen_settings(cfg: HessianConfig) -> dict:
    """The ``hessian`` keys the eigenvectors depend on. Only these go into ``eigenvectors.pt`` (no provenance or
    timing), so a change of another key (trace, density, GGN) leaves the file's bytes, and the scans that read it,
    unchanged for DVC."""
    keep = (
        "method",
        "top_k",
        "lambda_min",
        "tol",
        "max_hvps",
        "power_iters",
        "hvp",
        "batch_size",
        "dtype",
        "device",
        "seed",
    )
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in keep}
