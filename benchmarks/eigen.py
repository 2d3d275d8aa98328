"""Hessian-vector products needed for λmax: this pipeline's Lanczos vs PyHessian-style power iteration.

    .venv/bin/python benchmarks/eigen.py [--accuracy 1e-4] [--runs mlp resnet20 resnet20_noshort] [--top-k 5]

For each model (trained weights of the default runs when present) a reference λmax comes from Lanczos run to
convergence (float64 solver on the float32 operator). Then, for each method:

- **own defaults**: this stage's Lanczos at ``hessian.tol`` (1e-3 on the Ritz residual); PyHessian's
  ``eigenvalues()``: power iteration, maxIter 100, stop when the estimate changes by less than 1e-3 (relative).
  Reported: products spent (Lanczos: including the explicit residual products) and the final relative error.
- **products needed for the asked accuracy** (``--accuracy``, default 1e-4 relative): each method's own stopping
  rule at the loosest tolerance that delivers it (tolerances 1e-2 ... 1e-8; for power iteration, the run of 100
  iterations read at each tolerance's stopping point; "> 100" when no stopping point within maxIter delivers it).

``--top-k`` (MLP only, default 5 = the stage's ``top_k``) repeats both for the top-k eigenvalues, where PyHessian
runs one deflated power iteration per eigenvalue.
"""

from __future__ import annotations

from common import load_data, load_model, markdown_table  # first: pins the kernels before torch is imported

import argparse

import torch

from pipeline.config import HessianConfig
from pipeline.curvature.eigen import lanczos, power_iteration
from pipeline.curvature.operators import HessianOperator, ProbeSet

RUNS = {"mlp": "mlp", "resnet20": "resnet20", "resnet20_noshort": "resnet20_noshort"}
TOLERANCES = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6, 1e-7, 1e-8]
PYHESSIAN_TOL, PYHESSIAN_MAXITER = 1e-3, 100


def power_stop(history: list[float], tol: float) -> int:
    """Products PyHessian's rule spends at ``tol``: first i with |h_i - h_{i-1}| / (|h_{i-1}| + 1e-6) < tol."""
    for i in range(1, len(history)):
        if abs(history[i] - history[i - 1]) / (abs(history[i - 1]) + 1e-6) < tol:
            return i + 1
    return len(history)


def relative_errors(values: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((values - reference).abs() / reference.abs()).max())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy", type=float, default=1e-4, help="relative accuracy asked of the eigenvalues")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument(
        "--top-k", type=int, default=HessianConfig().top_k, help="top-k comparison on the MLP (0: skip)"
    )
    args = parser.parse_args(argv)
    stage_tol = HessianConfig().tol
    data = load_data()
    x, y = data.probe_tensors()
    probe = ProbeSet.from_tensors(x, y, 512)
    defaults, needed = [], []
    for run in args.runs:
        model, origin = load_model(run, RUNS[run], data)
        op = HessianOperator(model, probe)
        k = args.top_k if (run == "mlp" and args.top_k > 1) else 1
        ref, _ = lanczos(op.matvec, op.dim, k_largest=k, tol=1e-10, max_matvecs=2000, seed=123)
        reference = ref.eigenvalues.clone()
        print(
            f"{run}: {op.dim} parameters, weights from {origin}; reference top eigenvalues "
            f"{', '.join(f'{float(v):.8g}' for v in reference)} (max residual {float(ref.residuals.max()):.1e})",
            flush=True,
        )
        for kk in sorted({1, k}):
            want = reference[:kk]
            lz, _ = lanczos(op.matvec, op.dim, k_largest=kk, tol=stage_tol, max_matvecs=2000, seed=0)
            pw = power_iteration(op.matvec, op.dim, k=kk, max_iter=PYHESSIAN_MAXITER, tol=PYHESSIAN_TOL, seed=0)
            lz_err = relative_errors(lz.eigenvalues, want)
            pw_err = relative_errors(pw.eigenvalues.sort(descending=True).values, want)
            label = "λmax" if kk == 1 else f"top-{kk}"
            defaults.append(
                [
                    run,
                    label,
                    lz.matvecs,
                    f"{lz_err:.1e}",
                    pw.matvecs,
                    f"{pw_err:.1e}",
                    f"{pw.matvecs / lz.matvecs:.1f}x",
                    "yes" if lz_err < pw_err else "no",
                ]
            )

            lz_need = next(
                (
                    r.matvecs
                    for r in (
                        lanczos(op.matvec, op.dim, k_largest=kk, tol=t, max_matvecs=2000, seed=0)[0] for t in TOLERANCES
                    )
                    if relative_errors(r.eigenvalues, want) <= args.accuracy
                ),
                None,
            )
            if kk == 1:  # one run of maxIter products, read at each tolerance's stopping point
                long = power_iteration(op.matvec, op.dim, k=1, max_iter=PYHESSIAN_MAXITER, tol=1e-300, seed=0)
                pw_need = next(
                    (
                        n
                        for n in (power_stop(long.history, t) for t in TOLERANCES)
                        if abs(long.history[n - 1] - float(want[0])) <= args.accuracy * abs(float(want[0]))
                    ),
                    None,
                )
            else:  # deflation makes each tolerance a separate run
                pw_need = next(
                    (
                        r.matvecs
                        for r in (
                            power_iteration(op.matvec, op.dim, k=kk, max_iter=PYHESSIAN_MAXITER, tol=t, seed=0)
                            for t in TOLERANCES
                        )
                        if relative_errors(r.eigenvalues.sort(descending=True).values, want) <= args.accuracy
                    ),
                    None,
                )
            limit = PYHESSIAN_MAXITER * kk
            ratio = (
                f"{pw_need / lz_need:.1f}x"
                if (pw_need and lz_need)
                else (f"> {limit / lz_need:.1f}x" if lz_need else "n/a")
            )
            needed.append([run, label, lz_need or "not reached", pw_need or f"> {limit}", ratio])
            print(f"  {label}: done", flush=True)
    print()
    print("Own defaults (Lanczos: hessian.tol; power iteration: PyHessian maxIter 100, tol 1e-3):")
    print(
        markdown_table(
            [
                "model",
                "eigenvalues",
                "Lanczos products",
                "Lanczos rel. error",
                "power products",
                "power rel. error",
                "power / Lanczos products",
                "Lanczos more accurate",
            ],
            defaults,
        )
    )
    print()
    print(f"Products needed for relative accuracy {args.accuracy:g} (loosest tolerance of each method's own rule):")
    print(markdown_table(["model", "eigenvalues", "Lanczos", "power iteration", "power / Lanczos"], needed))


if __name__ == "__main__":
    main()
