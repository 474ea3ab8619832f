"""The Recipe tab: a whole run (prompts -> answers -> split -> dump -> train -> export -> evaluate) as
one background job, stage by stage (issue 13).

Pick a shipped recipe (`specforge_core.recipes.run.list_recipes`) or a recipe YAML in the workspace;
its file is shown read-only, its `params` as `name=value` lines to override (what `--set` takes),
the output directory inside the workspace (`recipes/<name>` by default), and, under "Advanced",
restart-from / stop-after. Start / Cancel go through `workbench.common` like every job tab; Resume
runs the stopped job's config again (a recipe continues where it stopped: finished stages are
skipped, the stage in progress resumes through its own job). The status card shows the current
stage (the job's `recipe_stage` events) and that stage's own progress; the stage table is read from
`recipe_state.json` in the output directory, and the results and calibration tables from
`eval/results.json` and `eval/calibration.json` once the evaluate stage wrote them.
"""

from __future__ import annotations

import dataclasses
import html
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ..common import (InputError, duration_text, find_job, job_runner, job_status_html, latest_job, relative_name,
                      render_message, resolve_input, start_job, submit_job, watch_job, wire_job_panel)
from ..forms import FormError, field_specs, parse_config_error
from ..security import PathOutsideWorkspace, resolve_in_workspace

TITLE = "Recipe"
OUTPUT_ROOT = "recipes"            # the default output is recipes/<recipe name> in the workspace
NO_STAGE = ("none", "")            # the restart-from / stop-after choice that means "not set"
STAGE_COLUMNS = ["stage", "status", "time", "result"]
RESULT_COLUMNS = ["config", "acceptance length", "speedup", "tokens/s", "prompts"]
CALIBRATION_COLUMNS = ["config", "simulated held-out", "in-process", "ratio", "simulated on benchmark",
                       "ratio on benchmark", "verify steps predicted", "note"]
_NOT_RECIPE_DIRS = ("jobs", "cache")
_MAX_YAML_BYTES = 1 << 20
CSS = """
.recipe-stage { margin-top: 6px; font-size: 13.5px; }
.recipe-stage .job-progress-fill { background: #16a34a; }
"""


def _specs():
    """The form's fields as `RecipeConfig` names them (labels and flags for error messages)."""
    from specforge_core.recipes.config import RecipeConfig

    specs = field_specs(RecipeConfig, ["recipe", "output", "set", "restart_from", "stop_after"])
    return [dataclasses.replace(s, label="params") if s.name == "set" else s for s in specs]


# ------------------------------------------------------------------------------------------------
# Finding and showing recipes
# ------------------------------------------------------------------------------------------------
def shipped_recipes() -> list[str]:
    from specforge_core.recipes.run import list_recipes

    return [r["name"] for r in list_recipes()]


def workspace_recipes(workspace: str | Path) -> list[str]:
    """Recipe YAML files in the workspace (relative paths): a mapping with a `name` and a stage section."""
    import yaml

    from specforge_core.recipes.config import Recipe

    ws = Path(workspace)
    out = []
    for p in sorted(ws.rglob("*")):
        rel = p.relative_to(ws)
        if rel.parts[0] in _NOT_RECIPE_DIRS or any(x.startswith(".") for x in rel.parts):
            continue
        if p.suffix not in (".yaml", ".yml") or not p.is_file() or p.stat().st_size > _MAX_YAML_BYTES:
            continue
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(raw, dict) and "name" in raw and any(k in raw for k in Recipe.STAGES):
            out.append(str(rel))
    return out


def recipe_choices(workspace: str | Path) -> list[str]:
    return shipped_recipes() + workspace_recipes(workspace)


def recipe_ref(workspace: str | Path, choice: Optional[str]) -> str:
    """A dropdown value -> what the engine loads: a shipped recipe's name, or the absolute path of a YAML
    file inside the workspace. Raises `InputError`."""
    choice = (choice or "").strip()
    if not choice:
        raise InputError("pick a recipe")
    if choice in shipped_recipes():
        return choice
    p = resolve_input(workspace, choice, "recipe")
    if not p.is_file():
        raise InputError(f"{choice}: neither a shipped recipe ({', '.join(shipped_recipes())}) nor a YAML file "
                         f"in the workspace")
    return str(p)


