"""The Train tab: an EAGLE3 training run, from a form built from `TrainConfig` to live curves.

The form comes from the schema (`workbench.forms`): the key fields up front, the rest under
"Advanced", so a new TrainConfig field appears here without touching this file. Paths typed in
the form are resolved inside the workspace (`security.resolve_in_workspace`). The run is a
background job (`specforge_core.jobs.runner`, optionally under torchrun with N processes); a
`gr.Timer` polls what the job writes (`metrics.jsonl`, its checkpoints) and redraws the loss,
acc_k and simulated acceptance-length plots. Export and check run as jobs of their own. Offline
training (a hidden-state store instead of the target's weights) is the `train_hidden_states`
field, with a disk estimate when `specforge_core.offline` is available.
"""

from __future__ import annotations

import html
import json
import shlex
from pathlib import Path
from typing import Any, Optional, Sequence

from ..forms import FieldSpec, FormError, advanced_rows, field_specs, render_errors, two_columns, values_to_config
from ..security import PathOutsideWorkspace, resolve_in_workspace, resolve_path_fields
from .jobs_tab import job_runner, job_status_html, render_message, submit_job

TITLE = "Train"
MAIN_FIELDS = ["target_model", "train_data", "eval_data", "chat_template", "max_length", "draft_vocab_size",
               "ttt_length", "lr", "batch_size", "epochs", "max_steps", "device", "output_dir"]
OFFLINE_FIELDS = ["train_hidden_states", "eval_hidden_states"]
# Defaults that point into the workspace instead of the CLI's `workspace/...` (the job runs in it).
GUI_DEFAULTS = {"output_dir": "runs/eagle3", "cache_dir": "cache", "num_proc": 1}
PATH_FIELDS = ("train_data", "eval_data", "train_hidden_states", "eval_hidden_states", "draft_model_config",
               "cache_dir", "output_dir")
MODEL_FIELDS = ("target_model", "tokenizer")  # a path, or a name the engine knows (default, llama3, hub id)
EXPORT_DIR = "serving"
CHECKPOINT_COLUMNS = ["checkpoint", "step", "reason", "path"]


def _train_cls():
    from specforge_core.training.config import TrainConfig

    return TrainConfig


def all_specs() -> tuple[list[FieldSpec], list[FieldSpec], list[FieldSpec]]:
    """(main, offline, advanced) field specs; advanced = every other TrainConfig field, in schema order."""
    cls = _train_cls()
    rest = [n for n in cls.model_fields if n not in MAIN_FIELDS and n not in OFFLINE_FIELDS]
    return field_specs(cls, MAIN_FIELDS), field_specs(cls, OFFLINE_FIELDS), field_specs(cls, rest)


def flat_specs() -> list[FieldSpec]:
    main, off, adv = all_specs()
    return main + off + adv


def gui_default(spec: FieldSpec) -> Any:
    return GUI_DEFAULTS.get(spec.name, spec.default)


# ------------------------------------------------------------------------------------------------
# form -> TrainConfig
# ------------------------------------------------------------------------------------------------
def _resolve_model_name(ws: Path, name: str) -> str:
    from specforge_core.targets import LLAMA3_ALIASES, is_default

    if is_default(name) or name.lower() in LLAMA3_ALIASES:
        return name
    looks_local = name.startswith((".", "/", "~")) or (ws / name).exists() or name.count("/") != 1
    if not looks_local:
        return name  # a hub id (org/name): the engine finds it in the HF cache
    return str(resolve_in_workspace(ws, name))


def workspace_paths(ws: Path):
    """The form's `transform`: every path field resolved inside the workspace, errors by field."""

    def transform(data: dict) -> dict:
        out, errors = resolve_path_fields(ws, data, PATH_FIELDS)
        for name in MODEL_FIELDS:
            v = out.get(name)
            if v:
                try:
                    out[name] = _resolve_model_name(ws, v)
                except PathOutsideWorkspace as e:
                    errors[name] = str(e)
        for name in ("train_data", "eval_data"):
            for p in out.get(name) or []:
                if not Path(p).exists() and name not in errors:
                    errors[name] = f"{_rel(ws, p)}: no such file in the workspace"
        if errors:
            raise FormError(errors)
        return out

    return transform


def train_config(workspace: str | Path, values: Sequence[Any], specs: Sequence[FieldSpec] | None = None):
    """Form values (in `flat_specs()` order) -> a validated TrainConfig with workspace paths; raises FormError."""
    ws = Path(workspace)
    specs = list(specs or flat_specs())
    return values_to_config(_train_cls(), specs, list(values), transform=workspace_paths(ws))


