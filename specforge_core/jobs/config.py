"""The `jobs` command's config: list, inspect, cancel or resume the background jobs of a workspace.

The same registry the GUI's Jobs tab reads, for a terminal or a script on the machine that runs the
jobs (e.g. to cancel a training job started from the browser, over ssh).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from ..config import JobConfig


class JobsConfig(JobConfig):
    """List, inspect, cancel or resume the background jobs of a workspace."""

    _positional = ("action", "job_id")

    action: Literal["list", "show", "tail", "cancel", "resume"] = Field(
        "list", description="list: every job; show: one job's row and latest progress; tail: its log; "
        "cancel: SIGTERM its processes (SIGKILL after --timeout); resume: start a job that continues it")
    job_id: Optional[str] = Field(None, description="the job (for show, tail, cancel, resume)")
    workspace: str = Field("workspace", description="workspace root holding jobs/jobs.db")
    status: Optional[str] = Field(None, description="list: only jobs with this status")
    limit: int = Field(50, ge=1, description="list: at most this many jobs, newest first")
    lines: int = Field(40, ge=1, description="tail: number of log lines")
    timeout: float = Field(30.0, gt=0, description="cancel: seconds to wait before SIGKILL")

    @model_validator(mode="after")
    def _need_id(self) -> "JobsConfig":
        if self.action != "list" and not self.job_id:
            raise ValueError(f"`jobs {self.action}` needs a JOB_ID (see `specforge-wb jobs list`)")
        return self
