"""The `export` and `check-draft` jobs: a training checkpoint -> the serving checkpoint SGLang / vLLM
load, and the check of one.

The format itself belongs to the draft family (`models/eagle3.py` for EAGLE3; the generic reading,
checking and atomic writing is `models/serving.py`): these jobs pick the family from the
checkpoint's `architectures` through `models.registry`. `export_draft` refuses to leave an output
behind that fails the check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import write_run_json
from ..events import Events
from ..models.checkpoints import resolve_checkpoint
from ..models.registry import family_for, guess_family
from ..models.serving import CONFIG_FILE, MODEL_FILE, check_draft_dir, load_target_config, write_draft_dir
from .config import CheckDraftConfig, ExportConfig


def check_draft(cfg: CheckDraftConfig, events: Events) -> dict:
    """The `check-draft` job: every problem in words; exit code 1 when there is any."""
    from ..targets import shipped_draft_dir

    path = shipped_draft_dir(str(cfg.path)) or Path(cfg.path)   # `default`: the draft shipped in the package
    tcfg = load_target_config(cfg.target) if cfg.target else None
    problems = check_draft_dir(path, target_config=tcfg)
    for msg in problems:
        events.warning(msg, path=str(path))
    summary: dict[str, Any] = {"path": str(path), "ok": not problems, "problems": problems,
                               "exit_code": 0 if not problems else 1, "target_checked": bool(cfg.target)}
    try:
        c = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        summary.update({k: c.get(k) for k in ("hidden_size", "vocab_size", "draft_vocab_size")})
        summary["aux_layer_ids"] = (c.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    events.emit("check_draft", ok=summary["ok"], problems=len(problems), path=str(path))
    return summary


def export_draft(cfg: ExportConfig, events: Events) -> dict:
    """Write `cfg.output` (config.json + model.safetensors) from a checkpoint; refuse a broken result."""
    from safetensors.torch import load_file

    ck = resolve_checkpoint(cfg.checkpoint)
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists; pass --overwrite to replace it, or choose another --output")
    try:
        state = load_file(str(ck / MODEL_FILE))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{ck / MODEL_FILE}: cannot read ({type(e).__name__}: {e})") from None
    try:
        train_cfg = json.loads((ck / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{ck / CONFIG_FILE}: cannot read the draft config ({e})") from None
    tcfg = load_target_config(cfg.target) if cfg.target else None
    if tcfg is None:
        events.warning("no --target given: vocab and hidden sizes are not checked against the target")

    arch = train_cfg.get("architectures") or [None]
    family = family_for(arch[0]) or guess_family(state)
    config = family.serving_config(train_cfg, state, cfg.dtype)
    tensors = family.serving_tensors(state, cfg.dtype)

    def check(tmp: Path) -> list[str]:
        problems = check_draft_dir(tmp, target_config=tcfg, dtype=cfg.dtype)
        for msg in problems:
            events.warning(msg, checkpoint=str(ck))
        return problems

    try:
        write_draft_dir(out, config, tensors, overwrite=cfg.overwrite, check=check,
                        finish=lambda tmp: write_run_json(tmp, f"export-{family.name}", cfg,
                                                          source_checkpoint=str(ck)))
    except ValueError as e:
        raise ValueError(f"refusing to export {ck}: {e}") from None
    n_params = sum(t.numel() for k, t in tensors.items() if k not in ("d2t", "t2d"))
    summary = {"output": str(out), "checkpoint": str(ck), "dtype": cfg.dtype, "tensors": len(tensors),
               "parameters": n_params, "bytes": (out / MODEL_FILE).stat().st_size,
               "vocab_size": config.get("vocab_size"), "draft_vocab_size": config.get("draft_vocab_size"),
               "aux_layer_ids": family.layer_ids(config),
               "target_checked": tcfg is not None, "ok": True, "exit_code": 0}
    events.emit("export_done", **{k: v for k, v in summary.items() if k not in ("ok", "exit_code")})
    return summary
