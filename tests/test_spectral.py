"""Matrix-free spectral tools on explicit symmetric matrices with known spectra."""

import math

import pytest
import torch

from pipeline.curvature.density import slq, smooth_density
from pipeline.curvature.eigen import arpack, lanczos, power_iteration
from pipeline.curvature.trace import hutchinson, hutchpp

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Small dense reference computations: multithreaded BLAS only adds spin-waiting on a busy CPU (seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


class Op:
    """A = Q diag(lam) Q^T with a seeded random orthogonal Q; counts matvecs."""

    def __init__(self, lam, seed: int = 0):
        self.lam = torch.as_tensor(lam, dtype=F64)
        self.dim = len(self.lam)
        self.q = random_orthogonal(self.dim, seed)
        a = (self.q * self.lam) @ self.q.T
        self.a = (a + a.T) / 2
        self.calls = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.a @ v

    def true_residuals(self, values, vectors):
        return torch.stack([(self.a @ v - lam * v).norm() for lam, v in zip(values, vectors)])


def spread(n: int, lo: float, hi: float, seed: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def mixed_spectrum():
    """Decaying positive tail 10 * 0.7^i plus ten negative eigenvalues down to -2 (dim 200)."""
    negatives = torch.tensor([-0.1, -0.2, -0.3, -0.5, -0.7, -0.8, -0.9, -1.0, -1.5, -2.0], dtype=F64)
    return torch.cat([10 * 0.7 ** torch.arange(190, dtype=F64), negatives])


def small_gap_spectrum():
    return torch.cat([torch.tensor([1.0, 0.95], dtype=F64), spread(198, 0.0, 0.9, seed=5)])


# ------------------------------------------------------------------------------------------------- lanczos


def test_lanczos_top_and_bottom_match_eigvalsh():
    op = Op(mixed_spectrum(), seed=0)
    exact = torch.linalg.eigvalsh(op.a)
    largest, smallest = lanczos(op, op.dim, k_largest=5, k_smallest=1, tol=1e-6)
    scale = float(exact.abs().max())
    assert torch.allclose(largest.eigenvalues, exact.flip(0)[:5], rtol=1e-8, atol=1e-8 * scale)
    assert torch.allclose(smallest.eigenvalues, exact[:1], rtol=1e-8, atol=1e-8 * scale)
    assert largest.method == "lanczos" and largest.converged.all() and smallest.converged.all()
    # one shared run: one total, counted exactly, with one residual matvec per returned pair
    assert largest.matvecs == smallest.matvecs == op.calls
    assert len(largest.history) == op.calls - 6
    assert largest.history[-1] == pytest.approx(float(exact[-1]), rel=1e-10)
    for res in (largest, smallest):
        true = op.true_residuals(res.eigenvalues, res.eigenvectors)
        assert torch.allclose(res.residuals, true, rtol=1e-6, atol=1e-13)
        assert (res.residuals <= 2e-6 * scale).all()
    vecs = torch.cat([largest.eigenvectors, smallest.eigenvectors])
    assert torch.allclose(vecs @ vecs.T, torch.eye(6, dtype=F64), atol=1e-10)
    # all six eigenvalues are simple: the vectors align with the true eigenvectors (column i of Q has lam[i])
    true_vecs = op.q[:, [0, 1, 2, 3, 4, 199]].T
    assert torch.allclose((vecs * true_vecs).sum(1).abs(), torch.ones(6, dtype=F64), atol=1e-8)


def test_lanczos_thick_restart_on_clustered_top():
    lam = torch.cat([torch.tensor([1.0, 0.99, 0.98, 0.97], dtype=F64), spread(296, 0.0, 0.9, seed=1)])
    op = Op(lam, seed=1)
    largest, smallest = lanczos(op, op.dim, k_largest=3, max_basis=12, tol=1e-7)
    assert smallest is None
    assert largest.matvecs == op.calls > 3 * 12  # several restarts of a 12-vector basis
    assert largest.converged.all()
    assert torch.allclose(largest.eigenvalues, torch.tensor([1.0, 0.99, 0.98], dtype=F64), rtol=1e-10, atol=0)
    assert (op.true_residuals(largest.eigenvalues, largest.eigenvectors) <= 1e-6).all()


def test_lanczos_tiny_dim_spans_everything():
    op = Op([3.0, 2.0, 1.0, 0.0, -1.0, -2.0], seed=3)
    largest, smallest = lanczos(op, 6, k_largest=5, k_smallest=1)
    assert torch.allclose(largest.eigenvalues, torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0], dtype=F64), atol=1e-12)
    assert torch.allclose(smallest.eigenvalues, torch.tensor([-2.0], dtype=F64), atol=1e-12)
    assert largest.converged.all() and (largest.residuals < 1e-12).all()
    assert largest.matvecs == op.calls == 6 + 6


