"""Trace estimators for a symmetric operator known only through ``matvec(v) = A v``: Hutchinson and Hutch++.

Nothing here knows about neural networks, so every routine can be checked on explicit matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.curvature._checks import check_int
from pipeline.curvature._krylov import F64, Counted, MatVec, generator, rademacher


@dataclass
class TraceEstimate:
    """A trace estimate with its standard error and cost."""

    value: float
    stderr: float
    matvecs: int
    samples: int
    method: str


def hutchinson(matvec: MatVec, dim: int, *, samples: int = 100, seed: int = 0, device="cpu") -> TraceEstimate:
    """Hutchinson's estimator ``tr(A) ~ mean_i z_i^T A z_i`` with Rademacher probes ``z_i``.

    Its variance per probe is ``2 (||A||_F^2 - sum_i A_ii^2)``; ``stderr`` = sample std (ddof=1) / sqrt(samples).

    Raises:
        ValueError: on a bad argument (``samples`` >= 2 so that the standard error exists).
    """
    dim = check_int("dim", dim, 1)
    samples = check_int("samples", samples, 2)
    device = torch.device(device)
    gen, A = generator(seed), Counted(matvec, dim)
    quad = []
    for _ in range(samples):
        z = rademacher(gen, dim, device)
        quad.append(float(z @ A(z)))
    q = torch.tensor(quad, dtype=F64)
    return TraceEstimate(float(q.mean()), float(q.std() / math.sqrt(samples)), A.calls, samples, "hutchinson")


def hutchpp(matvec: MatVec, dim: int, *, matvecs: int = 99, seed: int = 0, device="cpu") -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021) with a budget of ``matvecs`` matvecs split in thirds.

    ``s = matvecs // 3`` Rademacher columns ``S``; ``Q = orth(A S)``; ``tr(A) ~ tr(Q^T A Q) +
    mean_i g_i^T (I - QQ^T) A (I - QQ^T) g_i`` over ``matvecs - 2s`` Rademacher probes ``g_i``. ``stderr`` is the
    standard error of the second (Hutchinson) term only: given ``Q`` the first term is exact, so its variability
    over draws of ``S`` is not included. When ``dim <= matvecs`` the budget buys the exact trace
    ``sum_i e_i^T A e_i`` (``dim`` matvecs, ``stderr`` 0, ``samples`` 0).

    Raises:
        ValueError: on a bad argument (``matvecs`` >= 4 unless ``dim <= matvecs``: two probes for the stderr).
    """
    dim = check_int("dim", dim, 1)
    budget = check_int("matvecs", matvecs, 1)
    device = torch.device(device)
    gen, A = generator(seed), Counted(matvec, dim)
    if dim <= budget:
        eye = torch.eye(dim, dtype=F64, device=device)
        value = sum(float(A(eye[i])[i]) for i in range(dim))
        return TraceEstimate(value, 0.0, A.calls, 0, "hutchpp")
    if budget < 4:
        raise ValueError(f"matvecs must be >= 4 (or >= dim={dim}), got {budget}")
    s = budget // 3
    probes = budget - 2 * s
    AS = torch.stack([A(rademacher(gen, dim, device)) for _ in range(s)], 1)
    Q = torch.linalg.qr(AS, mode="reduced").Q.T.contiguous()  # rows orthonormal
    exact = sum(float(q @ A(q)) for q in Q)
    quad = []
    for _ in range(probes):
        g = rademacher(gen, dim, device)
        y = g - (Q @ g) @ Q  # y = (I - QQ^T) g; one pass suffices as Q is orthonormal to rounding
        quad.append(float(y @ A(y)))
    q = torch.tensor(quad, dtype=F64)
    return TraceEstimate(exact + float(q.mean()), float(q.std() / math.sqrt(probes)), A.calls, s + probes, "hutchpp")
