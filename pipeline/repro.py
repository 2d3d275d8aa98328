"""The same bits on every machine: CPU kernels pinned to one instruction-set level and a fixed thread count.

PyTorch's CPU results depend on the machine in two ways, and hundreds of SGD steps amplify either into different
weights (measured: four weight hashes after 30 ResNet20 steps for {1, 2} threads x {AVX-512, AVX2} kernels):

- **Instruction set.** ATen's vectorised kernels, oneDNN's convolutions and MKL's GEMMs each pick code for the CPU
  they find (AVX2, AVX-512, AMX), with different blocking and so different rounding. ``repro.pin`` caps all three at
  AVX2, which every x86-64 server CPU of the last decade has: ``ATEN_CPU_CAPABILITY=avx2``,
  ``ONEDNN_MAX_CPU_ISA=AVX2``, and MKL's conditional numerical reproducibility ``MKL_CBWR=AVX2``.
- **Thread count.** Reductions (a convolution's weight gradient, BatchNorm statistics, sums) are split by thread,
  so 1 and 2 threads round differently. No setting makes every kernel independent of it (oneDNN is not; ATen's
  im2col path held up to 4 threads and broke at 7, at 5x the cost of a product), so ``repro.threads`` fixes it.

Both are environment variables that the libraries read once, when torch is imported (or at their first call): they
are set by :func:`apply` before that, in every stage process (``pipeline.cli.stage_entry``), benchmark and test
session, and inherited by the processes a stage starts (Dask workers). :func:`kernel_record` is what every
checkpoint and table records; it also goes into the training fingerprint, so checkpoints made with other kernels
are never resumed.

What is not covered, and why: GPUs (cuBLAS/cuDNN pick kernels per GPU model and library version; with
deterministic algorithms a run repeats bitwise on one GPU model and software stack only), CPUs other than x86-64
(no AVX2 to pin; bitwise repeatable on one CPU model with fixed threads), numpy/scipy's OpenBLAS in the float64
solver steps (its kernels are left to the machine: their inputs are float64 and their rounding does not reach the
float32 weights), and oneDNN's cache-size-dependent blocking (the same AVX2 code on CPUs with other cache sizes
could block a reduction differently; not observed here, and the only way around it, ATen's im2col convolutions,
costs 3x per training step and 5x per Hessian-vector product).
"""

from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

# What `repro.pin` sets: every x86-64 CPU with AVX2 runs the same kernels.
PINNED_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_has_avx2() -> bool:
    """True on an x86-64 CPU that reports AVX2 (the level :data:`PINNED_ENVIRONMENT` asks for)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return any(
            line.startswith("flags") and " avx2" in line for line in Path("/proc/cpuinfo").read_text().splitlines()
        )
    except OSError:
        return False


def kernel_environment(pin: bool, threads: int) -> dict[str, str]:
    """The environment variables :func:`apply` sets for ``repro.pin`` and ``repro.threads`` on this machine."""
    env = dict(PINNED_ENVIRONMENT) if pin and cpu_has_avx2() else {}
    if threads:
        env.update({name: str(threads) for name in THREAD_VARIABLES})
    return env


def apply(pin: bool = True, threads: int = 2) -> dict[str, str]:
    """Set the kernel environment of ``repro.pin``/``repro.threads`` for this process and its children.

    Must run before torch is imported: the libraries read these variables once. ``pin: false`` leaves whatever the
    environment says (native kernels unless the user set the variables). Returns the variables set.

    Raises:
        RuntimeError: torch was imported already with other settings (a programming error, not a user's).
    """
    env = kernel_environment(pin, threads)
    if "torch" in sys.modules:
        wrong = {k: v for k, v in env.items() if os.environ.get(k) != v}
        if wrong:
            raise RuntimeError(
                f"pipeline.repro.apply: torch was imported before the kernel settings "
                f"{', '.join(f'{k}={v}' for k, v in wrong.items())}; import it after apply()"
            )
    os.environ.update(env)
    return env


def apply_section(raw: Any) -> dict[str, str]:
    """:func:`apply` for the raw ``repro`` mapping of a params file (validated as
    :class:`~pipeline.config.ReproConfig`).

    Raises:
        ConfigError: naming the ``repro.<key>`` that is wrong.
    """
    from pipeline.config import ReproConfig, build_section

    cfg = build_section(ReproConfig, raw if raw is not None else {}, "repro")
    return apply(cfg.pin, cfg.threads)


def apply_from_params(path: str | Path) -> dict[str, str]:
    """:func:`apply_section` for the ``repro`` section of the params file at ``path`` (defaults when it has none)."""
    from pipeline.config import ConfigError, read_yaml

    raw = read_yaml(path)
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError("", f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return apply_section((raw or {}).get("repro"))


def kernel_record() -> dict[str, str]:
    """What decides the bits of a CPU result here, as flat strings (provenance of every checkpoint and table):
    the kernel level torch dispatches to, the pinned variables, the thread count, the CPU model, and what is
    guaranteed.

    With pinned kernels the CPU model does not decide the bits, and recording it would make the tables of two
    machines differ in bytes (and in their DVC hashes) where their numbers agree; it is then recorded as
    ``any x86-64 with AVX2`` (the actual model is then not recorded: it does not decide the numbers).
    """
    import torch

    pinned = all(os.environ.get(k) == v for k, v in PINNED_ENVIRONMENT.items())
    if not cpu_has_avx2():
        guarantee = "bitwise on this CPU model with these threads (not x86-64 with AVX2: kernels not pinned)"
    elif pinned:
        guarantee = "bitwise on any x86-64 CPU with AVX2 at these threads"
    else:
        guarantee = "bitwise on this CPU model with these threads (kernels native, repro.pin off)"
    return {
        "kernel_level": str(torch.backends.cpu.get_cpu_capability()),
        "kernels_pinned": str(pinned).lower(),
        **{f"env_{k}": os.environ.get(k, "") for k in (*PINNED_ENVIRONMENT, *THREAD_VARIABLES)},
        "threads": str(torch.get_num_threads()),
        "cpu_model": "any x86-64 with AVX2 (kernels pinned)" if pinned and cpu_has_avx2() else cpu_model(),
        "machine": platform.machine(),
        "cpu_guarantee": guarantee,
        "cuda_guarantee": (
            "deterministic algorithms; bitwise on the same GPU model, driver and CUDA/cuDNN versions only"
            if torch.cuda.is_available()
            else "no CUDA device"
        ),
    }


def kernel_fingerprint() -> dict[str, str]:
    """The part of :func:`kernel_record` that changes trained weights (level, pinning, threads), for fingerprints;
    the CPU model is left out: pinned kernels give the same bits on every model."""
    record = kernel_record()
    return {k: record[k] for k in ("kernel_level", "kernels_pinned", "threads", "cpu_model")}
