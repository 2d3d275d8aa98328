"""Matrix-free spectral tools for a symmetric operator known only through ``matvec(v) = A v``.

Eigen-solvers (thick-restart Lanczos, PyHessian-style deflated power iteration, an ARPACK wrapper), trace
estimators (Hutchinson, Hutch++) and stochastic Lanczos quadrature (SLQ) for the spectral density. Nothing here
knows about neural networks, so every routine can be checked on explicit matrices. Each matvec is a Hessian-vector
product in practice (the dominant cost): calls are counted exactly and spent sparingly. Internal linear algebra is
float64; vectors live on ``device`` and small projected matrices on the CPU. Random draws come from a seeded CPU
generator and are then moved to ``device``, so results do not depend on the device.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]

F64 = torch.float64
# Floor of the breakdown test (Lanczos coupling beta <= this * largest |Ritz value|): with float64 matvecs an
# invariant Krylov space leaves beta ~ 1e-15 relative. Lanczos uses max(tol, floor); SLQ, which has no tol, the floor.
_BREAKDOWN = 1e-12


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


@dataclass
class TraceEstimate:
    """A trace estimate with its standard error and cost."""

    value: float
    stderr: float
    matvecs: int
    samples: int
    method: str


@dataclass
class SpectralDensity:
    """SLQ quadrature: ``nodes``/``weights`` of shape (runs, steps); all weights sum to 1."""

    nodes: torch.Tensor
    weights: torch.Tensor
    matvecs: int


# ----------------------------------------------------------------------------------------------- helpers


class _Counted:
    """Wraps a matvec: counts its calls and checks that it returns a float64 vector of length ``dim``."""

    def __init__(self, matvec: MatVec, dim: int):
        self.matvec, self.dim, self.calls = matvec, dim, 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        out = self.matvec(v)
        self.calls += 1
        if not isinstance(out, torch.Tensor) or out.shape != (self.dim,) or out.dtype != F64:
            got = (tuple(out.shape), out.dtype) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"matvec must return a float64 tensor of shape ({self.dim},), got {got}")
        return out


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_k(k_largest, k_smallest, dim: int) -> tuple[int, int]:
    k_largest, k_smallest = _check_int("k_largest", k_largest, 0), _check_int("k_smallest", k_smallest, 0)
    if not 1 <= k_largest + k_smallest <= dim:
        raise ValueError(f"k_largest + k_smallest must be between 1 and dim={dim}, got {k_largest + k_smallest}")
    return k_largest, k_smallest


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _gaussian(gen: torch.Generator, dim: int, device: torch.device) -> torch.Tensor:
    return torch.randn(dim, generator=gen, dtype=F64).to(device)


def _rademacher(gen: torch.Generator, dim: int, device: torch.device) -> torch.Tensor:
    return (torch.randint(0, 2, (dim,), generator=gen).to(F64) * 2 - 1).to(device)


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classical Gram-Schmidt against the rows of ``basis``, done twice ("twice is enough", Giraud et al. 2005).

    Returns ``(w - basis^T c, c)`` with ``c`` the summed coefficients of both passes (on the CPU).
    """
    c1 = basis @ w
    w = w - c1 @ basis
    c2 = basis @ w
    return w - c2 @ basis, (c1 + c2).cpu()


def _fresh_direction(gen: torch.Generator, basis: torch.Tensor) -> torch.Tensor:
    """A seeded random unit vector orthogonal to the rows of ``basis`` (which must not span the whole space)."""
    while True:
        w, _ = _orthogonalise(_gaussian(gen, basis.shape[1], basis.device), basis)
        norm = float(w.norm())
        if norm > 1e-8:  # a draw almost inside span(basis) is redrawn rather than amplified
            return w / norm


