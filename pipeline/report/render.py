"""The report's two documents: ``reports/index.html`` (self-contained: every figure embedded, opens offline) and
``reports/README.md`` (figures beside it, renders on any git host), with the summary and seeds tables."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display: figures are files


from pipeline.io import atomic_path  # noqa: E402
from pipeline.report.claims import (  # noqa: E402
    CLAIMS_CAPTION,
    REPARAM_CAPTION,
    claims_html,
    claims_markdown,
    reparam_html,
    reparam_markdown,
)
from pipeline.report.summary import (
    CONNECTIVITY_CAPTION,
    CONNECTIVITY_COLUMNS,
    SEED_COLUMNS,
    SUMMARY_COLUMNS,
    Report,
    format_value,
)


def seeds_markdown(seeds: Sequence[Mapping[str, Any]], comparisons: Sequence[Mapping[str, Any]]) -> str:
    """The "Across seeds" section in markdown (empty without seed metrics)."""
    if not seeds:
        return ""
    lines = [
        "| run | seeds | " + " | ".join(h for _, h in SEED_COLUMNS) + " |",
        "|---|---:|" + "---:|" * len(SEED_COLUMNS),
    ]
    lines += ["| " + " | ".join([r["run"], r["seeds"], *(r[k] for k, _ in SEED_COLUMNS)]) + " |" for r in seeds]
    if comparisons:
        lines += ["", "| runs | measure | ratio of means | verdict |", "|---|---|---:|---|"]
        lines += [f"| {c['pair']} | {c['measure']} | {c['ratio']} | {c['verdict']} |" for c in comparisons]
    return "\n".join(lines)


SEEDS_CAPTION = (
    "Mean ± half-width of the 95% Student-t interval over the seeds of each run (train.seed + k, every "
    "seed measured alike at its final checkpoint: λmax and λmin by Lanczos, Hutchinson trace). Two runs "
    "differ in a measure when their intervals separate; overlapping intervals mean the seeds cannot "
    "tell them apart, not that they are equal."
)


def _html_table(table_id: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='wide'><table id='{table_id}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def seeds_html(seeds: Sequence[Mapping[str, Any]], comparisons: Sequence[Mapping[str, Any]]) -> str:
    """The "Across seeds" section in HTML (empty without seed metrics)."""
    if not seeds:
        return ""
    out = [
        "<h2>Across seeds</h2>",
        _html_table(
            "seeds",
            ["run", "seeds", *(h for _, h in SEED_COLUMNS)],
            [[r["run"], r["seeds"], *(r[k] for k, _ in SEED_COLUMNS)] for r in seeds],
        ),
    ]
    if comparisons:
        out.append(
            _html_table(
                "comparisons",
                ["runs", "measure", "ratio of means", "verdict"],
                [[c["pair"], c["measure"], c["ratio"], c["verdict"]] for c in comparisons],
            )
        )
    out.append(f"<p class='meta'>{html.escape(SEEDS_CAPTION)}</p>")
    return "".join(out)


def connectivity_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The "Mode connectivity" table in markdown (empty without connectivity metrics)."""
    if not rows:
        return ""
    lines = [
        "| run | path | " + " | ".join(h for _, h in CONNECTIVITY_COLUMNS) + " |",
        "|---|---|" + "---:|" * len(CONNECTIVITY_COLUMNS),
    ]
    lines += [
        "| " + " | ".join([r["run"], r["variant"], *(r[k] for k, _ in CONNECTIVITY_COLUMNS)]) + " |" for r in rows
    ]
    return "\n".join(lines)


def connectivity_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """The "Mode connectivity" section in HTML (empty without connectivity metrics)."""
    if not rows:
        return ""
    table = _html_table(
        "connectivity",
        ["run", "path", *(h for _, h in CONNECTIVITY_COLUMNS)],
        [[r["run"], r["variant"], *(r[k] for k, _ in CONNECTIVITY_COLUMNS)] for r in rows],
    )
    return f"<h2>Mode connectivity</h2>{table}<p class='meta'>{html.escape(CONNECTIVITY_CAPTION)}</p>"


def summary_markdown(summary: Sequence[Mapping[str, Any]]) -> str:
    """The summary table in GitHub markdown (also the Prefect markdown artifact)."""
    header = "| " + " | ".join(h for _, h, _ in SUMMARY_COLUMNS) + " |"
    rule = "|" + "|".join("---" if k in ("run", "model", "status") else "---:" for k, _, _ in SUMMARY_COLUMNS) + "|"
    body = ["| " + " | ".join(format_value(row.get(k)) for k, _, _ in SUMMARY_COLUMNS) + " |" for row in summary]
    return "\n".join([header, rule, *body])


def _legend_markdown() -> str:
    return "\n".join(f"- **{h}**: {meaning}" for _, h, meaning in SUMMARY_COLUMNS if meaning)


