r"""Flatness of the loss around a point: worst-case ε-sharpness and the PAC-Bayes noise scale σ.

Two sharpness-based generalisation measures, over the same fixed probe set as the curvature operators (the loss
:math:`L` is the probe-set mean, batches weighted exactly; the parameters are ``wrt``, the rest held fixed):

- :func:`epsilon_sharpness`: the largest increase of :math:`L` within an ε-neighbourhood of the weights (Keskar et
  al. 2017, Metric 2.1; the worst-case sharpness behind Jiang et al. 2019), found by projected gradient ascent.
- :func:`pac_bayes_sigma`: the largest Gaussian noise scale whose expected loss increase stays within a bound (the
  σ' behind Jiang et al.'s ``pacbayes.flatness`` and ``pacbayes.mag.flatness``), found by bisection on σ with
  common random numbers.

The network is evaluated through :class:`~pipeline.curvature.operators.CurvatureOperator`: ``functional_call`` on
clones of the parameters and buffers, BatchNorm in eval mode (a model in training mode, or with dropout, is refused),
so the module is never modified. Costs are counted in full passes over the probe set: a *loss evaluation* is one
forward pass, a *gradient evaluation* one forward and one backward pass.

References: N. S. Keskar et al., "On large-batch training for deep learning: generalization gap and sharp minima",
ICLR 2017. Y. Jiang, B. Neyshabur et al., "Fantastic generalization measures and where to find them", ICLR 2020
(arXiv:1912.02178, 2019).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import vmap

from pipeline.curvature._checks import CurvatureError, check_int, check_nonnegative, check_positive
from pipeline.curvature.operators import CurvatureOperator, ProbeSet, account

F64 = torch.float64
NEIGHBOURHOODS = ("absolute", "relative")
# A projected step that moves the point by less than this fraction of the set's size is a fixed point of the ascent
# (gradient normal to the boundary, or zero): further steps cannot move it, so the start stops there.
_STATIONARY = 1e-10
_BRACKET_FACTOR = 10.0  # the σ bracket search multiplies or divides σ by this (one decade per evaluation)
_BRACKET_EVALUATIONS = 40  # at most this many decades from sigma_start before giving up


@dataclass(frozen=True)
class Sharpness:
    """The worst-case loss increase found in an ε-neighbourhood of the weights (see :func:`epsilon_sharpness`)."""

    neighbourhood: str  # "absolute" (L2 ball) or "relative" (Keskar's box)
    epsilon: float  # radius of the ball (parameter units) or relative half-width of the box (dimensionless)
    loss: float  # L(w), probe-set mean loss (nats for cross-entropy)
    max_loss: float  # the largest L(w + u) found, u in the neighbourhood (>= loss: u = 0 is in it)
    increase: float  # max_loss - loss, same units as the loss
    keskar: float  # 100 (max_loss - loss) / (1 + loss), Keskar et al.'s sharpness (percent)
    steps: int  # ascent steps evaluated, all starts together
    starts: int  # ascent runs: the random start, and the gradient start when taken
    gradient_evaluations: int  # forward + backward passes over the probe set, the one at w included
    names: tuple[str, ...] = field(repr=False)  # parameter names, in the order of `perturbation`
    perturbation: Tensor = field(repr=False, compare=False)  # (dim,) float64: the maximiser u found
    account: dict = field(default_factory=dict, compare=False)  # primitive operations spent (operators.account)


@dataclass(frozen=True)
class NoiseFlatness:
    """The largest noise scale whose expected loss increase stays within the bound (see :func:`pac_bayes_sigma`)."""

    sigma: float  # feasible end of the final bracket: increase(sigma) <= bound
    sigma_upper: float  # infeasible end: increase > bound (or non-finite); sigma_upper / sigma <= 1 + rtol
    increase: float  # mean_k L(w + u_k(sigma)) - L(w) over the draws, <= bound (loss units)
    loss: float  # L(w)
    bound: float  # the allowed expected increase (loss units: nats for cross-entropy)
    magnitude_aware: bool  # noise std sigma * sqrt(w_i^2 + magnitude_epsilon^2) instead of sigma
    magnitude_epsilon: float  # parameter units; 0.0 when not magnitude aware
    draws: int  # Monte Carlo noise draws, the same for every sigma
    iterations: int  # bisection iterations (one sigma each)
    bracket_evaluations: int  # sigmas evaluated while bracketing (one decade apart)
    loss_evaluations: int  # forward passes over the probe set: 1 + draws * (bracket_evaluations + iterations)
    account: dict = field(default_factory=dict, compare=False)  # primitive operations spent (operators.account)

    @property
    def flatness(self) -> float:
        """Jiang et al.'s ``pacbayes.flatness`` (or ``pacbayes.mag.flatness``): :math:`1/\\sigma^2`."""
        return 1.0 / self.sigma**2


