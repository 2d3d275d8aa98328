"""Hessian-vector products needed for λmax: this pipeline's Lanczos vs PyHessian-style power iteration.

    .venv/bin/python benchmarks/eigen.py [--tol 1e-4]

For each model (trained weights of the default runs when present): a reference λmax from Lanczos run to a Ritz
residual of 1e-9·|λ| (float64 solver on the float32 operator), then

- ``lanczos``: this stage's solver (k = 1) at the stage's default tolerance; and its Ritz value step by step;
- ``power``: PyHessian's ``eigenvalues()`` — power iteration, maxIter 100, stop when the relative change of the
  estimate is below 1e-3.

Reported: the products after which each method's estimate is (and stays) within ``--tol`` relative of the
reference, the products each method spends before its own stopping rule ends it, and its final relative error.
With ``--top-k 5`` (MLP) the same for the top 5 eigenvalues (deflated power iteration, PyHessian's ``top_n``).
"""

from __future__ import annotations

import argparse

import torch

from common import load_data, load_model, markdown_table
from pipeline.config import HessianConfig
from pipeline.curvature import spectral
from pipeline.curvature.operators import HessianOperator, ProbeSet

RUNS = {"mlp": "mlp", "resnet20": "resnet20", "resnet20_noshort": "resnet20_noshort"}


def first_within(history: list[float], reference: float, tol: float) -> int | None:
    """1-based index of the first estimate from which on every estimate is within ``tol`` relative."""
    good = [abs(h - reference) <= tol * abs(reference) for h in history]
    for i in range(len(good)):
        if all(good[i:]):
            return i + 1
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tol", type=float, default=1e-4, help="relative accuracy asked of λmax")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--top-k", type=int, default=1, help="also compare the top-k eigenvalues (MLP only)")
    args = parser.parse_args(argv)
    stage_tol = HessianConfig().tol
    data = load_data()
    x, y = data.probe_tensors()
    probe = ProbeSet.from_tensors(x, y, 512)
    rows, summary = [], []
    for run in args.runs:
        model, origin = load_model(run, RUNS[run], data)
        op = HessianOperator(model, probe)
        ref_top, _ = spectral.lanczos(op.matvec, op.dim, k_largest=max(args.top_k, 1) if run == "mlp" else 1,
                                      tol=1e-9, max_matvecs=1500, seed=123)
        reference = float(ref_top.eigenvalues[0])
        print(f"{run}: {op.dim} parameters, weights from {origin}; reference λmax = {reference:.8g} "
              f"(residual {float(ref_top.residuals[0]):.1e}, {ref_top.matvecs} products)", flush=True)
        lz, _ = spectral.lanczos(op.matvec, op.dim, k_largest=1, tol=stage_tol, max_matvecs=600, seed=0)
        # To count the products Lanczos needs for `tol`, continue the same seeded run with a tight tolerance and read
        # its step-by-step Ritz value (Lanczos with the same start vector is deterministic step by step).
        trace_run, _ = spectral.lanczos(op.matvec, op.dim, k_largest=1, tol=1e-9, max_matvecs=300, seed=0)
        pw = spectral.power_iteration(op.matvec, op.dim, k=1, max_iter=100, tol=1e-3, seed=0)
        need_lz = first_within(trace_run.history, reference, args.tol)
        need_pw = first_within(pw.history, reference, args.tol)
        err = lambda r: abs(float(r.eigenvalues[0]) - reference) / abs(reference)  # noqa: E731
        rows.append([run, "lanczos (this stage)", need_lz or "> 300", lz.matvecs, f"{err(lz):.1e}",
                     f"{float(lz.residuals[0]):.1e}"])
        rows.append([run, "power (PyHessian defaults)", need_pw or f"> {len(pw.history)} (stopped)", pw.matvecs,
                     f"{err(pw):.1e}", f"{float(pw.residuals[0]):.1e}"])
        ratio = (need_pw / need_lz) if (need_pw and need_lz) else None
        summary.append([run, need_lz, need_pw or f"not reached in {len(pw.history)}",
                        f"{ratio:.1f}x" if ratio else f"> {len(pw.history) / need_lz:.1f}x" if need_lz else "n/a",
                        f"{err(lz) / max(err(pw), 1e-300):.1e}"])
        if run == "mlp" and args.top_k > 1:
            k = args.top_k
            ref_k = ref_top.eigenvalues[:k]
            lzk, _ = spectral.lanczos(op.matvec, op.dim, k_largest=k, tol=stage_tol, max_matvecs=600, seed=0)
            pwk = spectral.power_iteration(op.matvec, op.dim, k=k, max_iter=100, tol=1e-3, seed=0)
            pw_sorted = pwk.eigenvalues.sort(descending=True).values
            for name, res, values in (("lanczos top-k", lzk, lzk.eigenvalues), ("power top-k", pwk, pw_sorted)):
                error = float(((values - ref_k).abs() / ref_k.abs()).max())
                rows.append([run, f"{name} (k={k})", "", res.matvecs, f"{error:.1e} (max)",
                             f"{float(res.residuals.max()):.1e} (max)"])
    print()
    print(markdown_table(["model", "method", f"products to reach {args.tol:g}", "products to own stop",
                          "final rel. error", "final residual"], rows))
    print()
    print(markdown_table(["model", f"Lanczos products to {args.tol:g}", f"power products to {args.tol:g}",
                          "fewer products (power / Lanczos)", "error ratio (Lanczos / power), at own stop"],
                         summary))


if __name__ == "__main__":
    main()
