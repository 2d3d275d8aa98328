"""Headline numbers of the stage tables, for the ``*_metrics.json`` files that ``dvc metrics`` reads.

No Prefect here: the ``hessian`` flow and the flatness sweep (:mod:`pipeline.sweep_run`) use the same function, so
a sweep point's numbers have exactly the keys and meaning of a run's ``hessian`` metrics.
"""

from __future__ import annotations

import math

import pandas as pd

__all__ = ["hessian_headline"]


def hessian_headline(spectrum: pd.DataFrame, peak_lr: float) -> dict:
    """The ``hessian`` numbers of ``metrics.json``: those of the newest checkpoint in ``spectrum`` (the
    ``hessian_spectrum`` table, or the rows of :func:`pipeline.curvature.analysis.analyse` with ``epoch`` and
    ``checkpoint`` columns added), plus the products and seconds spent over all of its checkpoints.

    ``lambda_max_lr_over_2`` uses ``peak_lr``; non-finite numbers become ``None`` (strict JSON).
    """
    if spectrum.empty:
        return {"status": "no finite checkpoint"}
    last = spectrum[spectrum.epoch == spectrum.epoch.max()]

    def pick(operator="hessian", quantity="eigenvalue", method=None, index=0):
        rows = last[(last.operator == operator) & (last.group == "all") & (last.quantity == quantity)
                    & (last["index"] == index)]
        if method is not None:
            rows = rows[rows.method == method]
        return rows.iloc[0] if len(rows) else None

    out = {"epoch": int(last.epoch.iloc[0]), "checkpoint": last.checkpoint.iloc[0]}
    top = pick()
    out["lambda_max"] = float(top.value)
    out["lambda_max_residual"] = float(top.residual)
    out["lambda_max_lr_over_2"] = float(top.value) * peak_lr / 2.0  # > 1: sharper than GD at the peak lr tolerates
    out["eigenvalues"] = [float(r.value) for r in last[(last.operator == "hessian") & (last.group == "all") &
                                                       (last.quantity == "eigenvalue")].sort_values("index").itertuples()]
    low = pick(quantity="lambda_min")
    if low is not None:
        out["lambda_min"] = float(low.value)
        out["lambda_min_residual"] = float(low.residual)
    for method in ("hutchinson", "hutchpp"):
        trace = pick(quantity="trace", method=method)
        if trace is not None:
            out[f"trace_{method}"] = float(trace.value)
            out[f"trace_{method}_stderr"] = float(trace.stderr)
    for quantity, key in (("noise_scale", "noise_scale"), ("noise_trace_covariance", "noise_trace_covariance"),
                          ("grad_sharpness", "grad_sharpness")):
        row = pick(quantity=quantity)
        if row is not None:
            out[key] = float(row.value)
    for quantity, method in (("epsilon_sharpness", "absolute"), ("epsilon_sharpness", "relative"),
                             ("epsilon_sharpness_keskar", "absolute"), ("epsilon_sharpness_keskar", "relative"),
                             ("pac_bayes_sigma", "isotropic"), ("pac_bayes_sigma", "magnitude")):
        row = pick(quantity=quantity, method=method)
        if row is not None:
            out[f"{quantity}_{method}"] = float(row.value)
    ggn = pick("ggn")
    if ggn is not None:
        out["ggn_lambda_max"] = float(ggn.value)
    totals = spectrum[spectrum.quantity == "products"]  # one row per checkpoint: every product and second spent
    out["hvps"] = int(totals.hvps.sum())
    out["seconds"] = round(float(totals.seconds.sum()), 3)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
