"""Seeded, deterministic, resumable training with checkpoints and a per-epoch history.

Batch order comes from a generator seeded by ``(train.seed, epoch)`` and the learning rate is a pure function of
the global step, so a run resumed from any checkpoint replays exactly the steps the uninterrupted run takes: on the
CPU the final weights are bitwise identical. A non-finite loss stops the run and is recorded (``status: diverged``).

``train.batch_size: full`` is full-batch gradient descent (one step per epoch over the whole train split);
``train.loss: mse`` trains on the squared error to the one-hot target (the edge-of-stability setting of Cohen et al.
2021). With ``train.track_sharpness_every`` a :class:`~pipeline.training.tracking.SharpnessTracker` measures λmax, the
curvature along the gradient and the quadratic model of the step at the due steps, on the probe set, and with
``train.track_batches`` the batch sharpness over fixed mini-batches of the train split (and, for Adam, the
preconditioned sharpness); those rows are ``Trainer.state.sharpness`` (the ``sharpness_history`` table).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.config import RunConfig, TrainConfig, resolve_device
from pipeline.data import PreparedData
from pipeline.io import finite, save_torch
from pipeline.provenance import provenance
from pipeline.training.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_GLOB,
    FOREIGN,
    MANIFEST,
    MANIFEST_KEYS,
    TORN,
    file_epoch,
    file_sha256,
    manifest_entry,
    read_manifest,
    run_fingerprint,
    try_load,
    write_manifest,
)
from pipeline.training.models import build_model, count_parameters
from pipeline.training.steps import batch_loss, batch_order, evaluate, learning_rate, parameter_norm


@dataclass
class TrainState:
    """Progress of a run: what a checkpoint stores besides the weights and the optimiser state."""

    epoch: int = 0
    step: int = 0
    seconds: float = 0.0
    status: str = "running"  # running | completed | diverged
    diverged_step: int | None = None
    history: list[dict] = field(default_factory=list)
    sharpness: list[dict] = field(default_factory=list)  # tracked steps (train.track_sharpness_every)
    track_vector: torch.Tensor | None = None  # the last tracked top eigenvector: the next solve's warm start
    track_preconditioned_vector: torch.Tensor | None = None  # the same for the preconditioned solve (Adam)


class Trainer:
    """Trains one run on prepared data, writing checkpoints to ``checkpoint_dir``.

    Usage: ``trainer.start()`` (fresh or resumed), then ``trainer.train_epoch()`` until ``trainer.done``.
    """

    def __init__(self, run: RunConfig, data: PreparedData, checkpoint_dir: str | Path):
        self.run = run
        self.cfg = run.train
        self.data = data
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = torch.device(resolve_device(self.cfg.device))
        self.data_fingerprint = data.fingerprint()  # hashes every tensor: computed once per run, not per checkpoint
        self.fingerprint = run_fingerprint(run, self.data_fingerprint)
        _make_deterministic(self.device)
        self.x_train, self.y_train = (t.to(self.device) for t in data.train_tensors())
        self.x_test, self.y_test = (t.to(self.device) for t in data.test_tensors())
        torch.manual_seed(self.cfg.seed)
        self.model = build_model(run.model_name, run.model, data.input_shape, data.num_classes).to(self.device)
        self.optimizer = _build_optimizer(self.model, self.cfg)
        self.steps_per_epoch = len(batch_order(len(self.x_train), self.cfg.batch_size, 0, 1))
        self.state = TrainState()
        self._entries: dict[str, dict] | None = None  # manifest entries of the good checkpoints (set by start)
        self.tracker = None
        if self.cfg.track_sharpness_every:
            from pipeline.curvature.operators import ProbeSet
            from pipeline.training.tracking import SharpnessTracker, tracked_batch_indices

            x_probe, y_probe = (t.to(self.device) for t in data.probe_tensors())
            # The batch sharpness's fixed mini-batches, drawn once from the train split (their own seeded generator)
            indices = tracked_batch_indices(
                len(self.x_train), self.cfg.batch_size, self.cfg.track_batches, self.cfg.seed
            )
            batches = [(self.x_train[i.to(self.device)], self.y_train[i.to(self.device)]) for i in indices]
            self.tracker = SharpnessTracker(
                ProbeSet.from_tensors(x_probe, y_probe, self.cfg.eval_batch_size),
                loss=self.cfg.loss,
                tol=self.cfg.track_tol,
                max_hvps=self.cfg.track_max_hvps,
                seed=self.cfg.seed,
                batches=batches,
            )

    # ------------------------------------------------------------------ lifecycle
    @property
    def done(self) -> bool:
        return self.state.status != "running"

    def start(self) -> str:
        """Resume from the newest good checkpoint (same config, data and code, intact), or start afresh.

        A torn (unreadable) or foreign (another fingerprint, or another epoch than its name says) ``epoch_*.pt`` is
        deleted, that file only, and training resumes from the newest good checkpoint *before* it, so the run
        recomputes the missing epochs (bitwise the same weights on the CPU). Good checkpoints are never deleted;
        those after the resume point stay listed and are rewritten, with the same weights, as training reaches them
        again. A file the manifest lists but that is gone counts as a hole too. The manifest is rewritten from the
        good checkpoints when it is missing or stale. With no good checkpoint (config changed) the run starts
        afresh.

        Returns a one-line description of what happened, repairs included (for logs).
        """
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(self.checkpoint_dir)
        good: dict[str, dict] = {}
        bad: list[tuple[Path, str]] = []
        for path in sorted(self.checkpoint_dir.glob(CHECKPOINT_GLOB)):
            entry, problem = self._inspect(path, (manifest or {}).get(path.name))
            if entry is not None:
                good[path.name] = entry
            else:
                bad.append((path, problem))
        holes = [
            name
            for name, e in (manifest or {}).items()
            if e.get("fingerprint") == self.fingerprint
            and name not in good
            and not (self.checkpoint_dir / name).exists()
        ]
        for path, _ in bad:
            path.unlink(missing_ok=True)
        bad_epochs = [e for e in (file_epoch(name) for name in [*(p.name for p, _ in bad), *holes]) if e is not None]
        cutoff = min(bad_epochs) if bad_epochs else None
        self._entries = dict(good)  # save_checkpoint adds to it; `good` stays what was found
        notes = _repair_notes(bad, holes)
        if manifest != good and (good or manifest is not None):  # an empty folder gets its manifest with epoch 0
            write_manifest(self.checkpoint_dir, good.values())
            notes.append(f"rewrote {'missing ' if manifest is None else ''}{MANIFEST}")

        candidates = sorted(
            (e for e in good.values() if cutoff is None or e["epoch"] < cutoff), key=lambda e: e["epoch"]
        )
        for entry in reversed(candidates):
            payload = try_load(self.checkpoint_dir / entry["file"])
            if payload is None or payload.get("fingerprint") != self.fingerprint:
                continue  # changed since it was hashed: fall back to an older one
            self._restore(payload)
            message = (
                f"resumed from {entry['file']} (epoch {self.state.epoch}/{self.cfg.epochs}, status {self.state.status})"
            )
            if cutoff is not None:
                notes.append(f"retraining from epoch {self.state.epoch}")
            return message + (f"; repaired: {'; '.join(notes)}" if notes else "")
        self.state = TrainState()
        self.state.history.append(self._epoch_row(batch_loss=float("nan"), grad_norm=float("nan")))
        self.save_checkpoint()
        foreign = sum(1 for _, problem in bad if problem == FOREIGN)
        if foreign and not good:  # the config, data or code changed: nothing to repair, a new run
            return f"started afresh (discarded {foreign} checkpoint(s) made with another config, data or code)"
        if cutoff is not None:
            notes.append("retraining from epoch 0")
        return "started afresh" + (f"; repaired: {'; '.join(notes)}" if notes else "")

    def _inspect(self, path: Path, listed: dict | None) -> tuple[dict | None, str]:
        """``(manifest entry, "")`` for a good checkpoint of this run, else ``(None, what is wrong)``.

        A file whose hash and fingerprint the manifest vouches for is good without being loaded."""
        try:
            digest = file_sha256(path)
        except OSError:
            return None, TORN
        if (
            listed is not None
            and listed.get("sha256") == digest
            and listed.get("fingerprint") == self.fingerprint
            and listed.get("epoch") == file_epoch(path.name)
            and all(k in listed for k in MANIFEST_KEYS)
        ):
            return {k: listed[k] for k in MANIFEST_KEYS}, ""
        payload = try_load(path)
        if payload is None:
            return None, TORN
        if payload.get("fingerprint") != self.fingerprint:
            return None, FOREIGN
        if payload.get("epoch") != file_epoch(path.name):
            return None, f"holds epoch {payload.get('epoch')}, not the one its name says"
        return manifest_entry(path.name, payload, digest), ""

    def train_epoch(self, on_step: Callable[[int], None] | None = None) -> dict:
        """Train one epoch; checkpoint when due. Returns the epoch's history row."""
        cfg, state = self.cfg, self.state
        epoch = state.epoch + 1
        self.model.train()
        started = time.perf_counter()
        loss_sum, grad_norm_sum, n_seen, n_steps = 0.0, 0.0, 0, 0
        for index in batch_order(len(self.x_train), cfg.batch_size, cfg.seed, epoch):
            lr = learning_rate(cfg, state.step, self.steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x, y = self.x_train[index.to(self.device)], self.y_train[index.to(self.device)]
            before = self._track_before(lr, epoch)
            loss = batch_loss(self.model(x), y, cfg.loss)
            if not torch.isfinite(loss):
                state.status, state.diverged_step = "diverged", state.step
                break
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in self.model.parameters() if p.grad is not None])
            ).item()
            self.optimizer.step()
            if before is not None:
                state.sharpness.append(self._track_after(before))
            state.step += 1
            loss_sum += loss.item() * len(index)
            grad_norm_sum += grad_norm
            n_seen += len(index)
            n_steps += 1
            if cfg.log_every and state.step % cfg.log_every == 0:
                state.history.append(
                    self._row(
                        "step",
                        epoch,
                        lr=lr,
                        batch_loss=loss.item(),
                        grad_norm=grad_norm,
                        seconds=state.seconds + time.perf_counter() - started,
                    )
                )
            if on_step is not None:
                on_step(state.step)
        state.seconds += time.perf_counter() - started
        state.epoch = epoch
        row = self._epoch_row(batch_loss=loss_sum / max(n_seen, 1), grad_norm=grad_norm_sum / max(n_steps, 1))
        state.history.append(row)
        if state.status == "running" and epoch == cfg.epochs:
            state.status = "completed"
        if self.done or epoch % cfg.checkpoint_every == 0:
            self.save_checkpoint()
        return row

    # ------------------------------------------------------------------ sharpness tracking
    def _track_before(self, lr: float, epoch: int) -> dict | None:
        """λmax, g'Hg/|g|², the batch and (Adam) preconditioned sharpness before the step with index ``state.step``,
        when it is due."""
        from pipeline.training.tracking import preconditioned_threshold, stability_threshold, tracking_due

        if self.tracker is None or not tracking_due(self.cfg, self.state.step, self.steps_per_epoch):
            return None
        self.tracker.vector = self.state.track_vector
        self.tracker.preconditioned_vector = self.state.track_preconditioned_vector
        before = self.tracker.before_step(self.model, self.optimizer)
        self.state.track_vector = self.tracker.vector
        self.state.track_preconditioned_vector = self.tracker.preconditioned_vector
        before.update(
            run=self.run.name,
            epoch=epoch - 1,
            step=self.state.step,
            lr=lr,
            two_over_lr=2.0 / lr if lr > 0 else math.inf,
            stability_threshold=stability_threshold(self.cfg, lr),
            preconditioned_threshold=preconditioned_threshold(self.cfg, lr),
        )
        return before

    def _track_after(self, before: dict) -> dict:
        from pipeline.training.tracking import TRACK_COLUMNS

        row = self.tracker.after_step(self.model, before)
        return {k: row[k] for k in TRACK_COLUMNS}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``epoch_XXXX.pt`` atomically (weights, optimiser, progress, config, provenance), then the manifest
        with the file's sha256 and the run fingerprint (atomically too, after the file is in place)."""
        s = self.state
        tag = "init" if s.epoch == 0 else ("final" if self.done else "periodic")
        path = self.checkpoint_dir / f"epoch_{s.epoch:04d}.pt"
        payload = {
            "format": CHECKPOINT_FORMAT,
            "tag": tag,
            "epoch": s.epoch,
            "step": s.step,
            "seconds": s.seconds,
            "status": s.status,
            "diverged_step": s.diverged_step,
            "history": s.history,
            "sharpness": s.sharpness,
            "track_vector": s.track_vector,
            "track_preconditioned_vector": s.track_preconditioned_vector,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": self.run.to_dict(),
            "fingerprint": self.fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "provenance": provenance(),
        }
        save_torch(path, payload)
        if self._entries is None:  # saved without start(): keep what the manifest vouches for
            self._entries = {
                name: e
                for name, e in (read_manifest(self.checkpoint_dir) or {}).items()
                if e.get("fingerprint") == self.fingerprint and (self.checkpoint_dir / name).is_file()
            }
        self._entries[path.name] = manifest_entry(path.name, payload, file_sha256(path))
        write_manifest(self.checkpoint_dir, self._entries.values())
        return path

    def _restore(self, payload: dict) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.state = TrainState(
            epoch=payload["epoch"],
            step=payload["step"],
            seconds=payload["seconds"],
            status=payload["status"],
            diverged_step=payload["diverged_step"],
            history=list(payload["history"]),
            sharpness=list(payload.get("sharpness", [])),
            track_vector=payload.get("track_vector"),
            track_preconditioned_vector=payload.get("track_preconditioned_vector"),
        )

    # ------------------------------------------------------------------ history rows
    def _row(self, scope: str, epoch: int, **values) -> dict:
        return {
            "run": self.run.name,
            "scope": scope,
            "epoch": epoch,
            "step": self.state.step,
            "train_loss": float("nan"),
            "train_accuracy": float("nan"),
            "test_loss": float("nan"),
            "test_accuracy": float("nan"),
            "param_norm": parameter_norm(self.model),
            **values,
        }

    def _epoch_row(self, batch_loss: float, grad_norm: float) -> dict:
        bs = self.cfg.eval_batch_size
        train_loss, train_acc = evaluate(self.model, self.x_train, self.y_train, bs, self.cfg.loss)
        test_loss, test_acc = evaluate(self.model, self.x_test, self.y_test, bs, self.cfg.loss)
        lr = learning_rate(self.cfg, max(self.state.step - 1, 0), self.steps_per_epoch)
        return self._row(
            "epoch",
            self.state.epoch,
            lr=lr,
            batch_loss=batch_loss,
            grad_norm=grad_norm,
            seconds=self.state.seconds,
            train_loss=train_loss,
            train_accuracy=train_acc,
            test_loss=test_loss,
            test_accuracy=test_acc,
        )

    def summary(self) -> dict:
        """Headline numbers of the run (for ``metrics.json``)."""
        last = next(r for r in reversed(self.state.history) if r["scope"] == "epoch")
        return {
            "status": self.state.status,
            "diverged_step": self.state.diverged_step,
            "epochs": self.state.epoch,
            "steps": self.state.step,
            "seconds": round(self.state.seconds, 3),
            "n_params": count_parameters(self.model),
            "train_loss": last["train_loss"],
            "train_accuracy": last["train_accuracy"],
            "test_loss": last["test_loss"],
            "test_accuracy": last["test_accuracy"],
            "generalization_gap": last["test_loss"] - last["train_loss"],
            **self.sharpness_summary(),
        }

    def sharpness_summary(self) -> dict:
        """Headline numbers of the tracked sharpness (empty when tracking is off).

        ``sharpness_over_threshold_last_quarter``: the mean over the last quarter of the tracked steps of
        λmax / (the optimiser's stability threshold), about 1 at the edge of stability (Cohen et al. 2021);
        ``batch_sharpness_over_threshold_last_quarter`` the same for the batch sharpness, about 1 at the edge of
        stochastic stability of mini-batch SGD (Andreyev & Beneventano 2024), and
        ``preconditioned_over_threshold_last_quarter`` for λmax(P⁻¹H) against Adam's (2+2β₁)/((1−β₁)η) (Cohen et
        al. 2022). ``*_max``: the largest ratio over all tracked steps. None where no step gives a finite ratio (the
        threshold is NaN for Adam and the preconditioned one for SGD).
        """
        rows = self.state.sharpness
        if not rows:
            return {}
        last = rows[-1]
        quarter = rows[len(rows) - max(len(rows) // 4, 1) :]
        return {
            "tracked_steps": len(rows),
            "tracking_seconds": round(sum(r["seconds"] for r in rows), 3),
            "tracked_lambda_max": finite(last["lambda_max"]),
            "tracked_stability_threshold": finite(last["stability_threshold"]),
            "tracked_grad_sharpness": finite(last["grad_sharpness"]),
            "sharpness_over_threshold_last_quarter": _mean_ratio(quarter, "lambda_max", "stability_threshold"),
            "lambda_max_over_threshold_max": _max_ratio(rows, "lambda_max", "stability_threshold"),
            "tracked_batch_sharpness": finite(last.get("batch_sharpness")),
            "batch_sharpness_over_threshold_max": _max_ratio(rows, "batch_sharpness", "stability_threshold"),
            "batch_sharpness_over_threshold_last_quarter": _mean_ratio(
                quarter, "batch_sharpness", "stability_threshold"
            ),
            "tracked_preconditioned_sharpness": finite(last.get("preconditioned_sharpness")),
            "preconditioned_over_threshold_last_quarter": _mean_ratio(
                quarter, "preconditioned_sharpness", "preconditioned_threshold"
            ),
            "tracked_hvps_mean": round(sum(r["hvps"] for r in rows) / len(rows), 2),
        }


def _ratios(rows: list[dict], value: str, threshold: str) -> list[float]:
    """``row[value] / row[threshold]`` of the rows where both are finite and the threshold positive."""
    pairs = [(r.get(value, math.nan), r.get(threshold, math.nan)) for r in rows]  # rows of older code lack some
    return [v / t for v, t in pairs if math.isfinite(v) and math.isfinite(t) and t > 0]


def _mean_ratio(rows: list[dict], value: str, threshold: str) -> float | None:
    ratios = _ratios(rows, value, threshold)
    return finite(sum(ratios) / len(ratios)) if ratios else None


def _max_ratio(rows: list[dict], value: str, threshold: str) -> float | None:
    ratios = _ratios(rows, value, threshold)
    return finite(max(ratios)) if ratios else None


def train(
    run: RunConfig, data: PreparedData, checkpoint_dir: str | Path, on_epoch: Callable[[dict], None] | None = None
) -> Trainer:
    """Train ``run`` to completion (or divergence), resuming from ``checkpoint_dir`` when possible."""
    trainer = Trainer(run, data, checkpoint_dir)
    trainer.start()
    while not trainer.done:
        row = trainer.train_epoch()
        if on_epoch is not None:
            on_epoch(row)
    return trainer


def _repair_notes(bad: list[tuple[Path, str]], holes: list[str]) -> list[str]:
    """What :meth:`Trainer.start` deleted or found missing, grouped by what was wrong (for its one log line)."""
    by_problem: dict[str, list[str]] = {}
    for path, problem in bad:
        by_problem.setdefault(problem, []).append(path.name)
    notes = [f"deleted {', '.join(names)} ({problem})" for problem, names in by_problem.items()]
    if holes:
        notes.append(f"{', '.join(holes)} listed in {MANIFEST} but missing")
    return notes


def _build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(
        model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )


def _make_deterministic(device: torch.device) -> None:
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
