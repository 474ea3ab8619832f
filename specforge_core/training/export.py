"""Export a training checkpoint as the serving checkpoint SGLang / vLLM load, and check one.

The serving layout (see DESIGN.md, "Serving checkpoint"): a directory with `config.json` (a Llama
config, `architectures: ["LlamaForCausalLMEagle3"]`, `num_hidden_layers: 1`, the target's
`vocab_size`, `draft_vocab_size`, `target_hidden_size` when it differs from `hidden_size`,
`eagle_config.eagle_aux_hidden_state_layer_ids`) and `model.safetensors` with exactly the
`midlayer.*`, `fc`, `norm`, `lm_head`, `d2t`, `t2d` tensors.

SGLang's loader skips tensor names it does not know, so a misnamed tensor loads as random weights
with no error. `check_draft_dir` therefore verifies names, shapes, dtypes and the vocab mapping
itself and lists every problem in words; `export_draft` refuses to leave an output behind that
fails it (written into a temp dir beside the output, renamed into place only when clean).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..config import write_run_json
from ..events import Events
from .config import CheckDraftConfig, ExportConfig

ARCHITECTURE = "LlamaForCausalLMEagle3"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Tensors SGLang / vLLM's LlamaForCausalLMEagle3 load, by serving name.
REQUIRED_TENSORS = (
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
    "midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight", "midlayer.post_attention_layernorm.weight",
    "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
)
# Known to both servers but not required: when absent they share the target's embedding.
OPTIONAL_TENSORS = ("embed_tokens.weight",)
# Export drops these: the embedding is the target's, frozen (vocab x H of dead weight otherwise).
EXPORT_DROP = ("embed_tokens.weight",)

_SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# transformers' runtime fields that mean nothing to a server reading config.json.
_CONFIG_JUNK = ("id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
                "output_attentions", "output_hidden_states", "return_dict", "_name_or_path", "use_cache",
                "transformers_version")


# ------------------------------------------------------------------------------------------------
# Reading a target's config (only the config: no weights are loaded to check a draft)
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


def _as_dict(cfg) -> dict | None:
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg
    get = getattr(cfg, "get_text_config", None)
    cfg = get() if callable(get) else cfg
    return cfg.to_dict()


# ------------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------------
def _int_field(cfg: dict, key: str, problems: list[str], required: bool = True) -> int | None:
    v = cfg.get(key)
    if v is None:
        if required:
            problems.append(f"config.json: field {key!r} is missing")
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        problems.append(f"config.json: field {key!r} must be a positive integer, got {v!r}")
        return None
    return v


def _read_tensor_index(path: Path, problems: list[str]) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    """name -> (safetensors dtype, shape, file), over model.safetensors or a sharded index."""
    from safetensors import safe_open

    files: list[Path] = []
    index = path / "model.safetensors.index.json"
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


def _load_tensor(name: str, where: Path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(where), framework="pt") as st:
        return st.get_tensor(name)


def check_draft_dir(path, target_config=None, target_vocab: int | None = None,
                    dtype: str | None = None) -> list[str]:
    """Every problem with the serving checkpoint at `path`, in words; [] when it is fine.

    target_config: the target's config (dict or PretrainedConfig) to check sizes against.
    target_vocab:  the target's vocab size (overrides the one in target_config).
    dtype:         expected float dtype ("bfloat16", ...); default: whatever config.json says, else
                   only that all float tensors share one dtype."""
    p = Path(path)
    problems: list[str] = []
    if not p.is_dir():
        return [f"{p}: not a directory"]
    cfg_file = p / CONFIG_FILE
    cfg: dict[str, Any] = {}
    if not cfg_file.exists():
        problems.append("config.json is missing")
    else:
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            if not isinstance(cfg, dict):
                problems.append("config.json: not a JSON object")
                cfg = {}
        except json.JSONDecodeError as e:
            problems.append(f"config.json: not valid JSON ({e})")
    tensors = _read_tensor_index(p, problems)

    # -- config fields ------------------------------------------------------------------------------
    if cfg:
        arch = cfg.get("architectures")
        if arch != [ARCHITECTURE]:
            problems.append(f"config.json: architectures is {arch!r}, expected [{ARCHITECTURE!r}] "
                            "(SGLang and vLLM pick the EAGLE3 draft class by this name)")
        if cfg.get("num_hidden_layers") != 1:
            problems.append(f"config.json: num_hidden_layers is {cfg.get('num_hidden_layers')!r}, expected 1")
    H = _int_field(cfg, "hidden_size", problems) if cfg else None
    heads = _int_field(cfg, "num_attention_heads", problems) if cfg else None
    kv = _int_field(cfg, "num_key_value_heads", problems, required=False) if cfg else None
    kv = kv or heads
    head_dim = _int_field(cfg, "head_dim", problems, required=False) if cfg else None
    if head_dim is None and H and heads:
        head_dim = H // heads
    inter = _int_field(cfg, "intermediate_size", problems) if cfg else None
    V = _int_field(cfg, "vocab_size", problems) if cfg else None
    Vd = _int_field(cfg, "draft_vocab_size", problems) if cfg else None
    H_t = _int_field(cfg, "target_hidden_size", problems, required=False) if cfg else None
    H_t = H_t or H
    if V and Vd and Vd > V:
        problems.append(f"config.json: draft_vocab_size {Vd} exceeds vocab_size {V}")
    eagle = cfg.get("eagle_config") if cfg else None
    layer_ids = None
    if eagle is not None:
        layer_ids = eagle.get("eagle_aux_hidden_state_layer_ids") if isinstance(eagle, dict) else None
        if layer_ids is not None and (not isinstance(layer_ids, list) or len(layer_ids) != 3 or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layer_ids)):
            problems.append(f"config.json: eagle_config.eagle_aux_hidden_state_layer_ids must be 3 non-negative "
                            f"integers, got {layer_ids!r}")
            layer_ids = None
    rp = cfg.get("rope_parameters") if cfg else None
    if isinstance(rp, dict) and cfg.get("rope_theta") is not None and rp.get("rope_theta") is not None \
            and float(rp["rope_theta"]) != float(cfg["rope_theta"]):
        problems.append(f"config.json: rope_theta {cfg['rope_theta']} disagrees with rope_parameters.rope_theta "
                        f"{rp['rope_theta']}")

    # -- target fit ---------------------------------------------------------------------------------
    tcfg = _as_dict(target_config)
    t_vocab = target_vocab or (tcfg.get("vocab_size") if tcfg else None)
    t_hidden = tcfg.get("hidden_size") if tcfg else None
    t_layers = tcfg.get("num_hidden_layers") if tcfg else None
    if t_vocab and V and V != t_vocab:
        problems.append(f"config.json: vocab_size {V} does not match the target's vocab size {t_vocab} "
                        "(d2t/t2d map into the target's vocabulary)")
    if t_hidden and H_t and H_t != t_hidden:
        what = "target_hidden_size" if cfg.get("target_hidden_size") else "hidden_size (no target_hidden_size)"
        problems.append(f"config.json: {what} is {H_t}, but the target's hidden_size is {t_hidden}")
    if t_layers and layer_ids:
        bad = [i for i in layer_ids if i >= t_layers]
        if bad:
            problems.append(f"config.json: aux layer ids {bad} do not exist in the target ({t_layers} layers)")

    # -- tensor names -------------------------------------------------------------------------------
    if tensors:
        for name in REQUIRED_TENSORS:
            if name not in tensors:
                problems.append(f"tensor {name!r} is missing (the server would use random weights for it)")
        for name in sorted(tensors):
            if name not in REQUIRED_TENSORS and name not in OPTIONAL_TENSORS:
                problems.append(f"unknown tensor {name!r}: SGLang ignores names it does not know, so this "
                                "weight would not be loaded")

    # -- shapes -------------------------------------------------------------------------------------
    expected: dict[str, tuple[int, ...] | None] = {}
    if H and heads and head_dim and kv:
        expected.update({
            "midlayer.self_attn.q_proj.weight": (heads * head_dim, 2 * H),
            "midlayer.self_attn.k_proj.weight": (kv * head_dim, 2 * H),
            "midlayer.self_attn.v_proj.weight": (kv * head_dim, 2 * H),
            "midlayer.self_attn.o_proj.weight": (H, heads * head_dim),
        })
    if H and inter:
        expected.update({
            "midlayer.mlp.gate_proj.weight": (inter, H),
            "midlayer.mlp.up_proj.weight": (inter, H),
            "midlayer.mlp.down_proj.weight": (H, inter),
        })
    if H:
        for n in ("midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight",
                  "midlayer.post_attention_layernorm.weight", "norm.weight"):
            expected[n] = (H,)
        if H_t:
            expected["fc.weight"] = (H, 3 * H_t)
        if Vd:
            expected["lm_head.weight"] = (Vd, H)
        if V:
            expected["embed_tokens.weight"] = (V, H)
    if Vd:
        expected["d2t"] = (Vd,)
    if V:
        expected["t2d"] = (V,)
    for name, shape in expected.items():
        if name in tensors and shape is not None and tensors[name][1] != shape:
            problems.append(f"tensor {name!r} has shape {list(tensors[name][1])}, expected {list(shape)} "
                            f"from config.json")
    if t_hidden and "fc.weight" in tensors and len(tensors["fc.weight"][1]) == 2 \
            and tensors["fc.weight"][1][1] != 3 * t_hidden:
        problems.append(f"tensor 'fc.weight' reads {tensors['fc.weight'][1][1]} inputs, but the target gives "
                        f"3 * {t_hidden} = {3 * t_hidden}")

    # -- dtypes -------------------------------------------------------------------------------------
    want = _SAFETENSORS_DTYPES.get(dtype or "") or _SAFETENSORS_DTYPES.get(
        str(cfg.get("torch_dtype") or cfg.get("dtype") or ""))
    floats = {n: t[0] for n, t in tensors.items() if n not in ("d2t", "t2d")}
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

    # -- the vocab mapping --------------------------------------------------------------------------
    if "d2t" in tensors and "t2d" in tensors and not any("d2t" in s or "t2d" in s for s in problems):
        d2t = _load_tensor("d2t", tensors["d2t"][2]).long()
        t2d = _load_tensor("t2d", tensors["t2d"][2]).bool()
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
    return problems


def check_draft(cfg: CheckDraftConfig, events: Events) -> dict:
    """The `check-draft` job: every problem in words; exit code 1 when there is any."""
    tcfg = load_target_config(cfg.target) if cfg.target else None
    problems = check_draft_dir(cfg.path, target_config=tcfg)
    for msg in problems:
        events.warning(msg, path=str(cfg.path))
    summary: dict[str, Any] = {"path": str(cfg.path), "ok": not problems, "problems": problems,
                               "exit_code": 0 if not problems else 1, "target_checked": bool(cfg.target)}
    try:
        c = json.loads((Path(cfg.path) / CONFIG_FILE).read_text(encoding="utf-8"))
        summary.update({k: c.get(k) for k in ("hidden_size", "vocab_size", "draft_vocab_size")})
        summary["aux_layer_ids"] = (c.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    events.emit("check_draft", ok=summary["ok"], problems=len(problems), path=str(cfg.path))
    return summary


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------
def serving_config(train_config: dict, state: dict[str, torch.Tensor], dtype: str) -> dict:
    """The serving config.json from the checkpoint's draft config, filling what the tensors imply."""
    c = {k: v for k, v in dict(train_config).items() if k not in _CONFIG_JUNK}
    c["architectures"] = [ARCHITECTURE]
    c["model_type"] = "llama"
    c["num_hidden_layers"] = 1
    c["torch_dtype"] = dtype
    c["dtype"] = dtype
    if "lm_head.weight" in state and not c.get("draft_vocab_size"):
        c["draft_vocab_size"] = int(state["lm_head.weight"].shape[0])
    if "t2d" in state and not c.get("vocab_size"):
        c["vocab_size"] = int(state["t2d"].shape[0])
    H = c.get("hidden_size")
    if "fc.weight" in state and H:
        H_t = int(state["fc.weight"].shape[1]) // 3
        if H_t != H:
            c["target_hidden_size"] = H_t
        else:
            c.pop("target_hidden_size", None)
    # transformers 5 keeps RoPE in `rope_parameters`; servers on transformers 4 read rope_theta /
    # rope_scaling and would silently fall back to theta 10000, so both spellings are written.
    rp = c.get("rope_parameters")
    if isinstance(rp, dict):
        if rp.get("rope_theta") is not None:
            c["rope_theta"] = rp["rope_theta"]
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            c["rope_scaling"] = scaling
        else:
            c.setdefault("rope_scaling", None)
    c.setdefault("tie_word_embeddings", False)
    return c


