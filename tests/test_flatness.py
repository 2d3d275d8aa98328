"""Flatness measures against closed forms: ε-sharpness and PAC-Bayes σ on an exact quadratic, and a small MLP."""

import itertools
import math

import pytest
import torch
from torch import nn

from pipeline.curvature._checks import CurvatureError
from pipeline.curvature.flatness import adaptive_sharpness, epsilon_sharpness, noise_draws, pac_bayes_sigma
from pipeline.curvature.operators import HessianOperator, ProbeSet, dense_matrix

F64 = torch.float64
EIGENVALUES = (4.0, 1.5, 1.0, 0.6, 0.3, 0.1)  # of the quadratic's Hessian A


def quadratic(offset: float = 0.0):
    """Linear model, one output, mean squared error: L(w) = |Xw - y|^2 / N = 1/2 (w - w*)^T A (w - w*) exactly.

    A = 2 X^T X / N with the spectrum EIGENVALUES, y = X w* (so L(w*) = 0), 23 samples in batches of 10, 10 and 3;
    the model's weights are w* + offset * (a seeded random vector).
    Returns (model, probe, A, w*).
    """
    n, d = 23, len(EIGENVALUES)
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=F64))  # (n, d) orthonormal columns
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    X = U @ torch.diag((torch.tensor(EIGENVALUES, dtype=F64) * n / 2).sqrt()) @ V.T
    w_star = torch.randn(d, generator=g, dtype=F64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + offset * torch.randn(d, generator=g, dtype=F64)).unsqueeze(0))
    probe = ProbeSet.from_tensors(X, (X @ w_star).unsqueeze(1), 10)
    return model, probe, 2 * X.T @ X / n, w_star


def top_eigenvector(A):
    return torch.linalg.eigh(A).eigenvectors[:, -1]


def test_quadratic_construction_is_exact():
    model, probe, A, _ = quadratic()
    assert [len(x) for x, _ in probe.batches] == [10, 10, 3]
    H = dense_matrix(HessianOperator(model, probe, loss="mse"))
    assert torch.allclose(H, A, rtol=0, atol=1e-12)
    assert torch.allclose(torch.linalg.eigvalsh(A), torch.tensor(sorted(EIGENVALUES), dtype=F64), atol=1e-12)


# ----------------------------------------------------------------------------------------------- ε-sharpness


def test_absolute_sharpness_at_a_minimum_is_half_lambda_max_epsilon_squared():
    model, probe, A, _ = quadratic()
    eps = 0.3
    res = epsilon_sharpness(model, probe, epsilon=eps, steps=40, loss="mse")
    exact = 0.5 * max(EIGENVALUES) * eps**2
    assert res.loss < 1e-28
    assert abs(res.increase / exact - 1) <= 1e-6
    assert res.keskar == pytest.approx(100 * res.increase / (1 + res.loss), rel=1e-15)
    u = res.perturbation
    assert float(u.norm()) == pytest.approx(eps, rel=1e-12)  # on the sphere
    assert abs(float(u @ top_eigenvector(A))) / eps >= 1 - 1e-6  # along the top eigenvector
    # The gradient-step start is skipped where the gradient at the minimum rounds to exactly zero, which depends on
    # the kernels' rounding: either way the random start alone finds the maximum (checked above).
    assert res.starts in (1, 2) and res.steps <= res.starts * 40
    assert res.gradient_evaluations == 1 + res.starts + res.steps
    # Started on the top eigenvector, the ascent is at a fixed point at once: exact, no step spent on that start.
    res_v = epsilon_sharpness(
        model, probe, epsilon=eps, steps=40, loss="mse", gradient_start=False, directions=[top_eigenvector(A)]
    )
    assert res_v.starts == res.starts + 1
    assert res_v.increase == pytest.approx(exact, rel=1e-12)