def test_lanczos_breakdown_finds_repeated_eigenvalues():
    # three distinct eigenvalues: every Krylov space is invariant after three steps
    lam = torch.cat([torch.full((10,), 5.0), torch.full((20,), 1.0), torch.full((20,), -2.0)]).to(F64)
    op = Op(lam, seed=2)
    largest, smallest = lanczos(op, 50, k_largest=4, k_smallest=2)
    assert torch.allclose(largest.eigenvalues, torch.full((4,), 5.0, dtype=F64), atol=1e-12)
    assert torch.allclose(smallest.eigenvalues, torch.full((2,), -2.0, dtype=F64), atol=1e-12)
    for res in (largest, smallest):
        assert torch.isfinite(res.eigenvectors).all() and res.converged.all() and (res.residuals < 1e-12).all()
    vecs = torch.cat([largest.eigenvectors, smallest.eigenvectors])
    assert torch.allclose(vecs @ vecs.T, torch.eye(6, dtype=F64), atol=1e-10)  # distinct copies, not repeats
    assert largest.matvecs == op.calls < 30


def test_lanczos_breakdown_with_restarts_at_the_smallest_basis():
    # k + 3 vectors: each breakdown forces a restart that must keep the exact copies found so far
    lam = torch.cat([torch.full((6,), -0.03), torch.full((4,), -0.3), torch.full((10,), -0.5)]).to(F64)
    op = Op(lam, seed=20)
    largest, _ = lanczos(op, 20, k_largest=5, max_basis=8)
    assert torch.allclose(largest.eigenvalues, torch.full((5,), -0.03, dtype=F64), atol=1e-12)
    assert largest.converged.all() and largest.matvecs == op.calls


def test_lanczos_smallest_only():
    op = Op(mixed_spectrum(), seed=21)
    largest, smallest = lanczos(op, op.dim, k_largest=0, k_smallest=2)
    assert largest.eigenvalues.shape == (0,) and largest.eigenvectors.shape == (0, op.dim)
    assert torch.allclose(smallest.eigenvalues, torch.tensor([-2.0, -1.5], dtype=F64), atol=1e-9)
    assert smallest.history[-1] == pytest.approx(-2.0, abs=1e-9)  # history follows the first wanted: the bottom


def test_lanczos_zero_operator_is_handled():
    largest, _ = lanczos(lambda v: torch.zeros_like(v), 20, k_largest=2)
    assert torch.equal(largest.eigenvalues, torch.zeros(2, dtype=F64)) and largest.converged.all()


def test_lanczos_warm_start_needs_far_fewer_matvecs():
    op = Op(small_gap_spectrum(), seed=4)
    cold, _ = lanczos(op, op.dim, k_largest=1, tol=1e-6)
    noise = 1e-5 * torch.randn(op.dim, generator=torch.Generator().manual_seed(9), dtype=F64)
    warm, _ = lanczos(op, op.dim, k_largest=1, tol=1e-6, v0=op.q[:, 0] + noise)
    assert cold.converged.all() and warm.converged.all()
    assert warm.eigenvalues[0] == pytest.approx(1.0, abs=1e-10)
    assert cold.eigenvalues[0] == pytest.approx(1.0, abs=1e-10)
    assert warm.matvecs * 3 < cold.matvecs


