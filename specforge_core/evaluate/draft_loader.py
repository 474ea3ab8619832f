"""Load an EAGLE3 draft for inference, from a serving export or a training checkpoint / run dir.

Two layouts hold a draft:
  serving export  (training/export.py): `config.json` (transformers-4 style rope fields) +
                  `model.safetensors` (weights in the export dtype, no `embed_tokens.weight`);
  checkpoint      (training/checkpoint.py): `RUN/checkpoints/step_N/` with `config.json` (the draft's
                  LlamaConfig dict), `model.safetensors` and a `COMPLETE` marker; a run dir means its
                  latest complete checkpoint.
Neither carries the (frozen) embedding: it is the target's and is copied in here. The draft's
`eagle_config.eagle_aux_hidden_state_layer_ids` says which target layers it reads, so the target
must be loaded with those layers (`draft_layer_ids` first, then `load_draft`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"


@dataclass
class DraftSource:
    kind: str            # "serving" or "checkpoint"
    path: Path           # the directory holding config.json + model.safetensors
    config: dict


def locate_draft(path) -> DraftSource:
    """Find the draft's files under `path` (serving dir, checkpoint dir or run dir); clear errors."""
    from ..training.checkpoint import COMPLETE, resolve_checkpoint

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such draft directory (a serving export, a checkpoint or a run dir)")
    if p.is_dir() and (p / MODEL_FILE).exists() and (p / CONFIG_FILE).exists() and not (p / COMPLETE).exists():
        kind, d = "serving", p
    else:
        try:
            d = resolve_checkpoint(p)
        except (FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"{p}: not a draft: neither a serving export (config.json + {MODEL_FILE}) "
                                    f"nor a training checkpoint / run dir ({e})") from None
        kind = "checkpoint"
    f = d / CONFIG_FILE
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: cannot read the draft config: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{f}: expected a JSON object")
    return DraftSource(kind, d, cfg)


def draft_layer_ids(path) -> list[int] | None:
    """The target layers the draft was trained on (None when its config does not say)."""
    ids = (locate_draft(path).config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return [int(i) for i in ids] if ids else None


def _llama_config(cfg: dict, where: Path):
    from transformers import LlamaConfig

    d = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version", "torch_dtype", "dtype")}
    # Serving exports carry rope_theta / rope_scaling; transformers 5 wants rope_parameters.
    if "rope_parameters" not in d:
        rp = dict(d.pop("rope_scaling", None) or {"rope_type": "default"})
        rp.setdefault("rope_type", rp.pop("type", "default"))
        rp["rope_theta"] = float(d.pop("rope_theta", 10000.0))
        d["rope_parameters"] = rp
    else:
        d.pop("rope_scaling", None)
        d.pop("rope_theta", None)
    arch = d.get("architectures")
    if not arch:
        raise ValueError(f"{where / CONFIG_FILE}: field 'architectures' is missing (expected "
                         "['LlamaForCausalLMEagle3'])")
    return LlamaConfig(**d)


def load_draft(path, target=None, device="cpu", dtype: torch.dtype | None = None):
    """Build the draft from `path`, load its weights, copy in the target's embedding (when the files do
    not carry one), move it to `device` / `dtype`. Returns (draft, DraftSource).

    target: a `models.target.Target` (its vocab, hidden size and aux layers are checked)."""
    from safetensors.torch import load_file

    from ..models.registry import build_draft

    src = locate_draft(path)
    config = _llama_config(src.config, src.path)
    try:
        draft = build_draft(config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{src.path / CONFIG_FILE}: {e}") from None
    try:
        state = load_file(str(src.path / MODEL_FILE))
    except Exception as e:  # noqa: BLE001 - a torn file is one message naming it
        raise ValueError(f"{src.path / MODEL_FILE}: cannot read ({type(e).__name__}: {e})") from None
    own = draft.state_dict()
    for k, v in state.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{src.path / MODEL_FILE}: tensor {k!r} has shape {list(v.shape)}, the config says "
                             f"{list(own[k].shape)}")
    state = {k: (v.to(own[k].dtype) if k in own and v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = draft.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "embed_tokens.weight"]
    if missing or unexpected:
        raise ValueError(f"{src.path / MODEL_FILE}: does not fit the draft config: missing {missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
    if "embed_tokens.weight" not in state:
        if target is None:
            raise ValueError(f"{src.path}: the draft has no embedding of its own; give the target to copy it from")
        draft.load_embedding(target.embedding_weight().detach().float().cpu())
    if target is not None:
        if draft.vocab_size != target.vocab_size:
            raise ValueError(f"{src.path / CONFIG_FILE}: vocab_size {draft.vocab_size} does not match the target's "
                             f"{target.vocab_size}")
        if 3 * draft.target_hidden_size != len(target.layer_ids) * target.hidden_size:
            raise ValueError(f"{src.path / CONFIG_FILE}: the draft reads 3 x {draft.target_hidden_size} target "
                             f"features, the target gives {len(target.layer_ids)} x {target.hidden_size}")
        ids = (src.config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        if ids and [int(i) for i in ids] != list(target.layer_ids):
            raise ValueError(f"{src.path / CONFIG_FILE}: the draft was trained on target layers {ids}, the target "
                             f"captures {list(target.layer_ids)}; load the target with layer_ids={ids}")
    draft.to(device=device, dtype=dtype or torch.float32)
    draft.eval()
    return draft, src
