"""Training checkpoints: the one owner of their format, their manifest and how analyses read them.

A run's folder holds ``epoch_*.pt`` files and a ``manifest.json`` that lists each with its sha256 and the run
fingerprint (config, data, training code, kernels: :func:`run_fingerprint`). Training writes them
(:class:`~pipeline.training.trainer.Trainer`) and repairs a torn or foreign folder on start. Analyses use only
checkpoints the manifest vouches for (:func:`verified_checkpoints`): every ``epoch_*.pt`` of the folder listed there,
its bytes matching the listed sha256, made with the run's fingerprint. Anything else is a one-line
:class:`~pipeline.errors.DataError` naming the file and the stage that remakes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from pipeline.config import ModelConfig, Params, RunConfig, TrainConfig, build_section
from pipeline.data import PreparedData
from pipeline.errors import DataError
from pipeline.io import write_json
from pipeline.provenance import code_fingerprint
from pipeline.training.models import build_model
from pipeline.training.steps import batch_order, learning_rate

CHECKPOINT_FORMAT = 1


CHECKPOINT_GLOB = "epoch_*.pt"


MANIFEST = "manifest.json"


MANIFEST_FORMAT = 2  # 2: every entry carries the file's sha256 and the run fingerprint


MANIFEST_KEYS = ("file", "epoch", "step", "tag", "status", "sha256", "fingerprint")


FOREIGN = "made by another config, data or code"


TORN = "unreadable (torn write?)"


_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


def run_fingerprint(run: RunConfig, data_fingerprint: str) -> str:
    """sha256 identifying what a checkpoint was made from: run config, data, library code, the CPU kernel settings
    (:func:`pipeline.repro.kernel_fingerprint`: other kernels give other weights) and, for a model from an import
    path, its sources (:func:`pipeline.training.custom.source_digest`)."""
    from pipeline.repro import kernel_fingerprint

    made_from = {
        "run": run.to_dict(),
        "data": data_fingerprint,
        "code": code_fingerprint(),
        "kernels": kernel_fingerprint(),
    }
    if ":" in run.model_name:  # a model from an import path: its own sources decide the weights too
        from pipeline.training.custom import source_digest

        made_from["model_code"] = source_digest(run.model_name)
    payload = json.dumps(made_from, sort_keys=True, default=list)
    return hashlib.sha256(payload.encode()).hexdigest()


def list_checkpoints(checkpoint_dir: str | Path) -> list[dict]:
    """The readable checkpoints of a folder, oldest first: ``{file, epoch, step, tag, status}``.

    Not verified against the manifest: analyses use :func:`pipeline.training.checkpoints.verified_checkpoints`."""
    rows = []
    for path in sorted(Path(checkpoint_dir).glob(CHECKPOINT_GLOB)):
        payload = try_load(path)
        if payload is not None:
            rows.append(
                {
                    "file": path.name,
                    "epoch": payload["epoch"],
                    "step": payload["step"],
                    "tag": payload["tag"],
                    "status": payload["status"],
                }
            )
    return rows


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_entry(name: str, payload: dict, sha256: str) -> dict:
    """The manifest row of checkpoint file ``name``: its progress, its bytes' sha256 and the run fingerprint."""
    return {
        "file": name,
        "epoch": payload["epoch"],
        "step": payload["step"],
        "tag": payload["tag"],
        "status": payload["status"],
        "sha256": sha256,
        "fingerprint": payload.get("fingerprint"),
    }


def read_manifest(checkpoint_dir: str | Path) -> dict[str, dict] | None:
    """The manifest's entries by file name, or None when ``manifest.json`` is missing or not a manifest."""
    try:
        raw = json.loads((Path(checkpoint_dir) / MANIFEST).read_text())
    except (OSError, ValueError):  # missing, unreadable or not JSON: no manifest
        return None
    rows = raw.get("checkpoints") if isinstance(raw, dict) else None
    if not isinstance(rows, list):
        return None
    return {r["file"]: r for r in rows if isinstance(r, dict) and isinstance(r.get("file"), str)}


