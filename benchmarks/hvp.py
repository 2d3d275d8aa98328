"""Hessian-vector product cost ÷ gradient cost on the probe set, for each implementation (MLP and ResNet20).

    .venv/bin/python benchmarks/hvp.py [--rounds 7] [--threads 2]

Candidates: the three implementations of :class:`pipeline.curvature.operators.HessianOperator`
(``reverse_over_reverse``: gradient graph built once and reused; ``forward_over_reverse``: torch.func jvp of grad;
``double_backward``: graph rebuilt per product, PyHessian's multi-batch mode) and curvlinops'
``HessianLinearOperator`` when curvlinops is installed (``pip install curvlinops-for-pytorch``). The baseline is the
gradient of the same probe-set loss, timed in the same rounds. All products are checked to agree first.
"""

from __future__ import annotations

from common import (  # first: pins the kernels before torch is imported
    interleaved,
    load_data,
    load_model,
    markdown_table,
)

import argparse

import torch

from pipeline.curvature.operators import HVP_IMPLEMENTATIONS, HessianOperator, ProbeSet, relative_difference

RUNS = {"mlp": "mlp", "resnet20": "resnet20"}


def curvlinops_product(model, probe: ProbeSet):
    try:
        from curvlinops import HessianLinearOperator
    except ImportError:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    op = HessianLinearOperator(
        model, torch.nn.CrossEntropyLoss(), params, list(probe.batches), check_deterministic=False
    )
    return lambda v: op @ v.to(torch.float32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data()
    x, y = data.probe_tensors()
    probe = ProbeSet.from_tensors(x, y, 512)
    rows = []
    for run, name in RUNS.items():
        model, origin = load_model(run, name, data)
        ops = {impl: HessianOperator(model, probe, hvp=impl) for impl in HVP_IMPLEMENTATIONS}
        base = ops["reverse_over_reverse"]
        v = torch.randn(base.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        products = {impl: (lambda op=op: op.matvec(v)) for impl, op in ops.items()}
        other = curvlinops_product(model, probe)
        if other is not None:
            products["curvlinops"] = lambda: other(v)
        reference = base.matvec(v)
        for impl, fn in products.items():  # same operator, same vector: all must agree to float32 rounding
            error = relative_difference(fn().to(torch.float64), reference)
            if error > 1e-3:
                raise SystemExit(f"{impl} disagrees with reverse_over_reverse on {run}: relative error {error:.2e}")
        timed = interleaved({"gradient": base.gradient, **products}, rounds=args.rounds)
        print(
            f"{run}: {base.dim} parameters, probe {probe.size} samples, weights from {origin}; "
            f"gradient {timed['gradient'] * 1e3:.1f} ms",
            flush=True,
        )
        for impl in products:
            rows.append(
                [
                    run,
                    impl,
                    f"{timed[impl] * 1e3:.1f}",
                    f"{timed['gradient'] * 1e3:.1f}",
                    f"{timed[impl] / timed['gradient']:.2f}",
                ]
            )
    print()
    print(markdown_table(["model", "HVP implementation", "HVP ms", "gradient ms", "HVP / gradient"], rows))
    if not any(r[1] == "curvlinops" for r in rows):
        print("\n(curvlinops not installed: `pip install curvlinops-for-pytorch` to include it)")


if __name__ == "__main__":
    main()