# ----------------------------------------------------------------------------------------------- helpers


def _loss_and_gradient(op: CurvatureOperator, u: Tensor) -> tuple[float, Tensor]:
    """:math:`L(w + u)` and its flat float64 gradient: one forward and backward pass over the probe set."""
    delta = op.unflatten(u)
    op.gradients += 1
    leaves = {n: (op.point[n] + delta[n]).detach().requires_grad_(True) for n in op.names}
    value = torch.zeros((), dtype=F64, device=op.device)
    total = [torch.zeros_like(p) for p in leaves.values()]
    for x, y in op.probe.batches:
        batch = op.batch_loss(leaves, x, y)
        grads = torch.autograd.grad(batch, list(leaves.values()))
        value += batch.detach().to(F64)
        total = [t + g for t, g in zip(total, grads)]
    return float(value), op.flatten(dict(zip(op.names, total)))


def _perturbed_losses(op: CurvatureOperator, deltas: Tensor) -> list[float]:
    """:math:`L(w + \\delta_k)` for the rows of ``deltas`` (shape (c, dim), the parameters' dtype and device).

    One forward pass over the probe set per row; with ``c > 1`` the rows go through the network together
    (``torch.func.vmap`` over the parameters).
    """
    c = deltas.shape[0]
    op.forwards += c
    stacked = {
        n: op.point[n] + chunk.reshape(c, *shape)
        for n, chunk, shape in zip(op.names, deltas.split(op.numels, dim=1), op.shapes)
    }
    per_draw = torch.zeros(c, dtype=F64, device=op.device)
    with torch.no_grad():
        for x, y in op.probe.batches:
            if c == 1:
                per_draw += op.batch_loss({n: p[0] for n, p in stacked.items()}, x, y).to(F64)
            else:
                per_draw += vmap(lambda p: op.batch_loss(p, x, y))(stacked).to(F64)
    return per_draw.tolist()


# ----------------------------------------------------------------------------------------------- ε-sharpness