def write_manifest(checkpoint_dir: str | Path, entries: Iterable[dict] | None = None) -> None:
    """Write ``manifest.json`` atomically: ``entries`` (rows of :func:`manifest_entry`), oldest first.

    ``None`` lists every readable checkpoint of the folder (each loaded and hashed)."""
    folder = Path(checkpoint_dir)
    if entries is None:
        entries = [
            manifest_entry(p.name, payload, file_sha256(p))
            for p in sorted(folder.glob(CHECKPOINT_GLOB))
            if (payload := try_load(p)) is not None
        ]
    rows = sorted(entries, key=lambda e: (e["epoch"], e["file"]))
    write_json(folder / MANIFEST, {"format": MANIFEST_FORMAT, "checkpoints": rows})


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def try_load(path: Path) -> dict | None:
    try:
        payload = load_checkpoint(path)
    except Exception:  # a torn or foreign file: treated as absent, never trusted
        return None
    return payload if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT else None


def file_epoch(name: str) -> int | None:
    """The epoch in a checkpoint file name ``epoch_0012.pt``, or None for another name."""
    match = _EPOCH_FILE.match(name)
    return int(match.group(1)) if match else None


def select_checkpoints(entries: list[dict], selection: str | int) -> list[dict]:
    """The entries (oldest first, as :func:`verified_checkpoints`) picked by ``selection``.

    ``final``: the newest; ``all``: every one; an integer ``k``: every k-th by epoch order (starting with the first),
    plus the newest.
    """
    if not entries:
        return []
    if selection == "final":
        return [entries[-1]]
    if selection == "all":
        return list(entries)
    picked = entries[::selection]
    return picked if picked[-1] is entries[-1] else [*picked, entries[-1]]


def partner_config(params: Params, run_name: str) -> RunConfig:
    """The config the ``partner`` stage trains for run ``run_name``: its train seed shifted by
    ``landscape.partner_seed_offset``, sharpness tracking off.

    The same as :func:`pipeline.flows.train.partner_run` (kept here, free of Prefect, for the checkpoint checks;
    a test holds the two equal)."""
    run = params.run(run_name)
    seed = run.train.seed + params.landscape.partner_seed_offset
    return dataclasses.replace(run, train=dataclasses.replace(run.train, seed=seed, track_sharpness_every=0))


def expected_fingerprint(params: Params, run_name: str, data_fingerprint: str, *, stage: str = "train") -> str:
    """The fingerprint the checkpoints of ``stage@run_name`` must carry (``stage``: ``train`` or ``partner``), from
    the run's config and the prepared data's ``data.fingerprint()``."""
    run = partner_config(params, run_name) if stage == "partner" else params.run(run_name)
    return run_fingerprint(run, data_fingerprint)


def verified_checkpoints(
    checkpoint_dir: str | Path, run: str, expected_fingerprint: str | None = None, *, stage: str = "train"
) -> list[dict]:
    """The checkpoints of ``checkpoint_dir`` that its manifest vouches for, oldest first: the manifest's entries
    ``{file, epoch, step, tag, status, sha256, fingerprint}``.

    Every ``epoch_*.pt`` of the folder must be listed in ``manifest.json`` with its sha256, every listed file must
    exist, and all must carry ``expected_fingerprint`` (see :func:`expected_fingerprint`) or, without it, one
    common fingerprint.

    Raises:
        DataError: one line naming the first file that fails and ``dvc repro <stage>@<run>``.
    """
    folder = Path(checkpoint_dir)
    rerun = f"rerun `dvc repro {stage}@{run}`"
    files = sorted(folder.glob(CHECKPOINT_GLOB)) if folder.is_dir() else []
    if not files:
        raise DataError(f"{folder}: no readable checkpoints (epoch_*.pt); run `dvc repro {stage}@{run}` first")
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(f"{folder / MANIFEST}: missing or unreadable, so no checkpoint can be verified; {rerun}")
    names = {p.name for p in files}
    for name in sorted(manifest):
        if name not in names:
            raise DataError(f"{folder / name}: listed in {MANIFEST} but missing; {rerun}")
    entries = []
    for path in files:
        entry = manifest.get(path.name)
        if entry is None:
            raise DataError(f"{folder / path.name}: not listed in {MANIFEST} (copied in or left over); {rerun}")
        if not entry.get("sha256") or not entry.get("fingerprint"):
            raise DataError(
                f"{folder / path.name}: {MANIFEST} has no sha256 or fingerprint for it (written by an "
                f"older version); {rerun}"
            )
        _check_digest(folder / path.name, file_sha256(path), entry, rerun)
        entries.append(entry)
    want = expected_fingerprint or max(entries, key=lambda e: e.get("epoch", -1))["fingerprint"]
    for entry in entries:
        if entry["fingerprint"] != want:
            raise DataError(
                f"{folder / entry['file']}: made by another config/data/code (fingerprint "
                f"{str(entry['fingerprint'])[:12]}, expected {want[:12]}); {rerun}"
            )
    return sorted(entries, key=lambda e: (e["epoch"], e["file"]))


