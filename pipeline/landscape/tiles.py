"""Scans of a landscape: grids of points split into tiles, finished tiles kept on disk so a scan resumes.

A scan is the loss and accuracy at every row of a coordinate list (a 1-D line, the row-major flattening of a 2-D
grid, or a path between two models). The list is cut into tiles of consecutive rows; each finished tile is written
atomically to a :class:`TileStore`, so an interrupted scan loses at most the tile in progress, and a rerun
evaluates only the missing tiles. The store is tied to a fingerprint of everything that defines the scan: a
folder holding another scan's tiles is cleared rather than mixed in, and a tile that cannot be read (a torn write,
a stray file) is deleted with one warning line naming it and computed again.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from pipeline.io import save_torch, write_json
from pipeline.landscape.engine import evaluate_points

FINGERPRINT = "fingerprint.json"


_TILE = re.compile(r"^tile_(\d{6})\.pt$")


@dataclass(frozen=True)
class Tile:
    """Rows ``start:stop`` of the flattened point list, the ``index``-th tile of the scan."""

    index: int
    start: int
    stop: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


def grid_coords(axes: Sequence[Tensor]) -> Tensor:
    """Cartesian product of 1-D ``axes`` as ``(P, len(axes))`` float64 rows, row-major (the first axis varies slowest),
    so a 2-D result reshapes to ``(len(axes[0]), len(axes[1]))`` with ``loss.view(n0, n1)``.

    Raises:
        ValueError: for no axes, or an axis that is not 1-D and non-empty.
    """
    if not axes:
        raise ValueError("axes: need at least one 1-D axis")
    for i, a in enumerate(axes):
        if a.dim() != 1 or a.numel() == 0:
            raise ValueError(f"axes[{i}]: must be a non-empty 1-D tensor, got shape {tuple(a.shape)}")
    mesh = torch.meshgrid(*[a.to(torch.float64) for a in axes], indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=1)


def make_tiles(n_points: int, tile_size: int) -> list[Tile]:
    """Consecutive tiles of ``tile_size`` rows covering ``0..n_points`` (the last may be shorter).

    Raises:
        ValueError: for ``n_points < 0`` or ``tile_size < 1``.
    """
    if n_points < 0:
        raise ValueError(f"n_points: must be >= 0, got {n_points}")
    if tile_size < 1:
        raise ValueError(f"tile_size: must be >= 1, got {tile_size}")
    return [Tile(i, start, min(start + tile_size, n_points)) for i, start in enumerate(range(0, n_points, tile_size))]


def scan_fingerprint(**parts: Any) -> str:
    """sha256 hex of the JSON of ``parts`` (keys sorted); tensors enter by dtype, shape and bytes.

    Pass everything that defines the scan: direction ids (:func:`pipeline.landscape.directions.direction_id`), the
    coordinates, the checkpoint's and data's fingerprints, the tile size, batch size and loss.
    """

    def encode(value: Any) -> Any:
        if isinstance(value, Tensor):
            t = value.detach().to("cpu").contiguous()
            data = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            return {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": data}
        if isinstance(value, Mapping):
            return {str(k): encode(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return hashlib.sha256(json.dumps(encode(parts), sort_keys=True).encode()).hexdigest()


class TileStore:
    """Finished tiles of one scan in ``folder``: ``tile_NNNNNN.pt`` (a dict of ``start``, ``stop``, ``loss``,
    ``accuracy``) and ``fingerprint.json``.

    A folder whose fingerprint differs from ``fingerprint`` (or is missing) is cleared of tiles, so a changed
    scan starts afresh instead of mixing old tiles in. The fingerprint must cover the tile size: tiles are found
    by index. A tile that does not load as one (torn, truncated, another file) is deleted when the store opens,
    with one ``warn`` line naming it, so :meth:`done` leaves it out and the scan computes it again.

    Args:
        folder: created when missing.
        fingerprint: identifies the scan (see :func:`scan_fingerprint`).
        warn: called with each warning (no ``warning:`` prefix); default: a ``warning: ...`` line on stderr.

    Raises:
        ValueError: for an empty fingerprint.
    """

    def __init__(self, folder: str | Path, fingerprint: str, warn: Callable[[str], None] | None = None):
        if not fingerprint:
            raise ValueError("fingerprint: must be a non-empty string")
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._stored_fingerprint() != fingerprint:
            # tiles first, the new fingerprint last: a crash in between leaves the old fingerprint, so the next
            # run clears again rather than trusting half-cleared tiles
            for path in self.folder.iterdir():
                if _TILE.match(path.name) or (path.name.startswith(".tile_") and path.name.endswith(".tmp")):
                    path.unlink()
            write_json(self.folder / FINGERPRINT, {"fingerprint": fingerprint})
        self._drop_unreadable()

    def _drop_unreadable(self) -> None:
        """Delete the tiles that do not load as a tile, one warning line each."""
        for index in sorted(self.done()):
            path = self._path(index)
            if _read_tile(path) is None:
                self.warn(f"{path}: unreadable (torn write?); recomputing")
                path.unlink(missing_ok=True)

    def _stored_fingerprint(self) -> str | None:
        try:
            return json.loads((self.folder / FINGERPRINT).read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None

    def _path(self, index: int) -> Path:
        return self.folder / f"tile_{index:06d}.pt"

    def done(self) -> set[int]:
        """Indices of the tiles on disk."""
        return {int(m.group(1)) for m in map(_TILE.match, (p.name for p in self.folder.iterdir())) if m}

    def save(self, tile: Tile, loss: Tensor, accuracy: Tensor) -> None:
        """Write one finished tile atomically (temporary file in the folder, then ``os.replace``).

        Raises:
            ValueError: when ``loss`` or ``accuracy`` does not have one value per row of the tile.
        """
        if loss.shape != (len(tile),) or accuracy.shape != (len(tile),):
            raise ValueError(
                f"loss, accuracy: need shape ({len(tile)},) for tile {tile.index}, "
                f"got {tuple(loss.shape)} and {tuple(accuracy.shape)}"
            )
        save_torch(
            self._path(tile.index),
            {
                "start": tile.start,
                "stop": tile.stop,
                "loss": loss.detach().to("cpu", torch.float64).clone(),
                "accuracy": accuracy.detach().to("cpu", torch.float64).clone(),
            },
        )

    def load_all(self, n_points: int) -> tuple[Tensor, Tensor]:
        """``(loss, accuracy)`` of all ``n_points`` rows, assembled from the tiles.

        Raises:
            ValueError: when a row is not covered by exactly one stored tile, or a tile became unreadable since the
                store opened (one line naming it; a rerun recomputes it).
        """
        loss = torch.full((n_points,), math.nan, dtype=torch.float64)
        accuracy = torch.full((n_points,), math.nan, dtype=torch.float64)
        covered = torch.zeros(n_points, dtype=torch.int64)
        for index in sorted(self.done()):
            payload = _read_tile(self._path(index))
            if payload is None:
                raise ValueError(f"{self._path(index)}: unreadable (torn write?); rerun the scan to recompute it")
            start, stop = int(payload["start"]), int(payload["stop"])
            if not 0 <= start < stop <= n_points:
                raise ValueError(f"n_points: tile {index} holds rows {start}:{stop}, outside 0:{n_points}")
            loss[start:stop] = payload["loss"]
            accuracy[start:stop] = payload["accuracy"]
            covered[start:stop] += 1
        if not bool((covered == 1).all()):
            missing = int((covered == 0).sum())
            raise ValueError(
                f"tile store {self.folder}: {missing} of {n_points} rows missing "
                f"and {int((covered > 1).sum())} covered twice; run the scan to complete it"
            )
        return loss, accuracy


def _read_tile(path: Path) -> dict | None:
    """A tile file's payload, or None when it is not a readable tile (torn, truncated or another file)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any reader error (zip, pickle, I/O) means the same: the tile must be computed again
        return None
    if not isinstance(payload, dict) or not {"start", "stop", "loss", "accuracy"} <= payload.keys():
        return None
    loss, accuracy, start, stop = (payload[k] for k in ("loss", "accuracy", "start", "stop"))
    if not (
        isinstance(loss, Tensor) and isinstance(accuracy, Tensor) and isinstance(start, int) and isinstance(stop, int)
    ):
        return None
    size = stop - start
    return payload if loss.shape == (size,) and accuracy.shape == (size,) else None


