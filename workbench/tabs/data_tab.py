"""The Data tab: turn a preset dataset or a file in the workspace into our conversation schema (the
`prepare-data` job), then look at what came out: rows, stats, histograms, and the skipped-row report.

Handlers are plain functions: `prepare_config` builds the `PrepareDataConfig` (the form's fields come
from that schema through `workbench.forms`; the source and the output directory are fixed by the
tab, inside the workspace), `launch_prepare` submits it as a background job, and `preview_rows`,
`dataset_stats`, `skipped_rows` read the files the job wrote (rows and tokenizers through
`workbench.common`).
"""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

from ..common import (DATA_DIR, SAMPLE_DATA, SAMPLE_TRAIN, UPLOAD_DIR, UPLOAD_MAX_BYTES, UPLOAD_SUFFIXES, InputError,
                      data_files, has_sample, job_runner, job_status_html, read_rows, relative_name, render_message,
                      resolve_input, resolve_tokenizer, save_upload, start_job, token_lengths, watch_job)
from ..forms import FormError, SchemaForm, stacked
from ..plots import token_length_histogram, turns_histogram
from ..security import resolve_path_fields

TITLE = "Data"
SOURCE_PRESET = "A dataset preset"
SOURCE_FILE = "A file in the workspace"
FORM_FIELDS = ["name", "sample_size", "split_eval", "seed", "system_prompt"]
PREVIEW_COLUMNS = ["id", "turns", "roles", "first user turn", "first assistant turn"]
SKIPPED_COLUMNS = ["file", "line", "code", "message"]
STATS_MAX_ROWS = 2000


def _prepare_cls():
    from specforge_core.data.config import PrepareDataConfig

    return PrepareDataConfig


# The source and the output directory are fixed by the tab, so no "Advanced" fields.
FORM = SchemaForm(_prepare_cls, FORM_FIELDS, "data", advanced=False)


def preset_names() -> list[str]:
    from specforge_core.data.presets import PRESETS

    return sorted(PRESETS)


def preset_table():
    import pandas as pd
    from specforge_core.data.presets import PRESETS
    from specforge_core.data.sources import is_cached

    rows = []
    for name in sorted(PRESETS):
        p = PRESETS[name]
        try:
            cached = is_cached(p)
        except Exception:  # noqa: BLE001 - a broken cache dir is just "not cached"
            cached = False
        rows.append({"preset": name, "hub id": p.hub_id, "split": p.split,
                     "in local HF cache": "yes" if cached else "no", "about": p.description})
    return pd.DataFrame(rows)


def upload_files(workspace: str | Path, files: Any) -> tuple[str, Optional[str]]:
    """The upload box: copy each uploaded file into `uploads/` (`common.save_upload`: size-capped, name
    sanitised, inside the workspace); (message html, the last file saved or None). Never raises."""
    paths = [f if isinstance(f, (str, Path)) else getattr(f, "name", None) for f in
             (files if isinstance(files, (list, tuple)) else [files] if files else [])]
    saved, errors = [], []
    for p in paths:
        if not p:
            continue
        try:
            saved.append(save_upload(workspace, p))
        except (InputError, OSError) as e:
            errors.append(str(e))
    msg = "".join(render_message(e, ok=False) for e in errors)
    if saved:
        msg = render_message("saved " + ", ".join(saved) + " in the workspace (selected below): preview it or "
                             "run prepare-data on it") + msg
    if not saved and not errors:
        msg = render_message("no file received", ok=False)
    return msg, (saved[-1] if saved else None)


def sample_note(workspace: str | Path) -> str:
    """What the Data tab says while the workspace holds the sample dataset (markdown; empty otherwise)."""
    if not has_sample(workspace):
        return ""
    return (f"**New here? This workspace came with a sample dataset**, `{SAMPLE_DATA}`: 60 short conversations "
            "written for this project (two rows are broken on purpose, so the skip report has something to "
            "show). Start with **Run prepare-data** on it (it is selected below), look at the rows in the "
            f"*Loss mask* tab, then train on `{SAMPLE_TRAIN}` in the *Train* tab (its default) and measure the "
            "draft in the *Benchmark* tab. Bring your own data with the upload box.")