def epsilon_sharpness(
    model: nn.Module,
    probe: ProbeSet,
    *,
    epsilon: float,
    neighbourhood: str = "absolute",
    steps: int = 20,
    step_size: float = 2.0,
    gradient_start: bool = True,
    directions: Sequence[Tensor] = (),
    seed: int = 0,
    wrt: Sequence[str] | None = None,
    loss: str = "cross_entropy",
) -> Sharpness:
    r"""Worst-case loss increase in an ε-neighbourhood of the weights, by projected gradient ascent (PGA).

    .. math:: \max_{u \in C_\epsilon} L(w + u) - L(w), \qquad
              \text{Keskar's value } 100\,\frac{\max_{u \in C_\epsilon} L(w + u) - L(w)}{1 + L(w)}

    with the neighbourhood

    - ``absolute``: the L2 ball :math:`C_\epsilon = \{u : \lVert u \rVert_2 \le \epsilon\}` (parameter units; at a
      minimum of a quadratic the value is :math:`\tfrac12 \lambda_{max} \epsilon^2`);
    - ``relative``: Keskar et al.'s box (2017, Metric 2.1, full space :math:`A = I`),
      :math:`C_\epsilon = \{u : |u_i| \le \epsilon (|w_i| + 1)\}`, which scales with each weight's magnitude (a
      small weight still gets the half-width ε). Keskar et al. use ε = 1e-3 and 5e-4.

    The ascent: from a point :math:`u`, a candidate :math:`\Pi_C(u + \alpha\, d(g))` with :math:`g = \nabla L(w+u)`
    and the standard steepest-ascent direction of the set scaled to its size, :math:`d(g) = \epsilon\, g /
    \lVert g \rVert_2` on the ball (normalised gradient) and :math:`d(g) = r \odot \mathrm{sign}(g)`,
    :math:`r_i = \epsilon(|w_i| + 1)`, on the box (sign gradient, as in L∞ PGD). The candidate is accepted when it
    raises the loss; otherwise :math:`\alpha` is halved and the step retried from the same point (a monotone ascent:
    the initial :math:`\alpha` = ``step_size`` = 2 reaches the far side of the set in one step; Auto-PGD, Croce &
    Hein 2020, starts with the same step). Starts: a seeded point uniform in the set; with ``gradient_start`` the
    first-order maximiser :math:`d(\nabla L(w))` (SAM's / FGSM's step); and for each of ``directions`` (e.g. the
    top Hessian eigenvectors, which have no sign) the set's extreme points :math:`d(\pm v)`. The best point over
    all starts is kept; ``u = 0`` counts.

    The result is a lower bound on the true maximum: ascent finds a local maximum. On the ball at a minimum of a
    quadratic, the steps act as a shifted power iteration and converge to the top eigenvector. On the box, a convex
    loss (near a minimum) has its maximum at a vertex, where sign steps of size 2 land, and the ascent stops at a
    vertex whose sign pattern is that of its own gradient; maximising a convex quadratic over a box is NP-hard, and
    such a vertex can be well below the best one (from a random start at the minimum of 200 random 10-parameter
    quadratics: 0.83 of the best vertex on average, 0.43 at worst); a start along the top eigenvector often helps.
    Keskar et al. used L-BFGS-B instead.

    Args:
        model: the network, in eval mode (checked); never modified.
        probe: the probe set; the loss is its mean.
        epsilon: the ball's radius (``absolute``) or the box's relative half-width (``relative``), > 0.
        neighbourhood: ``absolute`` or ``relative``.
        steps: ascent steps per start (each one gradient evaluation); a start stops early at a fixed point.
        step_size: initial step :math:`\alpha` as a multiple of the set's size (ε on the ball, r on the box), > 0.
        gradient_start: also start from the first-order maximiser (skipped where the gradient is exactly zero).
        directions: flat (dim,) vectors in the order of the ``wrt`` names; each adds two starts, along + and -.
        seed: seeds the random start (a CPU generator, so results do not depend on the device).
        wrt: parameter names perturbed (default: all trainable ones); the rest are held fixed.
        loss: ``cross_entropy`` or ``mse``.

    Returns:
        :class:`Sharpness`; its cost is ``gradient_evaluations`` = 1 + (1 + steps taken) per start.

    Raises:
        CurvatureError: a bad argument (the message names it), an unknown ``wrt`` name, a non-repeatable model, or
            a non-finite loss at ``w``.
    """
    epsilon = check_positive("epsilon", epsilon)
    if neighbourhood not in NEIGHBOURHOODS:
        raise CurvatureError(f"neighbourhood: unknown name {neighbourhood!r}; allowed: {', '.join(NEIGHBOURHOODS)}")
    steps = check_int("steps", steps, 1)
    step_size = check_positive("step_size", step_size)
    seed = check_int("seed", seed, 0)
    op = CurvatureOperator(model, probe, wrt=wrt, loss=loss)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    project: Callable[[Tensor], Tensor]
    direction: Callable[[Tensor], Tensor | None]
    if neighbourhood == "absolute":
        size = epsilon

        def project(u: Tensor) -> Tensor:
            norm = float(u.norm())
            return u * (epsilon / norm) if norm > epsilon else u

        def direction(g: Tensor) -> Tensor | None:
            norm = float(g.norm())
            return g * (epsilon / norm) if norm > 0 else None

        z = torch.randn(op.dim, generator=gen, dtype=F64)
        radius = epsilon * float(torch.rand((), generator=gen, dtype=F64)) ** (1.0 / op.dim)
        random_start = (z * (radius / float(z.norm()))).to(op.device)  # uniform in the ball
    else:
        r = epsilon * (op.flatten(op.point).abs() + 1.0)  # (dim,) half-widths of the box
        size = float(r.norm())

        def project(u: Tensor) -> Tensor:
            return torch.minimum(torch.maximum(u, -r), r)

        def direction(g: Tensor) -> Tensor | None:
            return r * g.sign() if bool((g != 0).any()) else None

        random_start = r * (2.0 * torch.rand(op.dim, generator=gen, dtype=F64).to(op.device) - 1.0)  # uniform

    evaluations = 1
    loss0, grad0 = _loss_and_gradient(op, torch.zeros(op.dim, dtype=F64, device=op.device))
    if not math.isfinite(loss0):
        raise CurvatureError(f"epsilon_sharpness: the loss at w is not finite ({loss0})")
    best_loss, best_u = loss0, torch.zeros(op.dim, dtype=F64, device=op.device)
    starts = [random_start]
    first_order = direction(grad0) if gradient_start else None
    if first_order is not None:
        starts.append(project(first_order))
    for i, v in enumerate(directions):
        if not isinstance(v, Tensor) or v.shape != (op.dim,) or not bool(torch.isfinite(v).all()) or not bool(v.any()):
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise CurvatureError(f"directions[{i}]: expected a finite non-zero vector of shape ({op.dim},), got {got}")
        v = v.to(device=op.device, dtype=F64)
        starts += [project(direction(v)), project(direction(-v))]

    taken_total = 0
    for u in starts:
        value, grad = _loss_and_gradient(op, u)
        evaluations += 1
        alpha, taken = step_size, 0
        while taken < steps:
            d = direction(grad)
            if d is None:
                break
            candidate = project(u + alpha * d)
            if float((candidate - u).norm()) <= _STATIONARY * size:
                break
            cand_value, cand_grad = _loss_and_gradient(op, candidate)
            evaluations += 1
            taken += 1
            if cand_value > value:  # NaN is rejected too
                u, value, grad = candidate, cand_value, cand_grad
            else:
                alpha /= 2.0
        taken_total += taken
        if value > best_loss:
            best_loss, best_u = value, u

    increase = best_loss - loss0
    return Sharpness(
        neighbourhood=neighbourhood,
        epsilon=epsilon,
        loss=loss0,
        max_loss=best_loss,
        increase=increase,
        keskar=100.0 * increase / (1.0 + loss0),
        steps=taken_total,
        starts=len(starts),
        gradient_evaluations=evaluations,
        account=account(op),
        names=tuple(op.names),
        perturbation=best_u.detach().clone(),
    )


