"""The serving checkpoint on disk, for every draft family: read, write, check, load.

A serving checkpoint is a directory with `config.json` (its `architectures[0]` names the family, the
name SGLang and vLLM key on) and `model.safetensors` (or a sharded index). The family says which
config fields and tensors it needs (`models.registry`); this module holds what all families share:

- `check_draft_dir`: every problem, in words. SGLang's loader skips tensor names it does not know,
  so a misnamed tensor loads as random weights with no error; the check is the only guard.
- `write_draft_dir`: written into a temp dir beside the output, checked, renamed into place only
  when clean, so a broken export never lands.
- `locate_draft` / `load_draft`: a draft for inference from a serving export, a training checkpoint or
  a run dir (its latest complete checkpoint), with the target's frozen embedding copied in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..fsutil import staged_dir
from ..targets import shipped_draft_dir
from .checkpoints import COMPLETE, resolve_checkpoint
from .registry import family_for, guess_family

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Integer tensors of the vocab mapping (EAGLE3's d2t / t2d, Medusa's token_map); every other tensor is
# a float weight.
MAPPING_TENSORS = ("d2t", "t2d", "token_map")


# ------------------------------------------------------------------------------------------------
# The target's config (only the config: no weights are loaded to check a draft)
# ------------------------------------------------------------------------------------------------
def load_target_config(name: str) -> dict:
    """The target's text config as a dict, from a name `targets.resolve_model` knows or a dir."""
    from ..targets import resolve_model

    resolved = resolve_model(name)
    p = Path(resolved)
    if p.is_dir():
        f = p / CONFIG_FILE
        if not f.exists():
            raise FileNotFoundError(f"{p}: no config.json; not a model directory")
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON: {e}") from None
    else:
        from transformers import AutoConfig

        try:
            d = AutoConfig.from_pretrained(resolved).to_dict()
        except Exception as e:  # noqa: BLE001 - hub / network errors become one clear message
            raise FileNotFoundError(f"cannot load the config of target {name!r}: {type(e).__name__}: {e}") from None
    # Multimodal targets keep the language model's fields in a sub-config.
    for key in ("text_config", "language_config", "llm_config"):
        if isinstance(d.get(key), dict) and "hidden_size" in d[key] and "hidden_size" not in d:
            d = {**d, **d[key]}
    return d


def config_dict(cfg) -> dict | None:
    """A target config (dict or transformers config, multimodal or not) as a plain text-config dict."""
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg
    get = getattr(cfg, "get_text_config", None)
    cfg = get() if callable(get) else cfg
    return cfg.to_dict()


# ------------------------------------------------------------------------------------------------
# Reading the files
# ------------------------------------------------------------------------------------------------
def read_config(path: Path, problems: list[str]) -> dict:
    f = path / CONFIG_FILE
    if not f.exists():
        problems.append("config.json is missing")
        return {}
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        problems.append(f"config.json: not valid JSON ({e})")
        return {}
    if not isinstance(cfg, dict):
        problems.append("config.json: not a JSON object")
        return {}
    return cfg


