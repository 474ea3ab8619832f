"""The Benchmark tab: acceptance length and speedup of a draft, in one of two modes.

- **In-process** (the default without SGLang, e.g. on a CPU): the engine's `evaluate` job runs the
  target and the draft in a background process on prompts from the workspace, plain greedy decoding
  first, then every speculative config. Its form is built from `EvaluateConfig`.
- **SGLang server**: the `bench` job against a running server's URL or `launch` (SGLang on a GPU
  box), benchmark sets (`name[:count][=path]`). Its form is built from `BenchConfig`. For small
  targets without SGLang, the reference server (`serve-reference`, same HTTP API) can be started
  here as a job.

Configs are `batch,steps,topk,draft_tokens` in both (`1,0,0,0` is the baseline). Both jobs rewrite a
results JSON as they go, in different shapes; `result_rows` maps either to the same rows, so one
table (pandas) and the same bar charts (pooled acceptance length, speedup per config) show both.
"""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..common import (SAMPLE_DATA, has_sample, job_status_html, relative_name, render_message,
                      start_job, submit_job, watch_job, wire_job_panel, workspace_transform)
from ..forms import FormError, SchemaForm, one_row, render_errors
from ..plots import bench_bar
from ..security import PathOutsideWorkspace, resolve_in_workspace

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
REF_FIELDS = ["target", "draft", "port", "steps"]

MODE_INPROCESS = "In-process (this machine, no server)"
MODE_SGLANG = "SGLang server"
MODES = [MODE_INPROCESS, MODE_SGLANG]
KINDS = {MODE_INPROCESS: "evaluate", MODE_SGLANG: "bench"}
EVAL_FIELDS = ["target", "draft", "prompts", "configs", "max_prompts", "max_new_tokens", "device", "output"]
# Small enough for a CPU: a handful of prompts, short answers. The draft is the one shipped for the
# embedded default target (`default`), so a fresh install measures a real draft before training any.
EVAL_DEFAULTS = {"draft": "default", "output": "bench/evaluate.json", "configs": ["1,3,1,4"], "max_prompts": 8,
                 "max_new_tokens": 64}
EVAL_PATH_FIELDS = ("draft", "prompts", "output")


def _bench_cls():
    from specforge_core.evaluate.config import BenchConfig

    return BenchConfig


def _reference_cls():
    from specforge_core.evaluate.config import ServeReferenceConfig

    return ServeReferenceConfig


def _evaluate_cls():
    from specforge_core.evaluate.config import EvaluateConfig

    return EvaluateConfig


FORM = SchemaForm(_bench_cls, MAIN_FIELDS, "bench", defaults=GUI_DEFAULTS)
flat_specs = FORM.specs
EVAL_FORM = SchemaForm(_evaluate_cls, EVAL_FIELDS, "bench-eval", defaults=EVAL_DEFAULTS)
eval_specs = EVAL_FORM.specs
# The reference server's few fields; the rest keep the engine's defaults.
REFERENCE_FORM = SchemaForm(_reference_cls, REF_FIELDS, "bench-ref", advanced=False)


def default_mode() -> str:
    """SGLang where it is installed (a GPU box), the in-process evaluator everywhere else (a CPU user
    has no server to measure)."""
    import importlib.util

    return MODE_SGLANG if importlib.util.find_spec("sglang") is not None else MODE_INPROCESS


def workspace_eval_form(workspace: str | Path) -> SchemaForm:
    """The in-process form as a workspace shows it first: the sample dataset's prompts when it has them."""
    if has_sample(workspace):
        return dataclasses.replace(EVAL_FORM, defaults={**EVAL_DEFAULTS, "prompts": SAMPLE_DATA})
    return EVAL_FORM


def _resolve_benchmarks(ws: Path, specs: list[str]) -> list[str]:
    """`name[:count]=path`: the path part must lie in the workspace, like every other path typed here."""
    out = []
    for s in specs:
        name, eq, path = s.partition("=")
        out.append(f"{name}={resolve_in_workspace(ws, path)}" if eq else s)
    return out