# ----------------------------------------------------------------------------------------------- PAC-Bayes σ


def noise_draws(dim: int, draws: int, seed: int) -> Tensor:
    """The standard-normal draws :math:`z_k` that :func:`pac_bayes_sigma` scales: shape (draws, dim), float64, CPU.

    Drawn once from a CPU generator seeded with ``seed``, so they do not depend on the device. A different
    ``draws`` gives different rows throughout (torch fills the whole tensor at once), not a prefix.
    """
    gen = torch.Generator(device="cpu").manual_seed(check_int("seed", seed, 0))
    return torch.randn(check_int("draws", draws, 1), check_int("dim", dim, 1), generator=gen, dtype=F64)


def pac_bayes_sigma(
    model: nn.Module,
    probe: ProbeSet,
    *,
    bound: float = 0.1,
    magnitude_aware: bool = False,
    magnitude_epsilon: float = 1e-3,
    draws: int = 10,
    rtol: float = 1e-2,
    sigma_start: float = 1e-2,
    draws_per_pass: int = 1,
    seed: int = 0,
    wrt: Sequence[str] | None = None,
    loss: str = "cross_entropy",
) -> NoiseFlatness:
    r"""The largest Gaussian noise scale σ whose expected loss increase stays within ``bound``, by bisection.

    .. math:: \hat\Delta(\sigma) = \frac1K \sum_{k=1}^K L(w + \sigma\, s \odot z_k) - L(w) \le \text{bound}

    with :math:`K` = ``draws`` fixed standard-normal vectors :math:`z_k` (:func:`noise_draws`; the same for every
    σ, *common random numbers*, so :math:`\hat\Delta` is a fixed, continuous function of σ that the bisection can
    bracket) and the noise shape

    - isotropic: :math:`s_i = 1`, i.e. :math:`u \sim N(0, \sigma^2 I)` (Jiang et al. 2019, ``pacbayes.flatness``
      :math:`= 1/\sigma^2`);
    - ``magnitude_aware``: :math:`s_i = \sqrt{w_i^2 + \epsilon_{mag}^2}`, i.e.
      :math:`u_i \sim N(0, \sigma^2 (w_i^2 + \epsilon_{mag}^2))`, ``pacbayes.mag.flatness``. Jiang et al. write the
      variance as :math:`\sigma'^2 w_i^2 + \epsilon^2` (ε = 1e-3, not scaled by σ'); here ε is scaled too, so
      that σ → 0 removes all noise (their form leaves noise of std ε at σ' = 0, which by itself may exceed the
      bound) and every σ is one scale of the same draws.

    The bound is on the expected increase of the *loss* (default 0.1, in nats for cross-entropy), not, as in
    Jiang et al.'s search, on the deviation of the training *error* (0.1, i.e. ten points of accuracy; so also the
    public re-implementation of Dziugaite et al. 2020, nitarshan/robust-generalization-measures, with 10 draws
    and 15 bisection steps on [0, 2]): the loss is
    what this pipeline measures everywhere else, it makes :math:`\hat\Delta` smooth in σ (the error of a finite
    probe set is a step function), and on a quadratic :math:`\mathbb E\,\Delta = \tfrac12 \sigma^2 \mathrm{tr}(A)`
    (isotropic) gives a closed form to test against.

    Search: from ``sigma_start``, σ is multiplied (or divided) by 10 until a feasible σ (increase <= bound) and an
    infeasible one (> bound, or non-finite) bracket the crossing, then bisected at the geometric mean until
    ``sigma_upper / sigma <= 1 + rtol``. For a non-convex loss :math:`\hat\Delta` need not be monotone; the result
    is then one crossing, the one the bracket found. Returns the feasible end.

    Args:
        model: the network, in eval mode (checked); never modified.
        probe: the probe set; the loss is its mean.
        bound: allowed expected loss increase, > 0 (loss units).
        magnitude_aware: scale each weight's noise by :math:`\sqrt{w_i^2 + \epsilon_{mag}^2}`.
        magnitude_epsilon: :math:`\epsilon_{mag}` >= 0, parameter units (Jiang et al.: 1e-3).
        draws: Monte Carlo draws K (the re-implementation above: 10).
        rtol: relative width of the final bracket, > 0 (about :math:`\log_2(\ln 10 / \mathrm{rtol})` iterations).
        sigma_start: the first σ tried, > 0 (dimensionless when ``magnitude_aware``, else parameter units).
        draws_per_pass: draws evaluated together through ``torch.func.vmap`` (1: one at a time). Results agree
            with the loop to rounding, not bitwise.
        seed: seeds the draws.
        wrt: parameter names perturbed (default: all trainable ones); the rest are held fixed.
        loss: ``cross_entropy`` or ``mse``.

    Returns:
        :class:`NoiseFlatness`; cost ``loss_evaluations`` = 1 + K (bracket evaluations + iterations) forward
        passes over the probe set. Memory: the K scaled draws are kept, K × dim in the parameters' dtype.

    Raises:
        CurvatureError: a bad argument (the message names it), an unknown ``wrt`` name, a non-repeatable model, a
            non-finite loss at ``w``, or no bracket within 40 decades of ``sigma_start`` (e.g. a loss that stays
            within the bound for any noise).
    """
    bound = check_positive("bound", bound)
    magnitude_epsilon = check_nonnegative("magnitude_epsilon", magnitude_epsilon) if magnitude_aware else 0.0
    draws = check_int("draws", draws, 1)
    rtol = check_positive("rtol", rtol)
    sigma_start = check_positive("sigma_start", sigma_start)
    draws_per_pass = check_int("draws_per_pass", draws_per_pass, 1)
    seed = check_int("seed", seed, 0)
    op = CurvatureOperator(model, probe, wrt=wrt, loss=loss)

    z = noise_draws(op.dim, draws, seed).to(op.device)
    if magnitude_aware:
        z = z * torch.sqrt(op.flatten(op.point) ** 2 + magnitude_epsilon**2)
    noise = z.to(op.dtype)  # (K, dim): s ⊙ z_k, scaled by σ at each evaluation
    loss0 = _perturbed_losses(op, torch.zeros(1, op.dim, dtype=op.dtype, device=op.device))[0]
    if not math.isfinite(loss0):
        raise CurvatureError(f"pac_bayes_sigma: the loss at w is not finite ({loss0})")
    evaluations = 1

    def increase(sigma: float) -> float:
        nonlocal evaluations
        losses = [v for chunk in noise.split(draws_per_pass) for v in _perturbed_losses(op, sigma * chunk)]
        evaluations += draws
        return sum(losses) / draws - loss0

    def feasible(value: float) -> bool:
        return math.isfinite(value) and value <= bound

    lo = hi = None  # (sigma, increase) at the feasible and the infeasible end
    sigma, bracketing = sigma_start, 0
    while lo is None or hi is None:
        if bracketing == _BRACKET_EVALUATIONS:
            side = "stays within" if hi is None else "exceeds"
            tried = sigma / _BRACKET_FACTOR if hi is None else sigma * _BRACKET_FACTOR
            raise CurvatureError(
                f"pac_bayes_sigma: the expected loss increase {side} bound={bound} for every sigma "
                f"tried from {sigma_start:g} to {tried:g}; no crossing to bisect"
            )
        value = increase(sigma)
        bracketing += 1
        if feasible(value):  # go up until infeasible (lo only grows, so the bracket is lo < hi)
            lo = (sigma, value)
            sigma *= _BRACKET_FACTOR
        else:  # go down until feasible
            hi = (sigma, value)
            sigma /= _BRACKET_FACTOR

    iterations = 0
    while hi[0] / lo[0] > 1.0 + rtol:
        mid = math.sqrt(lo[0] * hi[0])
        if not lo[0] < mid < hi[0]:  # adjacent floats: the bracket cannot shrink further
            break
        value = increase(mid)
        iterations += 1
        if feasible(value):
            lo = (mid, value)
        else:
            hi = (mid, value)

    return NoiseFlatness(
        sigma=lo[0],
        sigma_upper=hi[0],
        increase=lo[1],
        loss=loss0,
        bound=bound,
        magnitude_aware=magnitude_aware,
        magnitude_epsilon=magnitude_epsilon,
        draws=draws,
        iterations=iterations,
        bracket_evaluations=bracketing,
        loss_evaluations=evaluations,
        account=account(op),
    )


