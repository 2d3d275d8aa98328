"""Hashes of three results of the pipeline's own code under this process's kernel settings (tests/test_repro.py).

    python tests/scripts/repro_probe.py PIN THREADS OUT.json

PIN (1/0) and THREADS are ``repro.pin`` and ``repro.threads``; they are applied before torch is imported, as a stage
does. Writes the sha256 of: the weights after a short ResNet20 training run (the Trainer, checkpoints and all), the
top Hessian eigenvalues of the trained network by Lanczos, and the losses of one 5x5 surface tile, plus the kernel
record.
"""

import hashlib
import json
import sys
import tempfile

from pipeline import repro

repro.apply_section({"pin": sys.argv[1] == "1", "threads": int(sys.argv[2])})

import torch  # noqa: E402

from pipeline.config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from pipeline.curvature.eigen import lanczos  # noqa: E402
from pipeline.curvature.operators import HessianOperator, ProbeSet  # noqa: E402
from pipeline.data import prepare_dataset  # noqa: E402
from pipeline.landscape.directions import random_direction  # noqa: E402
from pipeline.landscape.engine import evaluate_points  # noqa: E402
from pipeline.training.trainer import train  # noqa: E402


def sha(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


data = prepare_dataset(DataConfig(train_samples=384, probe_size=128))
run = RunConfig(
    "probe",
    "resnet20",
    ModelConfig(),
    TrainConfig(epochs=2, batch_size=64, checkpoint_every=2, track_sharpness_every=0),
)
with tempfile.TemporaryDirectory() as folder:
    model = train(run, data, folder).model.eval()
weights = sha(*model.state_dict().values())

x, y = data.probe_tensors()
op = HessianOperator(model, ProbeSet.from_tensors(x, y, 128))
top, _ = lanczos(op.matvec, op.dim, k_largest=2, tol=1e-3, max_matvecs=60, seed=0)
eigen = sha(top.eigenvalues, top.eigenvectors)

params = {k: v.detach() for k, v in model.named_parameters()}
buffers = {k: v.detach() for k, v in model.named_buffers()}
dx, dy = (random_direction(params, seed=s) for s in (0, 1))
grid = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
coords = torch.cartesian_prod(grid, grid)
loss, accuracy = evaluate_points(model, params, buffers, [dx, dy], coords, x, y, batch_size=128, chunk=5)
tile = sha(loss, accuracy)

with open(sys.argv[3], "w") as handle:
    json.dump({"weights": weights, "eigen": eigen, "tile": tile, "record": repro.kernel_record()}, handle)
