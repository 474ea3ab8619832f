"""The Regenerate tab: re-write a dataset's assistant turns with the target itself (OpenAI-compatible
servers such as SGLang or vLLM, or a small target in-process), so the draft learns the target's own
distribution.

The form is built from `RegenConfig` (`workbench.forms`); input and output paths are resolved inside
the workspace. The job runs in the background (`specforge_core.jobs.runner`); a `gr.Timer` shows
its progress (ok / truncated / failed counts from its progress events) and the errors table read
from `<output stem>.errors.jsonl`. Resume starts a new job with `resume=True`, which skips every id
already written (and, with retry, takes the failed ones again).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..common import (job_status_html, relative_name, render_message, resume_job, start_job, watch_job,
                      wire_job_panel, workspace_transform)
from ..forms import SchemaForm

TITLE = "Regenerate"
MAIN_FIELDS = ["input", "output", "backend", "server_address", "model", "concurrency", "temperature", "top_p",
               "max_tokens", "num_samples", "local_model", "max_rows"]
GUI_DEFAULTS = {"output": "data/regen.jsonl", "backend": "server", "server_address": ["127.0.0.1:30000"]}
PATH_FIELDS = ("input", "output")
ERROR_COLUMNS = ["id", "server", "attempts", "error", "file", "line"]
CSS = """
.regen-counts { margin: 4px 2px; font-size: 14px; }
"""


def _regen_cls():
    from specforge_core.regen.config import RegenConfig

    return RegenConfig


FORM = SchemaForm(_regen_cls, MAIN_FIELDS, "regen", defaults=GUI_DEFAULTS)
flat_specs = FORM.specs


def regen_config(workspace: str | Path, values: Sequence[Any]):
    """Form values (in `flat_specs()` order) -> a validated RegenConfig; raises FormError."""
    return FORM.to_config(values, transform=workspace_transform(workspace, paths=PATH_FIELDS, models=("local_model",),
                                                                existing=("input",)))


def launch_regen(workspace: str | Path, *values: Any) -> tuple[str, Optional[str]]:
    return start_job(workspace, "regenerate", lambda: regen_config(workspace, values), flat_specs())


def errors_table(errors_file: str | Path, limit: int = 500):
    """(summary markdown, DataFrame) of the job's errors file; missing file = no errors yet."""
    import pandas as pd

    p = Path(errors_file)
    if not p.exists():
        return "No errors file yet.", pd.DataFrame(columns=ERROR_COLUMNS)
    rows, total, by = [], 0, {}
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line while the job writes
            total += 1
            key = str(rec.get("error", "?")).split(":")[0][:60]
            by[key] = by.get(key, 0) + 1
            if len(rows) < limit:
                rows.append({k: rec.get(k) for k in ERROR_COLUMNS})
    if not total:
        return f"**0 failed samples** (`{p.name}`).", pd.DataFrame(columns=ERROR_COLUMNS)
    kinds = ", ".join(f"{k} ×{v}" for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:5])
    return (f"**{total} failed samples** in `{p.name}`: {html.escape(kinds)}. Resume with *retry errors* to try "
            "them again."), pd.DataFrame(rows, columns=ERROR_COLUMNS)


def counts_html(prog: Optional[dict]) -> str:
    if not prog:
        return ""
    parts = [f"{k} <b>{prog[k]}</b>" for k in ("ok", "truncated", "failed", "requests") if prog.get(k) is not None]
    return '<div class="regen-counts">' + " · ".join(parts) + "</div>" if parts else ""


def poll_regen(workspace: str | Path, job_id: Optional[str]):
    """(status html, errors md, errors df, live?) for a regenerate job."""
    import pandas as pd

    if not job_id:
        return job_status_html(None), "", pd.DataFrame(columns=ERROR_COLUMNS), False
    w = watch_job(workspace, job_id, details=counts_html)
    if w.job is None:
        return w.card, "", pd.DataFrame(columns=ERROR_COLUMNS), False
    card, res = w.card, w.result
    if w.job.status == "finished":
        card += render_message(f"{res.get('samples_written', 0)} samples written to "
                               f"{relative_name(workspace, res.get('output', w.job.config.get('output', '')))} "
                               f"({res.get('ok', 0)} ok, {res.get('truncated', 0)} truncated, "
                               f"{res.get('failed', 0)} failed)", ok=not res.get("failed"))
    from specforge_core.regen.config import errors_path_for

    md, df = errors_table(errors_path_for(w.job.config["output"]))
    return card, md, df, w.live


def resume_regen(workspace: str | Path, job_id: Optional[str], retry_errors: bool = False) -> tuple[str, Optional[str]]:
    """A new job continuing `job_id` (skips ids already written; optionally retries the failed ones)."""
    if not job_id:
        return render_message("start a regeneration first (or pick one in the Jobs tab)", ok=False), None
    return resume_job(workspace, job_id, overrides={"retry_errors": bool(retry_errors)})


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------
def build(ctx) -> dict:
    import gradio as gr

    ws = Path(ctx.workspace)
    c: dict[str, Any] = {}
    gr.Markdown("Regenerate the assistant turns with the **target model** so the draft learns what the target "
                "actually says. Point it at one or more running OpenAI-compatible servers (SGLang, vLLM: "
                "`host:port`, space-separated) or use the `local` backend for a small target in-process. Output "
                "and a `.errors.jsonl` beside it go into the workspace; a stopped run resumes where it left off.")
    c["components"], inputs = FORM.layout()
    with gr.Row(equal_height=False, elem_classes=["wb-buttons"]):
        c["launch"] = gr.Button("Start regeneration", variant="primary", elem_id="regen-launch", scale=2)
        c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="regen-cancel", scale=1)
        c["retry"] = gr.Checkbox(value=False, label="retry errors on resume", elem_id="regen-retry", scale=1)
        # not "regen-resume": that is the form's `resume` field (ids are <prefix>-<field>)
        c["resume"] = gr.Button("Resume", elem_id="regen-resume-job", scale=1)
    c["message"] = gr.HTML(elem_id="regen-message")
    c["job_id"] = gr.State(None)
    c["status"] = gr.HTML(elem_id="regen-status")
    c["errors_md"] = gr.Markdown(elem_id="regen-errors-summary")
    c["errors"] = gr.DataFrame(headers=ERROR_COLUMNS, interactive=False, wrap=True, label="errors",
                               elem_id="regen-errors", max_height=320)
    c["timer"] = gr.Timer(2.0, active=False)
    watch_outputs = [c["status"], c["errors_md"], c["errors"], c["timer"]]
    watch = wire_job_panel(ctx, "regenerate", poll_regen, launch=launch_regen, launch_button=c["launch"],
                           launch_inputs=inputs, cancel_button=c["cancel"], message=c["message"],
                           job_id=c["job_id"], outputs=watch_outputs)

    def on_resume(job_id, retry):
        msg, new = resume_regen(ws, job_id, retry)
        jid = new or job_id
        return (msg, jid, *watch(jid))

    c["resume"].click(on_resume, inputs=[c["job_id"], c["retry"]], outputs=[c["message"], c["job_id"], *watch_outputs])
    c["inputs"] = inputs
    return c