# ----------------------------------------------------------------------------------------------- adaptive sharpness

ADAPTIVE_NORMS = ("2", "inf")
ADAPTIVE_KINDS = ("worst", "average")
_APGD_MOMENTUM = 0.75  # Croce & Hein's alpha: weight of the new step against the previous one
_APGD_SUCCESS = 0.75  # rho of the checkpoint rule: halve the step when fewer steps than this fraction succeeded


@dataclass(frozen=True)
class AdaptiveSharpness:
    """Sharpness in a neighbourhood scaled by the weights' magnitudes (see :func:`adaptive_sharpness`)."""

    kind: str  # "worst" (ascent) or "average" (random draws)
    norm: str  # "2" or "inf": the norm of delta / |w| (worst case); Gaussian or uniform draws (average case)
    rho: float  # the neighbourhood's size, dimensionless (relative to |w|)
    m: int  # samples per batch of the m-sharpness (the whole probe set: its size)
    loss: float  # L(w), probe-set mean
    value: float  # the sharpness: mean over batches (weighted by their samples) of each batch's loss increase
    per_batch: tuple[float, ...]  # each batch's increase, in probe order
    steps: int  # ascent steps, all batches together (0 for the average case)
    draws: int  # noise draws (average case; 0 for the worst case)
    gradient_evaluations: float  # probe-set passes with a backward pass (a batch counts its share)
    loss_evaluations: float  # probe-set passes without one
    account: dict = field(default_factory=dict, compare=False)


