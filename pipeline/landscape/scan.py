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
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from pipeline.io import save_torch, write_json
from pipeline.landscape.evaluate import evaluate_points

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
            raise ValueError(f"loss, accuracy: need shape ({len(tile)},) for tile {tile.index}, "
                             f"got {tuple(loss.shape)} and {tuple(accuracy.shape)}")
        save_torch(self._path(tile.index), {"start": tile.start, "stop": tile.stop,
                                            "loss": loss.detach().to("cpu", torch.float64).clone(),
                                            "accuracy": accuracy.detach().to("cpu", torch.float64).clone()})

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
            raise ValueError(f"tile store {self.folder}: {missing} of {n_points} rows missing "
                             f"and {int((covered > 1).sum())} covered twice; run the scan to complete it")
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
    if not (isinstance(loss, Tensor) and isinstance(accuracy, Tensor) and isinstance(start, int)
            and isinstance(stop, int)):
        return None
    size = stop - start
    return payload if loss.shape == (size,) and accuracy.shape == (size,) else None


def evaluate_tile(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                  directions: Sequence[Mapping[str, Tensor]], coords: Tensor, x: Tensor, y: Tensor, tile: Tile, *,
                  batch_size: int = 512, chunk: int | None = None,
                  buffer_directions: Sequence[Mapping[str, Tensor]] | None = None,
                  loss: str = "cross_entropy") -> tuple[Tensor, Tensor]:
    """Loss and accuracy at the rows ``tile.rows`` of ``coords`` (:func:`evaluate_points` on that slice).

    Returns:
        ``(loss, accuracy)``, each ``(len(tile),)`` float64.

    Raises:
        ValueError: for a tile outside ``coords``, or as :func:`evaluate_points`.
    """
    if not 0 <= tile.start <= tile.stop <= len(coords):
        raise ValueError(f"tile: rows {tile.start}:{tile.stop} are outside the {len(coords)} points")
    return evaluate_points(model, params, buffers, directions, coords[tile.rows], x, y, batch_size=batch_size,
                           chunk=chunk, buffer_directions=buffer_directions, loss=loss)


def scan(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
         directions: Sequence[Mapping[str, Tensor]], coords: Tensor, x: Tensor, y: Tensor,
         store: TileStore | None, *, tile_size: int = 64, chunk: int | None = None, batch_size: int = 512,
         buffer_directions: Sequence[Mapping[str, Tensor]] | None = None, loss: str = "cross_entropy",
         on_tile: Callable[[Tile, int, int], None] | None = None) -> tuple[Tensor, Tensor]:
    """Loss and accuracy at every row of ``coords``, tile by tile, skipping the tiles already in ``store``.

    Each finished tile is saved before the next starts, so a kill loses at most one tile's work. With a fixed
    ``chunk`` (or one cached by :func:`pipeline.landscape.evaluate.choose_chunk`) a resumed scan equals an
    uninterrupted one bitwise.

    Args:
        model, params, buffers, directions, coords, x, y, batch_size, chunk, buffer_directions, loss: as for
            :func:`pipeline.landscape.evaluate.evaluate_points`.
        store: where finished tiles go, or ``None`` (all in memory, no resume).
        tile_size: rows per tile.
        on_tile: called as ``on_tile(tile, done, total)`` after each evaluated tile, ``done`` counting the tiles
            finished so far (including those found in the store) out of ``total``.

    Returns:
        ``(loss, accuracy)``, each ``(P,)`` float64.

    Raises:
        ValueError: for bad arguments (see :func:`make_tiles` and :func:`evaluate_points`).
    """
    if coords.dim() != 2:
        raise ValueError(f"coords: expected shape (P, {len(directions)}), got {tuple(coords.shape)}")
    n_points = len(coords)
    tiles = make_tiles(n_points, tile_size)
    finished = store.done() if store is not None else set()
    loss_all = torch.full((n_points,), math.nan, dtype=torch.float64)
    accuracy_all = torch.full((n_points,), math.nan, dtype=torch.float64)
    done = sum(1 for t in tiles if t.index in finished)
    for tile in tiles:
        if tile.index in finished:
            continue
        tile_loss, tile_accuracy = evaluate_tile(model, params, buffers, directions, coords, x, y, tile,
                                                 batch_size=batch_size, chunk=chunk,
                                                 buffer_directions=buffer_directions, loss=loss)
        if store is not None:
            store.save(tile, tile_loss, tile_accuracy)
        loss_all[tile.rows] = tile_loss
        accuracy_all[tile.rows] = tile_accuracy
        done += 1
        if on_tile is not None:
            on_tile(tile, done, len(tiles))
    if store is not None:
        return store.load_all(n_points)
    return loss_all, accuracy_all


def _path_losses(losses: Sequence[float] | Tensor) -> list[float] | None:
    """The losses of a path as floats, or None when any is NaN (the path measures are then NaN).

    Raises:
        ValueError: for fewer than two losses.
    """
    values = [float(v) for v in (losses.tolist() if isinstance(losses, Tensor) else losses)]
    if len(values) < 2:
        raise ValueError(f"losses: need at least the two endpoints, got {len(values)} values")
    return None if any(math.isnan(v) for v in values) else values


def barrier(losses: Sequence[float]) -> float:
    """Loss barrier along a path: :math:`\\max_t L(t) - \\tfrac12 (L(0) + L(1))` (Frankle et al. 2020; Draxler et
    al. 2018 for the mode-connectivity setting). Non-negative since the maximum includes the endpoints; NaN when
    any loss is NaN.

    Raises:
        ValueError: for fewer than two losses.
    """
    values = _path_losses(losses)
    if values is None:
        return math.nan
    return max(values) - 0.5 * (values[0] + values[-1])


def max_rise(losses: Sequence[float]) -> float:
    r"""Largest increase of the loss along a path, :math:`\max_{t \le t'} L(t') - L(t)`: 0 when the loss never goes up
    (the monotone linear interpolation of Goodfellow et al. 2015), NaN when any loss is NaN.

    Raises:
        ValueError: for fewer than two losses.
    """
    values = _path_losses(losses)
    if values is None:
        return math.nan
    rise, lowest = 0.0, values[0]
    for v in values[1:]:
        rise = max(rise, v - lowest)
        lowest = min(lowest, v)
    return rise
