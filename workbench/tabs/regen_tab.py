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

from ..forms import FieldSpec, FormError, advanced_rows, field_specs, render_errors, two_columns, values_to_config
from ..security import PathOutsideWorkspace, resolve_path_fields
from .jobs_tab import job_runner, job_status_html, render_message, submit_job

TITLE = "Regenerate"
MAIN_FIELDS = ["input", "output", "backend", "server_address", "model", "concurrency", "temperature", "top_p",
               "max_tokens", "num_samples", "local_model", "max_rows"]
GUI_DEFAULTS = {"output": "data/regen.jsonl", "backend": "server", "server_address": ["127.0.0.1:30000"]}
PATH_FIELDS = ("input", "output")
ERROR_COLUMNS = ["id", "server", "attempts", "error", "file", "line"]


def _regen_cls():
    from specforge_core.regen.config import RegenConfig

    return RegenConfig


def all_specs() -> tuple[list[FieldSpec], list[FieldSpec]]:
    cls = _regen_cls()
    rest = [n for n in cls.model_fields if n not in MAIN_FIELDS]
    return field_specs(cls, MAIN_FIELDS), field_specs(cls, rest)


def flat_specs() -> list[FieldSpec]:
    main, adv = all_specs()
    return main + adv


def _rel(ws: Path, p: str | Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ws.resolve()))
    except ValueError:
        return str(p)


def workspace_paths(ws: Path):
    def transform(data: dict) -> dict:
        from .train_tab import _resolve_model_name

        out, errors = resolve_path_fields(ws, data, PATH_FIELDS)
        for p in out.get("input") or []:
            if "input" not in errors and not Path(p).exists():
                errors["input"] = f"{_rel(ws, p)}: no such file in the workspace"
        if out.get("local_model"):
            try:
                out["local_model"] = _resolve_model_name(ws, out["local_model"])
            except PathOutsideWorkspace as e:
                errors["local_model"] = str(e)
        if errors:
            raise FormError(errors)
        return out

    return transform


def regen_config(workspace: str | Path, values: Sequence[Any]):
    """Form values (in `flat_specs()` order) -> a validated RegenConfig; raises FormError."""
    return values_to_config(_regen_cls(), flat_specs(), list(values), transform=workspace_paths(Path(workspace)))


def launch_regen(workspace: str | Path, *values: Any) -> tuple[str, Optional[str]]:
    try:
        cfg = regen_config(workspace, values)
    except FormError as e:
        return render_errors(e, flat_specs()), None
    try:
        job = submit_job(workspace, "regenerate", cfg)
    except Exception as e:  # noqa: BLE001
        return render_message(f"could not start the job: {e}", ok=False), None
    return job_status_html(job), job.id


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
    r = job_runner(workspace)
    try:
        job = r.get(job_id)
    except KeyError:
        return render_message(f"no job {job_id}", ok=False), "", pd.DataFrame(columns=ERROR_COLUMNS), False
    prog = r.progress(job_id)
    card = job_status_html(job, prog) + counts_html(prog)
    if job.status == "finished":
        res = r.result(job_id) or {}
        card += render_message(f"{res.get('samples_written', 0)} samples written to "
                               f"{_rel(Path(workspace), res.get('output', job.config.get('output', '')))} "
                               f"({res.get('ok', 0)} ok, {res.get('truncated', 0)} truncated, "
                               f"{res.get('failed', 0)} failed)", ok=not res.get("failed"))
    elif job.status in ("failed", "lost"):
        card += f'<pre class="job-log-snippet">{html.escape(r.log_tail(job_id, 8))}</pre>'
    from specforge_core.regen.config import errors_path_for

    md, df = errors_table(errors_path_for(job.config["output"]))
    return card, md, df, job.status in ("starting", "running")


