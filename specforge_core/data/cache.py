"""The tokenised cache: conversations -> (input_ids, loss_mask) once, keyed by everything that shapes them.

`build_cache(cfg, events)` (CLI `build-cache`) reads the train (and eval) files, tokenises and masks
every row with the loss-mask API (`data.mask.mask_rows`, batched, in `num_proc` worker processes
through `datasets.map`), drops samples whose mask is all zero (counted and reported, never silent),
saves the splits with `save_to_disk`, builds the draft vocabulary from the train split's masked
tokens, and writes `run.json` and a `done` marker. It all happens in a temp directory renamed to
`cache_dir/<key>/` at the end, so a crash never leaves a half cache that looks finished.

The key (`cache_key`) is a sha256 over each data file's absolute path, size, mtime and *content*
hash, the tokenizer's identity (resolved dir + hash of its vocab and chat template), the template
name, max_length, train_only_last_turn and `CACHE_FORMAT`. The same inputs find the finished
directory and return at once; any change makes a new one. Content hashes are streamed (files can be
GBs) and remembered by (path, size, mtime_ns) in `cache_dir/.content_hashes.json`, except for files
modified within a few seconds of hashing, whose mtime cannot be trusted to change on the next write.

Layout of `cache_dir/<key>/`: `train/` and `eval/` (datasets, columns id, input_ids int32,
loss_mask int8, length, num_trained), `vocab_mapping.safetensors` + `vocab.json`, `run.json`, `done`.
The draft vocab is not part of the key: changing only `draft_vocab_size` reuses the tokenised splits
and rebuilds the (cheap) vocab, and says so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..config import read_run_json, write_run_json
from ..events import Events, JobCancelled
from ..fsutil import staged_dir
from ..targets import file_lock
from .config import BuildCacheConfig
from .vocab import VocabMapping, build_vocab_mapping, count_tokens, load_vocab_mapping, save_vocab_mapping

CACHE_FORMAT = 1
KIND = "build-cache"
DONE = "done"
HASH_MEMO = ".content_hashes.json"
_CHUNK = 1 << 20
# A file written within this many ns of being hashed may be rewritten within the same mtime tick;
# its hash is not memoised (git's "racy clean" rule).
_RACY_NS = 3_000_000_000
_MEMO_MIN_BYTES = 1 << 20
_EXAMPLE_IDS = 5


# ------------------------------------------------------------------------------------------------
# Key
# ------------------------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _load_memo(memo_path: Path | None) -> dict:
    if memo_path is None or not memo_path.exists():
        return {}
    try:
        data = json.loads(memo_path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}  # a torn memo only costs a rehash


def _save_memo(memo_path: Path, memo: dict) -> None:
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f"{memo_path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
        tmp.write_text(json.dumps(memo, indent=1), encoding="utf-8")
        os.replace(tmp, memo_path)
    except OSError:
        pass  # the memo is an optimisation; a read-only cache dir must not fail the job


def file_identity(path: str | Path, memo: dict | None = None) -> dict:
    """{path (absolute), size, mtime_ns, sha256} of a data file; `memo` (mutated) skips rehashing
    files whose (path, size, mtime_ns) were hashed before and are not racy."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise FileNotFoundError(f"{path}: data file not found" if not p.exists() else f"{path}: not a file")
    st = p.stat()
    ident = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entry = (memo or {}).get(str(p))
    if memo is not None and isinstance(entry, dict) and entry.get("size") == st.st_size \
            and entry.get("mtime_ns") == st.st_mtime_ns and isinstance(entry.get("sha256"), str):
        return {**ident, "sha256": entry["sha256"]}
    started = time.time_ns()
    digest = _sha256_file(p)
    if memo is not None and st.st_size >= _MEMO_MIN_BYTES and st.st_mtime_ns < started - _RACY_NS:
        memo[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return {**ident, "sha256": digest}


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")


def tokenizer_identity(tokenizer_name_or_dir: str) -> dict:
    """The resolved tokenizer location plus a hash of what defines its ids and chat template."""
    from ..targets import load_tokenizer, resolve_model

    resolved = resolve_model(tokenizer_name_or_dir)
    h = hashlib.sha256()
    p = Path(resolved)
    if p.is_dir() and (p / "tokenizer.json").exists():
        for name in _TOKENIZER_FILES:
            f = p / name
            if f.is_file():
                h.update(name.encode() + b"\0" + _sha256_file(f).encode() + b"\0")
    else:
        # A hub id (or a dir without tokenizer.json): hash what the loaded tokenizer says it is.
        tok = load_tokenizer(tokenizer_name_or_dir)
        h.update(tok.backend_tokenizer.to_str().encode("utf-8"))
        h.update(b"\0" + str(getattr(tok, "chat_template", None) or "").encode("utf-8"))
    return {"resolved": str(resolved), "sha256": h.hexdigest()}


def cache_key(data_files: list[str], tokenizer_name_or_dir: str, template: str, max_length: int,
              train_only_last_turn: bool, extra: dict | None = None, eval_files: list[str] | None = None,
              memo_dir: str | Path | None = None) -> str:
    """sha256 (hex, 24 chars) over the data files (path, size, mtime, content), tokenizer identity,
    template, max_length, train_only_last_turn, `extra` and CACHE_FORMAT. `memo_dir` holds the
    content-hash memo (normally the cache root)."""
    memo_path = Path(memo_dir) / HASH_MEMO if memo_dir is not None else None
    memo = _load_memo(memo_path)
    before = json.dumps(memo, sort_keys=True)
    payload = {
        "cache_format": CACHE_FORMAT,
        "data": [file_identity(f, memo) for f in data_files],
        "eval": [file_identity(f, memo) for f in (eval_files or [])],
        "tokenizer": tokenizer_identity(tokenizer_name_or_dir),
        "template": template,
        "max_length": int(max_length),
        "train_only_last_turn": bool(train_only_last_turn),
        "extra": extra or {},
    }
    if memo_path is not None and json.dumps(memo, sort_keys=True) != before:
        _save_memo(memo_path, memo)
    blob = json.dumps(payload, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:24]


def _cfg_key(cfg: BuildCacheConfig) -> str:
    from .templates import canonical_name

    # Aliases (qwen -> chatml, ...) render identically, so they share a cache.
    return cache_key(cfg.data, cfg.tokenizer, canonical_name(cfg.chat_template), cfg.max_length,
                     cfg.train_only_last_turn, eval_files=cfg.eval_data, memo_dir=cfg.cache_dir)


# ------------------------------------------------------------------------------------------------
# Tokenising (runs in datasets.map workers)
# ------------------------------------------------------------------------------------------------
def _reason(err: Exception) -> str:
    code = getattr(err, "code", None)
    if isinstance(code, str) and code:
        return code
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return msg[:80]


def _mask_batch(batch: dict, tokenizer: str, template: str, max_length: int, last_turn: bool) -> dict:
    """datasets.map function: JSON rows -> masked samples. The tokenizer travels by name (workers
    reload it, memoised per process) because hashing / pickling the object costs more than loading."""
    from ..targets import load_tokenizer
    from .mask import MaskError, mask_rows

    tok = load_tokenizer(tokenizer)
    rows = [json.loads(r) for r in batch["row"]]
    results = mask_rows(rows, tok, template, max_length, train_only_last_turn=last_turn)
    out: dict[str, list] = {k: [] for k in ("id", "input_ids", "loss_mask", "length", "num_trained", "truncated",
                                            "status", "detail")}
    for row, res in zip(rows, results, strict=True):
        out["id"].append(str(row.get("id", "")))
        if isinstance(res, BaseException):
            if not isinstance(res, MaskError):
                raise res
            out["input_ids"].append([])
            out["loss_mask"].append([])
            out["length"].append(0)
            out["num_trained"].append(0)
            out["truncated"].append(False)
            out["status"].append("error")
            out["detail"].append(_reason(res))
            continue
        ids = list(res.input_ids)
        lm = list(res.loss_mask)
        n_trained = int(sum(lm))
        out["input_ids"].append(ids)
        out["loss_mask"].append(lm)
        out["length"].append(len(ids))
        out["num_trained"].append(n_trained)
        out["truncated"].append(bool(res.truncated))
        out["status"].append("ok" if n_trained > 0 else "all_zero")
        out["detail"].append(res.warning or "")
    return out


def _masked_features():
    from datasets import Features, List, Value

    return Features({
        "id": Value("string"), "input_ids": List(Value("int32")), "loss_mask": List(Value("int8")),
        "length": Value("int32"), "num_trained": Value("int32"), "truncated": Value("bool"),
        "status": Value("string"), "detail": Value("string"),
    })


# ------------------------------------------------------------------------------------------------
# One split
# ------------------------------------------------------------------------------------------------
def _skip_counts(report) -> tuple[int, dict[str, int], list[str]]:
    """(count, by reason, a few 'file:line: code: message' examples) from a readers.SkipReport."""
    examples = [f"{e['file']}:{e['line']}: {e['code']}: {e['message']}" for e in report.examples[:_EXAMPLE_IDS]]
    return report.total, dict(sorted(report.counts.items())), examples


def _build_split(split: str, files: list[str], cfg: BuildCacheConfig, tok_name: str, work: Path,
                 out_dir: Path, events: Events, max_row_bytes: int) -> dict:
    from datasets import Dataset, Features, Value, concatenate_datasets

    from .readers import SkipReport, iter_rows

    report = SkipReport()
    read = [0]

    # Preset source schemas are recognised when the presets module is installed alongside.
    convert = "auto" if importlib.util.find_spec("specforge_core.data.presets") else None

    def gen():
        for row in iter_rows(files, max_row_bytes, report, convert=convert):
            read[0] += 1
            if read[0] % 5000 == 0:
                events.progress(read[0], None, what=f"{split} rows read")
                if events.cancelled:
                    raise JobCancelled(f"cancelled while reading {split} rows")
            yield {"id": str(row.get("id", "")), "row": json.dumps(row, ensure_ascii=False)}

    # A fresh fingerprint per build: datasets must never hand back rows cached from an earlier read.
    try:
        raw = Dataset.from_generator(gen, features=Features({"id": Value("string"), "row": Value("string")}),
                                     cache_dir=str(work / f"_raw_{split}"), fingerprint=uuid.uuid4().hex)
    except Exception as e:  # noqa: BLE001 - datasets wraps the generator's own errors; unwrap ours
        cause = e.__cause__ or e.__context__
        if cause is not None:
            raise cause from None
        raise
    n_skipped_read, skip_reasons, skip_examples = _skip_counts(report)
    if n_skipped_read:
        events.warning(f"{split}: skipped {n_skipped_read} unusable row(s) while reading", split=split,
                       by_reason=skip_reasons, examples=skip_examples)
    n = len(raw)
    events.emit("tokenise_start", split=split, rows=n, num_proc=cfg.num_proc)
    events.progress(0, n, what=f"{split} rows tokenised", force=True)

    # Chunks give progress events and cancel points; each chunk is big enough that starting the
    # worker pool (and its tokenizer reloads) stays a small part of the time.
    chunk = max(2000 * cfg.num_proc, -(-n // 50)) if n else 1
    parts = []
    for start in range(0, n, chunk):
        if events.cancelled:
            raise JobCancelled(f"cancelled while tokenising {split} ({start}/{n} rows)")
        part = raw.select(range(start, min(n, start + chunk)))
        nproc = cfg.num_proc if len(part) >= 2 * cfg.num_proc and cfg.num_proc > 1 else None
        parts.append(part.map(
            _mask_batch, batched=True, batch_size=256, num_proc=nproc, remove_columns=raw.column_names,
            fn_kwargs={"tokenizer": tok_name, "template": cfg.chat_template, "max_length": cfg.max_length,
                       "last_turn": cfg.train_only_last_turn},
            features=_masked_features(), new_fingerprint=uuid.uuid4().hex,
            cache_file_name=str(work / f"_masked_{split}_{start}.arrow"), desc=f"tokenising {split}"))
        events.progress(min(n, start + chunk), n, what=f"{split} rows tokenised", force=True)
    masked = concatenate_datasets(parts) if parts else Dataset.from_dict(
        {k: [] for k in _masked_features()}, features=_masked_features())

    status = masked["status"] if len(masked) else []
    detail = masked["detail"] if len(masked) else []
    ids = masked["id"] if len(masked) else []
    keep = [i for i, s in enumerate(status) if s == "ok"]
    zero = [i for i, s in enumerate(status) if s == "all_zero"]
    errs = [i for i, s in enumerate(status) if s == "error"]
    if zero:
        events.warning(f"{split}: dropped {len(zero)} sample(s) whose loss mask is all zero (nothing to train on; "
                       "check the chat template with inspect-mask)", split=split, count=len(zero),
                       ids=[ids[i] for i in zero[:_EXAMPLE_IDS]])
    err_reasons = Counter(detail[i] for i in errs)
    if errs:
        events.warning(f"{split}: {len(errs)} sample(s) could not be masked and were skipped", split=split,
                       by_reason=dict(err_reasons), ids=[ids[i] for i in errs[:_EXAMPLE_IDS]])
    warn_counts = Counter(detail[i] for i in keep if detail[i])
    for msg, c in warn_counts.items():
        events.warning(f"{split}: {c} sample(s) kept with mask warning: {msg}", split=split, count=c)

    kept = masked.select(keep).remove_columns(["status", "detail", "truncated"])
    truncated = sum(1 for i, t in enumerate(masked["truncated"] if len(masked) else []) if t and status[i] == "ok")
    kept.save_to_disk(str(out_dir))
    lengths = np.asarray(kept["length"], dtype=np.int64) if len(kept) else np.zeros(0, np.int64)
    trained = np.asarray(kept["num_trained"], dtype=np.int64) if len(kept) else np.zeros(0, np.int64)
    return {
        "rows_read": n, "samples": len(kept), "dropped_all_zero": len(zero), "dropped_all_zero_ids":
        [ids[i] for i in zero[:_EXAMPLE_IDS]], "mask_errors": len(errs), "mask_error_reasons": dict(err_reasons),
        "skipped_read": n_skipped_read, "skip_reasons": skip_reasons, "truncated": truncated,
        "tokens": int(lengths.sum()), "trained_tokens": int(trained.sum()),
    }


def _count_split(ds, vocab_size: int) -> np.ndarray:
    """Masked target-id counts of a saved split, read column-wise through Arrow (no per-sample Python)."""
    import pyarrow.compute as pc

    acc = np.zeros(vocab_size, dtype=np.int64)
    table = ds.with_format("arrow")
    for start in range(0, len(ds), 10_000):
        batch = table[start:start + 10_000]
        ids = pc.list_flatten(batch.column("input_ids")).to_numpy(zero_copy_only=False)
        lm = pc.list_flatten(batch.column("loss_mask")).to_numpy(zero_copy_only=False)
        count_tokens([ids], [lm], vocab_size, out=acc)
    return acc


def target_vocab_size(tokenizer_name: str) -> int:
    """The target vocab the draft maps into: the model's embedding rows when its config is beside the
    tokenizer (often larger than len(tokenizer), e.g. Qwen), else the tokenizer's length."""
    from ..targets import load_tokenizer, resolve_model

    n = len(load_tokenizer(tokenizer_name))
    cfg_p = Path(resolve_model(tokenizer_name)) / "config.json"
    if cfg_p.is_file():
        try:
            conf = json.loads(cfg_p.read_text(encoding="utf-8"))
            v = conf.get("vocab_size") or (conf.get("text_config") or {}).get("vocab_size")
            if isinstance(v, int) and v > 0:
                n = max(n, v)
        except (OSError, json.JSONDecodeError):
            pass
    return n


def _build_vocab(split_dir: Path, key: str, draft_vocab_size: int, vocab_size: int, dest: Path) -> VocabMapping:
    from datasets import load_from_disk

    counts = _count_split(load_from_disk(str(split_dir)), vocab_size)
    m = build_vocab_mapping(counts, draft_vocab_size)
    save_vocab_mapping(m, dest, key=key, seen_ids=int((counts > 0).sum()), trained_tokens=int(counts.sum()))
    return m


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------
def is_complete(path: str | Path) -> bool:
    p = Path(path)
    return (p / DONE).exists() and (p / "run.json").exists()


def _reuse(out: Path, cfg: BuildCacheConfig, key: str, vocab_size: int, events: Events) -> dict:
    run = read_run_json(out, expect_kind=KIND)
    summary = dict(run.get("summary") or {})
    meta_p = out / "vocab.json"
    meta = json.loads(meta_p.read_text(encoding="utf-8")) if meta_p.exists() else {}
    if meta.get("draft_vocab_size") != cfg.draft_vocab_size or meta.get("key") != key:
        events.emit("vocab_rebuild", path=str(out), old_draft_vocab_size=meta.get("draft_vocab_size"),
                    draft_vocab_size=cfg.draft_vocab_size)
        m = _build_vocab(out / "train", key, cfg.draft_vocab_size, vocab_size, out)
        summary.update(draft_vocab_size=m.draft_vocab_size, coverage=m.coverage)
        extra = {k: v for k, v in run.items() if k not in ("kind", "format_version", "specforge_version", "config")}
        extra["summary"] = summary
        write_run_json(out, KIND, cfg, **extra)
    summary.update(path=str(out), key=key, reused=True)
    return summary


def build_cache(cfg: BuildCacheConfig, events: Events) -> dict:
    """Tokenise + mask `cfg.data` (and `cfg.eval_data`) into `cache_dir/<key>/` and build the draft vocab;
    return at once when that directory is already complete (unless `overwrite`)."""
    from .templates import canonical_name

    t0 = time.time()
    canonical_name(cfg.chat_template)  # an unknown template fails here, before any hashing
    for f in [*cfg.data, *(cfg.eval_data or [])]:
        if not Path(f).expanduser().is_file():
            raise FileNotFoundError(f"{f}: data file not found")
    vocab_size = target_vocab_size(cfg.tokenizer)
    if cfg.draft_vocab_size > vocab_size:
        raise ValueError(f"draft_vocab_size {cfg.draft_vocab_size} is larger than the target vocabulary of "
                         f"{cfg.tokenizer!r} ({vocab_size} ids); use at most {vocab_size}")
    root = Path(cfg.cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    key = _cfg_key(cfg)
    out = root / key
    events.emit("cache_key", key=key, path=str(out))

    if is_complete(out) and not cfg.overwrite:
        with file_lock(root / f".{key}.lock"):
            summary = _reuse(out, cfg, key, vocab_size, events)
        events.emit("cache_reused", path=str(out), seconds=round(time.time() - t0, 3))
        return summary

    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # progress goes out as events, not as tqdm bars on stderr
    try:
        with file_lock(root / f".{key}.lock"):
            if is_complete(out) and not cfg.overwrite:  # another process finished it while we waited
                return _reuse(out, cfg, key, vocab_size, events)
            return _build_locked(cfg, key, out, vocab_size, events, t0)
    finally:
        if bars:
            datasets.enable_progress_bars()


def _build_locked(cfg: BuildCacheConfig, key: str, out: Path, vocab_size: int, events: Events, t0: float) -> dict:
    from ..targets import resolve_model

    tok_name = resolve_model(cfg.tokenizer)
    from .readers import DEFAULT_MAX_ROW_BYTES

    max_row_bytes = DEFAULT_MAX_ROW_BYTES
    # Built beside its final place and swapped in whole (an old, incomplete or overwritten one is moved aside).
    with staged_dir(out, prefix=f".{key}.tmp-") as tmp:
        work = tmp / "_work"
        train = _build_split("train", cfg.data, cfg, tok_name, work, tmp / "train", events, max_row_bytes)
        ev = None
        if cfg.eval_data:
            ev = _build_split("eval", cfg.eval_data, cfg, tok_name, work, tmp / "eval", events, max_row_bytes)
        if events.cancelled:
            raise JobCancelled("cancelled before building the draft vocab")
        if train["samples"] == 0:
            raise ValueError(f"{', '.join(cfg.data)}: no usable training samples (rows read {train['rows_read']}, "
                             f"skipped {train['skipped_read'] + train['mask_errors']}, all-zero masks "
                             f"{train['dropped_all_zero']}); check the files and the chat template")
        m = _build_vocab(tmp / "train", key, cfg.draft_vocab_size, vocab_size, tmp)
        shutil.rmtree(work, ignore_errors=True)
        splits = [train] + ([ev] if ev else [])
        summary = {
            "path": str(out), "key": key, "reused": False,
            "train_samples": train["samples"], "eval_samples": ev["samples"] if ev else 0,
            "dropped_all_zero": sum(s["dropped_all_zero"] for s in splits),
            "skipped": sum(s["skipped_read"] + s["mask_errors"] for s in splits),
            "draft_vocab_size": m.draft_vocab_size, "target_vocab_size": m.target_vocab_size,
            "coverage": m.coverage, "tokens": train["tokens"], "trained_tokens": train["trained_tokens"],
            "truncated": sum(s["truncated"] for s in splits),
        }
        write_run_json(tmp, KIND, cfg, key=key, cache_format=CACHE_FORMAT, tokenizer_resolved=tok_name,
                       summary=summary, splits={"train": train, **({"eval": ev} if ev else {})},
                       seconds=round(time.time() - t0, 2))
        (tmp / DONE).write_text(key + "\n", encoding="utf-8")
    events.emit("cache_built", path=str(out), train_samples=summary["train_samples"],
                eval_samples=summary["eval_samples"], coverage=round(m.coverage, 4),
                seconds=round(time.time() - t0, 2))
    return summary


# ------------------------------------------------------------------------------------------------
# Reading a cache
# ------------------------------------------------------------------------------------------------
class LoadedCache(NamedTuple):
    path: Path
    train: Any                     # datasets.Dataset
    eval: Any                      # datasets.Dataset or None
    vocab: VocabMapping


def load_cache(path: str | Path, expect_target_vocab: int | None = None,
               expect_draft_vocab: int | None = None) -> LoadedCache:
    """Open a finished cache: (path, train, eval or None, vocab). The draft vocab must carry this
    cache's key (`VocabMismatchError` otherwise)."""
    from datasets import load_from_disk

    p = Path(path)
    if not is_complete(p):
        raise FileNotFoundError(f"{p}: not a finished tokenised cache (no '{DONE}' marker / run.json); "
                                "run build-cache")
    run = read_run_json(p, expect_kind=KIND)
    if run.get("cache_format", 0) > CACHE_FORMAT:
        raise ValueError(f"{p / 'run.json'}: cache format {run.get('cache_format')} is newer than this code "
                         f"understands ({CACHE_FORMAT})")
    key = run.get("key")
    vocab = load_vocab_mapping(p, expect_key=key, expect_target_vocab=expect_target_vocab,
                               expect_draft_vocab=expect_draft_vocab)
    train = load_from_disk(str(p / "train"))
    ev = load_from_disk(str(p / "eval")) if (p / "eval").exists() else None
    return LoadedCache(p, train, ev, vocab)

