"""What mode connectivity costs: weight matching and the statistics of a path point, against one training epoch.

    .venv/bin/python benchmarks/alignment.py [--widths 1 4] [--rounds 3] [--artifacts DIR]

For ResNet-20 at each width multiplier (``model.resnet_width``) on digits, two networks: the final checkpoints of
a run and its partner when ``DIR`` holds them (``DIR/checkpoints/resnet20_x<k>`` and ``DIR/partners/resnet20_x<k>``,
the width preset's runs; ``DIR`` defaults to this repository's ``artifacts``), else two seeded fresh networks. The
candidates are timed round-robin in one process (median of ``--rounds``), so the machine's speed and load cancel in
the ratios:

- **epoch** (the baseline): one epoch of the default training, SGD with momentum over the train split in batches
  of 64 (22 steps on digits);
- **weight matching**: the permutation spec from the forward (``torch.fx``) plus weight matching to convergence,
  what ``landscape.align: weights`` runs once per run;
- **path point, interpolate**: one point of the straight path with interpolated buffers, loss and accuracy on the
  train and test splits (what every variant pays);
- **path point, reset** / **repair**: the same point with the BatchNorm statistics recomputed over the train split
  (one train-mode pass) or REPAIR's correction (one pass with hooks, plus the endpoints' statistics, amortised over
  the ``landscape.path_points`` points of the default path).
"""

from __future__ import annotations

from common import REPO, final_checkpoint, interleaved, load_data, markdown_table  # first: pins the kernels

import argparse
import copy
from pathlib import Path

import torch

from pipeline.config import LandscapeConfig, ModelConfig
from pipeline.landscape.connectivity import site_statistics, statistics_path
from pipeline.landscape.permutation import permutation_spec, weight_matching
from pipeline.training.checkpoints import load_checkpoint
from pipeline.training.models import build_model


def networks(width: float, data, artifacts: Path) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """The width preset's trained run and partner when present, else two seeded fresh ResNet-20s."""
    cfg = ModelConfig(resnet_width=width)
    run = f"resnet20_x{width:g}"
    finals = [final_checkpoint(artifacts / "checkpoints" / run), final_checkpoint(artifacts / "partners" / run)]
    trained = all(final is not None for final in finals)
    models = []
    for seed, final in enumerate(finals):
        torch.manual_seed(seed)
        model = build_model("resnet20", cfg, data.input_shape, data.num_classes)
        if trained:
            model.load_state_dict(load_checkpoint(final)["model"])
        models.append(model)
    origin = f"trained ({run}, final checkpoints)" if trained else "fresh (seeds 0 and 1)"
    return models[0], models[1], origin


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 4.0], help="ResNet-20 width multipliers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts", help="folder of trained checkpoints")
    args = parser.parse_args(argv)
    data = load_data()
    x, y = data.train_tensors()
    splits = {"train": (x, y), "test": data.test_tensors()}
    points = LandscapeConfig().path_points
    ts = torch.tensor([0.5], dtype=torch.float64)
    rows = []
    for width in args.widths:
        model, partner, origin = networks(width, data, args.artifacts)
        params = sum(p.numel() for p in model.parameters())
        spec = permutation_spec(model, data.input_shape)
        a = {n: p.detach() for n, p in model.named_parameters()}
        b = {n: p.detach() for n, p in partner.named_parameters()}
        sites = list(spec.repair_sites)
        passes = weight_matching(spec, a, b).passes

        learner = copy.deepcopy(model)
        opt = torch.optim.SGD(learner.parameters(), lr=0.01, momentum=0.9)
        order = torch.Generator().manual_seed(0)

        def epoch():
            learner.train()
            for i in torch.randperm(len(x), generator=order).split(64):
                loss = torch.nn.functional.cross_entropy(learner(x[i]), y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()

        def matching():
            weight_matching(permutation_spec(model, data.input_shape), a, b)

        def point(mode: str):
            def run():
                statistics_path(model, partner, ts, mode, x, splits, sites=sites)

            return run

        def repair_endpoints():  # the endpoints' channel statistics, paid once per path
            site_statistics(model, sites, x)
            site_statistics(partner, sites, x)

        seconds = interleaved(
            {
                "epoch": epoch,
                "matching": matching,
                "interpolate": point("interpolate"),
                "reset": point("reset"),
                "repair": point("repair"),
                "repair_once": repair_endpoints,
            },
            rounds=args.rounds,
        )
        # a repaired path of one point pays the endpoints' statistics once: spread them over the default path
        repair = seconds["repair"] - seconds["repair_once"] + seconds["repair_once"] / points
        epoch_s = seconds["epoch"]
        rows.append(
            [
                f"x{width:g}",
                f"{params:,}",
                origin,
                f"{len(spec.groups)} / {sum(spec.groups.values())}",
                passes,
                f"{epoch_s:.2f}",
                f"{seconds['matching']:.2f} ({seconds['matching'] / epoch_s:.2f})",
                f"{seconds['interpolate']:.2f} ({seconds['interpolate'] / epoch_s:.2f})",
                f"{seconds['reset']:.2f} ({seconds['reset'] / epoch_s:.2f})",
                f"{repair:.2f} ({repair / epoch_s:.2f})",
            ]
        )
        print(f"x{width:g}: {origin}; median of {args.rounds} rounds", flush=True)
    print(
        markdown_table(
            [
                "width",
                "parameters",
                "weights",
                "permutations / units",
                "passes",
                "epoch s",
                "weight matching s (÷ epoch)",
                "path point s (÷ epoch)",
                "reset point s (÷ epoch)",
                "repair point s (÷ epoch)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
