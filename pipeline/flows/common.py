"""Shared pieces of the stage flows: task defaults and progress reporting (terminal bar + UI artifact)."""

from __future__ import annotations

import sys

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

# DVC caches the outputs; Prefect must not cache or persist task results on top of it.
unit_of_work = task(cache_policy=NO_CACHE, persist_result=False)


class Progress:
    """A terminal progress bar mirrored by a Prefect progress artifact (percent) visible in the UI."""

    def __init__(self, total: int, initial: int, description: str, unit: str):
        self.total = max(total, 1)
        self.bar = tqdm(total=total, initial=initial, desc=description, unit=unit, file=sys.stderr,
                        dynamic_ncols=True, disable=None)
        self.artifact_id = create_progress_artifact(progress=100.0 * initial / self.total,
                                                    description=f"{description}: {unit}s done")
        self.done = initial

    def advance(self, n: int = 1, postfix: dict | None = None) -> None:
        self.done += n
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        update_progress_artifact(self.artifact_id, progress=100.0 * self.done / self.total)

    def close(self) -> None:
        self.bar.close()
