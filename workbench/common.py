"""What the workbench tabs share, so that each tab is a peer that imports no other tab.

- Jobs: every long job the GUI starts goes through `specforge_core.jobs.runner` as a child process,
  and the GUI only reads what the job writes (the registry, log.txt, events.jsonl, metrics.jsonl).
  Nothing is kept in the GUI's memory, so a reloaded page, or a restarted workbench, shows the same
  jobs. `submit_job` / `start_job` start one, `watch_job` reads one back as a status card,
  `cancel_job` / `resume_job` stop or continue one, `latest_job` finds the one a reloaded page should follow, and
  `wire_job_panel` connects a tab's Start / Cancel buttons, its timer and the page load to them.
- Messages: `render_message` (a green or red line) and `job_status_html` (a job's card).
- Paths and names typed into the GUI: `relative_name` shows a path as the workspace sees it;
  `resolve_input` / `workspace_transform` resolve paths through `workbench.security` (which stays
  the only path jail); `resolve_model_name` and `resolve_tokenizer` accept the engine's names
  (default, llama3, a hub id) beside workspace directories.
- Rows: `read_rows` / `read_row` read a data file through the engine's readers, and
  `token_lengths` counts tokens as training sees them.
- Workspace files: `data_files` lists the data files every tab offers; `seed_workspace` puts the
  sample dataset into a workspace that has no data yet (`SAMPLE_DATA`, and the names the tabs'
  defaults point at: `SAMPLE_TRAIN` once prepared, `SAMPLE_RUN` once trained); `save_upload` copies
  an uploaded file into `UPLOAD_DIR` (size-capped, name sanitised, jailed by `workbench.security`).

Everything here except `wire_job_panel` is a plain function without Gradio, so tests call it directly.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from .forms import FieldSpec, FormError, render_errors
from .security import PathOutsideWorkspace, resolve_in_workspace, resolve_path_fields, safe_file_name

STATUS_COLORS = {"starting": "#6366f1", "running": "#2563eb", "finished": "#16a34a", "failed": "#dc2626",
                 "cancelled": "#d97706", "lost": "#6b7280"}
LIVE = ("starting", "running")

# Job cards, messages and button rows, used by every tab that runs jobs (app.load_css adds this to the page).
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
.wb-buttons button { max-height: 48px; }
"""


class InputError(ValueError):
    """Input the user can fix (a bad path, a missing file, an unknown tokenizer); shown as a message, never a trace."""


# ------------------------------------------------------------------------------------------------
# Messages and job cards
# ------------------------------------------------------------------------------------------------
def render_message(text: str, ok: bool = True) -> str:
    cls = "wb-ok" if ok else "mask-error"
    mark = "✔" if ok else "✖"
    return f'<div class="{cls}">{mark} {html.escape(text)}</div>'


def log_snippet(text: str) -> str:
    return f'<pre class="job-log-snippet">{html.escape(text)}</pre>'


def duration_text(s: Optional[float]) -> str:
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
        s += f" · eta {duration_text(p['eta_s'])}"
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
            f' <span class="job-prog-text">{html.escape(progress_text(prog, job.status in LIVE))}</span>'
            f"{bar}{msg}</div>")


# ------------------------------------------------------------------------------------------------
# Jobs
# ------------------------------------------------------------------------------------------------
def job_runner(workspace: str | Path):
    from specforge_core.jobs.runner import runner

    return runner(workspace)


def find_job(workspace: str | Path, job_id: Optional[str]):
    """The job `job_id` of this workspace, or None (no id, or not in the registry)."""
    if not job_id:
        return None
    try:
        return job_runner(workspace).get(job_id)
    except KeyError:
        return None


def submit_job(workspace: str | Path, kind: str, cfg: Any, nproc: int = 1, resumed_from: str | None = None):
    """Start `kind` on `cfg` as a background job whose working directory is the workspace (`resumed_from`:
    the job it continues, for a job that continues by running its config again, e.g. a recipe)."""
    return job_runner(workspace).submit(kind, cfg, nproc=int(nproc or 1), cwd=Path(workspace),
                                        resumed_from=resumed_from)