def trust_region_maximum(A, g, eps):
    """max over |u| <= eps of g^T u + 1/2 u^T A u (A >= 0): u = (mu I - A)^{-1} g with mu > lambda_max and |u| = eps."""
    lam, Q = torch.linalg.eigh(A)
    b = Q.T @ g
    lo, hi = float(lam[-1]), float(lam[-1]) + float(g.norm()) / eps  # |u(hi)| <= eps < |u(lo+)|
    for _ in range(200):
        mu = 0.5 * (lo + hi)
        lo, hi = (mu, hi) if float((b / (mu - lam)).norm()) > eps else (lo, mu)
    u = Q @ (b / (hi - lam))
    return float(g @ u + 0.5 * u @ A @ u), u


def test_absolute_sharpness_away_from_the_minimum_solves_the_trust_region_problem():
    """With a gradient, the maximum over the ball is the trust-region subproblem's (secular equation)."""
    model, probe, A, w_star = quadratic(offset=0.1)
    eps = 0.3
    w = model.weight.detach().reshape(-1)
    exact, u_star = trust_region_maximum(A, A @ (w - w_star), eps)
    res = epsilon_sharpness(model, probe, epsilon=eps, steps=40, loss="mse")
    assert abs(res.increase / exact - 1) <= 1e-9
    assert float((res.perturbation - u_star).norm()) <= 1e-4 * eps


def test_relative_sharpness_within_the_box_bounds():
    """Keskar's box |u_i| <= eps (|w_i| + 1): a convex quadratic's maximum is at one of its 2^6 vertices."""
    model, probe, A, w_star = quadratic()
    eps = 0.1
    r = eps * (w_star.abs() + 1)
    vertices = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=len(r))), dtype=F64) * r  # (64, 6)
    best_vertex = float((0.5 * torch.einsum("ki,ij,kj->k", vertices, A, vertices)).max())
    linf_bound = 0.5 * float(r @ A.abs() @ r)  # |u^T A u| <= sum_ij |A_ij| r_i r_j
    v1 = top_eigenvector(A)
    corner = 0.5 * float((r * v1.sign()) @ A @ (r * v1.sign()))

    res = epsilon_sharpness(model, probe, epsilon=eps, neighbourhood="relative", loss="mse")
    assert bool((res.perturbation.abs() <= r * (1 + 1e-15)).all())
    assert res.increase <= best_vertex * (1 + 1e-12) <= linf_bound
    assert res.increase > 0.5 * best_vertex  # a local maximum (vertex whose sign pattern is its gradient's)

    res_v = epsilon_sharpness(model, probe, epsilon=eps, neighbourhood="relative", loss="mse", directions=[v1])
    assert corner * (1 - 1e-12) <= res_v.increase <= best_vertex * (1 + 1e-12)
    # On this instance the top eigenvector's sign pattern leads to the best vertex (not guaranteed in general).
    assert res_v.increase == pytest.approx(best_vertex, rel=1e-12)
    assert bool((res_v.perturbation.abs() == r).all())  # at a vertex
    assert res_v.keskar == pytest.approx(100 * res_v.increase, rel=1e-12)  # L(w*) = 0


# ----------------------------------------------------------------------------------------------- PAC-Bayes σ


def test_pac_bayes_sigma_matches_the_closed_form_of_the_same_draws():
    """E_u L(w* + u) - L(w*) = 1/2 sigma^2 mean_k z_k^T A z_k for the K fixed draws, so sigma = sqrt(bound / c)."""
    model, probe, A, _ = quadratic()
    bound, draws, rtol = 0.1, 10, 1e-9
    res = pac_bayes_sigma(model, probe, bound=bound, draws=draws, rtol=rtol, seed=3, loss="mse")
    z = noise_draws(len(EIGENVALUES), draws, 3)
    c = 0.5 * float(torch.einsum("ki,ij,kj->k", z, A, z).mean())
    sigma_star = math.sqrt(bound / c)
    assert abs(res.sigma / sigma_star - 1) <= rtol
    assert res.sigma <= sigma_star * (1 + 1e-12) < res.sigma_upper * (1 + 1e-12)
    assert res.sigma_upper / res.sigma <= 1 + rtol
    assert res.increase <= bound and res.increase == pytest.approx(c * res.sigma**2, rel=1e-12)
    assert res.flatness == pytest.approx(1 / res.sigma**2)
    assert res.loss_evaluations == 1 + draws * (res.bracket_evaluations + res.iterations)
    assert res.draws == draws and not res.magnitude_aware and res.magnitude_epsilon == 0.0