def _bench_rules(ws: Path):
    def check(out: dict, errors: dict) -> None:
        if out.get("benchmark"):
            try:
                out["benchmark"] = _resolve_benchmarks(ws, out["benchmark"])
            except PathOutsideWorkspace as e:
                errors["benchmark"] = str(e)
        if out.get("server") and out.get("launch"):
            errors[""] = "give a server URL or tick launch, not both (clear the server box to launch)"
        if out.get("draft") and "draft" not in errors:
            # SGLang has no Medusa: say so here, before a job (or a server) starts.
            from specforge_core.evaluate.launcher import sglang_refusal

            why = sglang_refusal(out["draft"])
            if why:
                errors["draft"] = why + f" Switch the mode to '{MODE_INPROCESS}'."

    return check


def bench_config(workspace: str | Path, values: Sequence[Any]):
    ws = Path(workspace)
    return FORM.to_config(values, transform=workspace_transform(ws, paths=PATH_FIELDS, models=("target", "tokenizer"),
                                                                check=_bench_rules(ws)))


def launch_bench(workspace: str | Path, *values: Any) -> tuple[str, Optional[str]]:
    return start_job(workspace, "bench", lambda: bench_config(workspace, values), flat_specs())


def evaluate_config(workspace: str | Path, values: Sequence[Any]):
    """In-process form values (in `eval_specs()` order) -> a validated EvaluateConfig; raises FormError."""
    return EVAL_FORM.to_config(values, transform=workspace_transform(workspace, paths=EVAL_PATH_FIELDS,
                                                                     models=("target", "tokenizer"),
                                                                     existing=("prompts", "draft")))


def launch_evaluate(workspace: str | Path, *values: Any) -> tuple[str, Optional[str]]:
    return start_job(workspace, "evaluate", lambda: evaluate_config(workspace, values), eval_specs())


def launch_benchmark(workspace: str | Path, mode: str, *values: Any) -> tuple[str, Optional[str]]:
    """The Run button: `values` are the SGLang form's (`flat_specs()`) then the in-process form's
    (`eval_specs()`); `mode` says which one runs."""
    n = len(flat_specs())
    if mode == MODE_SGLANG:
        return launch_bench(workspace, *values[:n])
    return launch_evaluate(workspace, *values[n:])


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
def read_results(path: str | Path) -> dict:
    """The bench results JSON; {} while it does not exist yet or is being replaced."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _evaluate_rows(results: dict) -> list[dict]:
    """The `evaluate` job's results JSON -> rows in the `bench` runs' shape (its baseline first, as 1,0,0,0)."""
    prompts = (results.get("config") or {}).get("prompts") or ""
    bench_name = Path(prompts).name or "prompts"
    status = "ok" if results.get("finished") else "partial"
    rows = []
    for mode in [results.get("baseline")] + list(results.get("results") or []):
        if not mode:
            continue
        base = mode is results.get("baseline")
        acc = mode.get("acceptance_length")
        wall, n = mode.get("wall_s"), mode.get("prompts")
        rows.append({"benchmark": bench_name, "config": "1,0,0,0" if base else mode.get("config"), "status": status,
                     "requests": n, "errors": mode.get("mismatches_vs_baseline", 0) or 0,
                     "acceptance_length_pooled": 1.0 if base and acc is None else acc,
                     "acceptance_length_mean_of_ratios": 1.0 if base else mode.get("acceptance_length_per_request_mean"),
                     "output_tokens_per_s": mode.get("tokens_per_s"), "speedup": 1.0 if base else mode.get("speedup"),
                     "latency_p50_s": None, "latency_mean_s": (wall / n) if wall and n else None})
    return rows


def result_rows(results: dict) -> list[dict]:
    """Either job's results JSON -> one list of rows (bench: its `runs`; evaluate: baseline + `results`)."""
    if results.get("kind") == "evaluate":
        return _evaluate_rows(results)
    return list(results.get("runs") or [])


def results_frame(results: dict):
    import pandas as pd

    runs = result_rows(results)
    df = pd.DataFrame([{k: r.get(k) for k in RESULT_COLUMNS} for r in runs], columns=RESULT_COLUMNS)
    for col in ("acceptance_length_pooled", "acceptance_length_mean_of_ratios", "output_tokens_per_s", "speedup",
                "latency_p50_s"):
        df[col] = pd.to_numeric(df[col], errors="coerce").round(3)
    return df


