"""Stage dependencies cannot drift from the code: every project file a stage imports is one of its DVC deps.

Each stage's import closure is built from its ``stages/*.py`` entry by reading the source (every ``import`` of a
``pipeline`` module, at module level or inside a function, since a lazy import runs too), following it through the
package ``__init__`` files. A file of the closure must be a dependency of the stage in ``dvc.yaml`` or
``sweeps/dvc.yaml``, itself or through a folder that holds it. Editing a file a stage runs then always reruns it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("dvc.yaml", "sweeps/dvc.yaml")


def _module_file(module: str) -> Path | None:
    """The file of a ``pipeline.*`` module (a package's ``__init__.py``), or None when it is not a project file."""
    base = ROOT.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _with_packages(module: str) -> list[str]:
    """``a.b.c`` -> ``[a, a.b, a.b.c]``: importing a module runs every package ``__init__`` above it."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def imported_modules(path: Path) -> set[str]:
    """The ``pipeline`` modules one source file imports (``from pipeline.x import y`` counts ``y`` when it is a
    module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            if name == "pipeline" or name.startswith("pipeline."):
                found.update(m for m in _with_packages(name) if _module_file(m) is not None)
    return found


def import_closure(entry: Path) -> set[Path]:
    """Every project file that running ``entry`` can import, ``entry`` included (paths relative to the repo)."""
    files, todo = {entry.resolve()}, [entry.resolve()]
    while todo:
        for module in imported_modules(todo.pop()):
            path = _module_file(module)
            if path is not None and path not in files:
                files.add(path)
                todo.append(path)
    return {p.relative_to(ROOT) if ROOT in p.parents else p for p in files}


def pipeline_stages(dvc_file: str) -> list[tuple[str, Path, list[str]]]:
    """``(stage name, entry script, deps)`` of each stage of a ``dvc.yaml``; paths relative to the repo root."""
    spec = YAML(typ="safe", pure=True).load((ROOT / dvc_file).read_text())
    stages = []
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        wdir = (ROOT / Path(dvc_file).parent / body.get("wdir", ".")).resolve()
        deps = [str((wdir / d).resolve().relative_to(ROOT)) for d in body.get("deps", []) if "${" not in d]
        entry = next(word for word in body["cmd"].split() if word.startswith("stages/") and word.endswith(".py"))
        stages.append((f"{dvc_file}:{name}", Path(entry), deps))
    return stages


def uncovered(closure: set[Path], deps: list[str]) -> list[str]:
    """Files of ``closure`` that no dependency names, itself or as a folder above it."""
    covered = [Path(d) for d in deps]
    return sorted(str(f) for f in closure if not any(f == d or d in f.parents for d in covered))


STAGES = [s for dvc_file in PIPELINES for s in pipeline_stages(dvc_file)]


@pytest.mark.parametrize("stage, entry, deps", STAGES, ids=[s[0] for s in STAGES])
def test_every_imported_project_file_is_a_dependency(stage, entry, deps):
    missing = uncovered(import_closure(ROOT / entry), deps)
    assert not missing, f"{stage}: imports {', '.join(missing)} but does not list it in deps"


def test_the_check_fails_when_a_dependency_is_dropped():
    stage, entry, deps = next(s for s in STAGES if s[0].endswith(":train"))
    closure = import_closure(ROOT / entry)
    assert Path("pipeline/training/trainer.py") in closure and Path("pipeline/__init__.py") in closure
    missing = uncovered(closure, [d for d in deps if d != "pipeline/training"])
    assert "pipeline/training/trainer.py" in missing and all(m.startswith("pipeline/training/") for m in missing)
    assert uncovered(closure, [d for d in deps if d != "pipeline/stage.py"]) == ["pipeline/stage.py"]


WINGS = ("training", "curvature", "landscape", "sweep", "report")


@pytest.mark.parametrize("stage, entry, deps", STAGES, ids=[s[0] for s in STAGES])
def test_wings_are_folder_dependencies(stage, entry, deps):
    """A stage depends on a wing as a whole folder, so a file added to the wing is covered without editing dvc.yaml."""
    files_in_wings = [d for d in deps if any(d.startswith(f"pipeline/{w}/") for w in WINGS)]
    assert not files_in_wings, f"{stage}: list the wing folder instead of {files_in_wings}"


def _deps(name: str) -> list[str]:
    return next(deps for stage, _, deps in STAGES if stage == f"dvc.yaml:{name}")


def _reruns_on(name: str, path: str) -> bool:
    return not uncovered({Path(path)}, _deps(name))


def test_closures_stay_tight():
    """Editing the report never reruns training; editing training code never reruns prepare; the scans' side-by-side
    figures and the metrics do not depend on training or curvature code."""
    assert not _reruns_on("train", "pipeline/report/render.py")
    assert not _reruns_on("prepare", "pipeline/training/trainer.py")
    assert not _reruns_on("prepare", "pipeline/curvature/eigen.py")
    for stage in ("metrics", "landscape_figures", "report"):
        assert not _reruns_on(stage, "pipeline/training/trainer.py"), stage
        assert not _reruns_on(stage, "pipeline/curvature/operators.py"), stage
    assert _reruns_on("hessian", "pipeline/curvature/eigen.py") and _reruns_on("train", "pipeline/training/steps.py")


def test_lazy_imports_and_package_inits_are_followed(tmp_path):
    source = tmp_path / "entry.py"
    source.write_text("def main():\n    from pipeline import errors\n")
    assert {str(p) for p in import_closure(source) if p != source} == {"pipeline/__init__.py", "pipeline/errors.py"}
    source.write_text("import os\n\ndef main():\n    from pipeline.flows.runtime import configure_prefect\n")
    closure = {str(p) for p in import_closure(source) if p != source}
    assert {"pipeline/flows/__init__.py", "pipeline/flows/runtime.py", "pipeline/io.py"} <= closure  # io: lazily
    assert not any(p.startswith("pipeline/curvature") for p in closure)