def recipe_display(workspace: str | Path, ref: str) -> str:
    """The inverse of `recipe_ref`: a shipped name stays, a path is shown relative to the workspace."""
    return ref if ref in shipped_recipes() else relative_name(workspace, ref)


def _load(workspace: str | Path, choice: Optional[str], overrides: Sequence[str] | None = None):
    from specforge_core.config import ConfigError
    from specforge_core.recipes.run import load_recipe

    ref = recipe_ref(workspace, choice)
    try:
        return ref, load_recipe(ref, list(overrides or []))
    except (ConfigError, FileNotFoundError) as e:
        raise InputError(str(e)) from None


def params_text(params: dict, overrides: Sequence[str] | None = None) -> str:
    """A recipe's params (with `name=value` overrides applied) as the params box shows them: one per line."""
    vals = {k: str(v) for k, v in params.items()}
    for item in overrides or []:
        k, _, v = item.partition("=")
        vals[k] = v
    return "\n".join(f"{k}={v}" for k, v in vals.items())


def parse_params(text: Optional[str]) -> dict[str, str]:
    """The params box -> {name: value}; blank and `#` lines are skipped. Raises `InputError`."""
    out: dict[str, str] = {}
    for n, line in enumerate((text or "").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise InputError(f"line {n}: {line!r} is not name=value")
        k, v = (x.strip() for x in line.split("=", 1))
        if not k:
            raise InputError(f"line {n}: {line!r} has no name before '='")
        out[k] = v
    return out


def stage_choices(stages: Sequence[str]) -> list[tuple[str, str]]:
    return [NO_STAGE, *((s, s) for s in stages)]


@dataclasses.dataclass
class RecipeView:
    """What the tab shows for a picked recipe."""

    yaml: str
    description: str
    params: str
    output: str
    stages: list[str]


def recipe_view(workspace: str | Path, choice: Optional[str], overrides: Sequence[str] | None = None) -> RecipeView:
    """The YAML, description, params box, default output dir and stages of the picked recipe (an error
    message in the description when it does not load)."""
    from specforge_core.recipes.config import Recipe
    from specforge_core.recipes.run import recipe_path, recipe_stages

    try:
        ref, rec = _load(workspace, choice)
    except InputError as e:
        return RecipeView("", render_message(str(e), ok=False), "", "", list(Recipe.STAGES))
    stages = recipe_stages(rec)
    where = "shipped recipe" if ref in shipped_recipes() else "recipe file in the workspace"
    desc = (f'<div class="recipe-about"><b>{html.escape(rec.name)}</b> ({where}): '
            f"{html.escape(rec.description or 'no description')}<br>target <code>{html.escape(rec.target)}</code>"
            f" · chat template <code>{html.escape(rec.chat_template)}</code> · stages "
            f"{html.escape(' → '.join(stages))}</div>")
    return RecipeView(recipe_path(ref).read_text(encoding="utf-8"), desc, params_text(rec.params, overrides),
                      f"{OUTPUT_ROOT}/{rec.name}", stages)


# ------------------------------------------------------------------------------------------------
# form -> RecipeConfig
# ------------------------------------------------------------------------------------------------
def recipe_config(workspace: str | Path, recipe: Optional[str], output: Optional[str], params: Optional[str],
                  restart_from: Optional[str] = None, stop_after: Optional[str] = None):
    """The form -> a validated `RecipeConfig` (action run) with workspace paths; raises FormError by field.

    Only params that differ from the recipe's become `set` overrides (the recipe file holds the rest)."""
    from specforge_core.config import ConfigError, build_config
    from specforge_core.recipes.config import RecipeConfig
    from specforge_core.recipes.run import load_recipe, recipe_stages

    errors: dict[str, str] = {}
    try:
        ref, rec = _load(workspace, recipe)
    except InputError as e:
        raise FormError({"recipe": str(e)}) from None
    overrides: list[str] = []
    try:
        given = parse_params(params)
        unknown = sorted(set(given) - set(rec.params))
        if unknown:
            raise InputError(f"{', '.join(unknown)}: not a param of {rec.name} (its params: "
                             f"{', '.join(rec.params) or 'none'})")
        overrides = [f"{k}={v}" for k, v in given.items() if v != str(rec.params[k])]
        if overrides:
            load_recipe(ref, overrides)
    except (InputError, ConfigError) as e:
        errors["set"] = str(e)
    out = (output or "").strip() or f"{OUTPUT_ROOT}/{rec.name}"
    try:
        out_path = resolve_in_workspace(workspace, out)
    except PathOutsideWorkspace as e:
        errors["output"] = str(e)
    stages = recipe_stages(rec)
    for name, value in (("restart_from", restart_from), ("stop_after", stop_after)):
        if value and value not in stages:
            errors[name] = f"{value!r} is not a stage of {rec.name} ({', '.join(stages)})"
    if errors:
        raise FormError(errors)
    data = {"action": "run", "recipe": ref, "output": str(out_path), "set": overrides or None,
            "restart_from": restart_from or None, "stop_after": stop_after or None}
    try:
        return build_config(RecipeConfig, data, source="form")
    except ConfigError as e:
        raise FormError(parse_config_error(str(e), RecipeConfig.model_fields)) from None


def launch_recipe(workspace: str | Path, *values: Any) -> tuple[str, Optional[str]]:
    """Validate and submit the recipe job; (status html, job id or None). Never raises."""
    return start_job(workspace, "recipe", lambda: recipe_config(workspace, *values), _specs())


def resume_recipe(workspace: str | Path, job_id: Optional[str]) -> tuple[str, Optional[str]]:
    """A new job that runs `job_id`'s recipe again on the same output: finished stages are skipped and the
    stopped one continues (without its restart-from, which would redo finished work). Never raises."""
    if not job_id:
        return render_message("start a recipe first", ok=False), None
    r = job_runner(workspace)
    try:
        job = r.get(job_id)
    except KeyError:
        return render_message(f"no job {job_id!r} in this workspace", ok=False), None
    if job.is_live:
        return render_message(f"{job_id} is still {job.status}; cancel it before resuming", ok=False), None
    if job.status == "finished" and not (job.config or {}).get("stop_after"):
        return render_message(f"{job_id} finished every stage; nothing to resume", ok=False), None
    cfg = {**job.config, "restart_from": None}
    try:
        new = submit_job(workspace, "recipe", cfg, resumed_from=job.id)
    except Exception as e:  # noqa: BLE001 - shown, not raised
        return render_message(f"could not resume: {e}", ok=False), None
    return render_message(f"resumed {job_id} as {new.id}"), new.id


def restored_values(workspace: str | Path, job_id: Optional[str]) -> Optional[list[Any]]:
    """The form values (recipe, output, params, restart from, stop after) `job_id` was started with, as the
    form shows them; None when there is no such recipe run."""
    job = find_job(workspace, job_id)
    if job is None:
        return None
    cfg = job.config or {}
    if job.kind != "recipe" or cfg.get("action") != "run" or not cfg.get("recipe"):
        return None
    choice = recipe_display(workspace, cfg["recipe"])
    try:
        _, rec = _load(workspace, choice)
        params = params_text(rec.params, cfg.get("set"))
    except InputError:
        params = "\n".join(cfg.get("set") or [])
    return [choice, relative_name(workspace, cfg.get("output", "")), params, cfg.get("restart_from") or "",
            cfg.get("stop_after") or ""]


# ------------------------------------------------------------------------------------------------
# Watching a run
# ------------------------------------------------------------------------------------------------
def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _num(v: Any, fmt: str = ".3f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else ""


def stage_summary(stage: str, res: Any) -> str:
    """A stage's result (from recipe_state.json) in one short line."""
    if not isinstance(res, dict):
        return ""
    g = res.get
    if stage == "prompts":
        return (f"{g('prompts', 0)} prompts ({g('duplicates', 0)} duplicates, {g('benchmark_excluded', 0)} "
                f"benchmark prompts removed)")
    if stage == "answers":
        return (f"{g('samples_written', 0)} answers ({g('ok', 0)} ok, {g('truncated', 0)} truncated, "
                f"{g('failed', 0)} failed)")
    if stage == "split":
        return f"{g('written_train', 0)} train / {g('written_eval', 0)} eval rows"
    if stage == "dump":
        samples = g("samples") or {}
        return (" / ".join(f"{v} {k}" for k, v in samples.items()) + f" samples, {g('format', '')}").strip(", ")
    if stage == "train":
        best = _num(g("best_sim_accept_len"))
        return f"{g('steps', 0)} steps" + (f", best held-out sim. acceptance length {best}" if best else "")
    if stage == "export":
        return (f"{_num(g('parameters'), ',')} parameters, {g('dtype', '')}"
                + (", checked" if g("checked") else ""))
    if stage == "evaluate":
        cal = g("calibration") or []
        return ", ".join(f"{c.get('config')}: acceptance length {_num(c.get('in_process'))}" for c in cal) or \
            "results in eval/results.json"
    bits = [f"{k} {v}" for k, v in res.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return ", ".join(bits[:4])


def output_dir_of(job: Any) -> Optional[Path]:
    out = (job.paths or {}).get("output") or (job.config or {}).get("output")
    return Path(out) if out else None


def stages_of(job: Any) -> list[str]:
    """The stages the job's recipe runs: from its output's run.json, else from the recipe itself."""
    from specforge_core.recipes.config import Recipe

    out = output_dir_of(job)
    run = _read_json(out / "run.json") if out else None
    if isinstance(run, dict) and isinstance(run.get("recipe"), dict):
        return [s for s in Recipe.STAGES if not (s == "dump" and run["recipe"].get("dump") is None)]
    try:
        from specforge_core.recipes.run import load_recipe, recipe_stages

        return recipe_stages(load_recipe(job.config["recipe"], job.config.get("set")))
    except Exception:  # noqa: BLE001 - a recipe file since deleted or edited: show every stage
        return list(Recipe.STAGES)


def stage_table(out_dir: Optional[str | Path], stages: Sequence[str], live: bool = False, now: float | None = None):
    """One row per stage from `recipe_state.json`: done, running (stopped, once the job is not live), pending."""
    import pandas as pd

    from specforge_core.recipes.run import STATE_FILE

    state = (_read_json(Path(out_dir) / STATE_FILE) if out_dir else None) or {}
    st_all = state.get("stages") or {}
    now = time.time() if now is None else now
    rows = []
    for s in stages:
        st = st_all.get(s) or {}
        status = st.get("status") or "pending"
        secs = st.get("seconds")
        if status == "running":
            if live:
                secs = now - float(st.get("started") or now)
            else:
                status = "stopped"
        rows.append({"stage": s, "status": status, "time": duration_text(secs) if secs is not None else "",
                     "result": stage_summary(s, st.get("result")) if status == "done" else ""})
    return pd.DataFrame(rows, columns=STAGE_COLUMNS)


def results_tables(out_dir: Optional[str | Path]):
    """(results df, calibration df) from eval/results.json and eval/calibration.json; empty before evaluate."""
    import pandas as pd

    res = (_read_json(Path(out_dir) / "eval" / "results.json") if out_dir else None) or {}
    rows = []
    base = res.get("baseline")
    if isinstance(base, dict):
        rows.append({"config": "baseline (no draft)", "acceptance length": 1.0, "speedup": 1.0,
                     "tokens/s": round(base.get("tokens_per_s") or 0.0, 2), "prompts": base.get("prompts")})
    for r in res.get("results") or []:
        rows.append({"config": r.get("config"), "acceptance length": _round(r.get("acceptance_length")),
                     "speedup": _round(r.get("speedup")), "tokens/s": _round(r.get("tokens_per_s"), 2),
                     "prompts": r.get("prompts")})
    cal = (_read_json(Path(out_dir) / "eval" / "calibration.json") if out_dir else None) or []
    crow = [{"config": c.get("config"), "simulated held-out": _round(c.get("simulated_heldout")),
             "in-process": _round(c.get("in_process")), "ratio": _round(c.get("ratio")),
             "simulated on benchmark": _round(c.get("simulated_on_benchmark")),
             "ratio on benchmark": _round(c.get("ratio_on_benchmark")),
             "verify steps predicted": _round(c.get("agreement")), "note": c.get("note") or ""}
            for c in cal if isinstance(c, dict)]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS), pd.DataFrame(crow, columns=CALIBRATION_COLUMNS)


def _round(v: Any, nd: int = 3) -> Any:
    return round(v, nd) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def results_note(workspace: str | Path, out_dir: Optional[str | Path]) -> str:
    if not out_dir:
        return ""
    ev = Path(out_dir) / "eval"
    res = _read_json(ev / "results.json")
    if not isinstance(res, dict):
        return "No results yet: the evaluate stage writes them."
    plot = ev / "acceptance.html"
    parts = [f"**Evaluation** in process on {res.get('prompts', '?')} prompts ({res.get('device', '?')}, "
             f"{res.get('dtype', '?')}): `{relative_name(workspace, ev / 'results.json')}`."]
    if plot.exists():
        parts.append(f"Charts: `{relative_name(workspace, plot)}` (open it in a browser).")
    parts.append("Calibration: the held-out simulated acceptance length from training beside what the draft "
                 "achieved in process; a ratio near 1 means training's accuracy predicts serving.")
    return " ".join(parts)


def stage_html(ev: Optional[dict]) -> str:
    """The latest `recipe_stage` event as a line with its own bar: `Stage 5 of 7: train · started`."""
    if not ev:
        return ""
    i, n = int(ev.get("index") or 0), int(ev.get("stages") or 0)
    status = str(ev.get("status") or "")
    done = i - (0 if status.startswith("done") else 1)
    frac = max(0.0, min(1.0, done / n)) if n else 0.0
    return (f'<div class="recipe-stage" data-stage="{html.escape(str(ev.get("stage")))}" data-index="{i}">'
            f"Stage {i} of {n}: <b>{html.escape(str(ev.get('stage')))}</b> · {html.escape(status)}"
            f'<div class="job-progress"><div class="job-progress-fill" style="width:{100 * frac:.1f}%"></div></div>'
            f"</div>")


def poll_recipe(workspace: str | Path, job_id: Optional[str]):
    """(status html, stage df, results md, results df, calibration df, live?) for a recipe job."""
    empty_res, empty_cal = results_tables(None)
    if not job_id:
        return job_status_html(None), stage_table(None, []), "", empty_res, empty_cal, False
    r = job_runner(workspace)
    w = watch_job(workspace, job_id, details=lambda _p: stage_html(r.last_event(job_id, "recipe_stage")))
    if w.job is None:
        return w.card, stage_table(None, []), "", empty_res, empty_cal, False
    out = output_dir_of(w.job)
    card = w.card
    if w.job.status == "finished" and w.result:
        done = sum(v == "done" for v in (w.result.get("stages") or {}).values())
        card += render_message(f"{done} of {len(w.result.get('stages') or {})} stages done in "
                               f"{relative_name(workspace, out)} ({duration_text(w.result.get('seconds_total'))} "
                               f"of stage time in all)")
    res_df, cal_df = results_tables(out)
    return (card, stage_table(out, stages_of(w.job), w.live), results_note(workspace, out), res_df, cal_df,
            w.live)


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------
def build(ctx) -> dict:
    import gradio as gr

    ws = Path(ctx.workspace)
    c: dict[str, Any] = {}
    specs = {s.name: s for s in _specs()}
    gr.Markdown("Run a whole **recipe** as one background job: prompts → the target's own answers → held-out "
                "split → (hidden-state dump) → training → export → in-process evaluation. Each stage is the "
                "engine's own job; a stopped run continues where it stopped (Resume), and the stage table shows "
                "what is done. Pick a shipped recipe or a recipe YAML in the workspace (`specforge-wb recipe show "
                "NAME` prints one to copy).")
    choices = recipe_choices(ws)
    first = choices[0] if choices else None
    view = recipe_view(ws, first)
    with gr.Row(equal_height=False):
        c["recipe"] = gr.Dropdown(choices, value=first, label="recipe", allow_custom_value=True, scale=2,
                                  info="a shipped recipe, or a recipe YAML file in the workspace",
                                  elem_id="recipe-recipe")
        c["output"] = gr.Textbox(view.output, label="output", info="the directory every stage writes into (in the "
                                 "workspace)", scale=2, elem_id="recipe-output")
    c["description"] = gr.HTML(view.description, elem_id="recipe-description")
    with gr.Row(equal_height=False):
        c["params"] = gr.Textbox(view.params, label="params", lines=5, max_lines=12, scale=1,
                                 placeholder="this recipe has no params",
                                 info="the recipe's params, one name=value a line; changed ones are passed as --set",
                                 elem_id="recipe-params")
        with gr.Column(scale=2):
            with gr.Accordion("Recipe file (read only)", open=False, elem_id="recipe-yaml-box"):
                c["yaml"] = gr.Code(view.yaml, language="yaml", interactive=False, label="recipe YAML",
                                    elem_id="recipe-yaml", max_lines=30)
    with gr.Accordion("Advanced", open=False, elem_id="recipe-advanced"):
        with gr.Row():
            c["restart_from"] = gr.Dropdown(stage_choices(view.stages), value="", label="restart from",
                                            info=specs["restart_from"].info, elem_id="recipe-restart-from")
            c["stop_after"] = gr.Dropdown(stage_choices(view.stages), value="", label="stop after",
                                          info=specs["stop_after"].info, elem_id="recipe-stop-after")
    inputs = [c["recipe"], c["output"], c["params"], c["restart_from"], c["stop_after"]]
    with gr.Row(equal_height=False, elem_classes=["wb-buttons"]):
        c["launch"] = gr.Button("Start recipe", variant="primary", elem_id="recipe-launch", scale=2)
        c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="recipe-cancel", scale=1)
        c["resume"] = gr.Button("Resume", elem_id="recipe-resume", scale=1)
    c["message"] = gr.HTML(elem_id="recipe-message")
    c["job_id"] = gr.State(None)
    c["status"] = gr.HTML(elem_id="recipe-status")
    c["stages"] = gr.DataFrame(headers=STAGE_COLUMNS, interactive=False, wrap=True, label="stages",
                               elem_id="recipe-stages")
    c["results_md"] = gr.Markdown(elem_id="recipe-results-note")
    with gr.Row(equal_height=False):
        c["results"] = gr.DataFrame(headers=RESULT_COLUMNS, interactive=False, wrap=True, label="results",
                                    elem_id="recipe-results")
        c["calibration"] = gr.DataFrame(headers=CALIBRATION_COLUMNS, interactive=False, wrap=True,
                                        label="calibration: training vs serving", elem_id="recipe-calibration")
    c["timer"] = gr.Timer(2.0, active=False)

    outputs = [c["status"], c["stages"], c["results_md"], c["results"], c["calibration"], c["timer"]]
    watch = wire_job_panel(ctx, "recipe", poll_recipe, launch=launch_recipe, launch_button=c["launch"],
                           launch_inputs=inputs, cancel_button=c["cancel"], message=c["message"],
                           job_id=c["job_id"], outputs=outputs)

    def on_resume(job_id):
        msg, new = resume_recipe(ws, job_id)
        jid = new or job_id
        return (msg, jid, *watch(jid))

    c["resume"].click(on_resume, inputs=c["job_id"], outputs=[c["message"], c["job_id"], *outputs])

    view_outputs = [c["yaml"], c["description"], c["params"], c["output"], c["restart_from"], c["stop_after"]]

    def show(v: RecipeView, restart: str = "", stop: str = "") -> tuple:
        return (v.yaml, v.description, v.params, v.output, gr.update(choices=stage_choices(v.stages), value=restart),
                gr.update(choices=stage_choices(v.stages), value=stop))

    # `.input`, not `.change`: restoring the form on page load sets the dropdown too, and must keep the run's params.
    c["recipe"].input(lambda choice: show(recipe_view(ws, choice)), inputs=c["recipe"], outputs=view_outputs)
    if ctx.app is not None:
        # A reloaded page follows the newest recipe job (wire_job_panel) and shows the form it was started with;
        # the recipe list is read again (a YAML written into the workspace since the app started).
        def on_load():
            vals = restored_values(ws, latest_job(ws, "recipe"))
            if vals is None:
                return (gr.update(choices=recipe_choices(ws)),) + (gr.update(),) * len(view_outputs)
            choice, out, params, restart, stop = vals
            v = dataclasses.replace(recipe_view(ws, choice), params=params, output=out)
            return (gr.update(choices=recipe_choices(ws), value=choice), *show(v, restart, stop))

        ctx.app.load(on_load, outputs=[c["recipe"], *view_outputs])
    c["inputs"] = inputs
    return c