def start_job(workspace: str | Path, kind: str, make_config: Callable[[], Any], specs: Sequence[FieldSpec],
              nproc: Any = 1) -> tuple[str, Optional[str]]:
    """A Start button: build the config from the form, submit it; (status html, job id or None). Never raises."""
    try:
        cfg = make_config()
    except FormError as e:
        return render_errors(e, specs), None
    try:
        job = submit_job(workspace, kind, cfg, nproc=int(nproc or 1))
    except Exception as e:  # noqa: BLE001 - e.g. nproc on a kind that cannot, a full disk: shown, not raised
        return render_message(f"could not start the job: {e}", ok=False), None
    return job_status_html(job), job.id


@dataclass
class JobWatch:
    """One job as a tab shows it: its card (status, progress, the log tail once it failed) and result."""

    job: Any                  # None: no such job in the workspace
    card: str
    result: dict              # a finished job's result, {} otherwise

    @property
    def live(self) -> bool:
        return self.job is not None and self.job.status in LIVE


def watch_job(workspace: str | Path, job_id: str, log_lines: int = 8,
              details: Callable[[Optional[dict]], str] | None = None) -> JobWatch:
    """Read job `job_id` back; an unknown id gives `job=None` and a card that says so.

    `details(progress)` adds html under the status card (e.g. a job's own counters).
    """
    r = job_runner(workspace)
    try:
        job = r.get(job_id)
    except KeyError:
        return JobWatch(None, render_message(f"no job {job_id}", ok=False), {})
    prog = r.progress(job_id)
    card = job_status_html(job, prog) + (details(prog) if details else "")
    result: dict = {}
    if job.status == "finished":
        result = r.result(job_id) or {}
    elif job.status in ("failed", "lost"):
        card += log_snippet(r.log_tail(job_id, log_lines))
    return JobWatch(job, card, result)


def latest_job(workspace: str | Path, kind: str | Sequence[str]) -> Optional[str]:
    """The newest job of `kind` (or of any of several kinds, e.g. a tab with two modes): what a reloaded
    page follows (the job kept running without the page)."""
    r = job_runner(workspace)
    jobs = [j for k in ([kind] if isinstance(kind, str) else kind) for j in r.list_jobs(kind=k, limit=1)]
    return max(jobs, key=lambda j: j.created).id if jobs else None


def cancel_job(workspace: str | Path, job_id: str | None, timeout: float = 30.0) -> str:
    """Cancel (SIGTERM, then SIGKILL after `timeout`); returns a message html. Never raises."""
    if not job_id:
        return render_message("select a job first", ok=False)
    try:
        job = job_runner(workspace).get(job_id)
        if job.status not in LIVE:
            return render_message(f"{job_id} is already {job.status}; nothing to cancel", ok=False)
        job = job_runner(workspace).cancel(job_id, timeout=timeout)
    except KeyError:
        return render_message(f"no job {job_id!r} in this workspace", ok=False)
    return render_message(f"{job_id}: {job.status}" + (f" ({job.message})" if job.message else ""),
                          ok=job.status in ("cancelled", "finished"))


def resume_job(workspace: str | Path, job_id: str | None, overrides: dict | None = None) -> tuple[str, Optional[str]]:
    """Start a job that continues `job_id` (with `overrides` of its config); (message html, new job id or None).
    Never raises."""
    if not job_id:
        return render_message("select a job first", ok=False), None
    try:
        new = job_runner(workspace).resume(job_id, overrides=overrides)
    except KeyError:
        return render_message(f"no job {job_id!r} in this workspace", ok=False), None
    except ValueError as e:
        return render_message(str(e), ok=False), None
    return render_message(f"resumed {job_id} as {new.id}"), new.id