def resume_regen(workspace: str | Path, job_id: Optional[str], retry_errors: bool = False) -> tuple[str, Optional[str]]:
    """A new job continuing `job_id` (skips ids already written; optionally retries the failed ones)."""
    if not job_id:
        return render_message("start a regeneration first (or pick one in the Jobs tab)", ok=False), None
    try:
        new = job_runner(workspace).resume(job_id, overrides={"retry_errors": bool(retry_errors)})
    except (KeyError, ValueError) as e:
        return render_message(str(e), ok=False), None
    return render_message(f"resumed {job_id} as {new.id}"), new.id


def latest_regen_job(workspace: str | Path) -> Optional[str]:
    jobs = job_runner(workspace).list_jobs(kind="regenerate", limit=1)
    return jobs[0].id if jobs else None


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------
def build(ctx) -> dict:
    import gradio as gr

    from ..forms import make_component

    ws = Path(ctx.workspace)
    main, adv = all_specs()
    comps: dict[str, Any] = {}
    c: dict[str, Any] = {"components": comps}
    gr.Markdown("Regenerate the assistant turns with the **target model** so the draft learns what the target "
                "actually says. Point it at one or more running OpenAI-compatible servers (SGLang, vLLM: "
                "`host:port`, space-separated) or use the `local` backend for a small target in-process. Output "
                "and a `.errors.jsonl` beside it go into the workspace; a stopped run resumes where it left off.")

    def comp(spec: FieldSpec):
        comps[spec.name] = make_component(spec, GUI_DEFAULTS.get(spec.name, spec.default),
                                          elem_id=f"regen-{spec.name.replace('_', '-')}")

    two_columns(main, comp)
    advanced_rows(adv, comp, "Advanced (every other RegenConfig field)")
    inputs = [comps[s.name] for s in main + adv]
    with gr.Row(equal_height=False, elem_classes=["wb-buttons"]):
        c["launch"] = gr.Button("Start regeneration", variant="primary", elem_id="regen-launch", scale=2)
        c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="regen-cancel", scale=1)
        c["retry"] = gr.Checkbox(value=False, label="retry errors on resume", elem_id="regen-retry", scale=1)
        c["resume"] = gr.Button("Resume", elem_id="regen-resume", scale=1)
    c["message"] = gr.HTML(elem_id="regen-message")
    c["job_id"] = gr.State(None)
    c["status"] = gr.HTML(elem_id="regen-status")
    c["errors_md"] = gr.Markdown(elem_id="regen-errors-summary")
    c["errors"] = gr.DataFrame(headers=ERROR_COLUMNS, interactive=False, wrap=True, label="errors",
                               elem_id="regen-errors", max_height=320)
    c["timer"] = gr.Timer(2.0, active=False)
    watch_outputs = [c["status"], c["errors_md"], c["errors"], c["timer"]]

    def watch(job_id):
        *out, live = poll_regen(ws, job_id)
        return (*out, gr.Timer(active=live))

    def on_launch(*vals):
        card, job_id = launch_regen(ws, *vals)
        if job_id is None:
            return (card, gr.update(), *([gr.update()] * len(watch_outputs)))
        return ("", job_id, *watch(job_id))

    c["launch"].click(on_launch, inputs=inputs, outputs=[c["message"], c["job_id"], *watch_outputs])
    c["timer"].tick(watch, inputs=c["job_id"], outputs=watch_outputs, show_progress="hidden")

    def on_cancel(job_id):
        from .jobs_tab import cancel_job

        return (cancel_job(ws, job_id), *watch(job_id))

    c["cancel"].click(on_cancel, inputs=c["job_id"], outputs=[c["message"], *watch_outputs])

    def on_resume(job_id, retry):
        msg, new = resume_regen(ws, job_id, retry)
        jid = new or job_id
        return (msg, jid, *watch(jid))

    c["resume"].click(on_resume, inputs=[c["job_id"], c["retry"]], outputs=[c["message"], c["job_id"], *watch_outputs])
    if ctx.app is not None:
        def on_load():
            jid = latest_regen_job(ws)
            return (jid, *watch(jid))

        ctx.app.load(on_load, outputs=[c["job_id"], *watch_outputs])
    c["inputs"] = inputs
    return c
