"""The Dask task runner shared by the flows that send units of work to a cluster (scan tiles, sweep points)."""

from __future__ import annotations

import logging
import os


def task_runner(cfg):
    """The Prefect task runner of ``cfg.executor`` (a ``landscape`` or ``sweep`` section: ``executor``,
    ``scheduler``, ``workers``): ``None`` (local: this process, in order) or a ``DaskTaskRunner`` on
    ``cfg.scheduler`` or on a LocalCluster of ``cfg.workers`` single-threaded processes bound to 127.0.0.1."""
    if cfg.executor != "dask":
        return None
    from prefect_dask import DaskTaskRunner

    logging.getLogger("distributed").setLevel(logging.WARNING)  # per-worker and per-connection lines at INFO
    if cfg.scheduler:
        return DaskTaskRunner(address=cfg.scheduler)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": cfg.workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
        }
    )


def local_cluster_threads(cfg) -> int | None:
    """Torch threads per Dask worker of a LocalCluster (the machine's cores shared out); None leaves them alone."""
    if cfg.executor != "dask" or cfg.scheduler:
        return None
    return max(1, (os.cpu_count() or 1) // cfg.workers)
