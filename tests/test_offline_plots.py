"""`dvc plots show/diff` HTML works offline once scripts/vega_offline.sh has run.

DVC's default page loads vega/vega-lite/vega-embed from a CDN; the script
inlines npm builds into a local HTML template (.dvc/plots/offline.html, set as
`plots.html_template` in .dvc/config.local). These tests run it on a throw-away
git+DVC repository; npm tarballs stay cached in ~/.cache/vega-offline (or
$VEGA_OFFLINE_CACHE) between runs. Without npm/registry the template tests skip;
without chromium the browser tests skip.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from chromium import chromium_binary, dump_dom, screenshot

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "vega_offline.sh"
TEMPLATE_REL = "plots/offline.html"  # as written to .dvc/config.local; DVC resolves it against .dvc/
RENDERED = re.compile(r'<(svg|canvas)\b[^>]*\bclass="marks"')
CDN_HOST = "cdn.jsdelivr.net"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's dvc
    env.update(
        DVC_NO_ANALYTICS="1",
        OMP_NUM_THREADS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
        **extra,
    )
    return env


def _run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None, check: bool = True):
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        pytest.fail(f"{cmd} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def _dvc(*args: str, cwd: Path, **kw):
    return _run(sys.executable, "-m", "dvc", *args, cwd=cwd, **kw)


def _make_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    _run("git", "init", "-q", cwd=path)
    _dvc("init", "-q", cwd=path)
    _dvc("config", "core.analytics", "false", cwd=path)
    _dvc("config", "core.check_update", "false", cwd=path)
    return path


@pytest.fixture(scope="module")
def plot_repo(tmp_path_factory) -> Path:
    repo = _make_repo(tmp_path_factory.mktemp("plots") / "repo")
    (repo / "metrics.csv").write_text("epoch,loss\n0,1.0\n1,0.55\n2,0.35\n3,0.3\n4,0.28\n")
    (repo / "dvc.yaml").write_text("plots:\n  - metrics.csv:\n      x: epoch\n      y: loss\n")
    return repo


@pytest.fixture(scope="module")
def cdn_html(plot_repo) -> Path:
    """DVC's default page (before the template is configured)."""
    _dvc("plots", "show", "-o", "cdn_out", cwd=plot_repo)
    html = plot_repo / "cdn_out" / "index.html"
    assert '<script src="https://cdn.jsdelivr.net/npm/vega' in html.read_text()
    return html


@pytest.fixture(scope="module")
def setup_run(plot_repo, cdn_html):
    start = time.monotonic()
    res = _run("bash", SCRIPT, plot_repo, cwd=REPO)
    elapsed = time.monotonic() - start
    assert res.returncode == 0, res.stderr
    if not (plot_repo / ".dvc" / TEMPLATE_REL).is_file():
        pytest.skip(f"offline vega template not built (npm or registry unavailable): {res.stderr.strip()}")
    return res, elapsed


@pytest.fixture(scope="module")
def offline_html(plot_repo, setup_run) -> Path:
    _dvc("plots", "show", "-o", "offline_out", cwd=plot_repo)
    return plot_repo / "offline_out" / "index.html"


def _assert_self_contained(html: str) -> None:
    assert "<script src=" not in html  # in particular no <script src="http...
    assert "cdn.jsdelivr.net" not in html
    inline = re.findall(r"<script[^>]*>(.*?)</script>", html, flags=re.S)
    sizes = sorted(len(s) for s in inline)
    assert len(inline) >= 4 and sizes[-3] > 50_000, sizes  # vega, vega-lite, vega-embed + a plot div
    for global_name in ("vega", "vegaLite", "vegaEmbed"):  # the UMD builds define these globals
        assert f".{global_name}=" in html, global_name
    assert "vegaEmbed('#" in html  # dvc_render's per-plot call
    assert '"epoch"' in html and '"loss"' in html  # the plot's data


