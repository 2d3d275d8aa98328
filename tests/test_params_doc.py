"""``docs/params.md`` is generated from ``pipeline/config.py``'s field metadata (:mod:`pipeline.docs`): the page on
disk must be current, every key must be explained, and every key of ``params.yaml`` must appear in it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from pipeline import docs
from pipeline.config import SECTIONS
from pipeline.docs import main, params_markdown

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "params.md"


def _section_text(page: str, name: str) -> str:
    match = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## |\Z)", page, flags=re.MULTILINE | re.DOTALL)
    assert match, f"no '## {name}' section in docs/params.md"
    return match.group(1)


def _rows(section_text: str) -> dict[str, list[str]]:
    """Table rows of a section keyed by the key column (backticks stripped); cells split on unescaped '|'."""
    rows = {}
    for line in section_text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0].strip("`")] = cells
    return rows


def test_page_is_current():
    assert PAGE.is_file(), "docs/params.md is missing: run `make docs`"
    assert PAGE.read_text(encoding="utf-8") == params_markdown(), "docs/params.md is stale: run `make docs`"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_key_is_explained(section):
    cls = SECTIONS[section]
    for f in dataclasses.fields(cls):
        assert f.metadata.get("doc") or f.metadata.get("unit"), (
            f"{section}.{f.name} has neither doc= nor unit= in pipeline/config.py: say what it means"
        )


def test_post_init_rules_name_existing_keys():
    keys = {f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(docs._POST_INIT_RULES) <= keys, set(docs._POST_INIT_RULES) - keys


def test_train_lr_row_shows_default_and_bound():
    rows = _rows(_section_text(params_markdown(), "train"))
    _, default, allowed, unit, _ = rows["lr"]
    assert default == "`0.05`" and allowed == "> 0" and unit.startswith("learning rate")
    assert rows["momentum"][2] == "0 ≤ x < 1"
    assert rows["optimizer"][2] == "one of: sgd, adam"
    assert rows["nesterov"][1] == "`false`" and rows["milestones"][1] == "`[]`"
    assert rows["device"][2] == "one of: auto, cpu, cuda, cuda:N, mps"


def test_sections_follow_params_yaml_and_list_all_its_keys():
    raw = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text(encoding="utf-8"))
    page = params_markdown()
    headings = re.findall(r"^## (\w+)$", page, flags=re.MULTILINE)
    assert headings == list(raw), "sections must appear in params.yaml order"
    for section, values in raw.items():
        if section == "runs":
            continue
        rows = _rows(_section_text(page, section))
        missing = [key for key in values if key not in rows]
        assert not missing, f"params.yaml keys missing from docs/params.md ({section}): {missing}"
        assert list(rows) == [f.name for f in dataclasses.fields(SECTIONS[section])]
    assert "`model`" in _section_text(page, "runs")


def test_check_flags_a_stale_page_in_one_line(tmp_path, capsys):
    page = tmp_path / "params.md"
    assert main([str(page), "--check"]) == 1
    assert capsys.readouterr().err.strip() == f"{page} is missing: run `make docs`"
    assert main([str(page)]) == 0 and page.read_text(encoding="utf-8") == params_markdown()
    assert main([str(page), "--check"]) == 0
    page.write_text(params_markdown() + "edited by hand\n", encoding="utf-8")
    capsys.readouterr()
    assert main([str(page), "--check"]) == 1
    err = capsys.readouterr().err
    assert err == f"{page} is stale: run `make docs`\n"
    assert [p.name for p in tmp_path.iterdir()] == ["params.md"]  # no temporary file left behind


def test_module_imports_neither_torch_nor_prefect():
    code = "import sys, pipeline.docs; print(sorted(m for m in ('torch', 'prefect') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
