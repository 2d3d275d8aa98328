"""Eigen-solvers for a symmetric operator known only through ``matvec(v) = A v``: thick-restart Lanczos,
PyHessian-style deflated power iteration, and an ARPACK wrapper.

Nothing here knows about neural networks, so every routine can be checked on explicit matrices
(:mod:`pipeline.curvature._krylov` says how matvecs are counted and random draws seeded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.curvature._checks import check_int, check_k, check_positive
from pipeline.curvature._krylov import (
    BREAKDOWN,
    F64,
    Counted,
    MatVec,
    fresh_direction,
    gaussian,
    generator,
    orthogonalise,
)


@dataclass
class EigenResult:
    """Eigenpairs with their cost; ``residuals`` are explicit ``||A v - lambda v||_2``."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    matvecs: int
    converged: torch.Tensor
    history: list[float] = field(default_factory=list)
    method: str = ""


def _residuals(A: Counted, vectors: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Explicit ``||A v_i - lambda_i v_i||_2`` for the rows of ``vectors`` (one counted matvec each)."""
    out = [float((A(v) - float(lam) * v).norm()) for v, lam in zip(vectors, values)]
    return torch.tensor(out, dtype=F64)


def _empty_result(dim: int, device: torch.device, matvecs: int, method: str) -> EigenResult:
    return EigenResult(
        torch.zeros(0, dtype=F64),
        torch.zeros(0, dim, dtype=F64, device=device),
        torch.zeros(0, dtype=F64),
        matvecs,
        torch.zeros(0, dtype=torch.bool),
        [],
        method,
    )


def lanczos(
    matvec: MatVec,
    dim: int,
    *,
    k_largest: int = 5,
    k_smallest: int = 0,
    tol: float = 1e-6,
    max_basis: int | None = None,
    max_matvecs: int = 2000,
    v0: torch.Tensor | None = None,
    seed: int = 0,
    device="cpu",
) -> tuple[EigenResult, EigenResult | None]:
    """Thick-restart Lanczos (Wu & Simon 2000) with full reorthogonalisation (twice per step).

    The basis ``V`` (n x dim) and the projection ``H = V^T A V`` (tridiagonal, arrowhead after a restart) give Ritz
    pairs ``(theta_i, V^T s_i)`` with Krylov residual ``|beta s_{n,i}|``. A pair is converged when that residual is
    ``<= tol * max_i |theta_i|`` (absolute scale, so near-zero eigenvalues need not be relatively accurate). The test
    runs after every step once the basis holds ``k = k_largest + k_smallest`` vectors. A full basis (m vectors) is
    restarted keeping the wanted Ritz vectors, up to ``(m - k) // 2`` neighbouring ones and the residual direction
    (no matvecs).

    Breakdown: ``beta <= max(tol, 1e-12) * scale`` means the space is invariant to within the tolerance (all its
    Ritz pairs converged). If the basis does not yet span ``R^dim``, the run goes on with a seeded random vector
    orthogonal to the basis (a new block, decoupled in ``H``): that is how a single-vector method finds further
    copies of a repeated eigenvalue. A later block must have its extreme Ritz pair(s) converged before the run
    stops, and its own breakdown ends the run once it adds nothing to the wanted set. Pairs of broken-down blocks
    are exact; a restart keeps only the wanted ones.

    Args:
        matvec: ``v -> A v`` for symmetric ``A`` (1-D float64 tensors on ``device``).
        dim: size of ``A``.
        k_largest, k_smallest: numbers of algebraically largest / smallest eigenpairs wanted (sum in [1, dim]).
        tol: relative Krylov-residual tolerance (> 0).
        max_basis: basis size m; default ``max(2k + 10, 30)``, capped at ``dim``; at least ``k + 3`` (or ``dim``).
        max_matvecs: total budget, including the k matvecs of the explicit residuals (>= 2k).
        v0: optional start vector (warm start), normalised; otherwise a seeded Gaussian.
        seed: seed of the start vector and of the new blocks after a breakdown.
        device: device of the basis vectors.

    Returns:
        ``(largest, smallest)``: top ``k_largest`` pairs sorted descending and bottom ``k_smallest`` sorted ascending
        (``None`` when ``k_smallest == 0``). Both come from one run: their ``matvecs`` is the same total (Lanczos
        steps plus all k explicit residuals) and their ``history`` the same list (first wanted Ritz value -- the top
        one, or the bottom one when ``k_largest == 0`` -- after each Lanczos step; residual matvecs add no entry).
        Hitting ``max_matvecs`` returns the current pairs with ``converged`` False where the test fails.

    Raises:
        ValueError: on a bad argument or a matvec returning the wrong shape or dtype.
    """
    dim = check_int("dim", dim, 1)
    k_largest, k_smallest = check_k(k_largest, k_smallest, dim)
    k = k_largest + k_smallest
    tol = check_positive("tol", tol)
    m = max(2 * k + 10, 30) if max_basis is None else check_int("max_basis", max_basis, 1)
    m = min(m, dim)
    if m < min(k + 3, dim):  # room for the wanted pairs, a new block's two extremes and the residual direction
        raise ValueError(f"max_basis must be >= k_largest + k_smallest + 3 = {k + 3} (or dim), got {max_basis}")
    max_matvecs = check_int("max_matvecs", max_matvecs, 2 * k)
    device = torch.device(device)
    gen, A = generator(seed), Counted(matvec, dim)

    if v0 is None:
        start = gaussian(gen, dim, device)
    else:
        if not isinstance(v0, torch.Tensor) or v0.shape != (dim,) or not bool(torch.isfinite(v0).all()):
            raise ValueError(f"v0 must be a finite tensor of shape ({dim},)")
        start = v0.detach().to(device=device, dtype=F64)
    norm = float(start.norm())
    if norm == 0.0:
        raise ValueError("v0 must be non-zero")

    V = torch.zeros(m, dim, dtype=F64, device=device)
    H = torch.zeros(m, m, dtype=F64)
    V[0] = start / norm
    n = block = 0  # basis size; first index of the current Krylov block (> 0 only after a breakdown)
    history: list[float] = []

    def wanted(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the k_largest largest (descending) and k_smallest smallest (ascending) values."""
        order = torch.argsort(values, stable=True)
        return order.flip(0)[:k_largest], order[:k_smallest]

    def restart(n: int, block: int, coupling: float) -> tuple[int, int]:
        """Compress V to kept Ritz vectors: wanted pairs of the exact (broken-down) part ``[0, block)``, then the
        current block's wanted pairs, its extremes and neighbours, with an arrow row to the residual direction."""
        theta_o, S_o = torch.linalg.eigh(H[:block, :block])
        theta_b, S_b = torch.linalg.eigh(H[block:n, block:n])
        top, bottom = wanted(torch.cat([theta_o, theta_b]))
        keep_o = torch.cat([top[top < block], bottom[bottom < block]])
        nb, room = n - block, m - 1 - len(keep_o)
        # the block's extremes stay even when not wanted: its top may still grow into the wanted set
        n_top = max(int((top >= block).sum()), int(k_largest > 0 and nb > 0))
        n_bot = max(int((bottom >= block).sum()), int(k_smallest > 0 and nb > 0))
        extra = max(0, min((m - k) // 2, room - n_top - n_bot))
        n_top = min(n_top + extra * k_largest // k, nb, room)
        n_bot = min(n_bot + extra - extra * k_largest // k, nb - n_top, room - n_top)
        keep_b = torch.cat([torch.arange(nb - n_top, nb), torch.arange(n_bot)])
        no, nk = len(keep_o), len(keep_o) + len(keep_b)
        kept = torch.cat([S_o[:, keep_o].T.to(device) @ V[:block], S_b[:, keep_b].T.to(device) @ V[block:n]])
        V[:nk] = kept
        H.zero_()
        H[:nk, :nk] = torch.diag(torch.cat([theta_o[keep_o], theta_b[keep_b]]))
        if nb:
            H[nk, no:nk] = H[no:nk, nk] = coupling * S_b[-1, keep_b]
        return nk, no

    while True:
        w, coef = orthogonalise(A(V[n]), V[: n + 1])
        H[n, n] = coef[n]  # other coefficients repeat known H entries (or are rounding): H stays exactly symmetric
        n += 1
        beta = float(w.norm())
        theta, S = torch.linalg.eigh(H[:n, :n])
        scale = float(theta.abs().max())
        history.append(float(theta[-1] if k_largest else theta[0]))
        breakdown = n == dim or beta <= max(tol, BREAKDOWN) * scale
        if breakdown:
            beta = 0.0
        krylov = (beta * S[n - 1]).abs()
        done = False
        if n >= k:
            if breakdown:
                done = n == dim or (block > 0 and not _block_adds(H, block, n, k_largest, k_smallest, tol * scale))
            elif bool((krylov[torch.cat(wanted(theta))] <= tol * scale).all()):
                done = block == 0 or _block_extremes_converged(H, block, n, beta, k_largest, k_smallest, tol * scale)
        if done or A.calls >= max_matvecs - k:  # keep k matvecs for the explicit residuals
            break
        if breakdown:  # everything so far is exact; a new block starts at n
            nxt, coupling, block = fresh_direction(gen, V[:n]), 0.0, n
        else:
            nxt, coupling = w / beta, beta
        if n == m:
            n, block = restart(n, block, coupling)
        else:
            H[n, n - 1] = H[n - 1, n] = coupling
        V[n] = nxt

    ok = krylov <= tol * scale
    results = []
    for idx in wanted(theta):
        vecs = S[:, idx].T.to(device) @ V[:n]
        vecs = vecs / vecs.norm(dim=1, keepdim=True)
        results.append((theta[idx].clone(), vecs, _residuals(A, vecs, theta[idx]), ok[idx].clone()))
    largest, smallest = (EigenResult(*r[:3], A.calls, r[3], list(history), "lanczos") for r in results)
    return largest, (smallest if k_smallest else None)


def _block_adds(H, block, n, k_largest, k_smallest, margin) -> bool:
    """Whether the invariant block ``H[block:n, block:n]`` reaches into the wanted set of ``H[:block, :block]``."""
    old, new = torch.linalg.eigvalsh(H[:block, :block]), torch.linalg.eigvalsh(H[block:n, block:n])
    adds_top = k_largest > 0 and (len(old) < k_largest or float(new[-1]) > float(old[-k_largest]) + margin)
    adds_bottom = k_smallest > 0 and (len(old) < k_smallest or float(new[0]) < float(old[k_smallest - 1]) - margin)
    return adds_top or adds_bottom


def _block_extremes_converged(H, block, n, beta, k_largest, k_smallest, limit) -> bool:
    """Whether the current block's top (and/or bottom) Ritz pair meets the Krylov residual test."""
    _, S = torch.linalg.eigh(H[block:n, block:n])
    res = (beta * S[-1]).abs()
    return (k_largest == 0 or float(res[-1]) <= limit) and (k_smallest == 0 or float(res[0]) <= limit)


def power_iteration(
    matvec: MatVec, dim: int, *, k: int = 1, max_iter: int = 100, tol: float = 1e-3, seed: int = 0, device="cpu"
) -> EigenResult:
    """PyHessian-style deflated power iteration for the k eigenvalues of largest magnitude, in the order found.

    For each eigenvalue, from a seeded Gaussian: ``v <- normalise(x - P x)`` (P: projector on the vectors already
    found, Gram-Schmidt twice), ``x <- A v``, estimate ``v^T A v``; stop when
    ``|est - prev| / (|prev| + 1e-6) < tol`` (PyHessian's rule) or after ``max_iter`` matvecs. The last ``v`` and its
    ``A v`` are kept, so the returned residual ``||A v - lambda v||`` costs no extra matvec.

    Returns:
        EigenResult with ``converged`` = the relative-change rule was met, ``history`` = the estimate of the first
        eigenvalue after each of its matvecs.

    Raises:
        ValueError: on a bad argument.
    """
    dim = check_int("dim", dim, 1)
    k = check_int("k", k, 1)
    if k > dim:
        raise ValueError(f"k must be <= dim={dim}, got {k}")
    max_iter = check_int("max_iter", max_iter, 1)
    tol = check_positive("tol", tol)
    device = torch.device(device)
    gen, A = generator(seed), Counted(matvec, dim)
    vectors = torch.zeros(0, dim, dtype=F64, device=device)
    values, residuals, converged, history = [], [], [], []
    for i in range(k):
        x, prev, ok = gaussian(gen, dim, device), None, False
        for _ in range(max_iter):
            v, _ = orthogonalise(x, vectors)
            norm = float(v.norm())
            if norm <= 1e-300:  # A v vanished (v in the null space or in span of found vectors): restart randomly
                v = fresh_direction(gen, vectors) if len(vectors) else gaussian(gen, dim, device)
                norm = float(v.norm())
            v = v / norm
            Av = A(v)
            est = float(v @ Av)
            if i == 0:
                history.append(est)
            if prev is not None and abs(est - prev) / (abs(prev) + 1e-6) < tol:
                ok = True
                break
            prev, x = est, Av
        values.append(est)
        residuals.append(float((Av - est * v).norm()))
        converged.append(ok)
        vectors = torch.cat([vectors, v[None]])
    return EigenResult(
        torch.tensor(values, dtype=F64),
        vectors,
        torch.tensor(residuals, dtype=F64),
        A.calls,
        torch.tensor(converged),
        history,
        "power",
    )


def arpack(
    matvec: MatVec, dim: int, *, k_largest: int = 5, k_smallest: int = 0, tol: float = 1e-6, seed: int = 0, device="cpu"
) -> tuple[EigenResult, EigenResult | None]:
    """``scipy.sparse.linalg.eigsh`` (implicitly restarted Lanczos) on a LinearOperator: ``which='LA'`` then ``'SA'``.

    Both calls share a seeded start vector. ARPACK cannot return all ``dim`` pairs of one end (it needs k < dim):
    that case materialises ``A`` with ``dim`` counted matvecs and uses ``torch.linalg.eigh``. Residuals are explicit.

    Returns:
        ``(largest, smallest)`` as for :func:`lanczos`; both carry the total matvecs of the call (both eigsh calls
        and all residuals); ``history`` is empty. If ARPACK does not converge, only the pairs it did converge are
        returned (fewer than requested) -- its own criterion ``||r|| <= tol |theta|`` decides ``converged``.

    Raises:
        ValueError: on a bad argument.
    """
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    dim = check_int("dim", dim, 1)
    k_largest, k_smallest = check_k(k_largest, k_smallest, dim)
    tol = check_positive("tol", tol)
    device = torch.device(device)
    gen, A = generator(seed), Counted(matvec, dim)
    v0 = torch.randn(dim, generator=gen, dtype=F64).numpy()

    def apply(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.array(x, dtype=np.float64).reshape(-1)).to(device)
        return A(v).cpu().numpy()

    op = LinearOperator((dim, dim), matvec=apply, dtype=np.float64)
    found = []
    for which, count in (("LA", k_largest), ("SA", k_smallest)):
        if count == 0:
            found.append(None)
            continue
        if count >= dim:
            eye = torch.eye(dim, dtype=F64, device=device)
            dense = torch.stack([A(e) for e in eye], 1).cpu()
            vals, vecs = (t.numpy() for t in torch.linalg.eigh((dense + dense.T) / 2))
        else:
            try:
                vals, vecs = eigsh(op, k=count, which=which, tol=tol, v0=v0)
            except ArpackNoConvergence as err:
                vals, vecs = err.eigenvalues, err.eigenvectors
        order = np.argsort(-vals if which == "LA" else vals, kind="stable")
        vecs = torch.from_numpy(vecs[:, order].T.copy()).to(device)
        found.append((torch.from_numpy(vals[order].copy()), vecs / vecs.norm(dim=1, keepdim=True)))
    residuals = [None if f is None else _residuals(A, f[1], f[0]) for f in found]
    # built after all residual matvecs, so that both results carry the call's total
    results = [
        None
        if f is None
        else EigenResult(f[0], f[1], res, A.calls, torch.ones(len(f[0]), dtype=torch.bool), [], "arpack")
        for f, res in zip(found, residuals)
    ]
    largest = results[0] if results[0] is not None else _empty_result(dim, device, A.calls, "arpack")
    return largest, results[1]