def _apgd_checkpoints(steps: int) -> list[int]:
    """The steps at which Auto-PGD may halve its step (Croce & Hein 2020, section 3.2): ``ceil(p_j * steps)`` with
    :math:`p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + \\max(p_j - p_{j-1} - 0.03, 0.06)`."""
    points, prev, cur = [0], 0.0, 0.22
    while cur <= 1.0:
        points.append(math.ceil(cur * steps))
        prev, cur = cur, cur + max(cur - prev - 0.03, 0.06)
    return sorted(set(p for p in points if 0 < p <= steps))


def _adaptive_worst_batch(op: CurvatureOperator, scale: Tensor, norm: str, rho: float, steps: int, seed: int):
    """One batch's worst case: Auto-PGD on :math:`u = \\delta / |w|` in the p-ball of radius ρ. Returns
    (increase, loss at w, steps taken)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if norm == "2":

        def project(u: Tensor) -> Tensor:
            n = float(u.norm())
            return u * (rho / n) if n > rho else u

        def direction(g: Tensor) -> Tensor:
            n = float(g.norm())
            return g / n if n > 0 else torch.zeros_like(g)

        z = torch.randn(op.dim, generator=gen, dtype=F64)
        radius = rho * float(torch.rand((), generator=gen, dtype=F64)) ** (1.0 / op.dim)
        u = (z * (radius / float(z.norm()))).to(op.device)  # uniform in the ball
    else:

        def project(u: Tensor) -> Tensor:
            return u.clamp(-rho, rho)

        def direction(g: Tensor) -> Tensor:
            return g.sign()

        u = (rho * (2.0 * torch.rand(op.dim, generator=gen, dtype=F64) - 1.0)).to(op.device)  # uniform in the box

    def value_and_grad(u: Tensor) -> tuple[float, Tensor]:
        value, grad = _loss_and_gradient(op, scale * u)
        return value, scale * grad  # the gradient with respect to u

    loss0, _ = _loss_and_gradient(op, torch.zeros(op.dim, dtype=F64, device=op.device))
    checkpoints = _apgd_checkpoints(steps)
    eta = 2.0 * rho
    value, grad = value_and_grad(u)
    best_value, best_u, best_grad = value, u, grad
    previous, successes, last_check, eta_at_check, best_at_check = u, 0, 0, eta, best_value
    for k in range(steps):
        z = project(u + eta * direction(grad))
        new = z if k == 0 else project(u + _APGD_MOMENTUM * (z - u) + (1.0 - _APGD_MOMENTUM) * (u - previous))
        new_value, new_grad = value_and_grad(new)
        if new_value > value:  # NaN is no success
            successes += 1
        previous, u, value, grad = u, new, new_value, new_grad
        if value > best_value:
            best_value, best_u, best_grad = value, u, grad
        if k + 1 in checkpoints:
            too_few = successes < _APGD_SUCCESS * (k + 1 - last_check)
            stalled = eta == eta_at_check and best_value == best_at_check
            eta_at_check, best_at_check = eta, best_value
            if too_few or stalled:  # halve the step and restart from the best point
                eta /= 2.0
                u, value, grad = best_u, best_value, best_grad
                previous = u
            successes, last_check = 0, k + 1
    best = max(best_value, loss0) if math.isfinite(best_value) else loss0
    return best - loss0, loss0, steps


def adaptive_sharpness(
    model: nn.Module,
    probe: ProbeSet,
    *,
    rho: float,
    norm: str = "2",
    kind: str = "worst",
    m: int = 0,
    steps: int = 20,
    draws: int = 10,
    draws_per_pass: int = 1,
    seed: int = 0,
    wrt: Sequence[str] | None = None,
    loss: str = "cross_entropy",
) -> AdaptiveSharpness:
    r"""Adaptive sharpness (Kwon et al. 2021, ASAM; Andriushchenko et al. 2023): the loss increase in a neighbourhood
    whose size along each weight is proportional to that weight's magnitude.

    .. math:: S_{worst} = \mathbb E_B \max_{\lVert \delta \oslash |w| \rVert_p \le \rho} L_B(w + \delta) - L_B(w),
              \qquad S_{avg} = \mathbb E_{z} L(w + \rho\,|w| \odot z) - L(w)

    - ``kind="worst"``: for each batch B of ``m`` samples of the probe set (m-sharpness, in probe order; ``m = 0``:
      the whole set), the maximum over :math:`u = \delta / |w|` in the p-ball of radius ρ, ``norm`` ``"2"`` or
      ``"inf"``, by Auto-PGD as in Andriushchenko et al.'s code (Croce & Hein 2020): from a seeded point uniform in
      the ball, ``steps`` steps of :math:`z = \Pi(u + \eta\, d(g_u))`, :math:`d` the normalised gradient (l2) or its
      sign (l∞), then momentum :math:`u \leftarrow \Pi(u + 0.75 (z - u) + 0.25 (u - u_{prev}))`; the step
      starts at :math:`\eta = 2\rho` and is halved, restarting from the best point, at Auto-PGD's checkpoints where
      fewer than 75 % of the steps since the last one raised the loss or nothing improved. The value is the mean of
      the batches' increases weighted by their sizes (equal batches: the plain mean). A lower bound of the maximum.
    - ``kind="average"``: the expected increase over ``draws`` fixed draws :math:`z_k`, standard normal (``"2"``) or
      uniform in [-1, 1] (``"inf"``: uniform in the l∞ ball of radius ρ), on the whole probe set: with the same
      draws for every batch the batch-weighted mean equals it, so ``m`` plays no part.

    Both are invariant under any rescaling :math:`w \mapsto T w` (T positive diagonal) that leaves the function
    unchanged, such as Dinh et al.'s (2017) layer-pair rescaling of a ReLU network (:mod:`pipeline.curvature.reparam`):
    the neighbourhood, the draws and the ascent's iterates all move with T. A weight that is exactly 0 is not
    perturbed. At a minimum of a quadratic :math:`\tfrac12 (w - w^*)^\top A (w - w^*)` the l2 worst case is
    :math:`\tfrac12 \rho^2 \lambda_{max}(DAD)` with :math:`D = \mathrm{diag}|w^*|`.

    Args:
        model: the network, in eval mode (checked); never modified.
        probe: the probe set.
        rho: the neighbourhood's size, > 0 (the p-ball's radius; the draws' scale in the average case).
        norm: ``"2"`` or ``"inf"``.
        kind: ``"worst"`` or ``"average"``.
        m: samples per batch of the worst case, >= 0 (0: the whole probe set as one batch).
        steps: Auto-PGD steps per batch (Andriushchenko et al.: 20).
        draws: noise draws of the average case.
        draws_per_pass: draws evaluated together through ``torch.func.vmap``.
        seed: seeds the random starts (batch b: ``seed + b``) and the draws.
        wrt: parameter names perturbed (default: all trainable ones); the rest are held fixed.
        loss: ``cross_entropy`` or ``mse``.

    Raises:
        CurvatureError: a bad argument (the message names it), a non-repeatable model or a non-finite loss at w.
    """
    rho = check_positive("rho", rho)
    if norm not in ADAPTIVE_NORMS:
        raise CurvatureError(f"norm: unknown name {norm!r}; allowed: {', '.join(ADAPTIVE_NORMS)}")
    if kind not in ADAPTIVE_KINDS:
        raise CurvatureError(f"kind: unknown name {kind!r}; allowed: {', '.join(ADAPTIVE_KINDS)}")
    m = check_int("m", m, 0)
    steps = check_int("steps", steps, 1)
    draws = check_int("draws", draws, 1)
    draws_per_pass = check_int("draws_per_pass", draws_per_pass, 1)
    seed = check_int("seed", seed, 0)
    whole = CurvatureOperator(model, probe, wrt=wrt, loss=loss)
    scale = whole.flatten(whole.point).abs()
    n = whole.n

    if kind == "average":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        shape = (draws, whole.dim)
        if norm == "2":
            z = torch.randn(*shape, generator=gen, dtype=F64)
        else:
            z = 2.0 * torch.rand(*shape, generator=gen, dtype=F64) - 1.0
        noise = (rho * z.to(whole.device) * scale).to(whole.dtype)
        loss0 = _perturbed_losses(whole, torch.zeros(1, whole.dim, dtype=whole.dtype, device=whole.device))[0]
        if not math.isfinite(loss0):
            raise CurvatureError(f"adaptive_sharpness: the loss at w is not finite ({loss0})")
        losses = [v for chunk in noise.split(draws_per_pass) for v in _perturbed_losses(whole, chunk)]
        increase = sum(losses) / draws - loss0
        return AdaptiveSharpness(
            kind=kind,
            norm=norm,
            rho=rho,
            m=n,
            loss=loss0,
            value=increase,
            per_batch=(increase,),
            steps=0,
            draws=draws,
            gradient_evaluations=0.0,
            loss_evaluations=float(whole.forwards),
            account=account(whole),
        )

    x = torch.cat([bx for bx, _ in whole.probe.batches])
    y = torch.cat([by for _, by in whole.probe.batches])
    size = n if m == 0 else min(m, n)
    increases, losses, sizes, taken, gradients, forwards = [], [], [], 0, 0.0, float(whole.forwards)
    for b, (bx, by) in enumerate(zip(x.split(size), y.split(size))):
        batch = ProbeSet(((bx, by),))
        op = CurvatureOperator(model, batch, wrt=wrt, loss=loss, check=False)  # `whole` checked the model once
        increase, loss_b, steps_b = _adaptive_worst_batch(op, scale, norm, rho, steps, seed + b)
        if not math.isfinite(loss_b):
            raise CurvatureError(f"adaptive_sharpness: the loss at w is not finite on batch {b} ({loss_b})")
        increases.append(increase)
        losses.append(loss_b)
        sizes.append(len(bx))
        taken += steps_b
        gradients += op.gradients * len(bx) / n
        forwards += op.forwards * len(bx) / n
    value = sum(v * s for v, s in zip(increases, sizes)) / n
    return AdaptiveSharpness(
        kind=kind,
        norm=norm,
        rho=rho,
        m=size,
        loss=sum(v * s for v, s in zip(losses, sizes)) / n,
        value=value,
        per_batch=tuple(increases),
        steps=taken,
        draws=0,
        gradient_evaluations=gradients,
        loss_evaluations=forwards,
        account={**account(whole), "gradients": gradients, "forwards": forwards},
    )
