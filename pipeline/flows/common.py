"""Shared pieces of the stage flows: task defaults, progress reporting (terminal bar + UI artifact), and artifacts
that survive the Prefect server going away."""

from __future__ import annotations

import sys
from typing import Any, Callable

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from pipeline.flows.runtime import SERVER_LOST, is_connection_error, note_server_lost, quiet_user_errors_on_console

quiet_user_errors_on_console()  # Prefect set up its console handler on import: user errors print one line

# DVC caches the outputs; Prefect must not cache or persist task results on top of it.
unit_of_work = task(cache_policy=NO_CACHE, persist_result=False)


def _api_call(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(...)`` (an artifact call to the Prefect API); when the server has gone away, one warning line and None.

    The numbers never depend on the UI: a stage whose server disappears goes on with its work and outputs.
    """
    if SERVER_LOST:
        return None
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - httpx/OSError/Prefect errors: anything from an API that is not there
        if not is_connection_error(err):
            raise
        note_server_lost(err)
        return None


def table_artifact(*args, **kwargs) -> Any:
    """``prefect.artifacts.create_table_artifact`` that survives a lost server (see :func:`_api_call`)."""
    return _api_call(create_table_artifact, *args, **kwargs)


def markdown_artifact(*args, **kwargs) -> Any:
    """``prefect.artifacts.create_markdown_artifact`` that survives a lost server (see :func:`_api_call`)."""
    return _api_call(create_markdown_artifact, *args, **kwargs)


class Progress:
    """A terminal progress bar mirrored by a Prefect progress artifact (percent) visible in the UI."""

    def __init__(self, total: int, initial: int, description: str, unit: str):
        self.total = max(total, 1)
        self.bar = tqdm(
            total=total, initial=initial, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=None
        )
        self.artifact_id = _api_call(
            create_progress_artifact, progress=100.0 * initial / self.total, description=f"{description}: {unit}s done"
        )
        self.done = initial

    def advance(self, n: int = 1, postfix: dict | None = None) -> None:
        self.done += n
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        if self.artifact_id is not None:
            _api_call(update_progress_artifact, self.artifact_id, progress=100.0 * self.done / self.total)

    def close(self) -> None:
        self.bar.close()