def render_markdown(report: Report, base: Path) -> str:
    """``reports/README.md``: figures linked relative to ``base`` (the folder the file is written to)."""
    lines = [
        "# Loss-landscape report",
        "",
        f"Built from the pipeline's tables at git revision `{report.revision}`. "
        "`index.html` beside this file is the same report with every figure embedded.",
        "",
        "## Summary",
        "",
        summary_markdown(report.summary),
        "",
        _legend_markdown(),
        "",
    ]
    if report.seeds:
        lines += ["## Across seeds", "", seeds_markdown(report.seeds, report.comparisons), "", SEEDS_CAPTION, ""]
    if report.connectivity:
        lines += ["## Mode connectivity", "", connectivity_markdown(report.connectivity), "", CONNECTIVITY_CAPTION, ""]
    if report.reparam:
        lines += ["## Reparametrisation (Dinh et al.)", "", reparam_markdown(report.reparam), "", REPARAM_CAPTION, ""]
    if report.claims:
        lines += ["## What the landscape says", "", claims_markdown(report.claims), "", CLAIMS_CAPTION, ""]
    for title, path, caption in report.figures:
        rel = (
            Path(path).resolve().relative_to(base.resolve())
            if Path(path).resolve().is_relative_to(base.resolve())
            else Path(path)
        )
        lines += [f"## {title}", "", f"![{title}]({rel.as_posix()})", "", caption, ""]
    lines += ["## Provenance", "", "| run | table | git revision | code | data | torch |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {p['run']} | {p['table']} | `{p['git_revision']}` | `{p['code']}` | `{p['data']}` | {p['torch']} |"
        for p in report.provenance
    ]
    lines += [
        "",
        "Libraries at report time: " + ", ".join(f"{k} {v}" for k, v in report.libraries.items()),
        "",
        "### Settings recorded with the tables",
        "",
    ]
    for name, value in report.settings.items():
        lines += [
            f"<details><summary><code>{name}</code></summary>",
            "",
            "```json",
            json.dumps(value, indent=2, sort_keys=True),
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1400px;padding:0 1rem;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}th,td{border:1px solid #ddd;padding:.25rem .5rem}
th{background:#f4f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fff1f0}figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85rem;color:#555}.meta{color:#666;font-size:.85rem}code{font-size:.85em}
figure.broken::after{content:"this figure failed to load";color:#b00020;font-weight:600}
dl.legend{font-size:.8rem;color:#444;display:grid;grid-template-columns:max-content 1fr;gap:.1rem 1rem}
dl.legend dt{font-weight:600}dl.legend dd{margin:0}
pre{background:#f7f7f9;padding:.5rem;overflow-x:auto;font-size:.8rem}
.wide{overflow-x:auto}
"""


# Marks each figure that failed to decode (visible) and records "<decoded>/<total>" on <body data-figures>.
_CHECK_FIGURES = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.querySelectorAll("figure img"));
  var bad = images.filter(function (img) { return !img.complete || img.naturalWidth === 0; });
  bad.forEach(function (img) { img.closest("figure").classList.add("broken"); });
  document.body.setAttribute("data-figures", (images.length - bad.length) + "/" + images.length);
});
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(report: Report) -> str:
    """``reports/index.html``: one file, figures embedded as data URIs, no external resources."""
    e = html.escape
    head = "".join(f"<th title='{e(meaning)}'>{e(h)}</th>" for _, h, meaning in SUMMARY_COLUMNS)
    body = []
    for row in report.summary:
        cells = "".join(
            f"<td class='num'>{e(format_value(row.get(k)))}</td>"
            if k not in ("run", "model", "status")
            else f"<td>{e(format_value(row.get(k)))}</td>"
            for k, _, _ in SUMMARY_COLUMNS
        )
        bad = row.get("status") != "completed"
        body.append(f"<tr class='{'bad' if bad else ''}'>{cells}</tr>")
    legend = "".join(f"<dt>{e(h)}</dt><dd>{e(meaning)}</dd>" for _, h, meaning in SUMMARY_COLUMNS if meaning)
    figures = "".join(
        f"<h2>{e(title)}</h2><figure><img src='{_data_uri(path)}' alt='{e(title)}'>"
        f"<figcaption>{e(caption)}</figcaption></figure>"
        for title, path, caption in report.figures
    )
    prov = "".join(
        f"<tr><td>{e(p['run'])}</td><td>{e(p['table'])}</td><td><code>{e(p['git_revision'])}</code></td>"
        f"<td><code>{e(p['code'])}</code></td><td><code>{e(p['data'])}</code></td><td>{e(p['torch'])}</td></tr>"
        for p in report.provenance
    )
    libs = ", ".join(f"{e(k)} {e(v)}" for k, v in report.libraries.items())
    settings = "".join(
        f"<details><summary><code>{e(name)}</code></summary><pre>"
        f"{e(json.dumps(value, indent=2, sort_keys=True))}</pre></details>"
        for name, value in report.settings.items()
    )
    exports = ", ".join(sorted({p.parent.name for p in report.exports}))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Loss-landscape report</title><style>{_CSS}</style></head>
<body>
<h1>Loss-landscape report</h1>
<p class="meta">git revision <code>{e(report.revision)}</code> · {len(report.summary)} runs · self-contained
(figures embedded) · data for <code>dvc plots</code>: {e(exports) or "none"}</p>
<h2>Summary</h2>
<div class="wide"><table id="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>
<dl class="legend">{legend}</dl>
{seeds_html(report.seeds, report.comparisons)}
{connectivity_html(report.connectivity)}
{reparam_html(report.reparam)}
{claims_html(report.claims)}
{figures}
<h2>Provenance</h2>
<table id="provenance"><thead><tr><th>run</th><th>table</th><th>git revision</th><th>code</th><th>data</th><th>torch</th>
</tr></thead><tbody>{prov}</tbody></table>
<p class="meta">Libraries at report time: {libs}</p>
<h3>Settings recorded with the tables</h3>
{settings}
<script>{_CHECK_FIGURES}</script>
</body></html>
"""


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