class MemoryStore:
    """A :class:`TileStore` kept in memory (no resume): what :func:`scan` uses when it is given no store."""

    def __init__(self):
        self._tiles: dict[int, tuple[Tile, Tensor, Tensor]] = {}

    def done(self) -> set[int]:
        return set(self._tiles)

    def save(self, tile: Tile, loss: Tensor, accuracy: Tensor) -> None:
        self._tiles[tile.index] = (
            tile,
            loss.detach().to(torch.float64).cpu(),
            accuracy.detach().to(torch.float64).cpu(),
        )

    def load_all(self, n_points: int) -> tuple[Tensor, Tensor]:
        loss = torch.full((n_points,), math.nan, dtype=torch.float64)
        accuracy = torch.full((n_points,), math.nan, dtype=torch.float64)
        for tile, tile_loss, tile_accuracy in self._tiles.values():
            loss[tile.rows], accuracy[tile.rows] = tile_loss, tile_accuracy
        return loss, accuracy


@dataclass
class Job:
    """One scan to evaluate tile by tile: ``theta = params + sum_j coords[:, j] d_j`` on ``(x, y)``, its finished
    tiles in ``store``."""

    name: str  # e.g. "random-train": names the job's tiles (task names in the Prefect UI)
    model: nn.Module
    params: Mapping[str, Tensor]
    buffers: Mapping[str, Tensor]
    directions: Sequence[Mapping[str, Tensor]]
    buffer_directions: Sequence[Mapping[str, Tensor]] | None
    coords: Tensor
    x: Tensor
    y: Tensor
    store: TileStore | MemoryStore
    loss: str = "cross_entropy"  # the run's training loss (train.loss)


