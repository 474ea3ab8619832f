"""The Jobs tab: every background job of the workspace with its status, log tail, outputs, cancel and resume.

It also holds the small job helpers the other tabs share (`submit_job`, `job_status_html`,
`progress_html`, ...): every long job the GUI starts goes through `specforge_core.jobs.runner` as a
child process, and the GUI only reads what the job writes (the registry, log.txt, events.jsonl,
metrics.jsonl). Nothing is kept in the GUI's memory, so a reloaded page, or a restarted workbench,
lists the same jobs.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any, Optional

TITLE = "Jobs"
LOG_LINES = 60
STATUS_COLORS = {"starting": "#6366f1", "running": "#2563eb", "finished": "#16a34a", "failed": "#dc2626",
                 "cancelled": "#d97706", "lost": "#6b7280"}
TABLE_COLUMNS = ["id", "kind", "status", "progress", "started", "duration", "outputs"]

# Job cards and form errors, shared by every tab that runs jobs (app.load_css adds this to the page).
CSS = """
.job-card { padding: 10px 14px; border: 1px solid var(--border-color-primary, #d4d4d8); border-radius: 8px;
  margin: 6px 0; font-size: 14px; }
.job-card code { font-size: 12.5px; }
.job-card.job-none { opacity: 0.65; font-style: italic; }
.job-badge { color: white; border-radius: 999px; padding: 2px 10px; font-size: 12px; font-weight: 600;
  text-transform: uppercase; letter-spacing: 0.03em; margin-right: 6px; }
.job-prog-text { margin-left: 8px; opacity: 0.8; }
.job-progress { height: 8px; background: rgba(99, 102, 241, 0.15); border-radius: 4px; margin-top: 8px;
  overflow: hidden; }
.job-progress-fill { height: 100%; background: #4f46e5; transition: width 0.4s ease; }
.job-message { margin-top: 6px; font-size: 13px; opacity: 0.85; }
.job-log-snippet { font-size: 12px; max-height: 180px; overflow: auto; background: rgba(0, 0, 0, 0.04);
  padding: 8px; border-radius: 6px; white-space: pre-wrap; }
.wb-ok { margin: 6px 0; padding: 8px 12px; border-radius: 6px; background: #dcfce7; color: #166534;
  border-left: 5px solid #16a34a; font-weight: 600; }
.regen-counts { margin: 4px 2px; font-size: 14px; }
.wb-buttons button { max-height: 48px; }
"""


class JobInputError(ValueError):
    """Something the user can fix (no job selected, a job that cannot resume); shown as a message."""


def job_runner(workspace: str | Path):
    from specforge_core.jobs.runner import runner

    return runner(workspace)


def submit_job(workspace: str | Path, kind: str, cfg: Any, nproc: int = 1):
    """Start `kind` on `cfg` as a background job whose working directory is the workspace."""
    return job_runner(workspace).submit(kind, cfg, nproc=int(nproc or 1), cwd=Path(workspace))


# ------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------
def _when(t: Optional[float]) -> str:
    return "" if not t else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _duration(s: Optional[float]) -> str:
    if s is None:
        return ""
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def status_badge(status: str) -> str:
    color = STATUS_COLORS.get(status, "#6b7280")
    return f'<span class="job-badge" data-status="{html.escape(status)}" style="background:{color}">' \
           f"{html.escape(status)}</span>"


def progress_text(p: Optional[dict], live: bool = True) -> str:
    """A `progress` event -> `12/40 steps (30%) · eta 8s` (no eta once the job has ended)."""
    if not p:
        return ""
    done, total, what = p.get("done"), p.get("total"), p.get("what", "")
    s = f"{done}/{total} {what}" if total else f"{done} {what}"
    if total:
        s += f" ({100 * (done or 0) / total:.0f}%)"
    if live and p.get("eta_s") is not None and (not total or (done or 0) < total):
        s += f" · eta {_duration(p['eta_s'])}"
    return s


def progress_fraction(p: Optional[dict]) -> Optional[float]:
    if not p or not p.get("total"):
        return None
    return max(0.0, min(1.0, (p.get("done") or 0) / p["total"]))


def job_status_html(job: Any, prog: Optional[dict] = None) -> str:
    """A one-job card: id, kind, status badge, progress bar, message."""
    if job is None:
        return '<div class="job-card job-none">No job started yet.</div>'
    frac = progress_fraction(prog)
    if frac is None and job.status == "finished":
        frac = 1.0
    bar = ""
    if frac is not None:
        bar = (f'<div class="job-progress"><div class="job-progress-fill" style="width:{100 * frac:.1f}%"></div>'
               f"</div>")
    msg = f'<div class="job-message">{html.escape(job.message)}</div>' if job.message else ""
    return (f'<div class="job-card" data-job-id="{html.escape(job.id)}" data-status="{html.escape(job.status)}">'
            f"{status_badge(job.status)} <b>{html.escape(job.kind)}</b> <code>{html.escape(job.id)}</code>"
            f' <span class="job-prog-text">{html.escape(progress_text(prog, job.status in ("starting", "running")))}</span>'
            f"{bar}{msg}</div>")


def render_message(text: str, ok: bool = True) -> str:
    cls = "wb-ok" if ok else "mask-error"
    mark = "✔" if ok else "✖"
    return f'<div class="{cls}">{mark} {html.escape(text)}</div>'


def _outputs(job: Any) -> dict[str, str]:
    return {k: v for k, v in (job.paths or {}).items() if k not in ("config", "events")}


def _relative(workspace: Path, p: str) -> str:
    try:
        return str(Path(p).resolve().relative_to(workspace.resolve()))
    except ValueError:
        return p


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
                     "started": _when(job.started or job.created), "duration": _duration(job.duration_s),
                     "outputs": " ".join(_relative(ws, v) for v in outs.values())})
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
        md.append(f"- **{name}**: `{_relative(ws, p)}`{exists}")
    if job.resumed_from:
        md.append(f"- **resumed from**: `{job.resumed_from}`")
    result = r.result(job_id) if job.status == "finished" else None
    if result:
        keys = list(result)[:12]
        md += ["", "**Result:** " + ", ".join(f"{k} = `{result[k]}`" for k in keys
                                                if not isinstance(result[k], (dict, list)))]
    return card, log, "\n".join(md)


def cancel_job(workspace: str | Path, job_id: str | None, timeout: float = 30.0) -> str:
    """Cancel (SIGTERM, then SIGKILL after `timeout`); returns a message html. Never raises."""
    if not job_id:
        return render_message("select a job first", ok=False)
    try:
        job = job_runner(workspace).get(job_id)
        if job.status not in ("starting", "running"):
            return render_message(f"{job_id} is already {job.status}; nothing to cancel", ok=False)
        job = job_runner(workspace).cancel(job_id, timeout=timeout)
    except KeyError:
        return render_message(f"no job {job_id!r} in this workspace", ok=False)
    return render_message(f"{job_id}: {job.status}" + (f" ({job.message})" if job.message else ""),
                          ok=job.status in ("cancelled", "finished"))


def resume_job(workspace: str | Path, job_id: str | None) -> tuple[str, Optional[str]]:
    """Start a job that continues `job_id`; returns (message html, new job id or None). Never raises."""
    if not job_id:
        return render_message("select a job first", ok=False), None
    try:
        new = job_runner(workspace).resume(job_id)
    except KeyError:
        return render_message(f"no job {job_id!r} in this workspace", ok=False), None
    except ValueError as e:
        return render_message(str(e), ok=False), None
    return render_message(f"resumed {job_id} as {new.id}"), new.id


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
