"""CLI row for the background-jobs registry: `specforge-wb jobs [list|show|tail|cancel|resume] [JOB_ID]`.

The same registry the GUI's Jobs tab reads, for a terminal or a script on the machine that runs the
jobs (e.g. to cancel a training job started from the browser, over ssh).
"""

from __future__ import annotations

from ..cli import Command
from ..events import Events
from .config import JobsConfig


def _row(job) -> dict:
    return {"id": job.id, "kind": job.kind, "status": job.status, "exit_code": job.exit_code,
            "duration_s": job.duration_s, "nproc": job.nproc, "job_dir": job.job_dir, "message": job.message}


def jobs_command(cfg: JobsConfig, events: Events) -> dict:
    from .runner import JobRunner

    r = JobRunner(cfg.workspace)
    try:
        if cfg.action == "list":
            return {"jobs": [_row(j) for j in r.list_jobs(status=cfg.status, limit=cfg.limit)]}
        job = r.get(cfg.job_id)
    except KeyError as e:
        raise ValueError(str(e).strip("'\"")) from None
    if cfg.action == "show":
        return {**job.to_dict(), "progress": r.progress(job.id)}
    if cfg.action == "tail":
        return {"id": job.id, "status": job.status, "log": r.log_tail(job.id, cfg.lines)}
    if cfg.action == "cancel":
        events.emit("cancelling", id=job.id, timeout=cfg.timeout)
        return _row(r.cancel(job.id, timeout=cfg.timeout))
    new = r.resume(job.id)
    return {**_row(new), "resumed_from": job.id}


COMMANDS = [
    Command("jobs", "jobs.config:JobsConfig", "jobs.commands:jobs_command",
            "list, show, tail, cancel or resume background jobs (the GUI's job registry)"),
]
