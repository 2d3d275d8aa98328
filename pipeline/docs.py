"""The parameter reference ``docs/params.md``, generated from :mod:`pipeline.config`'s field metadata.

Every key's default, allowed values (``ge``/``gt``/``le``/``lt``, ``choices``, ``pattern``), unit and meaning
(``doc``) are read from the section dataclasses, so the page cannot drift from what loading ``params.yaml`` checks.
``python -m pipeline.docs`` (``make docs``) writes the page; ``python -m pipeline.docs --check`` exits 1 when the
page on disk differs from what it would write (``tests/test_params_doc.py`` checks the same). Imports neither torch
nor Prefect.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import tempfile
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline import config
from pipeline.config import SECTIONS

DEFAULT_PATH = Path("docs") / "params.md"
MAKE_TARGET = "make docs"

# Rules that ``__post_init__`` (not the field metadata) enforces, appended to the metadata's allowed values so the
# page shows everything loading checks. The names come from config's own constants.
_POST_INIT_RULES: dict[str, str] = {
    "train.batch_size": f"or `{config.FULL_BATCH}`",
    "train.milestones": "strictly increasing, each ≥ 1",
    "hessian.checkpoints": "final, all, or an integer k ≥ 1",
    "hessian.details": "final, all, or an integer k ≥ 1",
    "hessian.max_hvps": "and ≥ 2 (max(top_k, group_top_k) + lambda_min) + 10",
    "hessian.trace": "list of: " + ", ".join(config.TRACE_METHODS) + " (no repeats)",
    "hessian.operators": "list of: " + ", ".join(config.CURVATURE_OPERATORS) + " (no repeats), including hessian",
    "hessian.flatness": "list of: " + ", ".join(config.FLATNESS_MEASURES) + " (no repeats)",
    "landscape.splits": "non-empty list of: " + ", ".join(config.LINE_SPLITS) + " (no repeats)",
    "landscape.line_points": "odd",
    "landscape.surface_points": "odd",
    "landscape.scheduler": "empty, or a Dask address (tcp, tls, ucx or inproc://...) with executor: dask",
}


def _number(value: float) -> str:
    """A bound as written in the page: integers with thousands separators, ``0.0`` as ``0``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}" if isinstance(value, int) else repr(value)


def _yaml(value: Any) -> str:
    """A default as it would appear in ``params.yaml`` (flow style)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def _bounds(meta: Mapping[str, Any]) -> str:
    """``ge``/``gt``/``le``/``lt`` as ``> 0``, ``≤ 100``, or ``0 ≤ x < 1`` when both sides are bounded."""
    lower = next((k for k in ("ge", "gt") if meta.get(k) is not None), None)
    upper = next((k for k in ("le", "lt") if meta.get(k) is not None), None)
    inclusive = {"ge": "≤", "gt": "<", "le": "≤", "lt": "<"}  # read left to right: limit op x op limit
    if lower and upper:
        return f"{_number(meta[lower])} {inclusive[lower]} x {inclusive[upper]} {_number(meta[upper])}"
    if lower:
        return f"{'≥' if lower == 'ge' else '>'} {_number(meta[lower])}"
    if upper:
        return f"{inclusive[upper]} {_number(meta[upper])}"
    return ""


def _pattern(pattern: re.Pattern) -> str:
    """``^(auto|cpu|cuda:\\d+)$`` as ``one of: auto, cpu, cuda:N``; any other pattern as the regular expression."""
    match = re.fullmatch(r"\^\((.*)\)\$", pattern.pattern)
    alternatives = match.group(1).split("|") if match else []
    if alternatives and all(re.fullmatch(r"[\w:.-]*(\\d\+)?", a) for a in alternatives):
        return "one of: " + ", ".join(a.replace(r"\d+", "N") for a in alternatives)
    return f"matches `{pattern.pattern}`"


def allowed(cls: type, f: dataclasses.Field) -> str:
    """What loading accepts for field ``f`` of section ``cls``, e.g. ``> 0``, ``0 ≤ x < 1``, ``one of: a, b``."""
    meta = f.metadata
    tp = typing.get_type_hints(cls)[f.name]
    parts = []
    if meta.get("choices") is not None:
        parts.append("one of: " + ", ".join(meta["choices"]))
    if meta.get("pattern") is not None:
        parts.append(_pattern(meta["pattern"]))
    bounds = _bounds(meta)
    if bounds:
        parts.append(f"list, each {bounds}" if typing.get_origin(tp) is tuple else bounds)
    if tp is bool:
        parts.append("true or false")
    if meta.get("mapping"):
        parts.append("a mapping of names to plain values (strings, numbers, true/false, null, lists of them)")
    section = next(name for name, c in SECTIONS.items() if c is cls)
    rule = _POST_INIT_RULES.get(f"{section}.{f.name}")
    if rule:
        parts.append(rule)
    if not parts and tp is str:
        parts.append("any string")
    return ", ".join(parts)


def _description(cls: type) -> str:
    """The first paragraph of ``cls``'s docstring without its ``<section> section:`` lead, in Markdown."""
    first = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0]
    text = " ".join(line.strip() for line in first.splitlines())
    text = re.sub(r"^``\w+`` section:\s*", "", text)
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    return text[:1].upper() + text[1:]


