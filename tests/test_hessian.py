"""The curvature report (pipeline.curvature.analysis) against dense float64 ground truth, and checkpoint selection."""

import pytest
import torch
from torch import nn

from pipeline.config import HessianConfig
from pipeline.curvature.analysis import analyse
from pipeline.curvature.density import slq
from pipeline.curvature.dynamics import gradient_noise
from pipeline.curvature.flatness import epsilon_sharpness, pac_bayes_sigma
from pipeline.curvature.operators import GGNOperator, HessianOperator, ProbeSet, dense_matrix, parameter_groups
from pipeline.training.checkpoints import select_checkpoints


def tiny_problem():
    """A 4 -> 6 -> 3 tanh MLP (51 parameters, float64) on 11 samples split into batches of 7 and 4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=g)
    return model, ProbeSet.from_tensors(x, y, 7)


def rows_of(report, quantity, operator="hessian", group="all", method=None):
    return [
        r
        for r in report.rows
        if r["quantity"] == quantity
        and r["operator"] == operator
        and r["group"] == group
        and (method is None or r["method"] == method)
    ]


def config(**overrides):
    base = dict(
        top_k=5,
        tol=1e-10,
        max_hvps=400,
        trace_hvps=45,
        density_runs=3,
        density_steps=51,
        operators=("hessian", "ggn"),
        groups="module",
        group_top_k=2,
    )
    return HessianConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def truth():
    model, probe = tiny_problem()
    H = dense_matrix(HessianOperator(model, probe))
    G = dense_matrix(GGNOperator(model, probe))
    return model, probe, H, G


@pytest.mark.parametrize("method", ["lanczos", "arpack", "power"])
def test_top_eigenvalues_and_lambda_min_match_eigvalsh(truth, method):
    model, probe, H, _ = truth
    exact = torch.linalg.eigvalsh(H)
    cfg = config(method=method, tol=1e-10 if method != "power" else 1e-12, power_iters=3000)
    report = analyse(model, probe, cfg, details=False)
    top = sorted(rows_of(report, "eigenvalue"), key=lambda r: r["index"])
    if method == "power":  # largest magnitude, as PyHessian: compare with the eigenvalues of largest |λ|
        want = exact[exact.abs().argsort(descending=True)[:5]].sort(descending=True).values
        got = torch.tensor(sorted((r["value"] for r in top), reverse=True), dtype=torch.float64)
        assert torch.allclose(got, want, rtol=1e-6, atol=0)
    else:
        got = torch.tensor([r["value"] for r in top], dtype=torch.float64)
        assert torch.allclose(got, exact.flip(0)[:5], rtol=1e-6, atol=0)
        assert all(r["converged"] and r["residual"] <= 1e-7 for r in top)
    low = rows_of(report, "lambda_min")[0]
    assert exact[0] < 0  # the tiny network has negative curvature: the test is not vacuous
    assert low["value"] == pytest.approx(float(exact[0]), rel=1e-6)
    assert report.eigenvectors is not None and report.eigenvalues is not None
    # the saved eigenvectors are eigenvectors of the dense Hessian
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([report.eigenvectors[n].reshape(5, -1) for n in names], dim=1).double()
    residual = (flat @ H - report.eigenvalues[:, None].double() * flat).norm(dim=1)
    assert float(residual.max()) <= 1e-5 * float(exact.abs().max())  # float32 storage of the vectors


def test_details_trace_density_ggn_and_groups(truth):
    model, probe, H, G = truth
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = analyse(model, probe, config(), details=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched

    exact_trace = float(torch.trace(H))
    for method in ("hutchinson", "hutchpp"):
        row = rows_of(report, "trace", method=method)[0]
        assert row["stderr"] > 0 and row["hvps"] == 45
        assert abs(row["value"] - exact_trace) <= 3 * row["stderr"], (method, row, exact_trace)

    density = [r for r in report.density if r["operator"] == "hessian"]
    nodes = [r for r in density if r["kind"] == "node"]
    smoothed = [r for r in density if r["kind"] == "smoothed"]
    assert sum(r["weight"] for r in nodes) == pytest.approx(1.0, abs=1e-12)
    xs = torch.tensor([r["lambda"] for r in smoothed])
    ds = torch.tensor([r["density"] for r in smoothed])
    assert float(torch.trapezoid(ds, xs)) == pytest.approx(1.0, abs=1e-3)
    # with as many steps as dimensions the quadrature nodes are the exact eigenvalues
    exact = torch.linalg.eigvalsh(H)
    heavy = [r["lambda"] for r in nodes if r["weight"] > 1e-3]
    assert max(min(abs(node - float(e)) for e in exact) for node in heavy) <= 1e-6 * float(exact.abs().max())

    ggn_top = sorted(rows_of(report, "eigenvalue", "ggn"), key=lambda r: r["index"])
    assert torch.allclose(
        torch.tensor([r["value"] for r in ggn_top], dtype=torch.float64),
        torch.linalg.eigvalsh(G).flip(0)[:5],
        rtol=1e-6,
        atol=0,
    )
    ggn_trace = rows_of(report, "trace", "ggn", method="hutchpp")[0]
    assert abs(ggn_trace["value"] - float(torch.trace(G))) <= 3 * ggn_trace["stderr"] + 1e-9

    offset = 0
    for group, names in parameter_groups(model, "module").items():
        size = sum(dict(model.named_parameters())[n].numel() for n in names)
        block = torch.linalg.eigvalsh(H[offset : offset + size, offset : offset + size])
        offset += size
        got = sorted((r["value"] for r in rows_of(report, "eigenvalue", group=group)), reverse=True)
        assert got == pytest.approx(block.flip(0)[:2].tolist(), rel=1e-6)
    with torch.no_grad():
        loss = nn.functional.cross_entropy(
            model(torch.cat([b[0] for b in probe.batches])), torch.cat([b[1] for b in probe.batches])
        )
    assert rows_of(report, "loss")[0]["value"] == pytest.approx(float(loss), rel=1e-12)
    solves = {(r["operator"], r["group"], r["method"]): r["hvps"] for r in report.rows if r["quantity"] == "eigenvalue"}
    others = sum(r["hvps"] for r in report.rows if r["quantity"] in ("trace", "density_mass", "grad_sharpness"))
    assert report.hvps == sum(solves.values()) + others == rows_of(report, "products")[0]["hvps"]


def test_without_details_only_eigenvalues_are_computed(truth):
    model, probe, _, _ = truth
    report = analyse(model, probe, config(lambda_min=False, noise=False), details=False)
    assert {r["quantity"] for r in report.rows} == {"loss", "grad_norm", "dim", "eigenvalue", "products"}
    assert {r["operator"] for r in report.rows} == {"hessian"} and report.density == []


def test_noise_and_flatness_rows_are_the_measures_at_the_point(truth):
    """Gradient noise and g'Hg/|g|^2 at every point; flatness only with details; the values are those of the
    measures themselves (and of the dense Hessian)."""
    model, probe, H, _ = truth
    cfg = config(groups="none", operators=("hessian",), density_runs=0, trace=(), flatness_steps=5, pac_bayes_draws=3)
    plain = analyse(model, probe, cfg, details=False)
    assert {r["quantity"] for r in plain.rows} >= {"noise_scale", "noise_trace_covariance", "grad_sharpness"}
    assert not rows_of(plain, "epsilon_sharpness") and not rows_of(plain, "pac_bayes_sigma")
    g = HessianOperator(model, probe).gradient()
    assert rows_of(plain, "grad_sharpness")[0]["value"] == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-9)
    noise = gradient_noise(model, probe)
    assert rows_of(plain, "noise_scale")[0]["value"] == noise.noise_scale
    assert rows_of(plain, "noise_trace_covariance")[0]["value"] == noise.trace_covariance

    report = analyse(model, probe, cfg, details=True)
    v1 = HessianOperator(model, probe).flatten({n: v[0] for n, v in report.eigenvectors.items()})
    for neighbourhood, epsilon in (("absolute", cfg.flatness_radius), ("relative", cfg.flatness_box)):
        direct = epsilon_sharpness(
            model, probe, epsilon=epsilon, neighbourhood=neighbourhood, steps=5, directions=(v1,), seed=cfg.seed + 19
        )
        assert rows_of(report, "epsilon_sharpness", method=neighbourhood)[0]["value"] == direct.increase > 0
        assert rows_of(report, "epsilon_sharpness_keskar", method=neighbourhood)[0]["value"] == direct.keskar
    for method, magnitude in (("isotropic", False), ("magnitude", True)):
        direct = pac_bayes_sigma(
            model, probe, bound=cfg.pac_bayes_bound, magnitude_aware=magnitude, draws=3, seed=cfg.seed + 23
        )
        assert rows_of(report, "pac_bayes_sigma", method=method)[0]["value"] == direct.sigma > 0


def test_an_unknown_flatness_measure_is_a_config_error():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"hessian.flatness\[1\]: unknown name 'sam'; allowed: epsilon, pac_bayes"):
        HessianConfig(flatness=("epsilon", "sam"))


def test_trace_of_a_larger_model_is_within_three_standard_errors():
    """Hutchinson and Hutch++ at the stage's default budget on a 1,000-parameter ReLU MLP (exact trace by columns)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 4)).double().eval()
    g = torch.Generator().manual_seed(2)
    probe = ProbeSet.from_tensors(
        torch.randn(50, 20, generator=g, dtype=torch.float64), torch.randint(0, 4, (50,), generator=g), 32
    )
    exact = float(torch.trace(dense_matrix(HessianOperator(model, probe))))
    report = analyse(model, probe, HessianConfig(groups="none", operators=("hessian",), density_runs=0), details=True)
    for row in rows_of(report, "trace"):
        assert abs(row["value"] - exact) <= 3 * row["stderr"], row