def results_figures(df):
    acc = bench_bar(df, "acceptance_length_pooled", "Acceptance length (pooled) per config",
                    "tokens / verify step", baseline=1.0)
    spd = bench_bar(df, "speedup", "Speedup over no speculation", "× baseline tokens/s", baseline=1.0)
    return acc, spd


def results_summary(results: dict, path: str) -> str:
    if not results:
        return f"No results yet (`{html.escape(path)}`)."
    n = len(result_rows(results))
    if results.get("kind") == "evaluate":
        status = "done" if results.get("finished") else "running"
        s = (f"**{status}** · in-process · {n} run(s) · {results.get('prompts', '?')} prompts · "
             f"{html.escape(str(results.get('device', '?')))} / {html.escape(str(results.get('dtype', '?')))} · "
             f"`{html.escape(path)}`")
        bad = [r for r in results.get("results") or [] if r.get("mismatches_vs_baseline")]
        for r in bad:
            s += (f"  \n⚠ {html.escape(str(r.get('config')))}: {r['mismatches_vs_baseline']} output(s) differ from "
                  "plain greedy decoding (the *errors* column)")
        for r in results.get("results") or []:
            cats = [(c, v.get("acceptance_length")) for c, v in (r.get("by_category") or {}).items()]
            if cats:
                s += (f"  \n{html.escape(str(r.get('config')))} by category: "
                      + ", ".join(f"{html.escape(str(c))} {a:.2f}" for c, a in cats if a is not None))
            tf = r.get("teacher_forced") or {}
            if tf.get("acceptance_length") is not None:
                agree = tf.get("agreement")
                s += (f"  \n{html.escape(str(r.get('config')))}: the trainer's simulated acceptance length on these "
                      f"answers is {tf['acceptance_length']:.3f} (in process {r.get('acceptance_length') or 0:.3f})"
                      + (f"; it predicts {100 * agree:.1f}% of the verify steps exactly" if agree is not None else ""))
        s += ("  \nAcceptance length is *pooled*: tokens per verify step summed over the prompts / verify steps "
              "(the bonus token counts, so no speculation is 1.0). Speedup is over plain greedy decoding of the "
              "same prompts in the same process; on a CPU that is a CPU's speed, not a server's.")
        return s
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
        w = watch_job(ws, job_id)
        card, live = w.card, w.live
        if w.job is not None:
            path = w.job.paths.get("output") or w.job.config.get("output") or path
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
    return (card, results_summary(results, relative_name(ws, p)), df.rename(columns=DISPLAY_NAMES), *results_figures(df), live)


def launch_reference(workspace: str | Path, *values: Any) -> tuple[str, Optional[str]]:
    """Start the reference server (SGLang's API over HF / in-process EAGLE3) as a background job;
    `values` in `REF_FIELDS` order."""
    try:
        cfg = REFERENCE_FORM.to_config(values, transform=workspace_transform(workspace, paths=("draft",),
                                                                             models=("target",)))
        job = submit_job(workspace, "serve-reference", cfg)
    except FormError as e:
        return render_errors(e, REFERENCE_FORM.specs()), None
    except Exception as e:  # noqa: BLE001 - shown, not raised into the page
        return render_message(f"could not start the reference server: {e}", ok=False), None
    return render_message(f"reference server starting as job {job.id} on http://127.0.0.1:{cfg.port} "
                          "(stop it from the Jobs tab)"), job.id


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------
def _output_default(mode: str) -> str:
    return EVAL_DEFAULTS["output"] if mode == MODE_INPROCESS else GUI_DEFAULTS["output"]