def _serving_tensors(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    want = _TORCH_DTYPES[dtype]
    out = {}
    for k, v in state.items():
        if k in EXPORT_DROP:
            continue
        if k == "d2t":
            out[k] = v.to(torch.int64).contiguous()
        elif k == "t2d":
            out[k] = v.to(torch.bool).contiguous()
        elif v.is_floating_point():
            out[k] = v.to(want).contiguous()
        else:
            out[k] = v.contiguous()  # unknown non-float: passed through so the check names it
    return out


def export_draft(cfg: ExportConfig, events: Events) -> dict:
    """Write `cfg.output` (config.json + model.safetensors) from a checkpoint; refuse a broken result."""
    from safetensors.torch import load_file, save_file

    from .checkpoint import resolve_checkpoint

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

    config = serving_config(train_cfg, state, cfg.dtype)
    tensors = _serving_tensors(state, cfg.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{out.name}_", dir=out.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        problems = check_draft_dir(tmp, target_config=tcfg, dtype=cfg.dtype)
        if problems:
            for msg in problems:
                events.warning(msg, checkpoint=str(ck))
            raise ValueError(f"refusing to export {ck}: the serving checkpoint would be broken "
                             f"({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n  - "
                             + "\n  - ".join(problems))
        write_run_json(tmp, "export-eagle3", cfg, source_checkpoint=str(ck))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old_{out.name}_", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(t.numel() for k, t in tensors.items() if k not in ("d2t", "t2d"))
    summary = {"output": str(out), "checkpoint": str(ck), "dtype": cfg.dtype, "tensors": len(tensors),
               "parameters": n_params, "bytes": (out / MODEL_FILE).stat().st_size,
               "vocab_size": config.get("vocab_size"), "draft_vocab_size": config.get("draft_vocab_size"),
               "aux_layer_ids": (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids"),
               "target_checked": tcfg is not None, "ok": True, "exit_code": 0}
    events.emit("export_done", **{k: v for k, v in summary.items() if k not in ("ok", "exit_code")})
    return summary
