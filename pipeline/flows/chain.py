"""One pipeline run in the Prefect UI: every stage's flow run carries the run's id, revision and experiment.

DVC runs each stage of a ``dvc repro`` (by hand, through ``landscape run``, ``dvc exp run`` or a queued experiment)
as a process of its own, so Prefect sees unrelated flow runs. :func:`join_pipeline_run` (called by
:func:`pipeline.flows.runtime.configure_prefect`, which every stage calls) gives each stage's flow runs (every flow
is declared with :func:`pipeline_flow`) the tags of :func:`run_tags`:

- ``pipeline-run:<id>``: the one ``dvc repro`` (:func:`pipeline_run_id`);
- ``rev:<sha>``: the git revision it ran at (an experiment's baseline commit; ``-dirty`` for uncommitted edits);
- ``exp:<name>``: the experiment, under ``dvc exp run`` (``DVC_EXP_NAME``);
- ``stage:<name>``: the DVC stage (``train@mlp``; ``DVC_STAGE``).

Filtering the UI's runs by the ``pipeline-run:`` tag shows the chain of one run together. A stage DVC skipped
(unchanged: its outputs came from the cache) runs no process; it is recorded as a flow run of its flow in a
Completed state named ``Cached`` with the same tags (:func:`record_skipped`): by each running stage for the stages
upstream of it (DVC has visited them all before it starts), and by ``landscape run`` for every stage of the run
once ``dvc repro`` has succeeded (:func:`finish_pipeline_run`), which covers a run where nothing ran at all.

The task runs are not tagged (see :func:`tag_flow_run`); they are found under their flow run. The functions above
the ``with Prefect`` line are Prefect-free; Prefect is imported inside the ones that use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterable, Mapping

from pipeline.provenance import git_revision_of

PIPELINE_RUN_ENV = "LANDSCAPE_PIPELINE_RUN"  # set by `landscape run` for its `dvc repro`
CACHED = "Cached"  # the name of a skipped stage's Completed state (Prefect's own name for a cached result)
SKIPPED_MESSAGE = "skipped by dvc repro: the stage is unchanged, its outputs come from the DVC cache"


def dvc_process_key() -> str | None:
    """``<pid>:<start time>`` of the nearest ``dvc`` process above this one (the ``dvc repro``, ``dvc exp run`` or
    the queue's ``dvc exp exec-run`` that runs this stage), or None when none is."""
    import psutil

    try:
        for process in psutil.Process().parents():
            command = process.cmdline()
            if any(Path(part).name == "dvc" for part in command[:2]) or command[1:3] == ["-m", "dvc"]:
                return f"{process.pid}:{process.create_time():.3f}"
    except psutil.Error:
        return None
    return None


def pipeline_run_id(environ: Mapping[str, str] = os.environ, dvc_key: str | None = None) -> str | None:
    """The id of the pipeline run this process belongs to: ``$LANDSCAPE_PIPELINE_RUN`` when set, else 12 hex digits
    of the ``dvc`` process running it (:func:`dvc_process_key`; every stage of one ``dvc repro`` has the same), else
    None (a stage run by hand belongs to no pipeline run)."""
    explicit = environ.get(PIPELINE_RUN_ENV, "").strip()
    if explicit:
        return explicit
    if "DVC_STAGE" not in environ:
        return None
    key = dvc_key or dvc_process_key()
    return hashlib.sha256(key.encode()).hexdigest()[:12] if key else None


# What `dvc repro` itself writes into tracked files as it goes: not edits of the revision it runs
DVC_WRITES = (":(exclude,glob)**/dvc.lock", ":(exclude,glob)**/.gitignore")


def git_revision(root: str | Path) -> str:
    """12 hex digits of HEAD in ``root``, with ``-dirty`` when tracked files other than those DVC writes as it runs
    (:data:`DVC_WRITES`) differ from it; ``unknown`` outside git."""
    return git_revision_of(root, DVC_WRITES, digits=12)


def run_tags(environ: Mapping[str, str] = os.environ, run_id: str | None = None) -> list[str]:
    """The tags of :mod:`this module <pipeline.flows.chain>` for a stage with environment ``environ`` (DVC sets
    ``DVC_STAGE``, ``DVC_ROOT``, and under ``dvc exp run`` ``DVC_EXP_NAME`` and ``DVC_EXP_BASELINE_REV``)."""
    baseline = environ.get("DVC_EXP_BASELINE_REV", "").strip()
    tags = [f"rev:{baseline[:12] if baseline else git_revision(environ.get('DVC_ROOT') or '.')}"]
    if run_id:
        tags.insert(0, f"pipeline-run:{run_id}")
    if environ.get("DVC_EXP_NAME", "").strip():
        tags.append(f"exp:{environ['DVC_EXP_NAME'].strip()}")
    if environ.get("DVC_STAGE", "").strip():
        tags.append(f"stage:{environ['DVC_STAGE'].strip()}")
    return tags


def flow_names(stage: str) -> tuple[str, str]:
    """(flow name, flow run name) of a DVC stage's flow: ``train@mlp`` -> (``train``, ``train-mlp``);
    ``landscape_figures`` -> (``landscape-figures``, ``landscape-figures``); ``sweeps/dvc.yaml:sweep`` -> sweep."""
    name = stage.rsplit(":", 1)[-1]
    base, _, key = name.partition("@")
    flow = base.replace("_", "-")
    return flow, f"{flow}-{key}" if key else flow


def stage_graph(root: str | Path, targets: Iterable[str] | None = None) -> dict[str, set[str]]:
    """Every DVC stage of the repository at or above ``root`` (or of ``targets`` and the stages they depend on) ->
    the stages upstream of it, by address (``train@mlp``, as ``$DVC_STAGE`` names it), from DVC's own index."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        stages = list(repo.index.stages)
        if targets is not None:  # as `dvc repro TARGETS` run at the root reads them
            with contextlib.chdir(repo.root_dir):
                stages = {s for target in targets for s in repo.stage.collect(target, with_deps=True)}

        def address(stage) -> str:  # DVC's `addressing`, but from the root whatever this process's directory
            dvcfile = Path(stage.path).relative_to(repo.root_dir).as_posix()
            return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"

        commands = [s for s in stages if s.cmd]  # (not the data a .dvc file tracks: nothing to run)
        return {address(s): {address(u) for u in nx.descendants(graph, s) if u.cmd} for s in commands}


def unrecorded(stages: Iterable[str], recorded: Iterable[str]) -> list[str]:
    """The stages of ``stages`` without a flow run of this pipeline run yet, sorted."""
    return sorted(set(stages) - set(recorded))


# ----------------------------------------------------------------------------------------------- with Prefect

_TAGS: list[str] = []  # this process's tags (:func:`join_pipeline_run`), given to each flow run as it starts


def set_run_tags(tags: Iterable[str]) -> None:
    """The tags :func:`tag_flow_run` gives every flow run this process starts from now on (a stage is one
    process; a second call replaces the first's)."""
    _TAGS[:] = list(tags)


def current_run_tags() -> list[str]:
    """The tags set by :func:`set_run_tags` (empty before)."""
    return list(_TAGS)


def tag_flow_run(flow, flow_run, state) -> None:
    """Prefect ``on_running`` hook: add this process's tags to the flow run that starts.

    On the flow run only, not through ``prefect.tags``: every tag of a task run makes Prefect acquire a tag
    concurrency slot on the server before the task runs (one more API call per task and a lease to renew), and
    when the server answers 503 the task, and so the stage, fails. A hook's failure is logged by Prefect and stops
    nothing.
    """
    if not _TAGS:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=sorted(set(flow_run.tags) | set(_TAGS)))


def pipeline_flow(**options):
    """``prefect.flow(**options)`` whose runs carry this process's pipeline-run tags (:func:`tag_flow_run`):
    the decorator of every stage's flow."""
    from prefect import flow

    return flow(on_running=[tag_flow_run], **options)


def recorded_stages(run_id: str) -> set[str]:
    """The stages with a flow run tagged ``pipeline-run:<run_id>`` on the server (run or recorded skipped)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    wanted = FlowRunFilter(tags=FlowRunFilterTags(all_=[f"pipeline-run:{run_id}"]))
    stages: set[str] = set()
    offset = 0
    with get_client(sync_client=True) as client:
        while True:  # in pages of the server's largest limit
            page = client.read_flow_runs(flow_run_filter=wanted, limit=200, offset=offset)
            stages |= {tag.removeprefix("stage:") for run in page for tag in run.tags if tag.startswith("stage:")}
            offset += len(page)
            if len(page) < 200:
                return stages


def record_skipped(stages: Iterable[str], tags: Iterable[str]) -> list[str]:
    """Create a flow run in state Completed(name="Cached") for each of ``stages``, tagged ``tags`` plus its own
    ``stage:`` tag; returns the flow run names."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    base = [t for t in tags if not t.startswith("stage:")]
    names = []
    with get_client(sync_client=True) as client:
        for stage in stages:
            flow_name, run_name = flow_names(stage)
            client.create_flow_run(
                flow(name=flow_name)(_skipped_stage),
                name=run_name,
                tags=[*base, f"stage:{stage}"],
                state=Completed(name=CACHED, message=SKIPPED_MESSAGE),
            )
            names.append(run_name)
    return names


def _skipped_stage() -> None:
    """Stands for a stage DVC did not run (never called: its flow run is created in a final state)."""


def join_pipeline_run(api_url: str | None, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Tag this stage's flow runs (:func:`run_tags`, :func:`set_run_tags`); with a server (``api_url``), record
    the stages upstream of this one that did not run in this pipeline run as skipped. Returns the tags.

    Recording needs the server's record of this run and DVC's index (about a second); any failure of it is one
    warning line: it never stops a stage.
    """
    run_id = pipeline_run_id(environ)
    tags = run_tags(environ, run_id)
    set_run_tags(tags)
    stage = environ.get("DVC_STAGE", "").strip()
    if api_url and run_id and stage:
        try:
            upstream = stage_graph(".").get(stage, set())  # (not $DVC_ROOT: a queued run's is the parent repo)
            missing = unrecorded(upstream, recorded_stages(run_id)) if upstream else []
            if missing:
                record_skipped(missing, tags)
        except Exception as err:  # noqa: BLE001 - the record is for the UI; the stage's work goes on regardless
            print(f"warning: skipped stages not recorded in Prefect ({type(err).__name__}: {err})", flush=True)
    return tags


def finish_pipeline_run(run_id: str, root: str | Path, targets: Iterable[str] | None, api_url: str) -> list[str]:
    """After a successful ``dvc repro`` of ``targets`` under ``landscape run``: record every stage of it that has
    no flow run of this pipeline run on the server at ``api_url`` as skipped. Returns the stages recorded."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    environ = {**os.environ, PIPELINE_RUN_ENV: run_id, "DVC_ROOT": str(root)}
    tags = run_tags(environ, run_id)
    graph = stage_graph(root, targets)
    with temporary_settings(updates={PREFECT_API_URL: api_url}):  # (whatever this process's settings say)
        missing = unrecorded(graph, recorded_stages(run_id))
        record_skipped(missing, tags)
    return missing