# ------------------------------------------------------------------------------------------------
# prepare-data as a job
# ------------------------------------------------------------------------------------------------
def prepare_config(workspace: str | Path, source: str, preset: Optional[str], file_path: str,
                   source_path: str, form_values: Sequence[Any]):
    """The form -> a validated `PrepareDataConfig` writing into `workspace/data`; raises FormError."""
    ws = Path(workspace)
    fixed: dict[str, Any] = {"output": str(ws / DATA_DIR)}
    if source == SOURCE_PRESET:
        if not preset:
            raise FormError({"dataset": "choose a preset"})
        fixed["dataset"] = preset
        if source_path and source_path.strip():
            fixed["source_path"] = source_path
    else:
        if not file_path or not str(file_path).strip():
            raise FormError({"input": "give a file inside the workspace (e.g. uploads/mine.jsonl)"})
        fixed["input"] = [file_path]
    fixed, errors = resolve_path_fields(ws, fixed, ("source_path", "input"))
    if errors:
        raise FormError(errors)
    if "input" in fixed and not Path(fixed["input"][0]).exists():
        raise FormError({"input": f"{file_path}: no such file in the workspace"})
    return FORM.to_config(form_values, fixed=fixed)


def launch_prepare(workspace: str | Path, source: str, preset: Optional[str], file_path: str, source_path: str,
                   *form_values: Any) -> tuple[str, Optional[str]]:
    """Submit the prepare-data job; returns (status html, job id or None). Never raises."""
    return start_job(workspace, "prepare-data",
                     lambda: prepare_config(workspace, source, preset, file_path, source_path, form_values),
                     FORM.specs())


def poll_job(workspace: str | Path, job_id: Optional[str]) -> tuple[str, Optional[str]]:
    """(status card, the train file once the job finished, else None)."""
    if not job_id:
        return job_status_html(None), None
    w = watch_job(workspace, job_id, log_lines=6)
    res, card, train = w.result, w.card, None
    if res.get("train_path"):
        train = relative_name(workspace, res["train_path"])
        card += render_message(f"{res.get('written_train', 0)} train / {res.get('written_eval', 0)} eval rows "
                               f"written, {res.get('skipped', 0)} skipped, {res.get('duplicates', 0)} duplicates")
    return card, train


