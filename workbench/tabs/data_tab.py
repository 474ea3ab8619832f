"""The Data tab: turn a preset dataset or a file in the workspace into our conversation schema (the
`prepare-data` job), then look at what came out: rows, stats, histograms, and the skipped-row report.

Handlers are plain functions: `prepare_config` builds the `PrepareDataConfig` (the form's fields come
from that schema through `workbench.forms`; the source and the output directory are fixed by the
tab, inside the workspace), `launch_prepare` submits it as a background job, and `preview_rows`,
`dataset_stats`, `skipped_rows` read the files the job wrote.
"""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

from ..forms import FormError, field_specs, render_errors, values_to_config
from ..security import PathOutsideWorkspace, resolve_in_workspace
from .jobs_tab import job_status_html, render_message, submit_job

TITLE = "Data"
DATA_DIR = "data"
SOURCE_PRESET = "A dataset preset"
SOURCE_FILE = "A file in the workspace"
FORM_FIELDS = ["name", "sample_size", "split_eval", "seed", "system_prompt"]
PREVIEW_COLUMNS = ["id", "turns", "roles", "first user turn", "first assistant turn"]
SKIPPED_COLUMNS = ["file", "line", "code", "message"]
STATS_MAX_ROWS = 2000
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz", ".ndjson")


class DataInputError(ValueError):
    """Input the user can fix; shown as a message, never a trace."""


def preset_names() -> list[str]:
    from specforge_core.data.presets import PRESETS

    return sorted(PRESETS)


def preset_table():
    import pandas as pd
    from specforge_core.data.presets import PRESETS, is_cached

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


def _resolve(workspace: Path, p: str, what: str) -> Path:
    try:
        return resolve_in_workspace(workspace, p)
    except PathOutsideWorkspace as e:
        raise DataInputError(f"{what}: {e}") from None


def data_files(workspace: str | Path) -> list[str]:
    """Data files under the workspace (relative paths), the prepared ones first; skip reports excluded."""
    ws = Path(workspace)
    out = []
    for p in sorted(ws.rglob("*")):
        rel = p.relative_to(ws)
        if rel.parts and rel.parts[0] in ("jobs", "cache", "runs") or any(x.startswith(".") for x in rel.parts):
            continue
        if p.is_file() and p.name.lower().endswith(_DATA_SUFFIXES) and not p.name.endswith("_skipped.jsonl") \
                and not p.name.endswith("_summary.json") and not p.name.endswith(".errors.jsonl"):
            out.append(str(rel))
    out.sort(key=lambda s: (not s.startswith(DATA_DIR + "/"), not s.endswith("_train.jsonl"), s))
    return out


# ------------------------------------------------------------------------------------------------
# prepare-data as a job
# ------------------------------------------------------------------------------------------------
def prepare_specs():
    from specforge_core.data.config import PrepareDataConfig

    return field_specs(PrepareDataConfig, FORM_FIELDS)


def prepare_config(workspace: str | Path, source: str, preset: Optional[str], file_path: str,
                   source_path: str, form_values: Sequence[Any]):
    """The form -> a validated `PrepareDataConfig` writing into `workspace/data`; raises FormError."""
    from specforge_core.data.config import PrepareDataConfig

    ws = Path(workspace)
    fixed: dict[str, Any] = {"output": str(ws / DATA_DIR)}
    if source == SOURCE_PRESET:
        if not preset:
            raise FormError({"dataset": "choose a preset"})
        fixed["dataset"] = preset
        if source_path and source_path.strip():
            try:
                fixed["source_path"] = str(resolve_in_workspace(ws, source_path))
            except PathOutsideWorkspace as e:
                raise FormError({"source_path": str(e)}) from None
    else:
        if not file_path or not str(file_path).strip():
            raise FormError({"input": "give a file inside the workspace (e.g. uploads/mine.jsonl)"})
        try:
            p = resolve_in_workspace(ws, file_path)
        except PathOutsideWorkspace as e:
            raise FormError({"input": str(e)}) from None
        if not p.exists():
            raise FormError({"input": f"{file_path}: no such file in the workspace"})
        fixed["input"] = [str(p)]
    return values_to_config(PrepareDataConfig, prepare_specs(), list(form_values), fixed=fixed)


def launch_prepare(workspace: str | Path, source: str, preset: Optional[str], file_path: str, source_path: str,
                   *form_values: Any) -> tuple[str, Optional[str]]:
    """Submit the prepare-data job; returns (status html, job id or None). Never raises."""
    try:
        cfg = prepare_config(workspace, source, preset, file_path, source_path, form_values)
    except FormError as e:
        return render_errors(e, prepare_specs()), None
    try:
        job = submit_job(workspace, "prepare-data", cfg)
    except Exception as e:  # noqa: BLE001
        return render_message(f"could not start the job: {e}", ok=False), None
    return job_status_html(job), job.id


