"""The Train tab: a draft training run (EAGLE3 or Medusa), from a form built from `TrainConfig` to live curves.

The form comes from the schema (`workbench.forms`): the key fields up front, the rest under
"Advanced", so a new TrainConfig field appears here without touching this file. The draft family
(`draft_type`) has a box of its own below the key fields, with only that family's fields shown
(EAGLE3: TTT length and decay, aux layers, attention; Medusa: heads, blocks per head, decay); the
hidden family's fields are left at their defaults, so the run, the saved config and the CLI command
carry only what is shown. Paths typed in the form are resolved inside the workspace
(`security.resolve_in_workspace`). The run is a background job (`specforge_core.jobs.runner`,
optionally under torchrun with N processes); a `gr.Timer` polls what the job writes (`metrics.jsonl`,
its checkpoints) and redraws the loss, acc_k (EAGLE3's TTT steps; "head i" for a Medusa run) and
simulated acceptance-length plots. Export and check run as jobs of their own. Offline
training (a hidden-state store instead of the target's weights) is the `train_hidden_states`
field, with a disk estimate from `specforge_core.offline.store`.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any, Optional, Sequence

from ..common import (SAMPLE_RUN, SAMPLE_TRAIN, find_job, has_sample, job_runner, job_status_html, latest_job, read_rows,
                      relative_name, render_message, resolve_model_name, resolve_tokenizer, start_job, submit_job,
                      token_lengths, watch_job, wire_job_panel, workspace_transform)
from ..forms import FieldSpec, FormError, SchemaForm, component_value, render_errors
from ..plots import read_metrics, split_rows, training_figures
from ..security import PathOutsideWorkspace, resolve_in_workspace

TITLE = "Train"
MAIN_FIELDS = ["target_model", "train_data", "eval_data", "chat_template", "max_length", "draft_vocab_size",
               "lr", "batch_size", "epochs", "max_steps", "device", "output_dir"]
OFFLINE_FIELDS = ["train_hidden_states", "eval_hidden_states"]
FAMILY_FIELD = ["draft_type"]
# Each family's own fields: shown only while that family is picked, left at their defaults otherwise.
FAMILY_FIELDS = {"eagle3": ["ttt_length", "ttt_decay", "aux_layer_ids", "attention_backend"],
                 "medusa": ["medusa_num_heads", "medusa_num_layers", "medusa_decay"]}
FAMILY_TITLES = {"eagle3": "**EAGLE3**: one decoder layer over three captured target layers, trained by "
                           "training-time test (TTT) for `ttt length` steps",
                 "medusa": "**Medusa**: K heads over the target's last hidden state; head i predicts token "
                           "t+2+i (served by vLLM <= 0.32; SGLang has no Medusa)"}
FAMILY_LABELS = {"draft_type": "draft family", "medusa_num_heads": "heads (K)",
                 "medusa_num_layers": "residual blocks per head",
                 "medusa_decay": "head decay (weight of head i = decay**i)"}
# Defaults that point into the workspace instead of the CLI's `workspace/...` (the job runs in it).
GUI_DEFAULTS = {"output_dir": SAMPLE_RUN, "cache_dir": "cache", "num_proc": 1}
# The run directory the form suggests per family (switching family moves a still-default one along).
FAMILY_RUN_DIRS = {"eagle3": SAMPLE_RUN, "medusa": "runs/medusa"}
PATH_FIELDS = ("train_data", "eval_data", "train_hidden_states", "eval_hidden_states", "draft_model_config",
               "cache_dir", "output_dir")
MODEL_FIELDS = ("target_model", "tokenizer")  # a path, or a name the engine knows (default, llama3, hub id)
EXPORT_DIR = "serving"
CHECKPOINT_COLUMNS = ["checkpoint", "step", "reason", "path"]


def _train_cls():
    from specforge_core.training.config import TrainConfig

    return TrainConfig


FORM = SchemaForm(_train_cls, MAIN_FIELDS, "train", defaults=GUI_DEFAULTS,
                  groups=[FAMILY_FIELD, FAMILY_FIELDS["eagle3"], FAMILY_FIELDS["medusa"], OFFLINE_FIELDS])
flat_specs = FORM.specs
gui_default = FORM.default


def workspace_form(workspace: str | Path) -> SchemaForm:
    """The form as a workspace shows it first: a workspace holding the sample dataset trains on it (the file
    the Data tab's prepare-data writes from it), so the first clicks work without typing a path."""
    if has_sample(workspace):
        return dataclasses.replace(FORM, defaults={**GUI_DEFAULTS, "train_data": [SAMPLE_TRAIN]})
    return FORM


def restored_values(workspace: str | Path, job_id: Optional[str]) -> Optional[list[Any]]:
    """The form values (in `flat_specs()` order) of the run `job_id` was started with, as the form shows
    them (workspace paths relative again); None when there is no such job. A field the saved config
    lacks (a run from an older version) keeps the GUI default. This is what a reloaded page shows beside
    that run's curves."""
    job = find_job(workspace, job_id)
    if job is None:
        return None
    saved = job.config or {}
    rel = set(PATH_FIELDS) | set(MODEL_FIELDS)
    out = []
    for spec in flat_specs():
        v = saved.get(spec.name, gui_default(spec))
        if spec.name in rel and v:
            v = [relative_name(workspace, x) for x in v] if isinstance(v, list) else relative_name(workspace, v)
        out.append(component_value(spec, v))
    return out


# ------------------------------------------------------------------------------------------------
# form -> TrainConfig
# ------------------------------------------------------------------------------------------------
def train_config(workspace: str | Path, values: Sequence[Any]):
    """Form values (in `flat_specs()` order) -> a validated TrainConfig with workspace paths; raises FormError."""
    resolve = workspace_transform(workspace, paths=PATH_FIELDS, models=MODEL_FIELDS,
                                  existing=("train_data", "eval_data"))

    def transform(data: dict) -> dict:
        # The other family's fields are hidden in the form: they keep their defaults.
        picked = data.get("draft_type", "eagle3")
        hidden = {n for fam, names in FAMILY_FIELDS.items() if fam != picked for n in names}
        return resolve({k: v for k, v in data.items() if k not in hidden})

    return FORM.to_config(values, transform=transform)


def family_view(draft_type: Optional[str], output_dir: Any) -> tuple[dict[str, bool], Any]:
    """What the form shows for a picked family: {family: visible} for the families' boxes, and the
    output dir (another family's suggested run directory becomes this family's; a typed one stays)."""
    picked = draft_type if draft_type in FAMILY_FIELDS else "eagle3"
    out = (output_dir or "").strip() if isinstance(output_dir, str) else output_dir
    if out in FAMILY_RUN_DIRS.values():
        out = FAMILY_RUN_DIRS[picked]
    return {fam: fam == picked for fam in FAMILY_FIELDS}, out


RDZV_PORT = 29500


def cli_command(workspace: str | Path, nproc: Any, *values: Any, nodes: Any = 1) -> str:
    """The shell command that runs the same training by hand (from the workspace directory): `specforge-wb
    train`, torchrun with `nproc` processes, or with `nodes` > 1 the multi-node torchrun line each node runs
    (its rank and node 0's address as shell variables; the README's "Scale-out" section)."""
    try:
        cfg = train_config(workspace, values)
    except FormError as e:
        return "# cannot build the command: " + "; ".join(f"{k or 'form'}: {v}" for k, v in e.errors.items())
    from specforge_core.config import config_to_argv

    argv = config_to_argv(cfg)
    n, nn = int(nproc or 1), int(nodes or 1)
    head = ["specforge-wb", "train"] if n <= 1 else ["torchrun", "--nproc_per_node", str(n), "-m",
                                                      "specforge_core", "train"]
    first = shlex.join(head)
    note = ""
    if nn > 1:
        # Unquoted on purpose: the shell fills in each node's rank and node 0's host name.
        first = (f"torchrun --nnodes {nn} --nproc_per_node {n} --node-rank $NODE_RANK "
                 f"--rdzv-endpoint $MASTER_HOST:{RDZV_PORT} -m specforge_core train")
        note = (f"# on each of the {nn} nodes ({nn} x {n} = {nn * n} processes): NODE_RANK=0..{nn - 1}, MASTER_HOST = "
                "node 0's address;\n# the workspace (cache, output dir) on a filesystem every node sees\n"
                f"export NODE_RANK=0 MASTER_HOST={_hostname()}\n")
    lines, cur = [first], []
    for a in argv:
        if a.startswith("--") and cur:
            lines.append(shlex.join(cur))
            cur = []
        cur.append(a)
    if cur:
        lines.append(shlex.join(cur))
    return note + f"cd {shlex.quote(str(Path(workspace).resolve()))}\n" + " \\\n    ".join(lines)


def _hostname() -> str:
    import socket

    return socket.gethostname() or "node0"


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
    name = relative_name(ws, p)
    return render_message(f"saved {name} (run it with: specforge-wb train --config {name})")


def launch_train(workspace: str | Path, nproc: Any, *values: Any) -> tuple[str, Optional[str]]:
    """Validate and submit the training job; returns (status html, job id or None). Never raises."""
    return start_job(workspace, "train", lambda: train_config(workspace, values), flat_specs(), nproc=nproc)


# ------------------------------------------------------------------------------------------------
# Watching a run
# ------------------------------------------------------------------------------------------------
def checkpoints_table(run_dir: str | Path | None):
    """The run's complete checkpoints; no rows for `None` (no run yet)."""
    import pandas as pd
    from specforge_core.models.checkpoints import CHECKPOINTS, complete_checkpoints

    rows = []
    if run_dir:
        for _, d in complete_checkpoints(Path(run_dir) / CHECKPOINTS):
            try:
                st = json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                st = {}
            rows.append({"checkpoint": d.name, "step": st.get("step"), "reason": st.get("reason", ""),
                         "path": str(d)})
    return pd.DataFrame(rows, columns=CHECKPOINT_COLUMNS)


def metrics_summary(rows: Sequence[dict], family: str = "eagle3") -> str:
    train, ev = split_rows(rows, "train"), split_rows(rows, "eval")
    if not train and not ev:
        return "No metrics yet: the first row appears after the first logged step."
    parts = []
    if train:
        r = train[-1]
        acc0 = "head 0 acc" if family == "medusa" else "acc_0"
        parts.append(f"**step {r['step']}** · loss {r.get('loss', float('nan')):.4f} · "
                     f"{acc0} {r.get('acc_0', float('nan')):.3f} · "
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


def run_family(run_dir: str | Path | None, config: Optional[dict] = None) -> str:
    """The draft family of a run: its run.json kind (`train-medusa`, `train-eagle3`), else the job's
    config (a run that has not written run.json yet), else eagle3."""
    if run_dir:
        try:
            kind = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8")).get("kind", "")
        except (OSError, json.JSONDecodeError, AttributeError):
            kind = ""
        if isinstance(kind, str) and kind.startswith("train-") and kind[len("train-"):] in FAMILY_FIELDS:
            return kind[len("train-"):]
    picked = (config or {}).get("draft_type")
    return picked if picked in FAMILY_FIELDS else "eagle3"


def poll_train(workspace: str | Path, job_id: Optional[str]):
    """(status html, loss fig, acc fig, accept-len fig, checkpoints df, summary md, live?) for a job."""
    if not job_id:
        return (job_status_html(None), *training_figures([]), checkpoints_table(None), metrics_summary([]), False)
    w = watch_job(workspace, job_id)
    if w.job is None:
        return (w.card, *training_figures([]), checkpoints_table(None), "", False)
    run_dir = run_dir_of(w.job)
    family = run_family(run_dir, w.job.config)
    rows = read_metrics(Path(run_dir) / "metrics.jsonl") if run_dir else []
    ckpts = checkpoints_table(run_dir)
    ckpts["path"] = [relative_name(workspace, p) for p in ckpts["path"]]
    return (w.card, *training_figures(rows, family), ckpts, metrics_summary(rows, family), w.live)


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
    servers = ("vLLM <= 0.32 (SGLang has no Medusa)" if job.config.get("draft_type") == "medusa"
               else "SGLang and vLLM")
    return render_message(f"export started as job {ej.id} → {relative_name(workspace, cfg.output)} "
                          f"(loads on {servers})"), ej.id


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
                              f"{relative_name(workspace, serving)})", ok=False), None
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
    w = watch_job(workspace, job_id)
    card = w.card
    if w.job is not None and w.job.status == "finished":
        res = w.result
        bits = [f"{k} = {v}" for k, v in res.items() if not isinstance(v, (dict, list)) and k != "exit_code"][:8]
        problems = res.get("problems") or []
        card += render_message(", ".join(bits) or "done", ok=not problems)
        for p in problems[:10]:
            card += render_message(str(p), ok=False)
    return card, w.live


# ------------------------------------------------------------------------------------------------
# Offline: disk estimate
# ------------------------------------------------------------------------------------------------
def disk_estimate(workspace: str | Path, *values: Any, sample_rows: int = 200) -> str:
    """How much disk a hidden-state dump of the train data would take (bf16 and fp8 vs SpecForge's 8H), for
    the picked family: EAGLE3's store keeps three captured layers per token, Medusa's only the last state."""
    from specforge_core.offline.store import bytes_per_token, human_bytes, specforge_bytes_per_token
    from specforge_core.models.serving import load_target_config

    ws = Path(workspace)
    specs = flat_specs()
    raw = dict(zip([s.name for s in specs], values))
    try:
        target = resolve_model_name(ws, specs[0].parse(raw.get("target_model")) or "default")
        data = next(s for s in specs if s.name == "train_data").parse(raw.get("train_data"))
        if not data:
            return "Give the train data (the conversations the dump would run the target over) to estimate."
        files = [resolve_in_workspace(ws, d) for d in data]
        H = int(load_target_config(target)["hidden_size"])
    except (PathOutsideWorkspace, ValueError, FileNotFoundError, KeyError) as e:
        return render_message(f"cannot estimate: {e}", ok=False)
    tok_name = raw.get("tokenizer") or target
    try:
        tok = resolve_tokenizer(tok_name if tok_name in ("default", "llama3") else relative_name(ws, tok_name), ws)
    except Exception as e:  # noqa: BLE001
        return render_message(f"cannot load the tokenizer to count tokens: {e}", ok=False)
    total_rows, sample = 0, []
    for f in files:
        with open(f, "rb") as fh:
            n = sum(1 for line in fh if line.strip())
        total_rows += n
        if len(sample) < sample_rows:
            rows, _ = read_rows(Path(f), sample_rows - len(sample))
            sample += rows
    if not sample:
        return "The train data has no readable rows."
    lens = token_lengths(sample, tok)
    max_len = next(s for s in specs if s.name == "max_length").parse(raw.get("max_length")) or 2048
    per_row = sum(min(n, int(max_len)) for n in lens) / len(lens)
    tokens = per_row * total_rows
    medusa = raw.get("draft_type") == "medusa"
    layers = 1 if medusa else 3  # a Medusa store (`states: last`) keeps one H-wide state per token
    ours_bf16 = tokens * bytes_per_token(H, "bfloat16", teacher_fraction=0.5, num_aux_layers=layers)
    ours_fp8 = tokens * bytes_per_token(H, "fp8_e4m3", teacher_fraction=0.5, num_aux_layers=layers)
    sf = tokens * specforge_bytes_per_token(H)
    kind = "a Medusa hidden-state dump (last state only)" if medusa else "an EAGLE3 hidden-state dump"
    return (f"**Disk estimate for {kind}** (target hidden size {H}, ~{total_rows:,} rows × "
            f"{per_row:.0f} tokens ≈ {tokens:,.0f} tokens, half of them teaching):  \n"
            f"bf16 store **{human_bytes(ours_bf16)}** · fp8 store **{human_bytes(ours_fp8)}** · "
            f"SpecForge's layout would need {human_bytes(sf)}.")


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------
def build(ctx) -> dict:
    import gradio as gr

    ws = Path(ctx.workspace)
    c: dict[str, Any] = {}
    gr.Markdown("Train a draft: **EAGLE3** or **Medusa** heads (pick the family below the key fields). "
                "**Online**: the target runs beside the draft and computes hidden states "
                "on the fly. **Offline**: give a hidden-state store (made by a dump) and only the draft is "
                "trained. Paths are inside the workspace; the run goes to `output dir` (checkpoints, "
                "`metrics.jsonl`).")

    def place_groups(groups: list[list[FieldSpec]], make) -> None:
        family, offline = groups[0], groups[-1]
        with gr.Group(elem_id="train-family"):
            with gr.Row(equal_height=False):
                c["draft_type_col"] = gr.Column(scale=1, min_width=220)
                with c["draft_type_col"]:
                    make(dataclasses.replace(family[0], label=FAMILY_LABELS["draft_type"]))
                for fam, specs in zip(FAMILY_FIELDS, groups[1:-1]):
                    box = gr.Column(scale=3, visible=fam == "eagle3", elem_id=f"train-{fam}-fields")
                    c[f"{fam}_box"] = box
                    with box:
                        gr.Markdown(FAMILY_TITLES[fam], elem_classes=["wb-family-note"])
                        with gr.Row(equal_height=False):
                            for spec in specs:
                                make(dataclasses.replace(spec, label=FAMILY_LABELS.get(spec.name, spec.label)))
        offline_group([offline], make)

    def offline_group(groups: list[list[FieldSpec]], make) -> None:
        with gr.Accordion("Offline training (hidden states on disk)", open=False, elem_id="train-offline"):
            with gr.Row():
                for s in groups[0]:
                    make(s)
            with gr.Row():
                c["estimate_btn"] = gr.Button("Estimate disk for a dump", size="sm", elem_id="train-estimate",
                                              scale=0, min_width=240)
            c["estimate"] = gr.Markdown(elem_id="train-estimate-out")

    c["components"], inputs = workspace_form(ws).layout(place_groups=place_groups)
    comps = c["components"]

    # Any change of family (a pick, or a reloaded page restoring a run's form) shows that family's fields;
    # only a pick by hand moves a still-suggested output dir to the new family's (a restored one stays).
    boxes = [c[f"{fam}_box"] for fam in FAMILY_FIELDS]
    comps["draft_type"].change(lambda d: tuple(gr.update(visible=v) for v in family_view(d, None)[0].values()),
                               inputs=comps["draft_type"], outputs=boxes)
    comps["draft_type"].input(lambda d, o: family_view(d, o)[1], inputs=[comps["draft_type"], comps["output_dir"]],
                              outputs=comps["output_dir"])
    with gr.Row(equal_height=False):
        c["nproc"] = gr.Number(value=1, precision=0, minimum=1, maximum=64, label="processes",
                               info="> 1 runs under torchrun", elem_id="train-nproc", scale=1, min_width=160)
        c["nodes"] = gr.Number(value=1, precision=0, minimum=1, maximum=1024, label="nodes (CLI command)",
                               info="> 1: \"Show CLI command\" prints the multi-node torchrun line (processes "
                               "per node); Start runs here", elem_id="train-nodes", scale=1, min_width=160)
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
    c["acc_plot"] = gr.Plot(label="accuracy per TTT step (EAGLE3) / per head (Medusa)", elem_id="train-acc-plot")
    with gr.Row(equal_height=True):
        c["export"] = gr.Button("Export serving checkpoint", elem_id="train-export")
        c["check"] = gr.Button("Check exported draft", elem_id="train-check")
    c["side_job"] = gr.State(None)
    c["side_status"] = gr.HTML(elem_id="train-side-status")
    c["checkpoints"] = gr.DataFrame(headers=CHECKPOINT_COLUMNS, interactive=False, label="checkpoints",
                                    elem_id="train-checkpoints", wrap=True)
    c["timer"] = gr.Timer(2.0, active=False)

    wire_job_panel(ctx, "train", poll_train, launch=launch_train, launch_button=c["launch"],
                   launch_inputs=[c["nproc"], *inputs], cancel_button=c["cancel"], message=c["message"],
                   job_id=c["job_id"], outputs=[c["status"], c["loss_plot"], c["acc_plot"], c["accept_plot"],
                                                c["checkpoints"], c["summary"], c["timer"]])
    c["show_cli"].click(lambda n, nn, *v: gr.update(value=cli_command(ws, n, *v, nodes=nn), visible=True),
                        inputs=[c["nproc"], c["nodes"], *inputs], outputs=c["cli"])
    c["save"].click(lambda p, *v: save_config(ws, p, *v), inputs=[c["save_path"], *inputs], outputs=c["message"])
    c["estimate_btn"].click(lambda *v: disk_estimate(ws, *v), inputs=inputs, outputs=c["estimate"])
    if ctx.app is not None:
        # A reloaded page follows the newest run (wire_job_panel); the form shows what that run was started with.
        def on_load():
            jid = latest_job(ws, "train")
            vals = restored_values(ws, jid)
            nproc = job_runner(ws).get(jid).nproc if vals is not None else None
            if vals is None:
                return (gr.update(),) * (len(inputs) + 1)
            return (*vals, nproc or 1)

        ctx.app.load(on_load, outputs=[*inputs, c["nproc"]])

    side_timer = gr.Timer(2.0, active=False)

    def on_side(fn, job_id):
        msg, sid = fn(ws, job_id)
        return msg, sid, gr.Timer(active=sid is not None)

    c["export"].click(lambda j: on_side(export_run, j), inputs=c["job_id"],
                      outputs=[c["side_status"], c["side_job"], side_timer])
    c["check"].click(lambda j: on_side(check_run, j), inputs=c["job_id"],
                     outputs=[c["side_status"], c["side_job"], side_timer])

    def side_tick(sid):
        card, live = side_job_result(ws, sid)
        return card, gr.Timer(active=live)

    side_timer.tick(side_tick, inputs=c["side_job"], outputs=[c["side_status"], side_timer], show_progress="hidden")
    c["inputs"] = inputs
    c["specs"] = flat_specs()
    return c
