"""The `prepare-data` job: a preset dataset or local files -> train / eval JSONL in our schema.

    prepare_data(PrepareDataConfig(dataset="sharegpt", source_path="dl/sharegpt"), events)
    prepare_data(PrepareDataConfig(input=["a.jsonl", "b.parquet"], name="mine"), events)

Writes into `output/`:
  `<name>_train.jsonl`, `<name>_eval.jsonl` (only when split_eval > 0), `<name>_skipped.jsonl` (one line
  per skipped row: file, line, code, message) and `<name>_summary.json` (the config, the counts and the
  format version: several datasets may share one output directory, so no single `run.json`).

Rows stream through: read -> convert -> normalise -> dedup by id (first wins) -> optional reservoir
sample (seeded) -> system prompt where missing -> split. The eval split is a hash of (seed, id), so a
row lands on the same side whatever else is in the file, and adding rows moves nothing. Files are
written under temporary names and renamed at the end: a failed or cancelled run leaves no partial
output, and a finished one replaces the previous outputs of the same name at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

from ..config import FORMAT_VERSION
from ..events import Events, JobCancelled
from .config import PrepareDataConfig
from .presets import get_preset
from .sources import iter_source_records
from .readers import SkipReport, dumps_line, expand_paths, iter_records, normalize_records
from .schema import add_system_prompt

CANCEL_CHECK_EVERY = 2000
PROGRESS_EVERY = 1000
_STRIP_SUFFIXES = (".gz", ".jsonl", ".ndjson", ".json", ".parquet")


def eval_fraction(seed: int, row_id: str) -> float:
    """Where a row falls in [0, 1) for the train/eval split: depends only on the seed and its id."""
    h = hashlib.blake2b(f"{seed}\0{row_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64


def _id_key(row_id: str) -> int:
    # 8-byte digests instead of the id strings: a 1.4 M-row dedup set stays ~100 MB smaller,
    # and a collision (p ~ 1e-7 at that size) would only drop one row as a duplicate.
    return int.from_bytes(hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def default_name(cfg: PrepareDataConfig) -> str:
    if cfg.name:
        name = cfg.name
    elif cfg.dataset:
        name = cfg.dataset.strip().lower().replace("_", "-")
    else:
        name = Path(cfg.input[0]).name
        changed = True
        while changed:
            changed = False
            for s in _STRIP_SUFFIXES:
                if name.lower().endswith(s) and len(name) > len(s):
                    name, changed = name[: -len(s)], True
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"name {name!r}: must be a plain file name prefix (no '/', not starting with '.')")
    return name


def _validate(cfg: PrepareDataConfig) -> None:
    if cfg.dataset and cfg.input:
        raise ValueError("give either --dataset (with --source-path for local source files) or --input, not both")
    if not cfg.dataset and not cfg.input:
        raise ValueError("nothing to prepare: give --dataset NAME (a preset) or --input FILE [FILE ...]")
    if cfg.source_path and not cfg.dataset:
        raise ValueError("--source-path needs --dataset (it says where that preset's source files are); "
                         "for files in our schema use --input")


def prepare_data(cfg: PrepareDataConfig, events: Events) -> dict:
    """Run the job (see the module docstring); returns the summary dict."""
    _validate(cfg)
    name = default_name(cfg)
    out = Path(cfg.output)

    # Open the source before creating anything, so a missing file or dataset leaves no trace.
    if cfg.input:
        files = expand_paths(cfg.input)
        source: Iterator[tuple[str, int, Any]] = (
            (str(f), line, obj) for f in files for line, obj in iter_records(f, cfg.max_row_bytes))
        convert: Any = "auto"
        sources = [str(f) for f in files]
    else:
        preset = get_preset(cfg.dataset)
        source = iter_source_records(preset, cfg.source_path, cfg.max_row_bytes)
        convert = preset.convert
        sources = [cfg.source_path or f"hf://{preset.hub_id}/{preset.split}"]

    out.mkdir(parents=True, exist_ok=True)
    final = {k: out / f"{name}_{k}.jsonl" for k in ("train", "eval", "skipped")}
    summary_path = out / f"{name}_summary.json"
    tmp = {k: p.with_name(f".{p.name}.tmp-{os.getpid()}") for k, p in final.items()}
    handles = {k: open(p, "wb") for k, p in tmp.items()}
    t0 = time.time()
    counts = {"rows_read": 0, "written_train": 0, "written_eval": 0, "duplicates": 0}
    report = SkipReport(sink=lambda rec: handles["skipped"].write(dumps_line(rec)))
    events.emit("prepare_start", name=name, sources=sources, output=str(out))

    def counted(records):
        for rec in records:
            counts["rows_read"] += 1
            n = counts["rows_read"]
            if n % PROGRESS_EVERY == 0:
                events.progress(n, None, what="rows read")
            if n % CANCEL_CHECK_EVERY == 0 and events.cancelled:
                raise JobCancelled(f"prepare-data {name}: cancelled after {n} rows; no output written")
            yield rec

    def write(row: dict) -> None:
        row = add_system_prompt(row, cfg.system_prompt)
        if cfg.split_eval > 0 and eval_fraction(cfg.seed, row["id"]) < cfg.split_eval:
            handles["eval"].write(dumps_line(row))
            counts["written_eval"] += 1
        else:
            handles["train"].write(dumps_line(row))
            counts["written_train"] += 1

    try:
        seen: set[int] = set()
        rng = random.Random(cfg.seed)
        k = cfg.sample_size
        reservoir: list[tuple[int, dict]] = []
        unique = 0
        for row in normalize_records(counted(source), report, convert):
            key = _id_key(row["id"])
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            if k is None:
                write(row)
            elif unique < k:  # reservoir sampling (algorithm R): uniform over the unique rows, one pass
                reservoir.append((unique, row))
            else:
                j = rng.randrange(unique + 1)
                if j < k:
                    reservoir[j] = (unique, row)
            unique += 1
        if events.cancelled:
            raise JobCancelled(f"prepare-data {name}: cancelled; no output written")
        reservoir.sort(key=lambda x: x[0])  # keep the source order in the output
        for _, row in reservoir:
            write(row)
        for h in handles.values():
            h.close()
    except BaseException:
        for h in handles.values():
            h.close()
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise

    os.replace(tmp["train"], final["train"])
    os.replace(tmp["skipped"], final["skipped"])
    if cfg.split_eval > 0:
        os.replace(tmp["eval"], final["eval"])
    else:
        tmp["eval"].unlink(missing_ok=True)
        if final["eval"].exists():
            # An eval file from an earlier run of this name would be read as this run's.
            final["eval"].unlink()
            events.warning(f"removed {final['eval']} left by an earlier run (split_eval is 0 now)")

    result = {
        "name": name,
        "train_path": str(final["train"]),
        "eval_path": str(final["eval"]) if cfg.split_eval > 0 else None,
        "skipped_path": str(final["skipped"]),
        "summary_path": str(summary_path),
        "rows_read": counts["rows_read"],
        "unique_rows": unique,
        "written_train": counts["written_train"],
        "written_eval": counts["written_eval"],
        "duplicates": counts["duplicates"],
        "skipped": report.total,
        "skipped_by_reason": dict(sorted(report.counts.items())),
        "seconds": round(time.time() - t0, 2),
    }
    from .. import __version__

    payload = {"kind": "prepare-data", "format_version": FORMAT_VERSION, "specforge_version": __version__,
               "config": cfg.model_dump(mode="json"), "sources": sources, "result": result,
               "skipped_examples": report.examples}
    stmp = summary_path.with_name(f".{summary_path.name}.tmp-{os.getpid()}")
    stmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(stmp, summary_path)

    events.progress(counts["rows_read"], counts["rows_read"], what="rows read", force=True)
    if report.total:
        events.warning(f"{report.summary()} (details in {final['skipped']})",
                       first=report.examples[0] if report.examples else None)
    if counts["written_train"] + counts["written_eval"] == 0:
        events.warning(f"prepare-data {name}: no usable rows were written")
    events.emit("summary", **result)
    return result
