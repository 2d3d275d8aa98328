"""The example of docs/api.md runs as it is and prints what it says."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_the_api_page_example_runs(tmp_path):
    page = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    assert len(blocks) == 1
    (tmp_path / "example.py").write_text(blocks[0])
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["top", "trace", "density", "surface:", "path"], done.stdout
    top = [float(v) for v in re.match(r"top eigenvalues ([^(]*) \(", lines[0]).group(1).split(", ")]
    assert len(top) == 3 and top[0] >= top[1] >= top[2] > 0
    trace, stderr = (float(v) for v in re.match(r"trace (\S+) \+- (\S+) \(hutchpp\)", lines[1]).groups())
    assert stderr >= 0 and abs(trace) < float("inf")