def test_setup_configures_local_template(plot_repo, setup_run):
    res, _ = setup_run
    value = _dvc("config", "--local", "plots.html_template", cwd=plot_repo).stdout.strip()
    assert value == TEMPLATE_REL
    assert "html_template" not in (plot_repo / ".dvc" / "config").read_text()  # local only
    template = (plot_repo / ".dvc" / TEMPLATE_REL).read_text()
    assert "{plot_divs}" in template and "{scripts}" not in template


def test_rerun_is_a_fast_noop(plot_repo, setup_run):
    template = plot_repo / ".dvc" / TEMPLATE_REL
    before = template.stat().st_mtime_ns
    start = time.monotonic()
    res = _run("bash", SCRIPT, plot_repo, cwd=REPO)
    elapsed = time.monotonic() - start
    assert res.returncode == 0 and res.stderr == ""
    assert template.stat().st_mtime_ns == before
    assert elapsed < 5, elapsed


def test_plots_show_html_is_self_contained(offline_html):
    _assert_self_contained(offline_html.read_text())


def test_plots_diff_uses_template_too(plot_repo, setup_run):
    _run("git", "add", "metrics.csv", "dvc.yaml", ".dvc/config", ".dvc/.gitignore", cwd=plot_repo)
    _run("git", "commit", "-q", "-m", "metrics", cwd=plot_repo)
    (plot_repo / "metrics.csv").write_text("epoch,loss\n0,0.9\n1,0.5\n2,0.3\n3,0.25\n4,0.2\n")
    _dvc("plots", "diff", "HEAD", "-o", "diff_out", cwd=plot_repo)
    html = (plot_repo / "diff_out" / "index.html").read_text()
    _assert_self_contained(html)
    assert '"HEAD"' in html and '"workspace"' in html  # both revisions are plotted


@pytest.mark.parametrize("breakage", ["npm missing", "registry unreachable"])
def test_failure_is_one_line_and_not_fatal(tmp_path, breakage):
    repo = tmp_path / "repo"
    repo.mkdir()
    _dvc("init", "-q", "--no-scm", cwd=repo)
    # A dangling setting would make `dvc plots show` fail; the script removes it.
    (repo / ".dvc" / "config.local").write_text(f"[plots]\n    html_template = {TEMPLATE_REL}\n")
    extra = {"VEGA_OFFLINE_CACHE": str(tmp_path / "empty-cache")}
    if breakage == "npm missing":
        extra["NPM"] = str(tmp_path / "no-such-npm")
    else:
        extra.update(
            npm_config_registry="http://127.0.0.1:9/",
            npm_config_cache=str(tmp_path / "npm-cache"),
            npm_config_offline="false",
        )
    res = _run("bash", SCRIPT, repo, cwd=REPO, env=_env(**extra), check=False)
    assert res.returncode == 0
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "need internet" in lines[0], res.stderr
    assert not (repo / ".dvc" / TEMPLATE_REL).exists()
    assert "html_template" not in (repo / ".dvc" / "config.local").read_text()


needs_chromium = pytest.mark.skipif(
    chromium_binary() is None, reason="chromium not installed (apt-get install chromium)"
)


@needs_chromium
def test_offline_html_renders_in_chromium(offline_html, tmp_path):
    dom = dump_dom(offline_html, wait_ms=5000)
    assert RENDERED.search(dom), dom[-2000:]
    png = screenshot(offline_html, tmp_path / "plots.png", width=800, height=600, wait_ms=3000)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cdn_reachable() -> bool:
    try:
        with socket.create_connection((CDN_HOST, 443), timeout=3):
            return True
    except OSError:
        return False


@needs_chromium
def test_cdn_html_does_not_render_offline(cdn_html):
    """Negative control: the RENDERED check fails for DVC's default (CDN) page offline."""
    if _cdn_reachable():
        pytest.skip(f"{CDN_HOST} is reachable, so the CDN page is not offline here")
    dom = dump_dom(cdn_html, wait_ms=5000)
    assert "vegaEmbed('#" in dom  # the page loaded ...
    assert not RENDERED.search(dom)  # ... but no chart without the CDN