def _cell(text: str) -> str:
    return text.replace("|", r"\|").replace("\n", " ")


def _row(*cells: str) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


_HEADER = [_row("key", "default", "allowed", "unit", "meaning"), "|---|---|---|---|---|"]


def _section(name: str, cls: type) -> list[str]:
    lines = [f"## {name}", "", _description(cls), "", *_HEADER]
    for f in dataclasses.fields(cls):
        lines.append(
            _row(
                f"`{f.name}`",
                "`{}`" if f.metadata.get("mapping") else f"`{_yaml(f.default)}`",
                allowed(cls, f),
                f.metadata.get("unit", ""),
                f.metadata.get("doc", ""),
            )
        )
    return lines


def _runs() -> list[str]:
    model_keys = ", ".join(f"`{f.name}`" for f in dataclasses.fields(config.ModelConfig))
    return [
        "## runs",
        "",
        (
            _description(config.RunConfig) + f" Run names match `{config._RUN_NAME_PATTERN.pattern}`. Besides `model`, "
            f"an entry may set any key of the `model` section ({model_keys}) or of the `train` section; the keys it "
            "does not set take the section's value."
        ),
        "",
        *_HEADER,
        _row("`model`", "required", config.MODEL_NAMES, "", "architecture of the run (see `docs/models.md`)"),
        _row(
            "any `model` key",
            "the `model` section's value",
            "as in `model`",
            "as in `model`",
            "overrides the `model` section for this run",
        ),
        _row(
            "any `train` key",
            "the `train` section's value",
            "as in `train`",
            "as in `train`",
            "overrides the `train` section for this run",
        ),
    ]


def params_markdown() -> str:
    """The text of ``docs/params.md``: every section of ``params.yaml`` in file order, one table row per key."""
    intro = (
        f"This page is generated by `{MAKE_TARGET}` (`python -m pipeline.docs`) from the field metadata in "
        "`pipeline/config.py` and must not be edited by hand."
    )
    lines = ["# `params.yaml` reference", "", intro, ""]
    for name, cls in SECTIONS.items():
        lines += [*_section(name, cls), ""]
    lines += _runs()
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.docs", description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH, help=f"default: {DEFAULT_PATH}")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the page differs from what would be generated"
    )
    args = parser.parse_args(argv)
    text = params_markdown()
    if args.check:
        try:
            current = args.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            print(f"{args.path} is missing: run `{MAKE_TARGET}`", file=sys.stderr)
            return 1
        if current != text:
            print(f"{args.path} is stale: run `{MAKE_TARGET}`", file=sys.stderr)
            return 1
        return 0
    write_atomic(args.path, text)
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
