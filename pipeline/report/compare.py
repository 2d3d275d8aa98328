"""``landscape compare``: headline numbers and tables of two revisions side by side, read through ``dvc.api``.

A revision is anything git or DVC resolves (a commit, branch, tag, ``HEAD~1``, or a ``dvc exp`` experiment name);
``None`` is the working tree. Outputs that DVC caches (the Parquet tables) are read from the DVC cache (or a
remote) at that revision, so nothing is checked out.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

METRICS = "reports/metrics.json"
# Wall-clock measurements differ between any two runs of the same code: they are shown, but not counted as a change
# unless asked for (``landscape compare --timing``).
_TIMING_NAMES = re.compile(r"(^|_)(seconds|wall|elapsed|time|duration)(_s)?$")


def is_timing(name: str) -> bool:
    """True for wall-clock columns and metric keys (``seconds``, ``tracking_seconds``, ``train.seconds``, ...)."""
    return bool(_TIMING_NAMES.search(name.rsplit(".", 1)[-1]))


class CompareError(RuntimeError):
    """A revision or a file that cannot be read; ``str()`` is one line."""


def _label(rev: str | None) -> str:
    return rev if rev is not None else "workspace"


def _resolve(rev: str, repo: Path) -> None:
    """Raise a one-line CompareError unless git (or DVC's experiment refs) knows ``rev``."""
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as dvc_repo:
            dvc_repo.scm.resolve_rev(rev)
            return
    except Exception:  # noqa: BLE001 - scmrepo raises several kinds; fall through to experiment names
        pass
    try:
        from dvc.repo.experiments.utils import resolve_name

        with Repo(str(repo)) as dvc_repo:
            if resolve_name(dvc_repo.scm, rev).get(rev) is not None:
                return
    except Exception:  # noqa: BLE001
        pass
    raise CompareError(f"{rev}: unknown revision (not a commit, branch, tag or `dvc exp` experiment of {repo})")


def read_bytes(path: str, rev: str | None, repo: Path) -> bytes:
    """The bytes of ``path`` at ``rev`` (``None``: the working tree), from git or the DVC cache."""
    if rev is None:
        file = Path(repo) / path
        if not file.is_file():
            raise CompareError(f"{path}: not found in the workspace (run `dvc repro` first)")
        return file.read_bytes()
    import dvc.api

    _resolve(rev, Path(repo))
    try:
        with dvc.api.open(path, repo=str(repo), rev=rev, mode="rb") as handle:
            return handle.read()
    except Exception as err:  # noqa: BLE001 - FileNotFoundError, PathMissingError, missing cache ...
        raise CompareError(f"{path}: not found at revision {rev} ({type(err).__name__})") from None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"mlp": {"train": {"loss": 1}}}`` -> ``{"mlp.train.loss": 1}`` (lists of numbers are kept whole)."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def compare_metrics(
    rev_a: str | None, rev_b: str | None, repo: Path = Path("."), *, timing: bool = False
) -> pd.DataFrame:
    """One row per headline number: ``key``, the value at each revision, ``delta`` (b − a) and ``changed``.

    Wall-clock keys (:func:`is_timing`) count as ``changed`` only with ``timing``.
    """
    values = []
    for rev in (rev_a, rev_b):
        try:
            values.append(flatten(json.loads(read_bytes(METRICS, rev, repo))))
        except ValueError as err:
            raise CompareError(f"{METRICS}: not valid JSON at {_label(rev)} ({err})") from None
    a, b = values
    rows = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        na, nb = _number(va), _number(vb)
        delta = nb - na if na is not None and nb is not None else None
        rows.append(
            {
                "key": key,
                _label(rev_a): va,
                _label(rev_b): vb,
                "delta": delta,
                "changed": va != vb and (timing or not is_timing(key)),
            }
        )
    return pd.DataFrame(rows, columns=["key", _label(rev_a), _label(rev_b), "delta", "changed"])


def read_table(run: str, name: str, rev: str | None, repo: Path = Path(".")) -> pd.DataFrame:
    """``reports/tables/<run>/<name>.parquet`` at ``rev``."""
    return pd.read_parquet(io.BytesIO(read_bytes(f"reports/tables/{run}/{name}.parquet", rev, repo)))