def test_lanczos_budget_exhausted_returns_unconverged():
    op = Op(small_gap_spectrum(), seed=4)
    largest, _ = lanczos(op, op.dim, k_largest=2, tol=1e-12, max_matvecs=8)
    assert op.calls == largest.matvecs == 8
    assert not largest.converged.all() and torch.isfinite(largest.eigenvalues).all()


# ------------------------------------------------------------------------------------------ power and arpack


def test_power_iteration_largest_magnitude_with_deflation():
    lam = torch.cat([torch.tensor([-5.0, 2.0], dtype=F64), spread(98, 0.0, 1.0, seed=6)])
    op = Op(lam, seed=6)
    res = power_iteration(op, 100, k=2, tol=1e-6)
    assert res.method == "power" and res.converged.all()
    assert res.eigenvalues[0] == pytest.approx(-5.0, rel=1e-5)
    assert res.eigenvalues[1] == pytest.approx(2.0, rel=1e-5)
    assert res.matvecs == op.calls and len(res.history) < op.calls  # history covers the first eigenvalue only
    assert res.history[-1] == float(res.eigenvalues[0])
    assert torch.allclose(res.residuals, op.true_residuals(res.eigenvalues, res.eigenvectors), rtol=1e-9, atol=1e-14)
    assert torch.allclose(res.eigenvectors.norm(dim=1), torch.ones(2, dtype=F64), atol=1e-14)


def test_power_relative_change_rule_stops_early_lanczos_wins():
    op = Op(small_gap_spectrum(), seed=7)
    power = power_iteration(op, op.dim, k=1, tol=1e-3)
    assert power.converged.all() and power.matvecs == len(power.history) < 100
    # the rule: the last two estimates differ by less than tol in relative terms
    assert abs(power.history[-1] - power.history[-2]) / (abs(power.history[-2]) + 1e-6) < 1e-3
    assert abs(power.history[-2] - power.history[-3]) / (abs(power.history[-3]) + 1e-6) >= 1e-3
    krylov, _ = lanczos(op, op.dim, k_largest=1, tol=1e-6)
    power_error, lanczos_error = abs(float(power.eigenvalues[0]) - 1.0), abs(float(krylov.eigenvalues[0]) - 1.0)
    assert power_error > 1e-4 and lanczos_error < 1e-10
    assert krylov.matvecs < power.matvecs


def test_arpack_agrees_with_lanczos():
    op = Op(mixed_spectrum(), seed=8)
    lan_top, lan_bottom = lanczos(op, op.dim, k_largest=4, k_smallest=2, tol=1e-10)
    op.calls = 0
    arp_top, arp_bottom = arpack(op, op.dim, k_largest=4, k_smallest=2, tol=1e-10)
    assert arp_top.method == "arpack" and arp_top.matvecs == arp_bottom.matvecs == op.calls
    assert torch.allclose(arp_top.eigenvalues, lan_top.eigenvalues, rtol=1e-8, atol=1e-8)
    assert torch.allclose(arp_bottom.eigenvalues, lan_bottom.eigenvalues, rtol=1e-8, atol=1e-8)
    assert torch.allclose(
        arp_top.residuals, op.true_residuals(arp_top.eigenvalues, arp_top.eigenvectors), rtol=1e-6, atol=1e-13
    )


def test_arpack_all_pairs_falls_back_to_dense():
    op = Op([4.0, 1.0, -3.0], seed=9)
    top, bottom = arpack(op, 3, k_largest=3)
    assert bottom is None and torch.allclose(top.eigenvalues, torch.tensor([4.0, 1.0, -3.0], dtype=F64))
    assert top.matvecs == op.calls == 3 + 3


# ---------------------------------------------------------------------------------------------------- trace


