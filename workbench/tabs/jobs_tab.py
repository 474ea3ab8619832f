"""The Jobs tab: every background job of the workspace with its status, log tail, outputs, cancel and resume.

Jobs run as child processes through `specforge_core.jobs.runner`; this tab only reads what they
write (the registry, log.txt, events.jsonl), so a reloaded page, or a restarted workbench, lists
the same jobs. The job helpers every tab uses (submit, status cards, cancel) live in
`workbench.common`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from ..common import (cancel_job, duration_text, job_runner, job_status_html, progress_text, relative_name,
                      render_message, resume_job)

TITLE = "Jobs"
LOG_LINES = 60
TABLE_COLUMNS = ["id", "kind", "status", "progress", "started", "duration", "outputs"]


def _when(t: Optional[float]) -> str:
    return "" if not t else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _outputs(job: Any) -> dict[str, str]:
    return {k: v for k, v in (job.paths or {}).items() if k not in ("config", "events")}


def jobs_table(workspace: str | Path, limit: int = 200):
    """All jobs, newest first, as a DataFrame (the Jobs table)."""
    import pandas as pd

    ws = Path(workspace)
    r = job_runner(ws)
    rows = []
    for job in r.list_jobs(limit=limit):
        prog = r.progress(job.id) if job.status in ("running", "starting", "cancelled", "failed") else None
        outs = {k: v for k, v in _outputs(job).items() if k not in ("job_dir", "log")}
        rows.append({"id": job.id, "kind": job.kind, "status": job.status, "progress": progress_text(prog, job.is_live),
                     "started": _when(job.started or job.created), "duration": duration_text(job.duration_s),
                     "outputs": " ".join(relative_name(ws, v) for v in outs.values())})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def job_choices(workspace: str | Path) -> list[tuple[str, str]]:
    return [(f"{j.id} · {j.status}", j.id) for j in job_runner(workspace).list_jobs(limit=200)]


def job_detail(workspace: str | Path, job_id: str | None, lines: int = LOG_LINES) -> tuple[str, str, str]:
    """(status card html, log tail, outputs markdown) for one job. Never raises."""
    if not job_id:
        return '<div class="job-card job-none">Select a job to see its log and outputs.</div>', "", ""
    ws = Path(workspace)
    r = job_runner(ws)
    try:
        job = r.get(job_id)
    except KeyError:
        return render_message(f"no job {job_id!r} in this workspace", ok=False), "", ""
    card = job_status_html(job, r.progress(job_id))
    log = r.log_tail(job_id, int(lines))
    md = [f"**Command:** `{r.command_line(job_id)}`", ""]
    for name, p in _outputs(job).items():
        exists = "" if Path(p).exists() else " *(not written yet)*"
        md.append(f"- **{name}**: `{relative_name(ws, p)}`{exists}")
    if job.resumed_from:
        md.append(f"- **resumed from**: `{job.resumed_from}`")
    result = r.result(job_id) if job.status == "finished" else None
    if result:
        keys = list(result)[:12]
        md += ["", "**Result:** " + ", ".join(f"{k} = `{result[k]}`" for k in keys
                                                if not isinstance(result[k], (dict, list)))]
    return card, log, "\n".join(md)


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------
def build(ctx) -> dict:
    import gradio as gr

    ws = Path(ctx.workspace)
    c: dict[str, Any] = {}
    gr.Markdown("Every background job of this workspace (data preparation, training, regeneration, "
                "benchmarks). Jobs run as separate processes: closing or reloading the page stops nothing.")
    with gr.Row():
        c["refresh"] = gr.Button("Refresh", size="sm", elem_id="jobs-refresh", scale=0, min_width=110)
        c["auto"] = gr.Checkbox(value=True, label="auto-refresh every 3 s", elem_id="jobs-auto", scale=0,
                                min_width=220)
    c["table"] = gr.DataFrame(value=None, headers=TABLE_COLUMNS, interactive=False, wrap=True,
                              elem_id="jobs-table", label="jobs (newest first)", max_height=380)
    with gr.Row(equal_height=False, elem_classes=["wb-buttons"]):
        c["select"] = gr.Dropdown([], value=None, label="Job", elem_id="jobs-select", scale=3,
                                  allow_custom_value=True)
        c["cancel"] = gr.Button("Cancel job", variant="stop", elem_id="jobs-cancel", scale=1)
        c["resume"] = gr.Button("Resume job", elem_id="jobs-resume", scale=1)
    c["message"] = gr.HTML(elem_id="jobs-message")
    c["card"] = gr.HTML(elem_id="jobs-card")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            c["log"] = gr.Textbox(label="log (last lines)", lines=14, max_lines=14, interactive=False,
                                  elem_id="jobs-log", autoscroll=True)
        with gr.Column(scale=2):
            c["outputs"] = gr.Markdown(elem_id="jobs-outputs")
    c["timer"] = gr.Timer(3.0, active=True)

    def refresh(selected):
        try:
            table = jobs_table(ws)
            choices = job_choices(ws)
        except Exception as e:  # noqa: BLE001 - a broken registry is shown, not raised into the page
            return None, gr.update(), render_message(f"cannot read the jobs registry: {e}", ok=False), "", "", ""
        ids = [v for _, v in choices]
        sel = selected if selected in ids else (ids[0] if ids else None)
        card, log, outs = job_detail(ws, sel)
        return table, gr.update(choices=choices, value=sel), gr.update(), card, log, outs

    outs = [c["table"], c["select"], c["message"], c["card"], c["log"], c["outputs"]]
    c["refresh"].click(refresh, inputs=c["select"], outputs=outs)
    c["timer"].tick(refresh, inputs=c["select"], outputs=outs, show_progress="hidden")
    c["auto"].change(lambda on: gr.Timer(active=bool(on)), inputs=c["auto"], outputs=c["timer"])
    c["select"].input(lambda s: job_detail(ws, s), inputs=c["select"],
                      outputs=[c["card"], c["log"], c["outputs"]])
    c["cancel"].click(lambda s: cancel_job(ws, s), inputs=c["select"], outputs=c["message"]).then(
        refresh, inputs=c["select"], outputs=outs)

    def on_resume(s):
        msg, new = resume_job(ws, s)
        table, sel_upd, _, card, log, o = refresh(new or s)
        return table, sel_upd, msg, card, log, o

    c["resume"].click(on_resume, inputs=c["select"], outputs=outs)
    if ctx.app is not None:
        ctx.app.load(refresh, inputs=c["select"], outputs=outs)
    return c