def wire_job_panel(ctx: Any, kind: str | Sequence[str], poll: Callable[..., tuple], *, launch: Callable[..., tuple],
                   launch_button: Any, launch_inputs: Sequence[Any], cancel_button: Any, message: Any, job_id: Any,
                   outputs: Sequence[Any], extra_inputs: Sequence[Any] = ()) -> Callable[..., tuple]:
    """Connect a job tab's controls; returns its `watch(job_id, *extra)` for the tab's other buttons.

    `poll(workspace, job_id, *extra) -> (*values, live)` fills `outputs`, whose last component is the
    tab's `gr.Timer` (it runs while the job is live); `launch(workspace, *form values)` returns
    (message html, job id or None). The page load follows the newest job of `kind` (one kind or several).
    """
    import gradio as gr

    ws = Path(ctx.workspace)
    extra = list(extra_inputs)

    def watch(jid, *extra_values):
        *out, live = poll(ws, jid, *extra_values)
        return (*out, gr.Timer(active=live))

    def on_launch(*vals):
        card, jid = launch(ws, *vals)
        if jid is None:
            return (card, gr.update(), *([gr.update()] * len(outputs)))
        return ("", jid, *watch(jid))

    def on_cancel(jid, *extra_values):
        return (cancel_job(ws, jid), *watch(jid, *extra_values))

    def on_load(*extra_values):
        jid = latest_job(ws, kind)
        return (jid, *watch(jid, *extra_values))

    launch_button.click(on_launch, inputs=list(launch_inputs), outputs=[message, job_id, *outputs])
    outputs[-1].tick(watch, inputs=[job_id, *extra], outputs=list(outputs), show_progress="hidden")
    cancel_button.click(on_cancel, inputs=[job_id, *extra], outputs=[message, *outputs])
    if ctx.app is not None:
        ctx.app.load(on_load, inputs=extra, outputs=[job_id, *outputs])
    return watch


# ------------------------------------------------------------------------------------------------
# Paths and names typed into the GUI
# ------------------------------------------------------------------------------------------------
def relative_name(workspace: str | Path, p: str | Path) -> str:
    """`p` as the workspace sees it (relative to its root); a path outside it is shown whole."""
    try:
        return str(Path(p).resolve().relative_to(Path(workspace).resolve()))
    except ValueError:
        return str(p)


def resolve_input(workspace: str | Path, p: str, what: str = "") -> Path:
    """`resolve_in_workspace` for a handler: a refused path becomes an `InputError` (prefixed by `what`)."""
    try:
        return resolve_in_workspace(workspace, p)
    except PathOutsideWorkspace as e:
        raise InputError(f"{what}: {e}" if what else str(e)) from None


def _names_engine_model(name: str) -> bool:
    from specforge_core.targets import LLAMA3_ALIASES, is_default

    return is_default(name) or name.lower() in LLAMA3_ALIASES


def names_shipped_draft(name: Any) -> bool:
    """`default` (or a shipped draft's own name): the draft that ships inside the package, not a workspace path."""
    from specforge_core.targets import ModelNotFoundError, shipped_draft_dir

    if not isinstance(name, str) or not name.strip():
        return False
    try:
        return shipped_draft_dir(name) is not None     # the engine's own rule for what names a shipped draft
    except ModelNotFoundError:                         # named, but missing from this install: the engine says so
        return True


def resolve_model_name(workspace: str | Path, name: str) -> str:
    """A target / tokenizer name from a form -> what the engine loads: `default`, `llama3` and hub ids
    (org/name, found in the local HF cache) pass through; anything else is a path in the workspace."""
    ws = Path(workspace)
    if _names_engine_model(name):
        return name
    looks_local = name.startswith((".", "/", "~")) or (ws / name).exists() or name.count("/") != 1
    if not looks_local:
        return name
    return str(resolve_in_workspace(ws, name))


def _as_list(v: Any) -> list:
    return [] if v is None else (list(v) if isinstance(v, (list, tuple)) else [v])


def workspace_transform(workspace: str | Path, paths: Iterable[str] = (), models: Iterable[str] = (),
                        existing: Iterable[str] = (), check: Callable[[dict, dict], None] | None = None):
    """A form's `transform` (see `forms.values_to_config`): the `paths` fields resolved in the workspace,
    the `models` fields through `resolve_model_name`, the `existing` fields' files checked to exist,
    then `check(values, errors)` for a tab's own rules; every problem is reported by field. A `draft`
    field that names the shipped draft (`default`) passes through as a name, like a `models` field."""
    ws = Path(workspace)
    paths, models, existing = tuple(paths), tuple(models), tuple(existing)

    def transform(data: dict) -> dict:
        shipped = {k for k in ("draft",) if k in paths and names_shipped_draft(data.get(k))}
        out, errors = resolve_path_fields(ws, data, [k for k in paths if k not in shipped])
        existing_here = [k for k in existing if k not in shipped]
        for name in models:
            if out.get(name):
                try:
                    out[name] = resolve_model_name(ws, out[name])
                except PathOutsideWorkspace as e:
                    errors[name] = str(e)
        for name in existing_here:
            missing = [p for p in _as_list(out.get(name)) if not Path(p).exists()]
            if missing and name not in errors:
                errors[name] = f"{relative_name(ws, missing[0])}: no such file in the workspace"
        if check is not None:
            check(out, errors)
        if errors:
            raise FormError(errors)
        return out

    return transform