def test_pac_bayes_sigma_approaches_the_expectation_with_many_draws():
    """Population closed form sigma* = sqrt(2 bound / tr A); 400 draws, evaluated 400 at a time (vmap)."""
    model, probe, A, _ = quadratic()
    res = pac_bayes_sigma(model, probe, draws=400, draws_per_pass=400, rtol=1e-6, loss="mse")
    z = noise_draws(len(EIGENVALUES), 400, 0)
    c = 0.5 * float(torch.einsum("ki,ij,kj->k", z, A, z).mean())
    assert abs(res.sigma / math.sqrt(0.1 / c) - 1) <= 1e-6  # the sample closed form, vectorised path
    # Relative std of the sample mean of z^T A z: sqrt(2 tr(A^2) / K) / tr(A) = 3 %; 15 % is five of them.
    assert res.sigma == pytest.approx(math.sqrt(2 * 0.1 / float(A.trace())), rel=0.15)


def test_magnitude_aware_sigma_matches_the_closed_form():
    """u_i = sigma sqrt(w_i^2 + eps_mag^2) z_i: c = 1/2 mean_k (s z_k)^T A (s z_k)."""
    model, probe, A, w_star = quadratic()
    res = pac_bayes_sigma(model, probe, bound=0.05, magnitude_aware=True, magnitude_epsilon=0.5, rtol=1e-9, loss="mse")
    sz = noise_draws(len(EIGENVALUES), 10, 0) * (w_star**2 + 0.25).sqrt()
    c = 0.5 * float(torch.einsum("ki,ij,kj->k", sz, A, sz).mean())
    assert abs(res.sigma / math.sqrt(0.05 / c) - 1) <= 1e-9
    assert res.magnitude_aware and res.magnitude_epsilon == 0.5


def test_a_loss_that_never_reaches_the_bound_is_reported():
    """Inputs all zero: the loss does not depend on the weights, so no sigma crosses the bound."""
    model = nn.Linear(3, 1, bias=False).double()
    probe = ProbeSet.from_tensors(torch.zeros(5, 3, dtype=F64), torch.ones(5, 1, dtype=F64), 5)
    with pytest.raises(CurvatureError, match=r"pac_bayes_sigma: .* stays within bound=0.1 for every sigma"):
        pac_bayes_sigma(model, probe, draws=2, loss="mse")


# ----------------------------------------------------------------------------------------------- small MLP


