"""Models from an import path: a run's ``model: "package.module:callable"``.

The callable is called as ``callable(input_shape, num_classes, **model_kwargs)`` with ``input_shape`` = (C, H, W)
and the run's ``model_kwargs`` (plain values from ``params.yaml``), and returns an ``nn.Module`` mapping a batch
``(B, C, H, W)`` to logits ``(B, num_classes)``. The project root (the working directory the stages run in) is on
the import path, so a top-level ``models/`` folder of the repository works as it is; DVC lists ``models`` as a
dependency of every stage that builds a model, and the module's sources enter each checkpoint's fingerprint
(:func:`model_sources`), so editing the model retrains rather than resumes.

Every failure is a :class:`pipeline.errors.ModelError`, one line naming the path and what was found;
:func:`check_model` is what ``landscape check`` runs for each run with an import path.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from pipeline.errors import ModelError


def _on_path() -> None:
    """The project root (working directory) importable, after the installed packages; new files seen."""
    root = os.getcwd()
    if root not in sys.path:
        sys.path.append(root)
    importlib.invalidate_caches()


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def resolve(path: str) -> Callable[..., Any]:
    """The object ``package.module:attribute`` names (attributes may be dotted: ``module:Class.build``)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ModelError(f"model {path!r}: expected package.module:callable")
    _on_path()
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as err:  # the user's module may raise anything while importing
        raise ModelError(f"model {path!r}: cannot import {module_name} ({_one_line(err)})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelError(f"model {path!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"model {path!r}: {attribute} is a {type(target).__name__}, not a callable")
    return target


def model_sources(path: str) -> list[Path]:
    """The source files whose code decides the model of import path ``path``: every ``*.py`` of its top-level
    package when that package lies in the project (``models/``), else the module's own file."""
    module_name = path.partition(":")[0]
    _on_path()
    top = module_name.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        return []
    origin = Path(spec.origin).resolve()
    root = Path.cwd().resolve()
    if origin.name == "__init__.py" and origin.parent.is_relative_to(root):
        return sorted(origin.parent.rglob("*.py"))
    try:
        module_spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return [origin]
    return [Path(module_spec.origin)] if module_spec is not None and module_spec.origin else [origin]


def source_digest(path: str) -> str:
    """sha256 over :func:`model_sources` (file names relative to their package folder, and contents)."""
    digest = hashlib.sha256()
    for file in model_sources(path):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def build_custom(
    path: str, input_shape: tuple[int, int, int], num_classes: int, kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """Call the model factory ``path`` and check that it returned a module with trainable parameters."""
    factory = resolve(path)
    try:
        model = factory(tuple(input_shape), int(num_classes), **dict(kwargs or {}))
    except Exception as err:
        raise ModelError(
            f"model {path!r}: calling it with {tuple(input_shape)}, {num_classes} classes and "
            f"model_kwargs {dict(kwargs or {})} failed ({_one_line(err)})"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {path!r}: returned a {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"model {path!r}: the module has no trainable parameters")
    return model


def check_model(
    path: str, input_shape: tuple[int, int, int], num_classes: int, kwargs: Mapping[str, Any] | None = None
) -> str:
    """Build the model and run one forward on zeros ``(2, *input_shape)`` in eval mode; return a one-line summary,
    or raise :class:`ModelError` naming what is wrong."""
    model = build_custom(path, input_shape, num_classes, kwargs)
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *input_shape))
    except Exception as err:
        raise ModelError(
            f"model {path!r}: a forward on zeros of shape {(2, *input_shape)} failed ({_one_line(err)})"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model {path!r}: a batch of shape {(2, *input_shape)} gave output {found}; "
            f"expected (2, {num_classes}) logits"
        )
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{path}: {type(model).__name__}, {n:,} parameters, output (B, {num_classes})"