def _looks_like_path(name: str, workspace: Path | None) -> bool:
    if name.startswith((".", "/", "~")):
        return True
    return workspace is not None and (workspace / name).exists()


def resolve_tokenizer(name: str, workspace: Path | None = None, allowed: dict[str, str] | None = None):
    """A tokenizer name from the GUI -> a loaded fast tokenizer; raises `InputError`.

    With `allowed` (the public demo) only those names are accepted; nothing is read from disk
    beyond the embedded tokenizers. Otherwise: `default`, `llama3`, a directory inside the
    workspace, or a hub id that is already in the local HF cache (the GUI never downloads).
    """
    from specforge_core.targets import ModelNotFoundError, load_tokenizer

    name = (name or "").strip() or "default"
    if allowed is not None:
        if name in allowed:
            name = allowed[name]
        elif name not in allowed.values():
            raise InputError(f"tokenizer {name!r} is not offered here; choose one of {', '.join(allowed)}")
        return load_tokenizer(name)
    if _names_engine_model(name):
        return load_tokenizer(name)
    if _looks_like_path(name, workspace):
        if workspace is None:
            raise InputError(f"{name}: local tokenizer directories are not available here")
        p = resolve_input(workspace, name)
        if not p.is_dir():
            raise InputError(f"{name}: no such tokenizer directory in the workspace")
        try:
            return load_tokenizer(str(p))
        except ModelNotFoundError as e:
            raise InputError(str(e)) from None
    from huggingface_hub import try_to_load_from_cache

    cached = any(isinstance(try_to_load_from_cache(name, f), str)
                 for f in ("tokenizer.json", "tokenizer_config.json"))
    if not cached:
        raise InputError(
            f"tokenizer {name!r} is neither `default`, `llama3`, a directory in the workspace, nor a hub id in the "
            f"local Hugging Face cache (the workbench does not download; run `huggingface-cli download {name}` first)")
    try:
        return load_tokenizer(name)
    except ModelNotFoundError as e:
        raise InputError(str(e)) from None