def test_hutchinson_error_and_stderr_match_theory():
    op = Op(spread(100, -1.0, 3.0, seed=10), seed=10)
    est = hutchinson(op, 100, samples=200, seed=1)
    trace = float(op.lam.sum())
    assert est.method == "hutchinson" and est.samples == 200 and est.matvecs == op.calls == 200
    assert abs(est.value - trace) <= 3 * est.stderr
    theory = math.sqrt(2 * (float((op.a**2).sum()) - float((op.a.diagonal() ** 2).sum())) / 200)
    assert est.stderr == pytest.approx(theory, rel=0.3)


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    op = Op(0.6 ** torch.arange(300, dtype=F64), seed=11)
    trace = float(op.lam.sum())
    errors_pp, errors_h = [], []
    for seed in range(5):
        op.calls = 0
        pp = hutchpp(op, 300, matvecs=30, seed=seed)
        assert pp.matvecs == op.calls == 30 and pp.samples == 20 and pp.method == "hutchpp"
        errors_pp.append(abs(pp.value - trace))
        errors_h.append(abs(hutchinson(op, 300, samples=30, seed=seed).value - trace))
        assert abs(pp.value - trace) <= 4 * pp.stderr + 1e-12
    assert max(errors_pp) < 0.05 * sum(errors_h) / 5


def test_hutchpp_exact_on_small_dim():
    op = Op(spread(10, -2.0, 5.0, seed=12), seed=12)
    est = hutchpp(op, 10, matvecs=99)
    assert est.value == pytest.approx(float(op.lam.sum()), abs=1e-12)
    assert est.stderr == 0.0 and est.matvecs == op.calls == 10


# ------------------------------------------------------------------------------------------------------ slq


def two_clusters():
    return torch.cat([spread(150, -0.1, 0.1, seed=13), spread(50, 9.5, 10.5, seed=14)])