def _rel(ws: Path, p: str | Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ws.resolve()))
    except ValueError:
        return str(p)


def cli_command(workspace: str | Path, nproc: Any, *values: Any) -> str:
    """The shell command that runs the same training by hand (from the workspace directory)."""
    try:
        cfg = train_config(workspace, values)
    except FormError as e:
        return "# cannot build the command: " + "; ".join(f"{k or 'form'}: {v}" for k, v in e.errors.items())
    from specforge_core.config import config_to_argv

    argv = config_to_argv(cfg)
    n = int(nproc or 1)
    head = ["specforge-wb", "train"] if n <= 1 else ["torchrun", "--nproc_per_node", str(n), "-m",
                                                      "specforge_core", "train"]
    lines, cur = [shlex.join(head)], []
    for a in argv:
        if a.startswith("--") and cur:
            lines.append(shlex.join(cur))
            cur = []
        cur.append(a)
    if cur:
        lines.append(shlex.join(cur))
    return f"cd {shlex.quote(str(Path(workspace).resolve()))}\n" + " \\\n    ".join(lines)


def save_config(workspace: str | Path, dest: str, *values: Any) -> str:
    """Write the form's config as YAML (.yaml/.yml) or JSON into the workspace; `--config` reads it back."""
    ws = Path(workspace)
    try:
        cfg = train_config(ws, values)
    except FormError as e:
        return render_errors(e, flat_specs())
    dest = (dest or "").strip() or "configs/train.yaml"
    try:
        p = resolve_in_workspace(ws, dest)
    except PathOutsideWorkspace as e:
        return render_message(str(e), ok=False)
    if p.suffix not in (".yaml", ".yml", ".json"):
        return render_message(f"{dest}: end the name with .yaml, .yml or .json", ok=False)
    data = cfg.model_dump(mode="json")
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".json":
        p.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        import yaml

        p.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return render_message(f"saved {_rel(ws, p)} (run it with: specforge-wb train --config {_rel(ws, p)})")


def launch_train(workspace: str | Path, nproc: Any, *values: Any) -> tuple[str, Optional[str]]:
    """Validate and submit the training job; returns (status html, job id or None). Never raises."""
    try:
        cfg = train_config(workspace, values)
    except FormError as e:
        return render_errors(e, flat_specs()), None
    try:
        job = submit_job(workspace, "train", cfg, nproc=int(nproc or 1))
    except Exception as e:  # noqa: BLE001 - e.g. nproc on a kind that cannot, a full disk
        return render_message(f"could not start the job: {e}", ok=False), None
    return job_status_html(job), job.id


# ------------------------------------------------------------------------------------------------
# Watching a run
# ------------------------------------------------------------------------------------------------
def checkpoints_table(run_dir: str | Path):
    import pandas as pd
    from specforge_core.training.checkpoint import CHECKPOINTS, COMPLETE

    root = Path(run_dir) / CHECKPOINTS
    rows = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if not d.is_dir() or not d.name.startswith("step_") or not (d / COMPLETE).is_file():
                continue
            try:
                st = json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                st = {}
            rows.append({"checkpoint": d.name, "step": st.get("step"), "reason": st.get("reason", ""),
                         "path": str(d)})
    return pd.DataFrame(rows, columns=CHECKPOINT_COLUMNS)


def metrics_summary(rows: Sequence[dict]) -> str:
    from ..plots import split_rows

    train, ev = split_rows(rows, "train"), split_rows(rows, "eval")
    if not train and not ev:
        return "No metrics yet: the first row appears after the first logged step."
    parts = []
    if train:
        r = train[-1]
        parts.append(f"**step {r['step']}** · loss {r.get('loss', float('nan')):.4f} · "
                     f"acc_0 {r.get('acc_0', float('nan')):.3f} · "
                     f"sim. acceptance length {r.get('sim_accept_len', float('nan')):.3f}"
                     + (f" · {r['tokens_per_s']:.0f} tok/s" if isinstance(r.get("tokens_per_s"), (int, float)) else ""))
        if r.get("counted_positions") == 0:
            parts.append("⚠ **no position was counted** at this step: every target prediction fell outside the "
                         "draft vocabulary, or nothing is trained under the loss mask (check the chat template in "
                         "the Loss-mask tab, or raise draft vocab size).")
    if ev:
        r = ev[-1]
        parts.append(f"eval @ step {r['step']}: loss {r.get('loss', float('nan')):.4f} · "
                     f"sim. acceptance length {r.get('sim_accept_len', float('nan')):.3f}")
    return " \n".join(parts)


