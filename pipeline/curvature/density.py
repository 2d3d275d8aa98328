"""The spectral density of a symmetric operator known only through ``matvec(v) = A v``: stochastic Lanczos
quadrature (SLQ) and its Gaussian smoothing.

Nothing here knows about neural networks, so every routine can be checked on explicit matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.curvature._checks import check_int, check_positive
from pipeline.curvature._krylov import BREAKDOWN, F64, Counted, MatVec, generator, orthogonalise, rademacher


@dataclass
class SpectralDensity:
    """SLQ quadrature: ``nodes``/``weights`` of shape (runs, steps); all weights sum to 1."""

    nodes: torch.Tensor
    weights: torch.Tensor
    matvecs: int


def slq(matvec: MatVec, dim: int, *, runs: int = 10, steps: int = 80, seed: int = 0, device="cpu") -> SpectralDensity:
    """Stochastic Lanczos quadrature (Golub & Meurant 2010; Ghorbani et al. 2019; Papyan 2020).

    For each run, ``steps`` Lanczos steps (full reorthogonalisation, twice) from a normalised Rademacher vector ``z``
    give a tridiagonal ``T = U diag(theta) U^T``; then ``z^T f(A) z ~ sum_j U_{1j}^2 f(theta_j)``, so the density is
    ``sum_runs sum_j (U_{1j}^2 / runs) delta(x - theta_j)``. ``steps`` is capped at ``dim``; a breakdown (invariant
    Krylov space) truncates that run, whose row is padded with its last node at weight 0.

    Returns:
        SpectralDensity with nodes and weights of shape ``(runs, min(steps, dim))`` (CPU) and the matvec count.

    Raises:
        ValueError: on a bad argument.
    """
    dim = check_int("dim", dim, 1)
    runs, steps = check_int("runs", runs, 1), min(check_int("steps", steps, 1), dim)
    device = torch.device(device)
    gen, A = generator(seed), Counted(matvec, dim)
    nodes = torch.zeros(runs, steps, dtype=F64)
    weights = torch.zeros(runs, steps, dtype=F64)
    for r in range(runs):
        V = torch.zeros(steps, dim, dtype=F64, device=device)
        V[0] = rademacher(gen, dim, device) / math.sqrt(dim)
        alphas, betas, anorm = [], [], 0.0
        for j in range(steps):
            w, coef = orthogonalise(A(V[j]), V[: j + 1])
            alphas.append(float(coef[j]))
            anorm = max(anorm, abs(alphas[-1]))  # running estimate of ||A|| from the entries of T
            if j == steps - 1:
                break
            beta = float(w.norm())
            if beta <= BREAKDOWN * anorm:
                break  # invariant Krylov space: the quadrature is already exact for this start vector
            betas.append(beta)
            anorm = max(anorm, beta)
            V[j + 1] = w / beta
        T = torch.diag(torch.tensor(alphas, dtype=F64))
        if betas:
            off = torch.tensor(betas, dtype=F64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        theta, U = torch.linalg.eigh(T)
        size = len(alphas)
        nodes[r, :size], nodes[r, size:] = theta, theta[-1]
        weights[r, :size] = U[0] ** 2 / runs
    return SpectralDensity(nodes, weights, A.calls)


def smooth_density(
    density: SpectralDensity,
    *,
    points: int = 1000,
    sigma: float | None = None,
    relative_sigma: float = 0.01,
    grid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian-smoothed density ``rho(x) = sum_i w_i N(x; node_i, sigma^2)``.

    ``sigma`` defaults to ``relative_sigma * (max node - min node)`` (``relative_sigma * max(max|node|, 1)`` when
    that range is 0). The default grid spans ``[min node - 6 sigma, max node + 6 sigma]`` with ``points`` points,
    so ``rho`` integrates to 1 on it; it is not renormalised, which keeps that a check on the weights.

    Returns:
        ``(grid, rho)``, float64 CPU.

    Raises:
        ValueError: on a bad argument.
    """
    nodes = density.nodes.detach().to("cpu", F64).reshape(-1)
    weights = density.weights.detach().to("cpu", F64).reshape(-1)
    if nodes.numel() == 0 or nodes.shape != weights.shape:
        raise ValueError("density must hold nodes and weights of the same non-zero size")
    relative_sigma = check_positive("relative_sigma", relative_sigma)
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = relative_sigma * ((hi - lo) if hi > lo else max(abs(lo), abs(hi), 1.0))
    sigma = check_positive("sigma", sigma)
    if grid is None:
        points = check_int("points", points, 2)
        grid = torch.linspace(lo - 6 * sigma, hi + 6 * sigma, points, dtype=F64)
    elif not isinstance(grid, torch.Tensor) or grid.dim() != 1:
        raise ValueError("grid must be a 1-D tensor")
    grid = grid.detach().to("cpu", F64)
    rho = torch.zeros_like(grid)
    for start in range(0, len(nodes), 4096):  # chunks bound the (points x nodes) kernel matrix
        n, w = nodes[start : start + 4096], weights[start : start + 4096]
        rho += (w * torch.exp(-0.5 * ((grid[:, None] - n) / sigma) ** 2)).sum(1)
    return grid, rho / (sigma * math.sqrt(2 * math.pi))