def poll_job(workspace: str | Path, job_id: Optional[str]) -> tuple[str, Optional[str]]:
    """(status card, the train file once the job finished, else None)."""
    if not job_id:
        return job_status_html(None), None
    from .jobs_tab import job_runner

    r = job_runner(workspace)
    try:
        job = r.get(job_id)
    except KeyError:
        return render_message(f"no job {job_id}", ok=False), None
    card = job_status_html(job, r.progress(job_id))
    train = None
    if job.status == "finished":
        res = r.result(job_id) or {}
        if res.get("train_path"):
            train = _relative(Path(workspace), res["train_path"])
            card += render_message(f"{res.get('written_train', 0)} train / {res.get('written_eval', 0)} eval rows "
                                   f"written, {res.get('skipped', 0)} skipped, {res.get('duplicates', 0)} duplicates")
    elif job.status in ("failed", "lost"):
        tail = r.log_tail(job_id, 6)
        card += f'<pre class="job-log-snippet">{html.escape(tail)}</pre>'
    return card, train


def _relative(ws: Path, p: str) -> str:
    try:
        return str(Path(p).resolve().relative_to(ws.resolve()))
    except ValueError:
        return p


# ------------------------------------------------------------------------------------------------
# Looking at a dataset
# ------------------------------------------------------------------------------------------------
def _read_rows(path: Path, limit: int) -> tuple[list[dict], Any]:
    from specforge_core.data.readers import SkipReport, iter_rows

    if not path.exists():
        raise DataInputError(f"{path.name}: no such file in the workspace")
    if path.is_dir():
        raise DataInputError(f"{path.name}: is a directory; choose a .jsonl, .json or .parquet file")
    report = SkipReport(max_examples=5)
    rows = []
    try:
        for row in iter_rows([path], report=report):
            rows.append(row)
            if len(rows) >= limit:
                break
    except (FileNotFoundError, ValueError) as e:
        raise DataInputError(str(e)) from None
    return rows, report


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

    path = _resolve(Path(workspace), file_path, "file")
    rows, _ = _read_rows(path, max(1, int(n)))
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


