"""Parquet schemas of every table the pipeline writes, and an atomic writer that stores provenance.

Tables are tidy: one row per (run, scope, epoch/step) with typed columns. Provenance (git revision, library
versions, the stage's params) goes into the file's key-value metadata under ``landscape.*`` keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import atomic_path

# Artifacts other than tables that one stage writes and another reads (torch files), and their payload format.
EIGENVECTORS = "eigenvectors.pt"  # artifacts/hessian/<run>/: the top Hessian eigenvectors of the final checkpoint
INTERPOLATE_DIRECTIONS = "interpolate_directions.pt"  # artifacts/landscape/<run>/: the directions of the 1-D scans
SURFACE_DIRECTIONS = "surface_directions.pt"  # artifacts/landscape/<run>/: the plane of the 2-D scan
ALIGNED_PARTNER = "aligned_partner.pt"  # artifacts/landscape/<run>/: the partner permuted to the run, and how
ARTIFACT_FORMAT = 1  # the "format" key of those payloads

TRAIN_HISTORY = pa.schema(
    [
        ("run", pa.string()),
        ("scope", pa.string()),  # "epoch": end-of-epoch evaluation; "step": every train.log_every steps
        ("epoch", pa.int64()),  # epochs completed (0 = initialisation); for step rows, the epoch in progress
        ("step", pa.int64()),  # optimiser steps completed
        ("lr", pa.float64()),  # learning rate of the last step
        ("train_loss", pa.float64()),  # mean cross-entropy over the whole train split, eval mode (epoch rows)
        ("train_accuracy", pa.float64()),  # fraction correct, train split, eval mode (epoch rows)
        ("test_loss", pa.float64()),  # mean cross-entropy over the test split, eval mode (epoch rows)
        ("test_accuracy", pa.float64()),  # fraction correct, test split (epoch rows)
        ("batch_loss", pa.float64()),  # epoch rows: sample-weighted mean of the epoch's mini-batch losses
        ("grad_norm", pa.float64()),  # L2 norm of the mini-batch gradient (epoch rows: mean over the epoch's steps)
        ("param_norm", pa.float64()),  # L2 norm of all trainable parameters
        ("seconds", pa.float64()),  # cumulative training wall-clock time, evaluation excluded
    ]
)

# One row per tracked optimiser step (train.track_sharpness_every), measured on the probe set in eval mode at the
# weights before the step (pipeline.training.tracking). Empty when tracking is off.
SHARPNESS_HISTORY = pa.schema(
    [
        ("run", pa.string()),
        ("epoch", pa.int64()),  # epochs completed before the step
        ("step", pa.int64()),  # 0-based index of the tracked step (= steps completed before it)
        ("lr", pa.float64()),  # learning rate of the step
        ("two_over_lr", pa.float64()),  # 2/eta: the stability bound of plain gradient descent
        (
            "stability_threshold",
            pa.float64(),
        ),  # the bound of the run's optimiser: (2+2beta)/eta with momentum; NaN: Adam
        ("lambda_max", pa.float64()),  # top Hessian eigenvalue of the probe loss (Lanczos, warm-started)
        ("lambda_max_residual", pa.float64()),  # ||Hv - lambda v||
        ("lambda_max_converged", pa.bool_()),  # residual within train.track_tol * |lambda_max|
        ("hvps", pa.int64()),  # Hessian-vector products of that solve
        ("warm_start", pa.bool_()),  # started from the previous tracked eigenvector
        ("grad_sharpness", pa.float64()),  # g'Hg/|g|^2: curvature along the probe gradient
        ("grad_norm", pa.float64()),  # |g| of the probe loss
        # E_B[g_B'H_B g_B/|g_B|^2] over train.track_batches fixed mini-batches of the run's batch size, each its own
        # loss's gradient and Hessian (Andreyev & Beneventano 2024); NaN: tracking of batches off, or not finite
        ("batch_sharpness", pa.float64()),
        ("batch_sharpness_stderr", pa.float64()),  # its standard error over the batches; NaN with fewer than 2
        ("batch_count", pa.int64()),  # batches in that mean (those with g_B = 0 left out); 0: off
        ("preconditioned_sharpness", pa.float64()),  # lambda_max(P^-1 H), Adam's P (Cohen et al. 2022); NaN: SGD
        ("preconditioned_threshold", pa.float64()),  # (2+2beta1)/((1-beta1)eta): Adam's bound on it; NaN: SGD
        ("preconditioned_residual", pa.float64()),  # ||Au - lambda u|| of A = P^-1/2 H P^-1/2 at its top vector u
        ("probe_loss", pa.float64()),  # L(theta) on the probe set, before the step
        ("loss_after", pa.float64()),  # L(theta + dtheta), the step actually taken (BatchNorm statistics held)
        ("actual_change", pa.float64()),  # loss_after - probe_loss
        ("predicted_change", pa.float64()),  # first_order + second_order
        ("first_order", pa.float64()),  # g'dtheta (= -eta g'v for SGD)
        ("second_order", pa.float64()),  # dtheta'H dtheta / 2 (= eta^2 v'Hv / 2)
        ("model_error", pa.float64()),  # actual - predicted: the third- and higher-order remainder
        ("model_ratio", pa.float64()),  # actual / predicted (1 where the quadratic model holds)
        ("step_norm", pa.float64()),  # |dtheta|
        ("step_sharpness", pa.float64()),  # dtheta'H dtheta / |dtheta|^2
        ("step_cosine", pa.float64()),  # -g'dtheta / (|g| |dtheta|)
        ("cost_forwards", pa.float64()),  # the whole tracked step's loss evaluations (probe-set passes)
        ("cost_gradients", pa.float64()),  # its probe-set gradients (one is the retained graph of the products)
        # its probe-set Hessian-vector products: the lambda_max solve, g'Hg, the step model, the preconditioned
        # solve (Adam); the batch sharpness adds batch_count mini-batch gradients and products, not counted here
        ("cost_hvps", pa.int64()),
        ("seconds", pa.float64()),  # wall-clock time of the measurements of this row
    ]
)

# One row per (checkpoint, operator, group, quantity, index). Quantities: `eigenvalue` (index 0 = largest),
# `lambda_min`, `trace` (method hutchinson | hutchpp, with stderr), `loss` and `grad_norm` of the probe set, `dim`
# (parameters spanned), `density_mass` (total SLQ weight, 1 up to rounding), `products` (all products spent at the
# checkpoint, in `value` and `hvps`, with the checkpoint's total `seconds`). With `hessian.noise`, at every checkpoint:
# `noise_trace_covariance` (tr of the per-sample gradient covariance, N - 1 normalised), `noise_scale` (B_simple =
# tr(Sigma)/|g|^2, in samples; McCandlish et al. 2018), `grad_sharpness` (g'Hg/|g|^2). With `hessian.flatness`, at
# `details`: `epsilon_sharpness` (largest loss increase found, nats) and `epsilon_sharpness_keskar`
# (100 * increase / (1 + L)), method `absolute` (L2 ball) or `relative` (Keskar's box); `pac_bayes_sigma`, method
# `isotropic` or `magnitude` (the largest noise scale keeping the expected loss increase within the bound).
HESSIAN_SPECTRUM = pa.schema(
    [
        ("run", pa.string()),
        ("checkpoint", pa.string()),  # checkpoint file name, e.g. epoch_0030.pt
        ("epoch", pa.int64()),  # epochs completed at the checkpoint
        ("step", pa.int64()),  # optimiser steps completed at the checkpoint
        ("lr", pa.float64()),  # learning rate of the next step at this checkpoint (for the 2/lr stability bound)
        ("operator", pa.string()),  # hessian | ggn
        ("group", pa.string()),  # "all" (every trainable parameter) or a parameter group, e.g. layer1.0
        ("quantity", pa.string()),
        ("index", pa.int64()),  # rank of an eigenvalue (0 = largest); 0 otherwise
        ("value", pa.float64()),
        ("stderr", pa.float64()),  # standard error of a stochastic estimate (trace); NaN otherwise
        ("residual", pa.float64()),  # ||H v - lambda v||_2 of an eigenpair, computed explicitly; NaN otherwise
        ("hvps", pa.int64()),  # curvature-vector products spent on this quantity (shared by the pairs of one solve)
        ("forwards", pa.float64()),  # loss evaluations spent, in passes over the probe set (a batch counts its share)
        ("gradients", pa.float64()),  # probe-set gradients spent (a product's retained graph is one)
        ("samples", pa.int64()),  # per-sample gradients spent (gradient noise)
        ("method", pa.string()),  # lanczos | power | arpack | hutchinson | hutchpp | slq
        ("converged", pa.bool_()),  # the solver met its tolerance
        ("seconds", pa.float64()),  # wall-clock time of the computation
        ("bn_mode", pa.string()),  # BatchNorm mode of the forward passes (always eval: running statistics)
    ]
)

# Spectral density by stochastic Lanczos quadrature: `node` rows are the quadrature nodes and weights (weights of one
# checkpoint and operator sum to 1); `smoothed` rows are the Gaussian-smoothed density on a grid (integrates to 1).
HESSIAN_DENSITY = pa.schema(
    [
        ("run", pa.string()),
        ("checkpoint", pa.string()),
        ("epoch", pa.int64()),
        ("operator", pa.string()),  # hessian | ggn
        ("kind", pa.string()),  # node | smoothed
        ("lambda", pa.float64()),  # eigenvalue axis
        ("density", pa.float64()),  # smoothed rows: probability density at `lambda`; NaN for node rows
        ("weight", pa.float64()),  # node rows: quadrature weight; NaN for smoothed rows
    ]
)

# 1-D scans around the final checkpoint (stage `interpolate`): one row per (path, point, split). Paths: `init_final`
# (t = 0 initialisation, t = 1 trained), `random` (filter-normalised), `eigen` (top Hessian eigenvector), `partner`
# (t = 0 trained, t = 1 the run retrained from another seed: linear mode connectivity).
INTERPOLATION_1D = pa.schema(
    [
        ("run", pa.string()),
        # init_final | random | eigen | partner | partner_aligned (the partner permuted to this run's unit order) |
        # partner[_aligned]_reset (BatchNorm statistics recomputed at each point) | partner[_aligned]_repair (REPAIR)
        ("path", pa.string()),
        ("direction", pa.string()),  # content id of the direction (pipeline.landscape.directions.direction_id)
        ("alpha", pa.float64()),  # coordinate: alpha (random, eigen; 0 = trained) or t in [0, 1] (init_final, partner*)
        ("distance", pa.float64()),  # signed Euclidean distance in weight space from the point at coordinate 0
        ("split", pa.string()),  # train | test
        ("loss", pa.float64()),  # mean cross-entropy over the split, BatchNorm in eval mode
        ("accuracy", pa.float64()),  # fraction correct
        # normalisation statistics at each point: stored (the trained model's) | interpolated (with the weights) |
        # recomputed (reset: at t = 0 and 1 the endpoints with recomputed statistics) | repaired | none (no buffers)
        ("statistics", pa.string()),
    ]
)

# 2-D surface (stage `surface`): loss and accuracy on the probe set at theta_final + alpha dx + beta dy.
SURFACE_2D = pa.schema(
    [
        ("run", pa.string()),
        ("plane", pa.string()),  # random | pca | eigen
        ("direction_x", pa.string()),  # content id of dx
        ("direction_y", pa.string()),  # content id of dy
        ("alpha", pa.float64()),  # coordinate along dx (0 = trained)
        ("beta", pa.float64()),  # coordinate along dy
        ("split", pa.string()),  # probe
        ("loss", pa.float64()),
        ("accuracy", pa.float64()),
    ]
)

# Curvature map of the surface (landscape.curvature_map > 0): extreme Hessian eigenvalues at a coarse sub-grid.
SURFACE_CURVATURE = pa.schema(
    [
        ("run", pa.string()),
        ("plane", pa.string()),
        ("alpha", pa.float64()),
        ("beta", pa.float64()),
        ("lambda_max", pa.float64()),
        ("lambda_min", pa.float64()),
        ("ratio", pa.float64()),  # |lambda_min / lambda_max|: 0 convex-looking, near 1 strongly non-convex
        ("hvps", pa.int64()),
        ("converged", pa.bool_()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "train_history": TRAIN_HISTORY,
    "sharpness_history": SHARPNESS_HISTORY,
    "hessian_spectrum": HESSIAN_SPECTRUM,
    "hessian_density": HESSIAN_DENSITY,
    "interpolation_1d": INTERPOLATION_1D,
    "surface_2d": SURFACE_2D,
    "surface_curvature": SURFACE_CURVATURE,
}


# One row per (run, seed) of the `seeds` stage: the run trained from seed train.seed + seed_index (0: the run itself,
# partner_seed_offset: the partner model), measured at its final checkpoint the same way for every seed.
SEEDS = pa.schema(
    [
        ("run", pa.string()),
        ("seed_index", pa.int64()),  # k: trained from train.seed + k
        ("seed", pa.int64()),  # train.seed + k
        ("source", pa.string()),  # whose checkpoints: train (k = 0), partner, seeds (trained by the seeds stage)
        ("status", pa.string()),  # completed | diverged
        ("epoch", pa.int64()),  # of the final checkpoint
        ("train_loss", pa.float64()),  # mean loss over the train split, eval mode
        ("train_accuracy", pa.float64()),
        ("test_loss", pa.float64()),
        ("test_accuracy", pa.float64()),
        ("generalization_gap", pa.float64()),  # test_loss - train_loss (nats)
        ("lambda_max", pa.float64()),  # top Hessian eigenvalue of the probe-set loss (Lanczos, hessian.tol)
        ("lambda_min", pa.float64()),  # most negative eigenvalue
        ("trace_hutchinson", pa.float64()),  # Hessian trace, Hutchinson with hessian.trace_hvps products
        ("trace_hutchinson_stderr", pa.float64()),
        ("hvps", pa.int64()),  # Hessian-vector products spent on the measures
        ("seconds", pa.float64()),  # wall-clock time of the measures (training excluded)
    ]
)


def write_table(
    rows: list[Mapping[str, Any]] | pd.DataFrame,
    path: str | Path,
    schema: pa.Schema,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``rows`` as Parquet with exactly ``schema`` (missing columns are an error), atomically.

    ``metadata`` values are JSON-encoded under ``landscape.<key>`` in the file's schema metadata.
    """
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=schema.names)
    missing = [name for name in schema.names if name not in frame.columns]
    if missing:
        raise ValueError(f"{path}: table lacks columns {missing} of its schema")
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    extra = {
        f"landscape.{k}".encode(): json.dumps(v, sort_keys=True, default=str).encode()
        for k, v in (metadata or {}).items()
    }
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``landscape.*`` metadata of a Parquet file, decoded."""
    raw = pq.read_schema(path).metadata or {}
    return {k.decode()[len("landscape.") :]: json.loads(v) for k, v in raw.items() if k.startswith(b"landscape.")}
