"""The Benchmark tab: acceptance length and speedup of a draft, measured by an SGLang server.

The form is built from `BenchConfig` (`specforge_core.evaluate.bench`) through `workbench.forms`:
a running server's URL or `launch` (SGLang on a GPU box), benchmark sets (`name[:count][=path]`)
and a config list (`batch,steps,topk,draft_tokens`; `1,0,0,0` is the baseline). The bench job
rewrites its results JSON after every run; this tab reads it and shows a table (pandas) and bar
charts of the pooled acceptance length and the speedup per config. For small targets without SGLang,
the reference server (`serve-reference`, same HTTP API) can be started here as a job.
The bench engine is optional at import time: without it the tab says so instead of breaking the app.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..forms import FieldSpec, FormError, advanced_rows, field_specs, render_errors, two_columns, values_to_config
from ..security import PathOutsideWorkspace, resolve_in_workspace, resolve_path_fields
from .jobs_tab import job_runner, job_status_html, render_message, submit_job

TITLE = "Benchmark"
MAIN_FIELDS = ["server", "launch", "target", "draft", "benchmark", "config_list", "max_new_tokens", "output"]
GUI_DEFAULTS = {"server": "http://127.0.0.1:30000", "output": "bench/results.json",
                "config_list": ["1,0,0,0", "1,3,1,4"]}
PATH_FIELDS = ("output", "draft", "log_dir")
RESULT_COLUMNS = ["benchmark", "config", "status", "requests", "errors", "acceptance_length_pooled",
                  "acceptance_length_mean_of_ratios", "output_tokens_per_s", "speedup", "latency_p50_s"]
# Shorter headers for the table (the results JSON keeps the engine's names).
DISPLAY_NAMES = {"acceptance_length_pooled": "accept len (pooled)",
                 "acceptance_length_mean_of_ratios": "accept len (mean of ratios)",
                 "output_tokens_per_s": "output tok/s", "latency_p50_s": "latency p50 (s)"}
REF_FIELDS = ["target", "draft", "port", "steps", "topk", "device"]


def bench_engine():
    """The bench module, or None when this installation has no bench engine."""
    try:
        from specforge_core.evaluate import bench
    except ImportError:
        return None
    return bench


def bench_kind_available() -> bool:
    if bench_engine() is None:
        return False
    try:
        from specforge_core.jobs.runner import resolve_kind

        resolve_kind("bench")
    except (ImportError, ValueError):
        return False
    return True


def all_specs() -> tuple[list[FieldSpec], list[FieldSpec]]:
    cls = bench_engine().BenchConfig
    rest = [n for n in cls.model_fields if n not in MAIN_FIELDS]
    return field_specs(cls, [n for n in MAIN_FIELDS if n in cls.model_fields]), field_specs(cls, rest)


def flat_specs() -> list[FieldSpec]:
    main, adv = all_specs()
    return main + adv


def _rel(ws: Path, p: str | Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ws.resolve()))
    except ValueError:
        return str(p)


def _resolve_benchmarks(ws: Path, specs: list[str]) -> list[str]:
    """`name[:count]=path`: the path part must lie in the workspace, like every other path typed here."""
    out = []
    for s in specs:
        name, eq, path = s.partition("=")
        out.append(f"{name}={resolve_in_workspace(ws, path)}" if eq else s)
    return out


def workspace_paths(ws: Path):
    def transform(data: dict) -> dict:
        from .train_tab import _resolve_model_name

        out, errors = resolve_path_fields(ws, data, PATH_FIELDS)
        for name in ("target", "tokenizer"):
            if out.get(name):
                try:
                    out[name] = _resolve_model_name(ws, out[name])
                except PathOutsideWorkspace as e:
                    errors[name] = str(e)
        if out.get("benchmark"):
            try:
                out["benchmark"] = _resolve_benchmarks(ws, out["benchmark"])
            except PathOutsideWorkspace as e:
                errors["benchmark"] = str(e)
        if out.get("server") and out.get("launch"):
            errors[""] = "give a server URL or tick launch, not both (clear the server box to launch)"
        if errors:
            raise FormError(errors)
        return out

    return transform


def bench_config(workspace: str | Path, values: Sequence[Any]):
    return values_to_config(bench_engine().BenchConfig, flat_specs(), list(values),
                            transform=workspace_paths(Path(workspace)))


def launch_bench(workspace: str | Path, *values: Any) -> tuple[str, Optional[str]]:
    if not bench_kind_available():
        return render_message("the bench job is not available in this installation", ok=False), None
    try:
        cfg = bench_config(workspace, values)
    except FormError as e:
        return render_errors(e, flat_specs()), None
    try:
        job = submit_job(workspace, "bench", cfg)
    except Exception as e:  # noqa: BLE001
        return render_message(f"could not start the job: {e}", ok=False), None
    return job_status_html(job), job.id


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
def read_results(path: str | Path) -> dict:
    """The bench results JSON; {} while it does not exist yet or is being replaced."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def results_frame(results: dict):
    import pandas as pd

    runs = results.get("runs") or []
    df = pd.DataFrame([{k: r.get(k) for k in RESULT_COLUMNS} for r in runs], columns=RESULT_COLUMNS)
    for col in ("acceptance_length_pooled", "acceptance_length_mean_of_ratios", "output_tokens_per_s", "speedup",
                "latency_p50_s"):
        df[col] = pd.to_numeric(df[col], errors="coerce").round(3)
    return df