def test_slq_weights_density_and_mass_location():
    op = Op(two_clusters(), seed=13)
    density = slq(op, 200, runs=10, steps=80, seed=0)
    assert density.nodes.shape == density.weights.shape == (10, 80)
    assert density.matvecs == op.calls == 800
    assert float(density.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(density.nodes.max()) == pytest.approx(float(op.lam.max()), rel=1e-6)
    high = float(density.weights[density.nodes > 5].sum())
    assert high == pytest.approx(0.25, abs=0.08)
    assert float(density.weights[density.nodes.abs() < 1].sum()) == pytest.approx(0.75, abs=0.08)
    grid, rho = smooth_density(density)
    assert grid.shape == rho.shape == (1000,) and (rho >= 0).all()
    assert float(torch.trapezoid(rho, grid)) == pytest.approx(1.0, abs=1e-3)
    upper = grid > 5
    assert float(torch.trapezoid(rho[upper], grid[upper])) == pytest.approx(high, abs=1e-3)


def test_slq_breakdown_pads_with_zero_weight():
    lam = torch.cat([torch.full((20,), 2.0), torch.full((20,), -1.0)]).to(F64)
    op = Op(lam, seed=15)
    density = slq(op, 40, runs=3, steps=10)
    assert density.nodes.shape == (3, 10) and torch.isfinite(density.nodes).all()
    assert density.matvecs == op.calls == 3 * 2  # two steps span the invariant space
    assert torch.allclose(density.nodes[:, :2], torch.tensor([-1.0, 2.0], dtype=F64).expand(3, 2), atol=1e-12)
    assert (density.weights[:, 2:] == 0).all() and (density.nodes[:, 2:] == density.nodes[:, 1:2]).all()
    assert float(density.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    grid, rho = smooth_density(density, sigma=0.05, grid=torch.linspace(-3, 4, 2001, dtype=F64))
    assert float(torch.trapezoid(rho, grid)) == pytest.approx(1.0, abs=1e-6)


def test_slq_steps_capped_at_dim():
    op = Op(spread(8, 0.0, 1.0, seed=16), seed=16)
    density = slq(op, 8, runs=2, steps=80)
    assert density.nodes.shape == (2, 8) and density.matvecs == 16
    assert float(density.weights.sum()) == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------------- determinism and errors


def test_same_seed_same_results_different_seed_differs():
    op = Op(mixed_spectrum(), seed=17)
    a, _ = lanczos(op, 200, k_largest=2, seed=3)
    b, _ = lanczos(op, 200, k_largest=2, seed=3)
    c, _ = lanczos(op, 200, k_largest=2, seed=4)
    assert a.history == b.history and torch.equal(a.eigenvectors, b.eigenvectors) and a.matvecs == b.matvecs
    assert c.history[0] != a.history[0]
    assert hutchinson(op, 200, samples=5, seed=3) == hutchinson(op, 200, samples=5, seed=3)
    assert hutchinson(op, 200, samples=5, seed=3).value != hutchinson(op, 200, samples=5, seed=4).value
    d1, d2 = slq(op, 200, runs=2, steps=5, seed=3), slq(op, 200, runs=2, steps=5, seed=3)
    assert torch.equal(d1.nodes, d2.nodes) and torch.equal(d1.weights, d2.weights)
    assert not torch.equal(slq(op, 200, runs=2, steps=5, seed=4).weights, d1.weights)
    p1, p2 = power_iteration(op, 200, seed=3), power_iteration(op, 200, seed=3)
    assert p1.history == p2.history and p1.history[0] != power_iteration(op, 200, seed=4).history[0]


MV = lambda v: v  # noqa: E731


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: lanczos(MV, 5, k_largest=4, k_smallest=2), "k_largest + k_smallest"),
        (lambda: lanczos(MV, 5, k_largest=0, k_smallest=0), "k_largest + k_smallest"),
        (lambda: lanczos(MV, 5, k_largest=-1), "k_largest"),
        (lambda: lanczos(MV, 5, k_largest=1, k_smallest=-1), "k_smallest"),
        (lambda: lanczos(MV, 5, k_largest=1, tol=0.0), "tol"),
        (lambda: lanczos(MV, 0, k_largest=1), "dim"),
        (lambda: lanczos(MV, 5.0, k_largest=1), "dim"),
        (lambda: lanczos(MV, 100, k_largest=5, max_basis=5), "max_basis"),
        (lambda: lanczos(MV, 100, k_largest=4, k_smallest=1, max_basis=7), "max_basis"),
        (lambda: lanczos(MV, 100, k_largest=5, max_matvecs=9), "max_matvecs"),
        (lambda: lanczos(MV, 5, k_largest=1, v0=torch.zeros(5, dtype=F64)), "v0"),
        (lambda: lanczos(MV, 5, k_largest=1, v0=torch.ones(4, dtype=F64)), "v0"),
        (lambda: power_iteration(MV, 5, k=0), "k"),
        (lambda: power_iteration(MV, 5, k=6), "k"),
        (lambda: power_iteration(MV, 5, tol=-1.0), "tol"),
        (lambda: power_iteration(MV, 5, max_iter=0), "max_iter"),
        (lambda: arpack(MV, 5, k_largest=6), "k_largest + k_smallest"),
        (lambda: arpack(MV, -3, k_largest=1), "dim"),
        (lambda: hutchinson(MV, 5, samples=1), "samples"),
        (lambda: hutchpp(MV, 50, matvecs=3), "matvecs"),
        (lambda: slq(MV, 5, runs=0), "runs"),
        (lambda: slq(MV, 5, steps=0), "steps"),
        (lambda: smooth_density(slq(MV, 5, runs=1, steps=2), sigma=0.0), "sigma"),
        (lambda: lanczos(lambda v: v.float(), 5, k_largest=1), "matvec"),
    ],
)
def test_argument_errors_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name.replace("+", r"\+")) as err:
        call()
    assert "\n" not in str(err.value)