def differing_rows(merged: pd.DataFrame, *, timing: bool = False) -> pd.DataFrame:
    """The rows of :func:`compare_tables` that differ: a value changed, or the row is on one side only.

    Wall-clock columns (:func:`is_timing`) count only with ``timing``.
    """
    deltas = [c for c in merged.columns if c.endswith("_delta") and (timing or not is_timing(c[: -len("_delta")]))]
    changed = (merged[deltas].fillna(0).abs() > 0).any(axis=1) if deltas else pd.Series(False, index=merged.index)
    return merged[changed | (merged.only_in != "")]


def compare_tables(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Row-by-row comparison: rows are matched on the non-float columns (plus their order within equal keys); each
    float column ``c`` becomes ``c_a``, ``c_b`` and ``c_delta``. Rows present on one side only are kept (NaN on the
    other), with ``only_in`` naming the side."""
    keys = [c for c in a.columns if c in b.columns and not pd.api.types.is_float_dtype(a[c])]
    values = [c for c in a.columns if c in b.columns and pd.api.types.is_float_dtype(a[c])]
    left, right = a.copy(), b.copy()
    for frame in (left, right):
        frame["_n"] = frame.groupby(keys, dropna=False).cumcount() if keys else range(len(frame))
    merged = left.merge(right, on=[*keys, "_n"], how="outer", suffixes=("_a", "_b"), indicator=True)
    for column in values:
        merged[f"{column}_delta"] = merged[f"{column}_b"] - merged[f"{column}_a"]
    merged["only_in"] = merged["_merge"].map({"left_only": "a", "right_only": "b", "both": ""}).astype(str)
    return merged.drop(columns=["_n", "_merge"])


def format_metrics(frame: pd.DataFrame, *, changed_only: bool = True) -> str:
    """Plain-text table of :func:`compare_metrics` (changed rows only by default)."""
    rows = frame[frame.changed] if changed_only else frame
    if rows.empty:
        return "no headline number differs"
    a, b = frame.columns[1], frame.columns[2]

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.6g}"
        return json.dumps(value) if isinstance(value, list) else str(value)

    def delta(value: Any, base: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        number = _number(base)
        relative = f" ({value / number:+.1%})" if number not in (None, 0.0) else ""
        return f"{value:+.6g}{relative}"

    table = [["key", a, b, "delta"]] + [
        [r.key, cell(r[a]), cell(r[b]), delta(r.delta, r[a])] for _, r in rows.iterrows()
    ]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_overlay(tables: Mapping[str, pd.DataFrame], name: str, path: str | Path) -> Path:
    """Overlay figure of one table at two revisions: training curves (``train_history``), λmax over epochs
    (``hessian_spectrum``), the loss along the scans (``interpolation_1d``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_path

    fig, axes = plt.subplots(
        1, 2 if name == "train_history" else 1, figsize=(11 if name == "train_history" else 6, 4), squeeze=False
    )
    for (label, table), style in zip(tables.items(), ("-", "--")):
        if name == "train_history":
            epochs = table[table.scope == "epoch"]
            axes[0, 0].plot(epochs.epoch, epochs.train_loss, style, label=f"train loss ({label})")
            axes[0, 0].plot(epochs.epoch, epochs.test_loss, style, label=f"test loss ({label})")
            axes[0, 1].plot(epochs.epoch, epochs.test_accuracy, style, label=f"test accuracy ({label})")
        elif name == "hessian_spectrum":
            top = table[
                (table.operator == "hessian")
                & (table.group == "all")
                & (table.quantity == "eigenvalue")
                & (table["index"] == 0)
            ]
            axes[0, 0].plot(top.epoch, top.value, style + "o", label=f"λmax ({label})")
            axes[0, 0].set_yscale("log")
        elif name == "interpolation_1d":
            for kind, rows in table[table.split == table.split.iloc[0]].groupby("path"):
                axes[0, 0].plot(rows.alpha, rows.loss, style, label=f"{kind} ({label})")
            axes[0, 0].set_yscale("log")
        else:
            plt.close(fig)
            raise CompareError(
                f"--plot: no overlay for table {name!r}; allowed: train_history, hessian_spectrum, interpolation_1d"
            )
    for ax in axes.ravel():
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_xlabel("alpha / t" if name == "interpolation_1d" else "epoch")
    fig.suptitle(f"{name}: {' vs '.join(tables)}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)