def results_figures(df):
    from ..plots import bench_bar

    acc = bench_bar(df, "acceptance_length_pooled", "Acceptance length (pooled) per config",
                    "tokens / verify step", baseline=1.0)
    spd = bench_bar(df, "speedup", "Speedup over no speculation", "× baseline tokens/s", baseline=1.0)
    return acc, spd


def results_summary(results: dict, path: str) -> str:
    if not results:
        return f"No results yet (`{html.escape(path)}`)."
    n = len(results.get("runs") or [])
    s = f"**{results.get('status', '?')}** · {n} run(s) · `{html.escape(path)}`"
    if results.get("error"):
        s += f"  \n✖ {html.escape(str(results['error']))}"
    s += ("  \nAcceptance length is *pooled*: sum(completion tokens) / sum(verify steps) over a run's requests "
          "(the bonus token counts, so no speculation is 1.0).")
    return s


def poll_bench(workspace: str | Path, job_id: Optional[str], results_path: str = ""):
    """(status html, summary md, results df, acc fig, speedup fig, live?)."""
    ws = Path(workspace)
    card, live = job_status_html(None), False
    path = results_path
    if job_id:
        r = job_runner(ws)
        try:
            job = r.get(job_id)
            card = job_status_html(job, r.progress(job_id))
            live = job.status in ("starting", "running")
            path = job.paths.get("output") or job.config.get("output") or path
            if job.status in ("failed", "lost"):
                card += f'<pre class="job-log-snippet">{html.escape(r.log_tail(job_id, 8))}</pre>'
        except KeyError:
            card = render_message(f"no job {job_id}", ok=False)
    if not path:
        df = results_frame({})
        return (card, "No results yet.", df.rename(columns=DISPLAY_NAMES), *results_figures(df), live)
    try:
        p = resolve_in_workspace(ws, path)
    except PathOutsideWorkspace as e:
        df = results_frame({})
        return (card, render_message(str(e), ok=False), df.rename(columns=DISPLAY_NAMES), *results_figures(df), live)
    results = read_results(p)
    df = results_frame(results)
    return (card, results_summary(results, _rel(ws, p)), df.rename(columns=DISPLAY_NAMES), *results_figures(df), live)


def latest_bench_job(workspace: str | Path) -> Optional[str]:
    jobs = job_runner(workspace).list_jobs(kind="bench", limit=1)
    return jobs[0].id if jobs else None


def reference_available() -> bool:
    try:
        from specforge_core.jobs.runner import resolve_kind

        resolve_kind("serve-reference")
    except (ImportError, ValueError):
        return False
    return True