def read_tensor_index(path: Path, problems: list[str]) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    """name -> (safetensors dtype, shape, file), over model.safetensors or a sharded index."""
    from safetensors import safe_open

    files: list[Path] = []
    index = path / INDEX_FILE
    if (path / MODEL_FILE).exists():
        files = [path / MODEL_FILE]
    elif index.exists():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({path / f for f in wm.values()})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            problems.append(f"{index.name}: unreadable weight map ({e})")
            return {}
    else:
        problems.append(f"{MODEL_FILE} is missing")
        return {}
    out: dict[str, tuple[str, tuple[int, ...], Path]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    out[name] = (sl.get_dtype(), tuple(sl.get_shape()), f)
        except Exception as e:  # noqa: BLE001 - a torn file is a problem to report, not a crash
            problems.append(f"{f.name}: cannot read ({type(e).__name__}: {e})")
    return out


def load_tensor(name: str, where: Path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(where), framework="pt") as st:
        return st.get_tensor(name)


# ------------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------------
def _check_dtypes(cfg: dict, tensors: dict, dtype: str | None, problems: list[str]) -> None:
    want = SAFETENSORS_DTYPES.get(dtype or "") or SAFETENSORS_DTYPES.get(
        str(cfg.get("torch_dtype") or cfg.get("dtype") or ""))
    floats = {n: t[0] for n, t in tensors.items() if n not in MAPPING_TENSORS}
    if want:
        for n, dt in sorted(floats.items()):
            if dt != want:
                problems.append(f"tensor {n!r} is {dt}, expected {want} ({dtype or 'config.json torch_dtype'})")
    elif len(set(floats.values())) > 1:
        problems.append(f"float tensors mix dtypes: {sorted(set(floats.values()))}")
    for n, dt in sorted(floats.items()):
        if dt not in ("BF16", "F16", "F32"):
            problems.append(f"tensor {n!r} is {dt}, expected a float dtype")
    if "d2t" in tensors and tensors["d2t"][0] != "I64":
        problems.append(f"tensor 'd2t' is {tensors['d2t'][0]}, expected I64 (int64 offsets)")
    if "t2d" in tensors and tensors["t2d"][0] != "BOOL":
        problems.append(f"tensor 't2d' is {tensors['t2d'][0]}, expected BOOL (a mask over the target vocab)")


def _check_vocab_mapping(cfg: dict, tensors: dict, problems: list[str]) -> None:
    """d2t (draft index -> target id offset) and t2d (mask over the target vocab) must describe the
    same ascending set of target ids."""
    if "d2t" not in tensors or "t2d" not in tensors or any("d2t" in s or "t2d" in s for s in problems):
        return
    d2t = load_tensor("d2t", tensors["d2t"][2]).long()
    t2d = load_tensor("t2d", tensors["t2d"][2]).bool()
    Vd = cfg.get("draft_vocab_size") if isinstance(cfg.get("draft_vocab_size"), int) else None
    marked = int(t2d.sum())
    if Vd and marked != Vd:
        problems.append(f"t2d marks {marked} target ids, expected draft_vocab_size {Vd}")
    target_ids = torch.arange(d2t.numel()) + d2t
    if (target_ids < 0).any() or (target_ids >= t2d.numel()).any():
        problems.append(f"d2t maps draft ids outside the target vocabulary [0, {t2d.numel()})")
    elif not bool((target_ids[1:] > target_ids[:-1]).all()):
        problems.append("d2t: the target ids d2t[i] + i are not strictly ascending")
    elif marked == d2t.numel() and not torch.equal(torch.nonzero(t2d).flatten(), target_ids):
        diff = (torch.nonzero(t2d).flatten() != target_ids).nonzero().flatten()
        problems.append(f"d2t and t2d disagree: {diff.numel()} draft ids map to target ids that t2d does not "
                        f"mark (first at draft id {int(diff[0])})")


def check_draft_dir(path, target_config=None, target_vocab: int | None = None,
                    dtype: str | None = None) -> list[str]:
    """Every problem with the serving checkpoint at `path`, in words; [] when it is fine.

    target_config: the target's config (dict or PretrainedConfig) to check sizes against.
    target_vocab:  the target's vocab size (overrides the one in target_config).
    dtype:         expected float dtype ("bfloat16", ...); default: whatever config.json says, else
                   only that all float tensors share one dtype."""
    p = Path(path)
    if not p.is_dir():
        return [f"{p}: not a directory"]
    problems: list[str] = []
    cfg = read_config(p, problems)
    tensors = read_tensor_index(p, problems)
    tcfg = dict(config_dict(target_config) or {})
    if target_vocab:
        tcfg["vocab_size"] = target_vocab
    arch = cfg.get("architectures") if cfg else None
    family = family_for(arch[0]) if isinstance(arch, list) and arch and isinstance(arch[0], str) else None
    if family is None:
        # An unknown name is one problem; the files are still checked against the family they look like,
        # so a user learns everything else that is wrong in the same run.
        family = guess_family(tensors)
        if cfg:
            problems.append(f"config.json: architectures is {arch!r}, expected [{family.architecture!r}] "
                            f"(SGLang and vLLM pick the draft class by this name)")
    problems += family.check_serving(cfg, tensors, tcfg or None)
    _check_dtypes(cfg, tensors, dtype, problems)
    _check_vocab_mapping(cfg, tensors, problems)
    return problems


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def write_draft_dir(out: Path, config: dict, tensors: dict[str, torch.Tensor], *, overwrite: bool,
                    check: Callable[[Path], list[str]], finish: Callable[[Path], None] | None = None) -> None:
    """Write config.json + model.safetensors into `out` atomically; `check(tmp_dir)` returning problems
    refuses the result (ValueError listing them) and leaves nothing behind. `finish(tmp_dir)` adds
    files (e.g. run.json) before the rename."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists; pass --overwrite to replace it, or choose another --output")
    with staged_dir(out) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        problems = check(tmp)
        if problems:
            raise ValueError(f"the serving checkpoint would be broken ({len(problems)} "
                             f"problem{'s' if len(problems) != 1 else ''}):\n  - " + "\n  - ".join(problems))
        if finish is not None:
            finish(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------------------
# Loading a draft for inference
# ------------------------------------------------------------------------------------------------
@dataclass
class DraftSource:
    kind: str            # "serving" or "checkpoint"
    path: Path           # the directory holding config.json + model.safetensors
    config: dict


def locate_draft(path) -> DraftSource:
    """Find the draft's files under `path` (serving dir, checkpoint dir or run dir, or `default`: the
    draft shipped for the embedded default target); clear errors."""
    p = shipped_draft_dir(str(path)) or Path(path)
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


def _family_of(cfg: dict, where: Path):
    from .registry import known_architectures

    arch = cfg.get("architectures")
    if not arch:
        raise ValueError(f"{where / CONFIG_FILE}: field 'architectures' is missing (expected one of "
                         f"{known_architectures()})")
    family = family_for(arch[0])
    if family is None:
        raise ValueError(f"{where / CONFIG_FILE}: unknown draft architecture {arch[0]!r}; known draft "
                         f"architectures: {known_architectures()}")
    return family


def draft_layer_ids(path) -> list[int] | None:
    """The target layers the draft was trained on (None when its config does not say)."""
    src = locate_draft(path)
    return _family_of(src.config, src.path).layer_ids(src.config)


def load_draft(path, target=None, device="cpu", dtype: torch.dtype | None = None):
    """Build the draft from `path`, load its weights, copy in the target's embedding (when the files do
    not carry one), move it to `device` / `dtype`. Returns (draft, DraftSource).

    target: a `models.target.Target` (its vocab, hidden size and aux layers are checked)."""
    from safetensors.torch import load_file

    src = locate_draft(path)
    family = _family_of(src.config, src.path)
    try:
        draft = family.model(family.config_from_dict(src.config, str(src.path / CONFIG_FILE)))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{src.path / CONFIG_FILE}: {e}") from None
    try:
        state = load_file(str(src.path / MODEL_FILE))
    except Exception as e:  # noqa: BLE001 - a torn file is one message naming it
        raise ValueError(f"{src.path / MODEL_FILE}: cannot read ({type(e).__name__}: {e})") from None
    state = family.state_from_serving(state, src.config)
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
    if "embed_tokens.weight" not in state and hasattr(draft, "load_embedding"):
        if target is None:
            raise ValueError(f"{src.path}: the draft has no embedding of its own; give the target to copy it from")
        draft.load_embedding(target.embedding_weight().detach().float().cpu())
    if target is not None:
        check_fits_target(draft, src, family, target)
    draft.to(device=device, dtype=dtype or torch.float32)
    draft.eval()
    return draft, src


def check_fits_target(draft, src: DraftSource, family, target) -> None:
    """The loaded draft reads what this loaded target gives (vocab, hidden size, capture layers)."""
    where = src.path / CONFIG_FILE
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"{where}: vocab_size {draft.vocab_size} does not match the target's {target.vocab_size}")
    if not family.reads_aux:  # the draft reads the target's last hidden state, no captured layers
        if draft.target_hidden_size != target.hidden_size:
            raise ValueError(f"{where}: the draft reads hidden states of size {draft.target_hidden_size}, the "
                             f"target's are {target.hidden_size}")
        return
    ids = family.layer_ids(src.config)
    n_aux = len(ids) if ids else len(target.layer_ids)
    if n_aux * draft.target_hidden_size != len(target.layer_ids) * target.hidden_size:
        raise ValueError(f"{where}: the draft reads {n_aux} x {draft.target_hidden_size} target features, the "
                         f"target gives {len(target.layer_ids)} x {target.hidden_size}")
    if ids and [int(i) for i in ids] != list(target.layer_ids):
        raise ValueError(f"{where}: the draft was trained on target layers {ids}, the target captures "
                         f"{list(target.layer_ids)}; load the target with layer_ids={ids}")