def evaluate_tile(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    directions: Sequence[Mapping[str, Tensor]],
    coords: Tensor,
    x: Tensor,
    y: Tensor,
    tile: Tile,
    *,
    batch_size: int = 512,
    chunk: int | None = None,
    buffer_directions: Sequence[Mapping[str, Tensor]] | None = None,
    loss: str = "cross_entropy",
    channels_last: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Loss and accuracy at the rows ``tile.rows`` of ``coords`` (:func:`evaluate_points` on that slice): the
    unit of work of every scan.

    Returns:
        ``(loss, accuracy)``, each ``(len(tile),)`` float64.

    Raises:
        ValueError: for a tile outside ``coords``, or as :func:`evaluate_points`.
    """
    if not 0 <= tile.start <= tile.stop <= len(coords):
        raise ValueError(f"tile: rows {tile.start}:{tile.stop} are outside the {len(coords)} points")
    return evaluate_points(
        model,
        params,
        buffers,
        directions,
        coords[tile.rows],
        x,
        y,
        batch_size=batch_size,
        chunk=chunk,
        buffer_directions=buffer_directions,
        channels_last=channels_last,
        loss=loss,
    )


def in_order(
    evaluate: Callable[[Job, Tile], tuple[Tensor, Tensor]], pending: Sequence[tuple[Job, Tile]]
) -> Iterator[tuple[Job, Tile, Tensor, Tensor]]:
    """Evaluate the pending tiles one after the other in this process (the default of :func:`run_tiles`)."""
    for job, tile in pending:
        yield (job, tile, *evaluate(job, tile))


def run_tiles(
    jobs: Sequence[Job],
    tile_size: int,
    evaluate: Callable[[Job, Tile], tuple[Tensor, Tensor]],
    *,
    execute: Callable[..., Iterable[tuple[Job, Tile, Tensor, Tensor]]] = in_order,
    on_start: Callable[[int, int], None] | None = None,
    on_tile: Callable[[Tile, int, int], None] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """The one tile loop: evaluate every tile of ``jobs`` missing from its store, save each as it arrives, and
    return ``{job name: (loss, accuracy)}`` assembled from the stores.

    Each finished tile is saved before the next result is taken, so a kill loses at most the tiles in flight. With
    a fixed ``chunk`` (or one cached by :func:`pipeline.landscape.engine.choose_chunk`) a resumed scan equals an
    uninterrupted one bitwise.

    Args:
        jobs: the scans; their names must differ.
        tile_size: rows per tile.
        evaluate: ``evaluate(job, tile) -> (loss, accuracy)`` of one tile (e.g. :func:`evaluate_tile`).
        execute: ``execute(evaluate, pending)`` yields ``(job, tile, loss, accuracy)`` for each pending
            ``(job, tile)`` in any order: :func:`in_order` here, or a flow's executor (Prefect tasks, Dask).
        on_start: called once as ``on_start(found, total)``: tiles found in the stores, tiles in all.
        on_tile: called as ``on_tile(tile, done, total)`` after each evaluated tile, ``done`` counting the tiles
            finished so far (including those found in the stores).

    Raises:
        ValueError: for bad arguments (see :func:`make_tiles`), two jobs of one name.
    """
    if len({job.name for job in jobs}) != len(jobs):
        raise ValueError(f"jobs: names must differ, got {[job.name for job in jobs]}")
    tiles = {job.name: make_tiles(len(job.coords), tile_size) for job in jobs}
    total = sum(len(t) for t in tiles.values())
    pending = []
    for job in jobs:
        finished = job.store.done()
        pending += [(job, tile) for tile in tiles[job.name] if tile.index not in finished]
    done = total - len(pending)
    if on_start is not None:
        on_start(done, total)
    for job, tile, loss, accuracy in execute(evaluate, pending):
        job.store.save(tile, loss, accuracy)
        done += 1
        if on_tile is not None:
            on_tile(tile, done, total)
    return {job.name: job.store.load_all(len(job.coords)) for job in jobs}


def scan(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    directions: Sequence[Mapping[str, Tensor]],
    coords: Tensor,
    x: Tensor,
    y: Tensor,
    store: TileStore | None,
    *,
    tile_size: int = 64,
    chunk: int | None = None,
    batch_size: int = 512,
    buffer_directions: Sequence[Mapping[str, Tensor]] | None = None,
    loss: str = "cross_entropy",
    on_tile: Callable[[Tile, int, int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Loss and accuracy at every row of ``coords``, tile by tile in this process (:func:`run_tiles` with one
    job), skipping the tiles already in ``store``.

    Args:
        model, params, buffers, directions, coords, x, y, batch_size, chunk, buffer_directions, loss: as for
            :func:`pipeline.landscape.engine.evaluate_points`.
        store: where finished tiles go, or ``None`` (all in memory, no resume).
        tile_size: rows per tile.
        on_tile: as for :func:`run_tiles`.

    Returns:
        ``(loss, accuracy)``, each ``(P,)`` float64.

    Raises:
        ValueError: for bad arguments (see :func:`make_tiles` and :func:`evaluate_points`).
    """
    if coords.dim() != 2:
        raise ValueError(f"coords: expected shape (P, {len(directions)}), got {tuple(coords.shape)}")
    job = Job(
        "scan",
        model,
        params,
        buffers,
        directions,
        buffer_directions,
        coords,
        x,
        y,
        store if store is not None else MemoryStore(),
        loss,
    )

    def evaluate(job: Job, tile: Tile) -> tuple[Tensor, Tensor]:
        return evaluate_tile(
            job.model,
            job.params,
            job.buffers,
            job.directions,
            job.coords,
            job.x,
            job.y,
            tile,
            batch_size=batch_size,
            chunk=chunk,
            buffer_directions=job.buffer_directions,
            loss=job.loss,
        )

    return run_tiles([job], tile_size, evaluate, on_tile=on_tile)["scan"]
