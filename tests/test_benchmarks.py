"""Every benchmark starts: its imports put ``benchmarks/common.py`` (which pins the CPU kernels) before torch, which
a formatter's import sorting once undid for all of them."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py") if p.name != "common.py"
)


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_the_benchmark_starts(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-1500:]


def test_the_gpu_benchmark_runs_its_cpu_path_on_a_tiny_size():
    """benchmarks/gpu.py's every part (training, HVP / gradient, Lanczos on two devices, the grid engine) on the CPU:
    its table has the four rows, and λmax on the "two devices" (both the CPU here) is the same bits."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    tiny = ["--device", "cpu", "--samples", "64", "--probe", "32", "--points", "3", "--rounds", "1"]
    done = subprocess.run(
        [sys.executable, str(script), *tiny, "--batch-size", "32", "--lanczos-hvps", "40", "--root", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "synthetic: 48 train, probe 32; device cpu (CPU)" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "measure" not in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| train epoch (ResNet20)",
        "| HVP / gradient (probe set)",
        "| Lanczos λmax, CPU vs device",
        "| grid points/s, engine (chunk " + rows[3].split("(chunk ")[1].split(")")[0] + ") vs loop",
    ]
    assert "| 0.0e+00 relative |" in rows[2]