def _residuals(A: _Counted, vectors: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Explicit ``||A v_i - lambda_i v_i||_2`` for the rows of ``vectors`` (one counted matvec each)."""
    out = [float((A(v) - float(lam) * v).norm()) for v, lam in zip(vectors, values)]
    return torch.tensor(out, dtype=F64)


def _empty_result(dim: int, device: torch.device, matvecs: int, method: str) -> EigenResult:
    return EigenResult(torch.zeros(0, dtype=F64), torch.zeros(0, dim, dtype=F64, device=device),
                       torch.zeros(0, dtype=F64), matvecs, torch.zeros(0, dtype=torch.bool), [], method)


# ------------------------------------------------------------------------------------------ eigen-solvers


def lanczos(matvec: MatVec, dim: int, *, k_largest: int = 5, k_smallest: int = 0, tol: float = 1e-6,
            max_basis: int | None = None, max_matvecs: int = 2000, v0: torch.Tensor | None = None, seed: int = 0,
            device="cpu") -> tuple[EigenResult, EigenResult | None]:
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
    dim = _check_int("dim", dim, 1)
    k_largest, k_smallest = _check_k(k_largest, k_smallest, dim)
    k = k_largest + k_smallest
    tol = _check_positive("tol", tol)
    m = max(2 * k + 10, 30) if max_basis is None else _check_int("max_basis", max_basis, 1)
    m = min(m, dim)
    if m < min(k + 3, dim):  # room for the wanted pairs, a new block's two extremes and the residual direction
        raise ValueError(f"max_basis must be >= k_largest + k_smallest + 3 = {k + 3} (or dim), got {max_basis}")
    max_matvecs = _check_int("max_matvecs", max_matvecs, 2 * k)
    device = torch.device(device)
    gen, A = _generator(seed), _Counted(matvec, dim)

    if v0 is None:
        start = _gaussian(gen, dim, device)
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
        w, coef = _orthogonalise(A(V[n]), V[: n + 1])
        H[n, n] = coef[n]  # other coefficients repeat known H entries (or are rounding): H stays exactly symmetric
        n += 1
        beta = float(w.norm())
        theta, S = torch.linalg.eigh(H[:n, :n])
        scale = float(theta.abs().max())
        history.append(float(theta[-1] if k_largest else theta[0]))
        breakdown = n == dim or beta <= max(tol, _BREAKDOWN) * scale
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
            nxt, coupling, block = _fresh_direction(gen, V[:n]), 0.0, n
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


def power_iteration(matvec: MatVec, dim: int, *, k: int = 1, max_iter: int = 100, tol: float = 1e-3, seed: int = 0,
                    device="cpu") -> EigenResult:
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
    dim = _check_int("dim", dim, 1)
    k = _check_int("k", k, 1)
    if k > dim:
        raise ValueError(f"k must be <= dim={dim}, got {k}")
    max_iter = _check_int("max_iter", max_iter, 1)
    tol = _check_positive("tol", tol)
    device = torch.device(device)
    gen, A = _generator(seed), _Counted(matvec, dim)
    vectors = torch.zeros(0, dim, dtype=F64, device=device)
    values, residuals, converged, history = [], [], [], []
    for i in range(k):
        x, prev, ok = _gaussian(gen, dim, device), None, False
        for _ in range(max_iter):
            v, _ = _orthogonalise(x, vectors)
            norm = float(v.norm())
            if norm <= 1e-300:  # A v vanished (v in the null space or in span of found vectors): restart randomly
                v = _fresh_direction(gen, vectors) if len(vectors) else _gaussian(gen, dim, device)
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
    return EigenResult(torch.tensor(values, dtype=F64), vectors, torch.tensor(residuals, dtype=F64), A.calls,
                       torch.tensor(converged), history, "power")


def arpack(matvec: MatVec, dim: int, *, k_largest: int = 5, k_smallest: int = 0, tol: float = 1e-6, seed: int = 0,
           device="cpu") -> tuple[EigenResult, EigenResult | None]:
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

    dim = _check_int("dim", dim, 1)
    k_largest, k_smallest = _check_k(k_largest, k_smallest, dim)
    tol = _check_positive("tol", tol)
    device = torch.device(device)
    gen, A = _generator(seed), _Counted(matvec, dim)
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
    results = [None if f is None else EigenResult(f[0], f[1], res, A.calls, torch.ones(len(f[0]), dtype=torch.bool),
                                                  [], "arpack") for f, res in zip(found, residuals)]
    largest = results[0] if results[0] is not None else _empty_result(dim, device, A.calls, "arpack")
    return largest, results[1]


# --------------------------------------------------------------------------------------- trace estimators


def hutchinson(matvec: MatVec, dim: int, *, samples: int = 100, seed: int = 0, device="cpu") -> TraceEstimate:
    """Hutchinson's estimator ``tr(A) ~ mean_i z_i^T A z_i`` with Rademacher probes ``z_i``.

    Its variance per probe is ``2 (||A||_F^2 - sum_i A_ii^2)``; ``stderr`` = sample std (ddof=1) / sqrt(samples).

    Raises:
        ValueError: on a bad argument (``samples`` >= 2 so that the standard error exists).
    """
    dim = _check_int("dim", dim, 1)
    samples = _check_int("samples", samples, 2)
    device = torch.device(device)
    gen, A = _generator(seed), _Counted(matvec, dim)
    quad = []
    for _ in range(samples):
        z = _rademacher(gen, dim, device)
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
    dim = _check_int("dim", dim, 1)
    budget = _check_int("matvecs", matvecs, 1)
    device = torch.device(device)
    gen, A = _generator(seed), _Counted(matvec, dim)
    if dim <= budget:
        eye = torch.eye(dim, dtype=F64, device=device)
        value = sum(float(A(eye[i])[i]) for i in range(dim))
        return TraceEstimate(value, 0.0, A.calls, 0, "hutchpp")
    if budget < 4:
        raise ValueError(f"matvecs must be >= 4 (or >= dim={dim}), got {budget}")
    s = budget // 3
    probes = budget - 2 * s
    AS = torch.stack([A(_rademacher(gen, dim, device)) for _ in range(s)], 1)
    Q = torch.linalg.qr(AS, mode="reduced").Q.T.contiguous()  # rows orthonormal
    exact = sum(float(q @ A(q)) for q in Q)
    quad = []
    for _ in range(probes):
        g = _rademacher(gen, dim, device)
        y = g - (Q @ g) @ Q  # y = (I - QQ^T) g; one pass suffices as Q is orthonormal to rounding
        quad.append(float(y @ A(y)))
    q = torch.tensor(quad, dtype=F64)
    return TraceEstimate(exact + float(q.mean()), float(q.std() / math.sqrt(probes)), A.calls, s + probes, "hutchpp")


# ------------------------------------------------------------------------------------------ spectral density


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
    dim = _check_int("dim", dim, 1)
    runs, steps = _check_int("runs", runs, 1), min(_check_int("steps", steps, 1), dim)
    device = torch.device(device)
    gen, A = _generator(seed), _Counted(matvec, dim)
    nodes = torch.zeros(runs, steps, dtype=F64)
    weights = torch.zeros(runs, steps, dtype=F64)
    for r in range(runs):
        V = torch.zeros(steps, dim, dtype=F64, device=device)
        V[0] = _rademacher(gen, dim, device) / math.sqrt(dim)
        alphas, betas, anorm = [], [], 0.0
        for j in range(steps):
            w, coef = _orthogonalise(A(V[j]), V[: j + 1])
            alphas.append(float(coef[j]))
            anorm = max(anorm, abs(alphas[-1]))  # running estimate of ||A|| from the entries of T
            if j == steps - 1:
                break
            beta = float(w.norm())
            if beta <= _BREAKDOWN * anorm:
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


def smooth_density(density: SpectralDensity, *, points: int = 1000, sigma: float | None = None,
                   relative_sigma: float = 0.01, grid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    relative_sigma = _check_positive("relative_sigma", relative_sigma)
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = relative_sigma * ((hi - lo) if hi > lo else max(abs(lo), abs(hi), 1.0))
    sigma = _check_positive("sigma", sigma)
    if grid is None:
        points = _check_int("points", points, 2)
        grid = torch.linspace(lo - 6 * sigma, hi + 6 * sigma, points, dtype=F64)
    elif not isinstance(grid, torch.Tensor) or grid.dim() != 1:
        raise ValueError("grid must be a 1-D tensor")
    grid = grid.detach().to("cpu", F64)
    rho = torch.zeros_like(grid)
    for start in range(0, len(nodes), 4096):  # chunks bound the (points x nodes) kernel matrix
        n, w = nodes[start:start + 4096], weights[start:start + 4096]
        rho += (w * torch.exp(-0.5 * ((grid[:, None] - n) / sigma) ** 2)).sum(1)
    return grid, rho / (sigma * math.sqrt(2 * math.pi))
