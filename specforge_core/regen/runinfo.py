"""`out.run.json`: what made a regeneration output, and the check that a resume does not mix two runs.

Why: `--resume` skips every id already written. If the resumed run has another model, other
sampling or another `--num-samples` (which renames every id), the output silently becomes a mix of
two datasets. So each run writes its config beside its output (keyed by the output's name, like
the errors file, since several outputs may share a folder), in the `run.json` format of every other
artifact (`kind`, `format_version`, `specforge_version`, `config`), plus the model the servers
actually served. A resume compares the fields that change what a row contains and refuses on any
difference, naming each field with its old and new value; `--force` continues anyway (the record
then notes which fields were forced).

Fields that do NOT block a resume, because they change how or how fast rows are made or which rows
get made, never what a row contains: where the servers are and their key, concurrency, every
timeout, retries, backoff, retirement and re-probing, `max_rows` / `max_row_bytes` (which rows are
read: raising `max_rows` is how a run is extended), the local backend's batch size and device,
and `seed` (the servers are not sent it; locally it picks other samples from the same distribution).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from ..config import FORMAT_VERSION, ConfigError
from .config import RegenConfig

KIND = "regenerate"
# Fields whose change makes new rows differ from the old ones in content or id.
OUTPUT_FIELDS = ("input", "backend", "num_samples", "system_prompt", "temperature", "top_p", "max_tokens",
                 "stop", "reasoning")
# The model is compared as served (`model` of the record, filled once the servers are probed) and as
# asked for; `local_model` only matters to the local backend.


def _abs_inputs(inputs: list[str]) -> list[str]:
    return [str(Path(p).expanduser().resolve()) for p in inputs]


def record(cfg: RegenConfig, model: Optional[str], previous: Optional[dict] = None,
           forced: Optional[list[tuple[str, Any, Any]]] = None) -> dict:
    conf = cfg.model_dump(mode="json")
    conf["input"] = _abs_inputs(cfg.input)  # compared across working directories
    conf["api_key"] = None  # never write a secret beside the data
    for k in ("resume", "overwrite", "retry_errors", "force"):  # `--config out.run.json` starts a plain run
        conf[k] = False
    rec: dict[str, Any] = {"kind": KIND, "format_version": FORMAT_VERSION, "specforge_version": __version__,
                           "config": conf, "model": model, "updated": round(time.time(), 3)}
    history = list((previous or {}).get("forced") or [])
    if forced:
        history.append({"at": round(time.time(), 3),
                        "fields": {name: {"old": old, "new": new} for name, old, new in forced}})
    if history:
        rec["forced"] = history
    return rec


def write(path: Path, rec: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: corrupt run record ({e}); delete it to resume without the config check, "
                          "or start over with --overwrite") from None
    if not isinstance(data, dict) or data.get("kind") != KIND or not isinstance(data.get("config"), dict):
        raise ConfigError(f"{path}: not a regeneration run record")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(f"{path}: format version {data.get('format_version')} is newer than this "
                          f"specforge-wb understands ({FORMAT_VERSION}); upgrade it")
    return data


def differences(old: dict, cfg: RegenConfig, model: Optional[str]) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) for every output-changing field that differs. `model`: the model
    this run serves (None while it is not known yet: then only an explicit `--model` is compared)."""
    oc = old.get("config") or {}
    new = cfg.model_dump(mode="json")
    new["input"] = _abs_inputs(cfg.input)
    diffs = []
    for name in OUTPUT_FIELDS:
        if name in oc and oc[name] != new[name]:
            diffs.append((name, oc[name], new[name]))
    backend = new["backend"]
    if backend == "local" and oc.get("backend") == "local" and oc.get("local_model") != new["local_model"]:
        diffs.append(("local_model", oc.get("local_model"), new["local_model"]))
    if backend == "server":
        was = old.get("model") or oc.get("model")
        now = model or new.get("model")
        if was and now and was != now:
            diffs.append(("model", was, now))
    return diffs


def describe(path: Path, diffs: list[tuple[str, Any, Any]]) -> str:
    lines = [f"--resume with another config than the run that wrote this output ({path}); its rows would "
             "mix with rows made differently:"]
    for name, old, new in diffs:
        lines.append(f"  {name}: {old!r} (earlier run) -> {new!r} (now)")
    lines.append("Resume with the earlier values, write to another --output, start over with --overwrite, "
                 "or pass --force to mix them anyway. (Concurrency, timeouts, retries, server addresses, "
                 "max_rows and seed may change freely.)")
    return "\n".join(lines)


def check(path: Path, old: Optional[dict], cfg: RegenConfig, model: Optional[str]) -> list[tuple[str, Any, Any]]:
    """Raise ConfigError on output-changing differences unless `cfg.force`; returns the forced ones."""
    if old is None:
        return []
    diffs = differences(old, cfg, model)
    if diffs and not cfg.force:
        raise ConfigError(describe(path, diffs))
    return diffs