def launch_reference(workspace: str | Path, target: str, draft: str, port: Any, steps: Any) -> tuple[str, Optional[str]]:
    """Start the reference server (SGLang's API over HF / in-process EAGLE3) as a background job."""
    if not reference_available():
        return render_message("the reference server is not available in this installation", ok=False), None
    from specforge_core.evaluate.config import ServeReferenceConfig

    from .train_tab import _resolve_model_name

    ws = Path(workspace)
    specs = field_specs(ServeReferenceConfig, ["target", "draft", "port", "steps"])

    def transform(d: dict) -> dict:
        errors = {}
        try:
            d["target"] = _resolve_model_name(ws, d.get("target") or "default")
        except PathOutsideWorkspace as e:
            errors["target"] = str(e)
        if d.get("draft"):
            try:
                d["draft"] = str(resolve_in_workspace(ws, d["draft"]))
            except PathOutsideWorkspace as e:
                errors["draft"] = str(e)
        if errors:
            raise FormError(errors)
        return d

    try:
        cfg = values_to_config(ServeReferenceConfig, specs, [target, draft, port, steps], transform=transform)
        job = submit_job(ws, "serve-reference", cfg)
    except FormError as e:
        return render_errors(e, specs), None
    except Exception as e:  # noqa: BLE001
        return render_message(f"could not start the reference server: {e}", ok=False), None
    return render_message(f"reference server starting as job {job.id} on http://127.0.0.1:{cfg.port} "
                          "(stop it from the Jobs tab)"), job.id


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------
def build(ctx) -> dict:
    import gradio as gr

    from ..forms import make_component

    ws = Path(ctx.workspace)
    c: dict[str, Any] = {}
    gr.Markdown("Measure a draft where it will run: an **SGLang server**. Give the URL of a running server (its "
                "speculative flags are measured as they are) or tick *launch* to start SGLang once per config "
                "(needs sglang and a GPU). A config is `batch,steps,topk,draft_tokens`; `1,0,0,0` is the "
                "no-speculation baseline that speedups are measured against. Benchmark sets are "
                "`name[:count][=path]` (mtbench, gsm8k, humaneval, math500, or NAME=FILE in the workspace).")
    if bench_engine() is None:
        gr.Markdown("⚠ The benchmark engine (`specforge_core.evaluate.bench`) is not installed here.")
        return c
    main, adv = all_specs()
    comps: dict[str, Any] = {}

    def comp(spec: FieldSpec):
        comps[spec.name] = make_component(spec, GUI_DEFAULTS.get(spec.name, spec.default),
                                          elem_id=f"bench-{spec.name.replace('_', '-')}")

    two_columns(main, comp)
    advanced_rows(adv, comp, "Advanced (every other BenchConfig field)")
    inputs = [comps[s.name] for s in main + adv]
    if reference_available():
        with gr.Accordion("Reference server for small targets (SGLang's API, in-process, CPU-friendly)", open=False):
            gr.Markdown("No SGLang here? Serve a small target (and an exported draft) with the reference server and "
                        "benchmark it by its URL. It measures acceptance faithfully; its speed is a CPU's.")
            with gr.Row():
                ref_target = gr.Textbox(value="default", label="target", elem_id="bench-ref-target")
                ref_draft = gr.Textbox(value="", label="draft (serving checkpoint dir)", elem_id="bench-ref-draft")
                ref_port = gr.Number(value=30000, precision=0, label="port", elem_id="bench-ref-port")
                ref_steps = gr.Number(value=3, precision=0, label="steps", elem_id="bench-ref-steps")
            ref_btn = gr.Button("Start reference server", elem_id="bench-ref-start")
            ref_msg = gr.HTML(elem_id="bench-ref-message")
            ref_btn.click(lambda t, d, p, s: launch_reference(ws, t, d, p, s)[0],
                          inputs=[ref_target, ref_draft, ref_port, ref_steps], outputs=ref_msg)
    with gr.Row(equal_height=False, elem_classes=["wb-buttons"]):
        c["launch"] = gr.Button("Run benchmark", variant="primary", elem_id="bench-run", scale=2,
                                interactive=bench_kind_available())
        c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="bench-cancel", scale=1)
    with gr.Row(equal_height=True):
        c["results_path"] = gr.Textbox(value=GUI_DEFAULTS["output"], label="results file to show",
                                       elem_id="bench-results-path", scale=3)
        c["show"] = gr.Button("Show results", elem_id="bench-show", scale=1)
    if not bench_kind_available():
        gr.Markdown("⚠ This installation has no `bench` job command yet; results files can still be shown.")
    c["message"] = gr.HTML(elem_id="bench-message")
    c["job_id"] = gr.State(None)
    c["status"] = gr.HTML(elem_id="bench-status")
    c["summary"] = gr.Markdown(elem_id="bench-summary")
    c["table"] = gr.DataFrame(headers=[DISPLAY_NAMES.get(k, k) for k in RESULT_COLUMNS], interactive=False, wrap=True, label="results",
                              elem_id="bench-table")
    with gr.Row():
        c["acc_plot"] = gr.Plot(label="acceptance length", elem_id="bench-acc-plot")
        c["speed_plot"] = gr.Plot(label="speedup", elem_id="bench-speed-plot")
    c["timer"] = gr.Timer(3.0, active=False)
    watch_outputs = [c["status"], c["summary"], c["table"], c["acc_plot"], c["speed_plot"], c["timer"]]

    def watch(job_id, path):
        *out, live = poll_bench(ws, job_id, path)
        return (*out, gr.Timer(active=live))

    def on_launch(*vals):
        card, job_id = launch_bench(ws, *vals)
        if job_id is None:
            return (card, gr.update(), *([gr.update()] * len(watch_outputs)))
        return ("", job_id, *watch(job_id, ""))

    c["launch"].click(on_launch, inputs=inputs, outputs=[c["message"], c["job_id"], *watch_outputs])
    c["timer"].tick(watch, inputs=[c["job_id"], c["results_path"]], outputs=watch_outputs, show_progress="hidden")
    c["show"].click(lambda p: watch(None, p), inputs=c["results_path"], outputs=watch_outputs)

    def on_cancel(job_id, path):
        from .jobs_tab import cancel_job

        return (cancel_job(ws, job_id), *watch(job_id, path))

    c["cancel"].click(on_cancel, inputs=[c["job_id"], c["results_path"]], outputs=[c["message"], *watch_outputs])
    if ctx.app is not None:
        def on_load(path):
            jid = latest_bench_job(ws)
            return (jid, *watch(jid, path))

        ctx.app.load(on_load, inputs=c["results_path"], outputs=[c["job_id"], *watch_outputs])
    c["inputs"] = inputs
    return c