# ------------------------------------------------------------------------------------------------
# Looking at a dataset
# ------------------------------------------------------------------------------------------------
def _snippet(text: str, n: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _first(row: dict, role: str) -> str:
    for t in row.get("conversations") or []:
        if t.get("role") == role:
            return _snippet(t.get("content", ""))
    return ""


def preview_rows(workspace: str | Path, file_path: str, n: int = 20):
    """The first `n` valid rows of a workspace file as a DataFrame."""
    import pandas as pd

    path = resolve_input(workspace, file_path, "file")
    rows, _ = read_rows(path, max(1, int(n)))
    out = []
    for r in rows:
        conv = r.get("conversations")
        if conv is None:  # a pre-formatted text row
            out.append({"id": r.get("id"), "turns": None, "roles": "(text)",
                        "first user turn": _snippet(r.get("text", "")), "first assistant turn": ""})
            continue
        out.append({"id": r.get("id"), "turns": len(conv), "roles": " ".join(t.get("role", "?")[0] for t in conv),
                    "first user turn": _first(r, "user"), "first assistant turn": _first(r, "assistant")})
    return pd.DataFrame(out, columns=PREVIEW_COLUMNS)


def _describe(values: Sequence[float]) -> str:
    if not values:
        return "–"
    vs = sorted(values)
    p95 = vs[min(len(vs) - 1, int(round(0.95 * (len(vs) - 1))))]
    return f"mean {statistics.fmean(vs):.1f} · median {statistics.median(vs):g} · p95 {p95:g} · max {vs[-1]:g}"


def dataset_stats(workspace: str | Path, file_path: str, tokenizer_name: str = "default",
                  max_rows: int = STATS_MAX_ROWS) -> tuple[str, Any, Any, dict]:
    """(markdown summary, turns histogram, token-length histogram, raw stats) of a workspace file."""
    ws = Path(workspace)
    path = resolve_input(ws, file_path, "file")
    rows, report = read_rows(path, int(max_rows))
    turns = [len(r["conversations"]) for r in rows if r.get("conversations") is not None]
    assistant = [sum(t.get("role") == "assistant" for t in r["conversations"]) for r in rows
                 if r.get("conversations") is not None]
    tok = resolve_tokenizer(tokenizer_name or "default", ws)
    lengths = token_lengths(rows, tok)
    stats = {"rows": len(rows), "turns": turns, "assistant_turns": assistant, "token_lengths": lengths,
             "skipped_while_reading": report.total, "capped": len(rows) >= int(max_rows)}
    md = [f"**{html.escape(file_path)}** · {len(rows)} rows" + (f" (first {max_rows} only)" if stats["capped"] else ""),
          "",
          f"- turns per row: {_describe(turns)}",
          f"- assistant turns per row: {_describe(assistant)}",
          f"- tokens per row ({html.escape(tokenizer_name or 'default')}, chat-templated): {_describe(lengths)}",
          f"- total tokens: {sum(lengths):,}"]
    if report.total:
        md.append(f"- ⚠ {report.summary()} while reading this file")
    return "\n".join(md), turns_histogram(turns), token_length_histogram(lengths), stats


def skipped_path_for(workspace: str | Path, file_path: str) -> Optional[Path]:
    """`data/x_train.jsonl` -> `data/x_skipped.jsonl` (what prepare-data wrote beside it), if any."""
    p = resolve_input(workspace, file_path, "file")
    for suffix in ("_train.jsonl", "_eval.jsonl", "_skipped.jsonl"):
        if p.name.endswith(suffix):
            return p.with_name(p.name[: -len(suffix)] + "_skipped.jsonl")
    return None


def skipped_rows(workspace: str | Path, file_path: str, limit: int = 500) -> tuple[str, Any]:
    """(summary markdown, DataFrame of file / line / code / message) from the prepare-data skip report."""
    import pandas as pd

    sp = skipped_path_for(workspace, file_path)
    if sp is None:
        return ("No skip report: this file was not written by prepare-data (rows that cannot be read are "
                "counted in the stats above)."), pd.DataFrame(columns=SKIPPED_COLUMNS)
    if not sp.exists():
        return f"No skip report beside it (`{sp.name}` is missing).", pd.DataFrame(columns=SKIPPED_COLUMNS)
    rows, counts, total = [], {}, 0
    with open(sp, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            total += 1
            counts[rec.get("code", "?")] = counts.get(rec.get("code", "?"), 0) + 1
            if len(rows) < limit:
                row = {k: rec.get(k) for k in SKIPPED_COLUMNS}
                row["file"] = relative_name(workspace, row["file"]) if row["file"] else row["file"]
                rows.append(row)
    if not total:
        return f"**0 rows skipped** (`{sp.name}`).", pd.DataFrame(columns=SKIPPED_COLUMNS)
    by = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    more = f" (first {limit} shown)" if total > limit else ""
    return f"**{total} rows skipped** ({by}){more} · `{sp.name}`", pd.DataFrame(rows, columns=SKIPPED_COLUMNS)


def inspect_file(workspace: str | Path, file_path: str, tokenizer_name: str):
    """The Load button: (error html, preview df, stats md, turns fig, tokens fig, skipped md, skipped df)."""
    import pandas as pd

    try:
        if not file_path:
            raise InputError("choose a data file (prepare one above, or put it in the workspace)")
        df = preview_rows(workspace, file_path)
        md, f1, f2, _ = dataset_stats(workspace, file_path, tokenizer_name)
        smd, sdf = skipped_rows(workspace, file_path)
    except (ValueError, OSError) as e:  # InputError is a ValueError
        empty = pd.DataFrame(columns=PREVIEW_COLUMNS)
        return (render_message(str(e), ok=False), empty, "", turns_histogram([]), token_length_histogram([]),
                "", pd.DataFrame(columns=SKIPPED_COLUMNS))
    return "", df, md, f1, f2, smd, sdf


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------
def build(ctx) -> dict:
    import gradio as gr

    ws = Path(ctx.workspace)
    c: dict[str, Any] = {}
    first_file = SAMPLE_DATA if has_sample(ws) else None
    gr.Markdown("Bring conversations into one schema: pick a public dataset preset (its source files in the "
                "workspace or the local Hugging Face cache) or a file of your own, and run **prepare-data**. "
                f"Outputs go to `{DATA_DIR}/` in the workspace: `<name>_train.jsonl`, `<name>_eval.jsonl` and "
                "`<name>_skipped.jsonl` (every unusable row with its file and line).")
    c["sample_note"] = gr.Markdown(sample_note(ws), elem_id="data-sample-note", visible=has_sample(ws))
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320):
            c["upload"] = gr.File(label=f"Upload JSONL / JSON / Parquet (saved in {UPLOAD_DIR}/, at most "
                                        f"{UPLOAD_MAX_BYTES >> 20} MiB each)", file_count="multiple",
                                  file_types=list(UPLOAD_SUFFIXES), elem_id="data-upload", height=150)
            c["upload_msg"] = gr.HTML(elem_id="data-upload-message")
            c["source"] = gr.Radio([SOURCE_FILE, SOURCE_PRESET], value=SOURCE_FILE, label="Source",
                                   elem_id="data-source")
            c["file"] = gr.Dropdown(data_files(ws), value=first_file, label="File (inside the workspace)",
                                    allow_custom_value=True, elem_id="data-file",
                                    info="JSONL / JSON / Parquet, our schema, ShareGPT style or a preset's source schema")
            with gr.Group(visible=False) as preset_box:
                c["preset"] = gr.Dropdown(preset_names(), value=None, label="Preset", elem_id="data-preset")
                c["source_path"] = gr.Textbox(label="source path (optional)", elem_id="data-source-path",
                                              placeholder="downloads/ultrachat/",
                                              info="where the preset's source files are in the workspace; "
                                                   "empty: the local Hugging Face cache")
        with gr.Column(scale=1, min_width=320):
            _, c["form"] = FORM.layout(stacked)
    with gr.Accordion("Dataset presets", open=False):
        gr.DataFrame(preset_table(), interactive=False, wrap=True)
    with gr.Row(elem_classes=["wb-buttons"]):
        c["run"] = gr.Button("Run prepare-data", variant="primary", elem_id="data-run", scale=0, min_width=220)
    c["job_id"] = gr.State(None)
    c["status"] = gr.HTML(elem_id="data-status")
    c["timer"] = gr.Timer(2.0, active=False)

    gr.Markdown("### Look at a dataset")
    with gr.Row(equal_height=False):
        c["view_file"] = gr.Dropdown(data_files(ws), value=first_file, label="Data file", allow_custom_value=True,
                                     elem_id="data-view-file", scale=3)
        c["tokenizer"] = gr.Textbox(value="default", label="Tokenizer (for token lengths)", scale=2,
                                    elem_id="data-tokenizer")
    with gr.Row(elem_classes=["wb-buttons"]):
        c["load"] = gr.Button("Load and show", variant="primary", elem_id="data-load", scale=0, min_width=220)
    c["error"] = gr.HTML(elem_id="data-error")
    c["preview"] = gr.DataFrame(headers=PREVIEW_COLUMNS, interactive=False, wrap=True, label="first rows",
                                elem_id="data-preview", max_height=360)
    c["stats"] = gr.Markdown(elem_id="data-stats")
    with gr.Row():
        c["turns_plot"] = gr.Plot(turns_histogram([]), label="turns", elem_id="data-turns-plot")
        c["tokens_plot"] = gr.Plot(token_length_histogram([]), label="token lengths", elem_id="data-tokens-plot")
    c["skipped_md"] = gr.Markdown(elem_id="data-skipped-summary")
    c["skipped"] = gr.DataFrame(headers=SKIPPED_COLUMNS, interactive=False, wrap=True, label="skipped rows",
                                elem_id="data-skipped", max_height=300)

    c["source"].change(lambda s: (gr.update(visible=s == SOURCE_FILE), gr.update(visible=s == SOURCE_PRESET)),
                       inputs=c["source"], outputs=[c["file"], preset_box])

    def on_run(source, preset, file_path, source_path, *vals):
        card, job_id = launch_prepare(ws, source, preset, file_path, source_path, *vals)
        return card, job_id, gr.Timer(active=job_id is not None)

    c["run"].click(on_run, inputs=[c["source"], c["preset"], c["file"], c["source_path"], *c["form"]],
                   outputs=[c["status"], c["job_id"], c["timer"]])

    def on_tick(job_id):
        card, train = poll_job(ws, job_id)
        live = bool(job_id) and job_runner(ws).get(job_id).is_live
        files = data_files(ws)
        view = gr.update(choices=files, value=train) if train else gr.update(choices=files)
        return card, gr.Timer(active=live), view, gr.update(choices=files)

    c["timer"].tick(on_tick, inputs=c["job_id"], outputs=[c["status"], c["timer"], c["view_file"], c["file"]],
                    show_progress="hidden")
    load_outputs = [c["error"], c["preview"], c["stats"], c["turns_plot"], c["tokens_plot"], c["skipped_md"],
                    c["skipped"]]
    c["load"].click(lambda f, t: inspect_file(ws, f, t), inputs=[c["view_file"], c["tokenizer"]],
                    outputs=load_outputs)

    def on_upload(files):
        msg, saved = upload_files(ws, files)
        files_now = data_files(ws)

        def pick():  # one update per dropdown: Gradio consumes an update dict as it applies it
            return gr.update(choices=files_now, value=saved) if saved else gr.update(choices=files_now)

        # The upload box empties itself: the files now live in the workspace, listed in both dropdowns.
        return msg, None, pick(), pick(), gr.update(value=SOURCE_FILE) if saved else gr.update()

    c["upload"].upload(on_upload, inputs=c["upload"],
                       outputs=[c["upload_msg"], c["upload"], c["file"], c["view_file"], c["source"]])
    if ctx.app is not None:
        # Files appear in the workspace while the app runs (uploads, other jobs): list them afresh.
        def on_load():
            return (gr.update(choices=data_files(ws)),) * 2 + (gr.update(value=sample_note(ws),
                                                                           visible=has_sample(ws)),)

        ctx.app.load(on_load, outputs=[c["file"], c["view_file"], c["sample_note"]])
    return c