# ------------------------------------------------------------------------------------------------
# Rows of a data file
# ------------------------------------------------------------------------------------------------
def whole_number(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a whole number, got {value!r}") from None


def read_rows(path: Path, limit: int) -> tuple[list[dict], Any]:
    """The first `limit` valid rows of a JSONL / JSON / Parquet file and the engine's skip report."""
    from specforge_core.data.readers import SkipReport, iter_rows

    if not path.exists():
        raise InputError(f"{path.name}: no such file in the workspace")
    if path.is_dir():
        raise InputError(f"{path.name}: is a directory; choose a .jsonl, .json or .parquet file")
    report = SkipReport(max_examples=5)
    rows = []
    try:
        for row in iter_rows([path], report=report):
            rows.append(row)
            if len(rows) >= limit:
                break
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    return rows, report


def read_row(path: Path, index: int) -> dict:
    """Row `index` (0-based, counting valid rows, as `specforge-wb inspect-mask --index` does) of a
    JSONL / JSON / Parquet file, read with the engine's streaming readers."""
    from specforge_core.data.readers import SkipReport, iter_rows

    index = whole_number(index, "row index")
    if index < 0:
        raise InputError("row index must be 0 or more")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give a .jsonl, .json or .parquet file")
    report = SkipReport(max_examples=3)
    seen = 0
    try:
        for i, row in enumerate(iter_rows([path], report=report)):
            if i == index:
                return row
            seen = i + 1
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    msg = f"{path}: no row at index {index} (the file has {seen} valid rows"
    if report.total:
        ex = report.examples[0]
        msg += f"; {report.summary()}, e.g. line {ex['line']}: {ex['message']}"
    raise InputError(msg + ")")


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


# ------------------------------------------------------------------------------------------------
# Workspace files: the data lists, the sample a fresh workspace starts with, uploads
# ------------------------------------------------------------------------------------------------
DATA_DIR = "data"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz", ".ndjson")
# Not data a user picks: the jobs' own folders, and the reports prepare-data / regenerate write beside their output.
_NOT_DATA_DIRS = ("jobs", "cache", "runs")
_NOT_DATA_ENDINGS = ("_skipped.jsonl", "_summary.json", ".errors.jsonl")
ASSETS = Path(__file__).with_name("assets")
SAMPLE_ASSET = ASSETS / "sample_sharegpt.jsonl"
SAMPLE_DATA = "samples/sample_sharegpt.jsonl"          # where a fresh workspace gets the sample
SAMPLE_NAME = "sample_sharegpt"                         # prepare-data's default name for it (the input stem)
SAMPLE_TRAIN = f"{DATA_DIR}/{SAMPLE_NAME}_train.jsonl"  # what prepare-data writes from it
SAMPLE_RUN = "runs/eagle3"                              # the Train tab's default run directory
UPLOAD_DIR = "uploads"
UPLOAD_MAX_BYTES = 1 << 30                               # 1 GiB; the server refuses bigger files before they land
UPLOAD_SUFFIXES = (".jsonl", ".json", ".parquet", ".ndjson")


def data_files(workspace: str | Path) -> list[str]:
    """Data files under the workspace (relative paths), the prepared ones first; skip reports excluded."""
    ws = Path(workspace)
    out = []
    for p in sorted(ws.rglob("*")):
        rel = p.relative_to(ws)
        if rel.parts and rel.parts[0] in _NOT_DATA_DIRS or any(x.startswith(".") for x in rel.parts):
            continue
        if p.is_file() and p.name.lower().endswith(DATA_SUFFIXES) and not p.name.endswith(_NOT_DATA_ENDINGS):
            out.append(str(rel))
    out.sort(key=lambda s: (not s.startswith(DATA_DIR + "/"), not s.endswith("_train.jsonl"), s))
    return out


def has_sample(workspace: str | Path) -> bool:
    return (Path(workspace) / SAMPLE_DATA).is_file()


def seed_workspace(workspace: str | Path) -> Optional[Path]:
    """A workspace with no data file and no job yet gets the sample dataset (60 short ShareGPT-style
    conversations written for this project, two of them deliberately broken; see notebooks/README.md)
    at `SAMPLE_DATA`, so Data -> Loss mask -> Train -> Benchmark works on the first clicks. Returns the
    file it wrote, or None (the workspace already has data, or had jobs: a user who deleted the sample
    does not get it back)."""
    ws = Path(workspace)
    if (ws / "jobs").exists() or data_files(ws) or not SAMPLE_ASSET.is_file():
        return None
    dest = resolve_in_workspace(ws, SAMPLE_DATA)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(SAMPLE_ASSET.read_bytes())
    return dest


def save_upload(workspace: str | Path, src: str | Path, name: str | None = None,
                max_bytes: int = UPLOAD_MAX_BYTES) -> str:
    """Copy an uploaded file (Gradio's temporary copy at `src`) to `UPLOAD_DIR/<sanitised name>` and
    return its workspace-relative path. The name is reduced to a safe base name (no folders, no `..`,
    no leading dot), must end like a data file, and never replaces an existing file (`x-1.jsonl`, ...).
    Raises `InputError` (too big, not a data file, a path the jail refuses)."""
    import shutil

    src = Path(src)
    raw = name or src.name
    try:
        clean = safe_file_name(raw)
    except ValueError as e:
        raise InputError(str(e)) from None
    if not clean.lower().endswith(UPLOAD_SUFFIXES):
        raise InputError(f"{raw}: upload a .jsonl, .json or .parquet file")
    size = src.stat().st_size
    if size > max_bytes:
        raise InputError(f"{raw}: {size / 2**20:.1f} MiB is over the upload limit of {max_bytes / 2**20:.0f} MiB; "
                         f"copy big files into the workspace folder instead")
    folder = resolve_input(workspace, UPLOAD_DIR, "upload")
    stem, dot, ext = clean.rpartition(".")
    dest, n = folder / clean, 0
    while dest.exists():
        n += 1
        dest = folder / f"{stem}-{n}{dot}{ext}"
    dest = resolve_input(workspace, str(dest.relative_to(Path(workspace).resolve())), "upload")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return relative_name(workspace, dest)