def build(ctx) -> dict:
    import gradio as gr

    ws = Path(ctx.workspace)
    c: dict[str, Any] = {}
    mode = default_mode()
    eval_form = workspace_eval_form(ws)
    gr.Markdown("Measure a draft's **acceptance length** and **speedup**. *In-process* runs the target and the "
                "draft here, in a background job, on prompts from the workspace (plain greedy decoding first, then "
                "each config): it needs no server and works on a CPU. *SGLang server* measures the draft where it "
                "will run: give the URL of a running server (its speculative flags are measured as they are) or "
                "tick *launch* to start SGLang once per config (needs sglang and a GPU). A config is "
                "`batch,steps,topk,draft_tokens`; `1,0,0,0` is the no-speculation baseline that speedups are "
                "measured against.")
    c["mode"] = gr.Radio(MODES, value=mode, label="Mode", elem_id="bench-mode")
    with gr.Group(visible=mode == MODE_INPROCESS) as inproc_box:
        gr.Markdown("The draft is `default` (the draft shipped for the embedded SmolLM2 target), a training run "
                    "directory (its latest checkpoint), a checkpoint, or a serving export; prompts are conversation rows (the turns before the last answer), `prompt` or "
                    "`turns` rows.")
        _, eval_inputs = eval_form.layout()
    with gr.Group(visible=mode == MODE_SGLANG) as sglang_box:
        gr.Markdown("Benchmark sets are `name[:count][=path]` (mtbench, gsm8k, humaneval, math500, or NAME=FILE "
                    "in the workspace).")
        _, inputs = FORM.layout()
        with gr.Accordion("Reference server for small targets (SGLang's API, in-process, CPU-friendly)", open=False,
                          elem_id="bench-ref"):
            gr.Markdown("No SGLang here? Serve a small target (and an exported draft) with the reference server "
                        "and benchmark it by its URL. It measures acceptance faithfully; its speed is a CPU's.")
            _, ref_inputs = REFERENCE_FORM.layout(one_row)
            ref_btn = gr.Button("Start reference server", elem_id="bench-ref-start")
            ref_msg = gr.HTML(elem_id="bench-ref-message")
            ref_btn.click(lambda *v: launch_reference(ws, *v)[0], inputs=ref_inputs, outputs=ref_msg)
    with gr.Row(equal_height=False, elem_classes=["wb-buttons"]):
        c["launch"] = gr.Button("Run benchmark", variant="primary", elem_id="bench-run", scale=2)
        c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="bench-cancel", scale=1)
    with gr.Row(equal_height=True):
        c["results_path"] = gr.Textbox(value=_output_default(mode), label="results file to show",
                                       elem_id="bench-results-path", scale=3)
        c["show"] = gr.Button("Show results", elem_id="bench-show", scale=1)
    c["message"] = gr.HTML(elem_id="bench-message")
    c["job_id"] = gr.State(None)
    c["status"] = gr.HTML(elem_id="bench-status")
    c["summary"] = gr.Markdown(elem_id="bench-summary")
    c["table"] = gr.DataFrame(headers=[DISPLAY_NAMES.get(k, k) for k in RESULT_COLUMNS], interactive=False, wrap=True,
                              label="results", elem_id="bench-table")
    with gr.Row():
        c["acc_plot"] = gr.Plot(label="acceptance length", elem_id="bench-acc-plot")
        c["speed_plot"] = gr.Plot(label="speedup", elem_id="bench-speed-plot")
    c["timer"] = gr.Timer(3.0, active=False)
    watch_outputs = [c["status"], c["summary"], c["table"], c["acc_plot"], c["speed_plot"], c["timer"]]
    watch = wire_job_panel(ctx, tuple(KINDS.values()), poll_bench, launch=launch_benchmark,
                           launch_button=c["launch"], launch_inputs=[c["mode"], *inputs, *eval_inputs],
                           cancel_button=c["cancel"], message=c["message"], job_id=c["job_id"],
                           outputs=watch_outputs, extra_inputs=[c["results_path"]])
    c["show"].click(lambda p: watch(None, p), inputs=c["results_path"], outputs=watch_outputs)
    c["mode"].change(lambda m: (gr.update(visible=m == MODE_INPROCESS), gr.update(visible=m == MODE_SGLANG),
                                _output_default(m)),
                     inputs=c["mode"], outputs=[inproc_box, sglang_box, c["results_path"]])
    c["inputs"] = inputs
    c["eval_inputs"] = eval_inputs
    return c
