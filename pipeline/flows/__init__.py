"""Prefect flows: one per DVC stage. The only place in the package that imports Prefect.

Import :mod:`pipeline.flows.runtime` (and call ``configure_prefect``) before anything that imports Prefect, so
the API address is settled first: a reachable server is used, otherwise a one-line warning and ephemeral mode.
"""
