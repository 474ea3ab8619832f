"""Background jobs: spawn, track in SQLite, cancel, logs and metrics.

`runner.JobRunner(workspace)` is the API (submit / get / status / list_jobs / cancel / resume /
log_tail / progress / metrics); `store.JobStore` is the registry; `wrap` is the tiny parent process
that records each job's exit status. Names are loaded lazily so that `python -m
specforge_core.jobs.wrap` (started for every job) imports nothing it does not need.
"""

from __future__ import annotations

_EXPORTS = {
    "JobRunner": "runner", "submit": "runner", "status": "runner", "cancel": "runner", "resume": "runner",
    "list_jobs": "runner", "log_tail": "runner", "progress": "runner", "metrics": "runner",
    "job_kinds": "runner", "cli_command": "runner",
    "Job": "store", "JobStore": "store", "StoreError": "store",
}


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


__all__ = sorted(_EXPORTS)