def run_dir_of(job: Any) -> Optional[str]:
    return (job.paths or {}).get("output_dir") or (job.config or {}).get("output_dir")


def poll_train(workspace: str | Path, job_id: Optional[str]):
    """(status html, loss fig, acc fig, accept-len fig, checkpoints df, summary md, live?) for a job."""
    from ..plots import read_metrics, training_figures

    if not job_id:
        figs = training_figures([])
        return (job_status_html(None), *figs, checkpoints_table("/nonexistent"), metrics_summary([]), False)
    r = job_runner(workspace)
    try:
        job = r.get(job_id)
    except KeyError:
        figs = training_figures([])
        return (render_message(f"no job {job_id}", ok=False), *figs, checkpoints_table("/nonexistent"), "", False)
    run_dir = run_dir_of(job)
    rows = read_metrics(Path(run_dir) / "metrics.jsonl") if run_dir else []
    card = job_status_html(job, r.progress(job_id))
    if job.status in ("failed", "lost"):
        card += f'<pre class="job-log-snippet">{html.escape(r.log_tail(job_id, 8))}</pre>'
    live = job.status in ("starting", "running")
    ckpts = checkpoints_table(run_dir) if run_dir else checkpoints_table("/nonexistent")
    ckpts["path"] = [_rel(Path(workspace), p) for p in ckpts["path"]]
    return (card, *training_figures(rows), ckpts, metrics_summary(rows), live)


def latest_train_job(workspace: str | Path) -> Optional[str]:
    jobs = job_runner(workspace).list_jobs(kind="train", limit=1)
    return jobs[0].id if jobs else None


def export_run(workspace: str | Path, job_id: Optional[str]) -> tuple[str, Optional[str]]:
    """Submit `export` of the job's run (its latest checkpoint) into RUN/serving; (message, job id)."""
    from specforge_core.training.config import ExportConfig

    if not job_id:
        return render_message("start (or pick) a training run first", ok=False), None
    job = job_runner(workspace).get(job_id)
    run_dir = run_dir_of(job)
    if not run_dir or not checkpoints_table(run_dir).shape[0]:
        return render_message("this run has no complete checkpoint yet; wait for it to save one (at the end, "
                              "on cancel, or every save_every steps)", ok=False), None
    cfg = ExportConfig(checkpoint=run_dir, output=str(Path(run_dir) / EXPORT_DIR),
                       target=job.config.get("target_model"), overwrite=True)
    try:
        ej = submit_job(workspace, "export", cfg)
    except Exception as e:  # noqa: BLE001
        return render_message(f"could not start the export: {e}", ok=False), None
    return render_message(f"export started as job {ej.id} → {_rel(Path(workspace), cfg.output)}"), ej.id


def check_run(workspace: str | Path, job_id: Optional[str]) -> tuple[str, Optional[str]]:
    """Submit `check-draft` on the run's exported serving checkpoint; (message, job id)."""
    from specforge_core.training.config import CheckDraftConfig

    if not job_id:
        return render_message("start (or pick) a training run first", ok=False), None
    job = job_runner(workspace).get(job_id)
    run_dir = run_dir_of(job)
    serving = Path(run_dir or "") / EXPORT_DIR
    if not run_dir or not (serving / "config.json").exists():
        return render_message("export the run first (no serving checkpoint in "
                              f"{_rel(Path(workspace), serving)})", ok=False), None
    cfg = CheckDraftConfig(path=str(serving), target=job.config.get("target_model"))
    try:
        cj = submit_job(workspace, "check-draft", cfg)
    except Exception as e:  # noqa: BLE001
        return render_message(f"could not start the check: {e}", ok=False), None
    return render_message(f"check-draft started as job {cj.id}; its verdict is in the Jobs tab"), cj.id


def side_job_result(workspace: str | Path, job_id: Optional[str]) -> tuple[str, bool]:
    """(html, live?) for an export / check job started from this tab."""
    if not job_id:
        return "", False
    r = job_runner(workspace)
    job = r.get(job_id)
    card = job_status_html(job, r.progress(job_id))
    if job.status == "finished":
        res = r.result(job_id) or {}
        bits = [f"{k} = {v}" for k, v in res.items() if not isinstance(v, (dict, list)) and k != "exit_code"][:8]
        problems = res.get("problems") or []
        card += render_message(", ".join(bits) or "done", ok=not problems)
        for p in problems[:10]:
            card += render_message(str(p), ok=False)
    elif job.status in ("failed", "lost"):
        card += f'<pre class="job-log-snippet">{html.escape(r.log_tail(job_id, 8))}</pre>'
    return card, job.status in ("starting", "running")


