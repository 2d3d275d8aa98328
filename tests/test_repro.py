"""Bitwise reproducibility across machines (pipeline.repro): pinned kernels and a fixed thread count give the same
bytes whatever the core count or the instruction set the CPU offers; without pinning they do not.

Another machine is stood in for by this one under other settings: one core instead of two (``taskset``), and the
instruction-set dispatch capped at AVX2 (``MKL_ENABLE_INSTRUCTIONS=AVX2`` on top of the pinned variables: an
AVX2-only CPU as MKL sees it). Each configuration is a fresh process, as a stage is, since the libraries read their
settings once at import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import repro

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "scripts" / "repro_probe.py"
KERNEL_VARIABLES = (*repro.PINNED_ENVIRONMENT, *repro.THREAD_VARIABLES, "MKL_ENABLE_INSTRUCTIONS")
needs_two_cores = pytest.mark.skipif(
    shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2, reason="needs taskset and two cores"
)


def probe(tmp_path: Path, *, pin: bool, threads: int, cores: str, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_VARIABLES}  # the suite's own pinning not inherited
    env.update(extra or {})
    out = tmp_path / f"probe-{int(pin)}-{threads}-{cores}-{len(extra or {})}.json"
    subprocess.run(
        ["taskset", "-c", cores, sys.executable, str(PROBE), str(int(pin)), str(threads), str(out)],
        env=env,
        check=True,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return json.loads(out.read_text())


def digest(result: dict) -> tuple[str, str, str]:
    return result["weights"], result["eigen"], result["tile"]


@needs_two_cores
@pytest.mark.skipif(not repro.cpu_has_avx2(), reason="kernel pinning is for x86-64 CPUs with AVX2")
def test_pinned_kernels_give_identical_bytes_on_one_or_two_cores_and_under_an_isa_cap(tmp_path):
    two = probe(tmp_path, pin=True, threads=2, cores="0,1")
    one = probe(tmp_path, pin=True, threads=2, cores="0")
    capped = probe(tmp_path, pin=True, threads=2, cores="0,1", extra={"MKL_ENABLE_INSTRUCTIONS": "AVX2"})
    assert digest(one) == digest(two) == digest(capped)  # training, Lanczos and a surface tile, bit for bit
    for result in (two, one, capped):
        record = result["record"]
        assert record["kernel_level"] == "AVX2" and record["kernels_pinned"] == "true" and record["threads"] == "2"
        assert record["cpu_guarantee"].startswith("bitwise on any x86-64 CPU with AVX2")

    # The same code unpinned, at the thread count a 1- or 2-core machine picks by itself: the bytes differ, so the
    # comparison above can fail (on an AVX2-only CPU the native level is AVX2 and the thread count still splits them).
    native_two = probe(tmp_path, pin=False, threads=0, cores="0,1")
    native_one = probe(tmp_path, pin=False, threads=0, cores="0")
    assert native_one["record"]["threads"] == "1" and native_one["record"]["kernels_pinned"] == "false"
    assert len({digest(native_two), digest(native_one), digest(two)}) > 1
    assert digest(native_two)[0] != digest(native_one)[0]  # the trained weights depend on the core count


def test_kernel_environment_and_record(monkeypatch):
    assert repro.kernel_environment(False, 0) == {}
    assert repro.kernel_environment(False, 3) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    if repro.cpu_has_avx2():
        assert repro.kernel_environment(True, 2) == {
            **repro.PINNED_ENVIRONMENT,
            "OMP_NUM_THREADS": "2",
            "MKL_NUM_THREADS": "2",
        }
    record = repro.kernel_record()  # this session pinned by conftest
    assert set(repro.kernel_fingerprint()) == {"kernel_level", "kernels_pinned", "threads", "cpu_model"}
    assert record["threads"] == "2"
    from pipeline.provenance import provenance

    assert {"kernel_level", "threads", "cpu_model", "cpu_guarantee", "cuda_guarantee"} <= set(provenance())


def test_apply_refuses_to_change_kernels_after_torch_is_imported(monkeypatch):
    import torch  # noqa: F401 - imported by conftest already; the point is that it is

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    repro.apply(pin=False, threads=2)  # the settings in force: nothing to change, fine
    with pytest.raises(RuntimeError, match="torch was imported before the kernel settings OMP_NUM_THREADS=5"):
        repro.apply(pin=False, threads=5)


def test_a_bad_repro_section_is_one_line(tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"^repro.threads: must be >= 0, got -1$"):
        repro.apply_section({"threads": -1})
    with pytest.raises(ConfigError, match=r"^repro.pinn: unknown key; allowed: pin, threads, seeds$"):
        repro.apply_section({"pinn": True})