def bn_mlp():
    """4 -> 6 -> BatchNorm -> tanh -> 3, float64, eval mode with non-trivial running statistics (69 parameters)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    model.train()
    model(torch.randn(32, 4, dtype=F64) * 2 + 1)
    return model.eval()


@pytest.fixture(scope="module")
def mlp_problem():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (11,), generator=g)
    return bn_mlp(), ProbeSet.from_tensors(x, y, 7)


def test_mlp_measures_are_finite_monotone_and_leave_the_model_untouched(mlp_problem):
    model, probe = mlp_problem
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for neighbourhood, epsilons in (("absolute", (0.01, 0.05, 0.25)), ("relative", (1e-3, 1e-2, 1e-1))):
        results = [epsilon_sharpness(model, probe, epsilon=e, neighbourhood=neighbourhood, steps=10) for e in epsilons]
        assert all(math.isfinite(r.max_loss) and math.isfinite(r.keskar) for r in results)
        increases = [r.increase for r in results]
        assert 0 < increases[0] < increases[1] < increases[2], (neighbourhood, increases)
        assert results[0].loss == results[1].loss
    for magnitude_aware in (False, True):
        res = pac_bayes_sigma(model, probe, magnitude_aware=magnitude_aware)
        assert 0 < res.sigma < math.inf and math.isfinite(res.increase) and res.increase <= res.bound == 0.1
        assert res.sigma_upper / res.sigma <= 1.01 and res.iterations >= 1
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_results_are_bitwise_reproducible(mlp_problem):
    model, probe = mlp_problem
    a = epsilon_sharpness(model, probe, epsilon=0.05, steps=5, seed=7)
    b = epsilon_sharpness(model, probe, epsilon=0.05, steps=5, seed=7)
    assert a == b and torch.equal(a.perturbation, b.perturbation)
    c = epsilon_sharpness(model, probe, epsilon=0.05, steps=5, seed=8, gradient_start=False)
    assert not torch.equal(a.perturbation, c.perturbation)
    assert pac_bayes_sigma(model, probe, seed=7) == pac_bayes_sigma(model, probe, seed=7)
    assert pac_bayes_sigma(model, probe, seed=7) != pac_bayes_sigma(model, probe, seed=8)


def test_vectorised_draws_agree_with_the_loop(mlp_problem):
    model, probe = mlp_problem
    loop = pac_bayes_sigma(model, probe, rtol=1e-6, draws=6)
    batched = pac_bayes_sigma(model, probe, rtol=1e-6, draws=6, draws_per_pass=4)  # chunks of 4 and 2
    assert batched.sigma == pytest.approx(loop.sigma, rel=1e-6)
    assert batched.increase == pytest.approx(loop.increase, rel=1e-9, abs=1e-12)


def test_a_subset_of_parameters(mlp_problem):
    model, probe = mlp_problem
    wrt = ["3.weight", "3.bias"]
    res = epsilon_sharpness(model, probe, epsilon=0.05, wrt=wrt, steps=5)
    assert res.names == tuple(wrt) and res.perturbation.shape == (6 * 3 + 3,)
    full = pac_bayes_sigma(model, probe)
    last = pac_bayes_sigma(model, probe, wrt=wrt)
    assert last.sigma > full.sigma  # fewer weights perturbed: more noise allowed per weight


def test_training_mode_model_is_refused():
    model = bn_mlp().train()
    probe = ProbeSet.from_tensors(torch.randn(6, 4, dtype=F64), torch.zeros(6, dtype=torch.long), 3)
    with pytest.raises(CurvatureError, match="not repeatable"):
        pac_bayes_sigma(model, probe)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, p: epsilon_sharpness(m, p, epsilon=0.0), r"^epsilon: must be a finite number > 0, got 0.0$"),
        (lambda m, p: epsilon_sharpness(m, p, epsilon=-1), r"^epsilon: must be a finite number > 0"),
        (lambda m, p: epsilon_sharpness(m, p, epsilon=math.nan), r"^epsilon: must be a finite number > 0"),
        (
            lambda m, p: epsilon_sharpness(m, p, epsilon=0.1, neighbourhood="linf"),
            r"^neighbourhood: unknown name 'linf'",
        ),
        (lambda m, p: epsilon_sharpness(m, p, epsilon=0.1, steps=0), r"^steps: must be an int >= 1, got 0$"),
        (lambda m, p: epsilon_sharpness(m, p, epsilon=0.1, step_size=0), r"^step_size: must be a finite number > 0"),
        (lambda m, p: epsilon_sharpness(m, p, epsilon=0.1, wrt=["nope.weight"]), r"^wrt: unknown parameter names"),
        (lambda m, p: epsilon_sharpness(m, p, epsilon=0.1, directions=[torch.ones(5)]), r"^directions\[0\]: expected"),
        (lambda m, p: epsilon_sharpness(m, p, epsilon=0.1, loss="hinge"), r"^loss: unknown name 'hinge'"),
        (lambda m, p: pac_bayes_sigma(m, p, bound=0.0), r"^bound: must be a finite number > 0, got 0.0$"),
        (lambda m, p: pac_bayes_sigma(m, p, bound=-0.1), r"^bound: must be a finite number > 0"),
        (lambda m, p: pac_bayes_sigma(m, p, draws=0), r"^draws: must be an int >= 1, got 0$"),
        (lambda m, p: pac_bayes_sigma(m, p, rtol=0), r"^rtol: must be a finite number > 0"),
        (
            lambda m, p: pac_bayes_sigma(m, p, magnitude_aware=True, magnitude_epsilon=-1e-3),
            r"^magnitude_epsilon: must be a finite number >= 0",
        ),
        (lambda m, p: pac_bayes_sigma(m, p, seed=-1), r"^seed: must be an int >= 0"),
        (lambda m, p: pac_bayes_sigma(m, p, wrt=["nope.weight"]), r"^wrt: unknown parameter names \['nope.weight'\]"),
    ],
)
def test_bad_arguments_name_the_argument(mlp_problem, call, message):
    model, probe = mlp_problem
    with pytest.raises(CurvatureError, match=message) as info:
        call(model, probe)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------- adaptive sharpness


def test_adaptive_worst_case_l2_at_a_minimum_is_half_rho_squared_lambda_max_of_the_scaled_hessian():
    model, probe, A, w_star = quadratic()
    D = torch.diag(w_star.abs())
    exact_top = float(torch.linalg.eigvalsh(D @ A @ D)[-1])
    for rho in (0.05, 0.3):
        res = adaptive_sharpness(model, probe, rho=rho, norm="2", kind="worst", steps=60, loss="mse")
        assert res.loss < 1e-28
        assert abs(res.value / (0.5 * rho**2 * exact_top) - 1) <= 1e-6
        assert res.per_batch == (res.value,) and res.m == 23  # m = 0: the whole probe set as one batch


def test_adaptive_worst_case_linf_is_a_vertex_value_within_the_box_bound():
    model, probe, A, w_star = quadratic()
    rho = 0.1
    res = adaptive_sharpness(model, probe, rho=rho, norm="inf", kind="worst", steps=40, loss="mse")
    D = torch.diag(w_star.abs())
    M = D @ A @ D
    vertices = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=len(EIGENVALUES))), dtype=F64) * rho
    best = float((0.5 * (vertices @ M * vertices).sum(1)).max())  # a convex quadratic peaks at a vertex of the box
    assert res.value <= best * (1 + 1e-9)
    assert res.value >= 0.5 * best  # Auto-PGD from one start: a good vertex (0.72 of the best here), not the best


def test_adaptive_average_case_matches_the_same_draws_in_closed_form():
    model, probe, A, w_star = quadratic()
    rho, draws = 0.2, 7
    for norm in ("2", "inf"):
        res = adaptive_sharpness(model, probe, rho=rho, norm=norm, kind="average", draws=draws, seed=3, loss="mse")
        gen = torch.Generator().manual_seed(3)
        z = (
            torch.randn(draws, 6, generator=gen, dtype=F64)
            if norm == "2"
            else 2 * torch.rand(draws, 6, generator=gen, dtype=F64) - 1
        )
        delta = rho * z * w_star.abs()
        exact = float((0.5 * (delta @ A * delta).sum(1)).mean())
        assert res.value == pytest.approx(exact, rel=1e-9)


def test_adaptive_m_sharpness_is_the_size_weighted_mean_of_the_batches_own_values():
    model, probe, _, _ = quadratic(offset=0.2)
    whole = adaptive_sharpness(model, probe, rho=0.1, norm="2", m=10, steps=10, loss="mse")
    assert len(whole.per_batch) == 3 and whole.m == 10  # 23 samples: batches of 10, 10 and 3
    x = torch.cat([b for b, _ in probe.batches])
    y = torch.cat([t for _, t in probe.batches])
    singles = [
        adaptive_sharpness(
            model, ProbeSet.from_tensors(x[i:j], y[i:j], 10), rho=0.1, norm="2", steps=10, seed=b, loss="mse"
        )
        for b, (i, j) in enumerate(((0, 10), (10, 20), (20, 23)))
    ]
    assert [s.value for s in singles] == pytest.approx(list(whole.per_batch), rel=1e-12)
    assert whole.value == pytest.approx((10 * singles[0].value + 10 * singles[1].value + 3 * singles[2].value) / 23)
    assert all(v >= 0 for v in whole.per_batch)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rho=0.0), "rho"),
        (dict(rho=0.1, norm="1"), "norm"),
        (dict(rho=0.1, kind="best"), "kind"),
        (dict(rho=0.1, m=-1), "m"),
    ],
)
def test_adaptive_bad_arguments_name_the_argument(kwargs, message):
    model, probe, _, _ = quadratic()
    with pytest.raises(CurvatureError, match=message):
        adaptive_sharpness(model, probe, loss="mse", **kwargs)