# ------------------------------------------------------------------------------------------------
# Offline: disk estimate
# ------------------------------------------------------------------------------------------------
def offline_available() -> bool:
    try:
        from specforge_core.offline import store  # noqa: F401
    except ImportError:
        return False
    return True


def disk_estimate(workspace: str | Path, *values: Any, sample_rows: int = 200) -> str:
    """How much disk a hidden-state dump of the train data would take (bf16 and fp8 vs SpecForge's 8H)."""
    if not offline_available():
        return "Offline training is not available in this installation (no `specforge_core.offline`)."
    from specforge_core.offline.store import bytes_per_token, human_bytes, specforge_bytes_per_token
    from specforge_core.training.export import load_target_config

    ws = Path(workspace)
    specs = flat_specs()
    raw = dict(zip([s.name for s in specs], values))
    try:
        target = _resolve_model_name(ws, specs[0].parse(raw.get("target_model")) or "default")
        data = next(s for s in specs if s.name == "train_data").parse(raw.get("train_data"))
        if not data:
            return "Give the train data (the conversations the dump would run the target over) to estimate."
        files = [resolve_in_workspace(ws, d) for d in data]
        H = int(load_target_config(target)["hidden_size"])
    except (PathOutsideWorkspace, ValueError, FileNotFoundError, KeyError) as e:
        return render_message(f"cannot estimate: {e}", ok=False)
    from .data_tab import _read_rows, token_lengths
    from .mask_tab import resolve_tokenizer

    tok_name = raw.get("tokenizer") or target
    try:
        tok = resolve_tokenizer(tok_name if tok_name in ("default", "llama3") else _rel(ws, tok_name), ws)
    except Exception as e:  # noqa: BLE001
        return render_message(f"cannot load the tokenizer to count tokens: {e}", ok=False)
    total_rows, sample = 0, []
    for f in files:
        with open(f, "rb") as fh:
            n = sum(1 for line in fh if line.strip())
        total_rows += n
        if len(sample) < sample_rows:
            rows, _ = _read_rows(Path(f), sample_rows - len(sample))
            sample += rows
    if not sample:
        return "The train data has no readable rows."
    lens = token_lengths(sample, tok)
    max_len = next(s for s in specs if s.name == "max_length").parse(raw.get("max_length")) or 2048
    per_row = sum(min(n, int(max_len)) for n in lens) / len(lens)
    tokens = per_row * total_rows
    ours_bf16 = tokens * bytes_per_token(H, "bfloat16", teacher_fraction=0.5)
    ours_fp8 = tokens * bytes_per_token(H, "fp8_e4m3", teacher_fraction=0.5)
    sf = tokens * specforge_bytes_per_token(H)
    return (f"**Disk estimate for a hidden-state dump** (target hidden size {H}, ~{total_rows:,} rows × "
            f"{per_row:.0f} tokens ≈ {tokens:,.0f} tokens, half of them teaching):  \n"
            f"bf16 store **{human_bytes(ours_bf16)}** · fp8 store **{human_bytes(ours_fp8)}** · "
            f"SpecForge's layout would need {human_bytes(sf)}.")


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------
def build(ctx) -> dict:
    import gradio as gr

    from ..forms import make_component

    ws = Path(ctx.workspace)
    main, off, adv = all_specs()
    c: dict[str, Any] = {"components": {}}
    gr.Markdown("Train an EAGLE3 draft. **Online**: the target runs beside the draft and computes hidden states "
                "on the fly. **Offline**: give a hidden-state store (made by a dump) and only the draft is "
                "trained. Paths are inside the workspace; the run goes to `output dir` (checkpoints, "
                "`metrics.jsonl`).")

    def comp(spec: FieldSpec):
        x = make_component(spec, gui_default(spec), elem_id=f"train-{spec.name.replace('_', '-')}")
        c["components"][spec.name] = x
        return x

    two_columns(main, comp)
    with gr.Accordion("Offline training (hidden states on disk)", open=False, elem_id="train-offline"):
        with gr.Row():
            for s in off:
                comp(s)
        with gr.Row():
            c["estimate_btn"] = gr.Button("Estimate disk for a dump", size="sm", elem_id="train-estimate",
                                          scale=0, min_width=240, interactive=offline_available())
        c["estimate"] = gr.Markdown(elem_id="train-estimate-out")
    advanced_rows(adv, comp, "Advanced (every other TrainConfig field)", elem_id="train-advanced")
    specs = main + off + adv
    inputs = [c["components"][s.name] for s in specs]
    with gr.Row(equal_height=False):
        c["nproc"] = gr.Number(value=1, precision=0, minimum=1, maximum=64, label="processes",
                               info="> 1 runs under torchrun", elem_id="train-nproc", scale=1, min_width=160)
        c["save_path"] = gr.Textbox(value="configs/train.yaml", label="save config as", scale=2,
                                    info="a .yaml or .json file in the workspace", elem_id="train-save-path")
    with gr.Row(equal_height=False, elem_classes=["wb-buttons"]):
        c["launch"] = gr.Button("Start training", variant="primary", elem_id="train-launch", scale=2)
        c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="train-cancel", scale=1)
        c["show_cli"] = gr.Button("Show CLI command", elem_id="train-show-cli", scale=1)
        c["save"] = gr.Button("Save config", elem_id="train-save", scale=1)
    c["cli"] = gr.Code(language="shell", label="CLI command", elem_id="train-cli", visible=False, interactive=False)
    c["message"] = gr.HTML(elem_id="train-message")
    c["job_id"] = gr.State(None)
    c["status"] = gr.HTML(elem_id="train-status")
    c["summary"] = gr.Markdown(elem_id="train-summary")
    with gr.Row(equal_height=False):
        c["loss_plot"] = gr.Plot(label="loss", elem_id="train-loss-plot")
        c["accept_plot"] = gr.Plot(label="simulated acceptance length", elem_id="train-accept-plot")
    c["acc_plot"] = gr.Plot(label="acc_k", elem_id="train-acc-plot")
    with gr.Row(equal_height=True):
        c["export"] = gr.Button("Export for SGLang / vLLM", elem_id="train-export")
        c["check"] = gr.Button("Check exported draft", elem_id="train-check")
    c["side_job"] = gr.State(None)
    c["side_status"] = gr.HTML(elem_id="train-side-status")
    c["checkpoints"] = gr.DataFrame(headers=CHECKPOINT_COLUMNS, interactive=False, label="checkpoints",
                                    elem_id="train-checkpoints", wrap=True)
    c["timer"] = gr.Timer(2.0, active=False)

    watch_outputs = [c["status"], c["loss_plot"], c["acc_plot"], c["accept_plot"], c["checkpoints"], c["summary"],
                     c["timer"]]

    def watch(job_id):
        *out, live = poll_train(ws, job_id)
        return (*out, gr.Timer(active=live))

    def on_launch(nproc, *vals):
        card, job_id = launch_train(ws, nproc, *vals)
        if job_id is None:
            return (card, gr.update(), *([gr.update()] * len(watch_outputs)))
        return ("", job_id, *watch(job_id))

    c["launch"].click(on_launch, inputs=[c["nproc"], *inputs], outputs=[c["message"], c["job_id"], *watch_outputs])
    c["timer"].tick(watch, inputs=c["job_id"], outputs=watch_outputs, show_progress="hidden")

    def on_cancel(job_id):
        from .jobs_tab import cancel_job

        return (cancel_job(ws, job_id), *watch(job_id))

    c["cancel"].click(on_cancel, inputs=c["job_id"], outputs=[c["message"], *watch_outputs])
    c["show_cli"].click(lambda n, *v: gr.update(value=cli_command(ws, n, *v), visible=True),
                        inputs=[c["nproc"], *inputs], outputs=c["cli"])
    c["save"].click(lambda p, *v: save_config(ws, p, *v), inputs=[c["save_path"], *inputs], outputs=c["message"])
    c["estimate_btn"].click(lambda *v: disk_estimate(ws, *v), inputs=inputs, outputs=c["estimate"])

    side_timer = gr.Timer(2.0, active=False)

    def on_side(fn, job_id):
        msg, sid = fn(ws, job_id)
        return msg, sid, gr.Timer(active=sid is not None)

    c["export"].click(lambda j: on_side(export_run, j), inputs=c["job_id"],
                      outputs=[c["side_status"], c["side_job"], side_timer])
    c["check"].click(lambda j: on_side(check_run, j), inputs=c["job_id"],
                     outputs=[c["side_status"], c["side_job"], side_timer])

    def side_tick(sid, prev):
        card, live = side_job_result(ws, sid)
        return card, gr.Timer(active=live)

    side_timer.tick(side_tick, inputs=[c["side_job"], c["side_status"]], outputs=[c["side_status"], side_timer],
                    show_progress="hidden")

    if ctx.app is not None:
        # A reloaded page picks up the newest training run (it kept running without the page).
        def on_load():
            job_id = latest_train_job(ws)
            return (job_id, *watch(job_id))

        ctx.app.load(on_load, outputs=[c["job_id"], *watch_outputs])
    c["inputs"] = inputs
    c["specs"] = specs
    return c