def token_lengths(rows: Sequence[dict], tokenizer: Any) -> list[int]:
    """Tokens per row as training sees them: the chat-templated conversation (or the text row)."""
    out = []
    has_template = bool(getattr(tokenizer, "chat_template", None))
    for r in rows:
        conv = r.get("conversations")
        if conv is None:
            out.append(len(tokenizer(r.get("text", ""), add_special_tokens=False)["input_ids"]))
            continue
        msgs = [{"role": t["role"], "content": t.get("content", "")} for t in conv]
        if has_template:
            try:
                ids = tokenizer.apply_chat_template(msgs, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                out.append(len(ids))
                continue
            except Exception:  # noqa: BLE001 - a template that rejects the row: count the raw text instead
                pass
        out.append(len(tokenizer("\n".join(m["content"] for m in msgs), add_special_tokens=False)["input_ids"]))
    return out


def _describe(values: Sequence[float]) -> str:
    if not values:
        return "–"
    vs = sorted(values)
    p95 = vs[min(len(vs) - 1, int(round(0.95 * (len(vs) - 1))))]
    return f"mean {statistics.fmean(vs):.1f} · median {statistics.median(vs):g} · p95 {p95:g} · max {vs[-1]:g}"


def dataset_stats(workspace: str | Path, file_path: str, tokenizer_name: str = "default",
                  max_rows: int = STATS_MAX_ROWS) -> tuple[str, Any, Any, dict]:
    """(markdown summary, turns histogram, token-length histogram, raw stats) of a workspace file."""
    from ..plots import token_length_histogram, turns_histogram
    from .mask_tab import MaskInputError, resolve_tokenizer

    ws = Path(workspace)
    path = _resolve(ws, file_path, "file")
    rows, report = _read_rows(path, int(max_rows))
    turns = [len(r["conversations"]) for r in rows if r.get("conversations") is not None]
    assistant = [sum(t.get("role") == "assistant" for t in r["conversations"]) for r in rows
                 if r.get("conversations") is not None]
    try:
        tok = resolve_tokenizer(tokenizer_name or "default", ws)
    except MaskInputError as e:
        raise DataInputError(str(e)) from None
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
    p = _resolve(Path(workspace), file_path, "file")
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
                row["file"] = _relative(Path(workspace), str(row["file"])) if row["file"] else row["file"]
                rows.append(row)
    if not total:
        return f"**0 rows skipped** (`{sp.name}`).", pd.DataFrame(columns=SKIPPED_COLUMNS)
    by = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    more = f" (first {limit} shown)" if total > limit else ""
    return f"**{total} rows skipped** ({by}){more} · `{sp.name}`", pd.DataFrame(rows, columns=SKIPPED_COLUMNS)


def inspect_file(workspace: str | Path, file_path: str, tokenizer_name: str):
    """The Load button: (error html, preview df, stats md, turns fig, tokens fig, skipped md, skipped df)."""
    import pandas as pd

    from ..plots import token_length_histogram, turns_histogram

    try:
        if not file_path:
            raise DataInputError("choose a data file (prepare one above, or put it in the workspace)")
        df = preview_rows(workspace, file_path)
        md, f1, f2, _ = dataset_stats(workspace, file_path, tokenizer_name)
        smd, sdf = skipped_rows(workspace, file_path)
    except (DataInputError, ValueError, OSError) as e:
        empty = pd.DataFrame(columns=PREVIEW_COLUMNS)
        return (render_message(str(e), ok=False), empty, "", turns_histogram([]), token_length_histogram([]),
                "", pd.DataFrame(columns=SKIPPED_COLUMNS))
    return "", df, md, f1, f2, smd, sdf


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------
def build(ctx) -> dict:
    import gradio as gr

    from ..forms import make_component

    ws = Path(ctx.workspace)
    c: dict[str, Any] = {}
    gr.Markdown("Bring conversations into one schema: pick a public dataset preset (its source files in the "
                "workspace or the local Hugging Face cache) or a file of your own, and run **prepare-data**. "
                f"Outputs go to `{DATA_DIR}/` in the workspace: `<name>_train.jsonl`, `<name>_eval.jsonl` and "
                "`<name>_skipped.jsonl` (every unusable row with its file and line).")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320):
            c["source"] = gr.Radio([SOURCE_FILE, SOURCE_PRESET], value=SOURCE_FILE, label="Source",
                                   elem_id="data-source")
            c["file"] = gr.Dropdown(data_files(ws), value=None, label="File (inside the workspace)",
                                    allow_custom_value=True, elem_id="data-file",
                                    info="JSONL / JSON / Parquet, our schema, ShareGPT style or a preset's source schema")
            with gr.Group(visible=False) as preset_box:
                c["preset"] = gr.Dropdown(preset_names(), value=None, label="Preset", elem_id="data-preset")
                c["source_path"] = gr.Textbox(label="source path (optional)", elem_id="data-source-path",
                                              placeholder="downloads/ultrachat/",
                                              info="where the preset's source files are in the workspace; "
                                                   "empty: the local Hugging Face cache")
        with gr.Column(scale=1, min_width=320):
            specs = prepare_specs()
            c["form"] = [make_component(s, elem_id=f"data-{s.name.replace('_', '-')}") for s in specs]
    with gr.Accordion("Dataset presets", open=False):
        gr.DataFrame(preset_table(), interactive=False, wrap=True)
    with gr.Row(elem_classes=["wb-buttons"]):
        c["run"] = gr.Button("Run prepare-data", variant="primary", elem_id="data-run", scale=0, min_width=220)
    c["job_id"] = gr.State(None)
    c["status"] = gr.HTML(elem_id="data-status")
    c["timer"] = gr.Timer(2.0, active=False)

    gr.Markdown("### Look at a dataset")
    with gr.Row(equal_height=False):
        c["view_file"] = gr.Dropdown(data_files(ws), value=None, label="Data file", allow_custom_value=True,
                                     elem_id="data-view-file", scale=3)
        c["tokenizer"] = gr.Textbox(value="default", label="Tokenizer (for token lengths)", scale=2,
                                    elem_id="data-tokenizer")
    with gr.Row(elem_classes=["wb-buttons"]):
        c["load"] = gr.Button("Load and show", variant="primary", elem_id="data-load", scale=0, min_width=220)
    c["error"] = gr.HTML(elem_id="data-error")
    c["preview"] = gr.DataFrame(headers=PREVIEW_COLUMNS, interactive=False, wrap=True, label="first rows",
                                elem_id="data-preview", max_height=360)
    c["stats"] = gr.Markdown(elem_id="data-stats")
    from ..plots import token_length_histogram, turns_histogram

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
        from .jobs_tab import job_runner

        live = bool(job_id) and job_runner(ws).get(job_id).status in ("starting", "running")
        files = data_files(ws)
        view = gr.update(choices=files, value=train) if train else gr.update(choices=files)
        return card, gr.Timer(active=live), view, gr.update(choices=files)

    c["timer"].tick(on_tick, inputs=c["job_id"], outputs=[c["status"], c["timer"], c["view_file"], c["file"]],
                    show_progress="hidden")
    load_outputs = [c["error"], c["preview"], c["stats"], c["turns_plot"], c["tokens_plot"], c["skipped_md"],
                    c["skipped"]]
    c["load"].click(lambda f, t: inspect_file(ws, f, t), inputs=[c["view_file"], c["tokenizer"]],
                    outputs=load_outputs)
    if ctx.app is not None:
        # Files appear in the workspace while the app runs (uploads, other jobs): list them afresh.
        ctx.app.load(lambda: (gr.update(choices=data_files(ws)),) * 2, outputs=[c["file"], c["view_file"]])
    return c