def test_select_checkpoints():
    entries = [{"file": f"epoch_{e:04d}.pt", "epoch": e} for e in (0, 5, 10, 15, 20, 25, 30)]
    epochs = lambda sel: [e["epoch"] for e in select_checkpoints(entries, sel)]  # noqa: E731
    assert epochs("final") == [30]
    assert epochs("all") == [0, 5, 10, 15, 20, 25, 30]
    assert epochs(2) == [0, 10, 20, 30]
    assert epochs(4) == [0, 20, 30]
    assert epochs(1) == epochs("all")
    assert select_checkpoints([], "all") == []


def test_every_analysis_records_the_primitive_operations_it_spent(truth):
    """The account beside each row's wall time: products as the solvers count them, gradients and forwards as the
    measures count them (the operators' repeatability checks, two forwards of the first batch, included)."""
    model, probe, _, _ = truth
    cfg = config(groups="none", operators=("hessian",), flatness_steps=5, pac_bayes_draws=3)
    report = analyse(model, probe, cfg, details=True)
    check = 2 * 7 / 11  # the first batch (7 of 11 samples), twice
    loss_row = rows_of(report, "loss")[0]
    assert (loss_row["forwards"], loss_row["gradients"], loss_row["hvps"]) == (pytest.approx(1 + check), 1, 0)
    noise = rows_of(report, "noise_scale")[0]
    assert (noise["samples"], noise["forwards"], noise["hvps"]) == (11, pytest.approx(check), 0)
    sharp = rows_of(report, "grad_sharpness")[0]
    assert (sharp["hvps"], sharp["gradients"]) == (1, 1)  # the first product builds the retained graph
    for method in cfg.trace:
        assert rows_of(report, "trace", method=method)[0]["hvps"] == cfg.trace_hvps
    runs = slq(HessianOperator(model, probe).matvec, 51, runs=cfg.density_runs, steps=cfg.density_steps, seed=17)
    assert rows_of(report, "density_mass")[0]["hvps"] == runs.matvecs > 0
    eigen = rows_of(report, "eigenvalue")
    assert eigen[0]["hvps"] > 0 and eigen[0]["gradients"] == 0  # the graph was built already
    direct = epsilon_sharpness(model, probe, epsilon=cfg.flatness_radius, steps=5, directions=(), seed=cfg.seed + 19)
    ball = rows_of(report, "epsilon_sharpness", method="absolute")[0]
    assert ball["gradients"] >= direct.gradient_evaluations and ball["forwards"] == pytest.approx(check)
    flat = pac_bayes_sigma(model, probe, bound=cfg.pac_bayes_bound, draws=3, seed=cfg.seed + 23)
    row = rows_of(report, "pac_bayes_sigma", method="isotropic")[0]
    assert row["forwards"] == pytest.approx(flat.loss_evaluations + check) and row["gradients"] == 0
    total = rows_of(report, "products")[0]
    assert total["hvps"] == sum(
        r["hvps"]
        for r in report.rows
        if r["quantity"] in ("eigenvalue", "trace", "density_mass", "grad_sharpness") and r["index"] == 0
    )  # noqa: E501