def load_verified(checkpoint_dir: str | Path, entry: dict, run: str, *, stage: str = "train") -> dict:
    """The payload of checkpoint ``entry`` (from :func:`verified_checkpoints`), its bytes hashed again as they are
    read, so what is loaded is what the manifest lists (``weights_only``: no code runs).

    Raises:
        DataError: one line naming the file, when its bytes or fingerprint no longer match the entry.
    """
    path = Path(checkpoint_dir) / entry["file"]
    rerun = f"rerun `dvc repro {stage}@{run}`"
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error}); {rerun}") from None
    _check_digest(path, hashlib.sha256(raw).hexdigest(), entry, rerun)
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception:  # the listed bytes do not load (any reader error): a one-line error, not a zip traceback
        raise DataError(f"{path}: unreadable although it matches {MANIFEST}; {rerun}") from None
    if not isinstance(payload, dict) or payload.get("fingerprint") != entry.get("fingerprint"):
        raise DataError(f"{path}: its fingerprint differs from the one in {MANIFEST}; {rerun}")
    return payload


def _check_digest(path: Path, digest: str, entry: dict, rerun: str) -> None:
    if digest != entry.get("sha256"):
        raise DataError(f"{path}: sha256 does not match {MANIFEST} (torn or replaced); {rerun}")


def require_checkpoints(
    checkpoint_dir: str | Path, run: str, *, stage: str = "train", expected_fingerprint: str | None = None
) -> list[dict]:
    """The verified checkpoints of ``checkpoint_dir`` (:func:`verified_checkpoints`), or a one-line
    :class:`DataError` naming the file at fault and how to remake it (``dvc repro <stage>@<run>``)."""
    return verified_checkpoints(checkpoint_dir, run, expected_fingerprint, stage=stage)


def model_from_checkpoint(payload: dict, data: PreparedData, *, data_fingerprint: str | None = None) -> nn.Module:
    """The network of a checkpoint payload, weights loaded, in eval mode, on the CPU in float32.

    ``data_fingerprint``: ``data.fingerprint()`` when the caller has it already (it hashes every tensor, so a caller
    reading several checkpoints computes it once); computed here otherwise.

    Raises:
        DataError: when the checkpoint was trained on other data than ``data`` (fingerprints differ).
    """
    config = payload["config"]
    if payload.get("data_fingerprint") != (data_fingerprint or data.fingerprint()):
        raise DataError(
            f"checkpoint of run {config['name']!r} (epoch {payload['epoch']}) was trained on other data "
            "than the prepared data; rerun its train stage"
        )
    model_cfg = build_section(ModelConfig, dict(config["model"]), "model")
    model = build_model(config["model_name"], model_cfg, data.input_shape, data.num_classes)
    model.load_state_dict(payload["model"])
    return model.eval()


def next_learning_rate(payload: dict, train_samples: int) -> float:
    """Learning rate of the step that would follow the checkpoint (the one the 2/η stability bound concerns)."""
    cfg = build_section(TrainConfig, dict(payload["config"]["train"]), "train")
    steps_per_epoch = len(batch_order(train_samples, cfg.batch_size, 0, 1))
    return learning_rate(cfg, payload["step"], steps_per_epoch)


def parameters_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


__all__ = [
    "select_checkpoints",
    "require_checkpoints",
    "verified_checkpoints",
    "load_verified",
    "expected_fingerprint",
    "partner_config",
    "model_from_checkpoint",
    "next_learning_rate",
    "parameters_finite",
    "load_checkpoint",
]
