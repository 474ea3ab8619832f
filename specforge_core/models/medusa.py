"""The Medusa draft family: K heads over the target's last hidden state; config, module, serving format.

Medusa (Cai et al. 2024, https://arxiv.org/abs/2401.10774; Medusa-1: the base stays frozen) reads only
the target's *last* hidden state after its final norm (HF `last_hidden_state`, the input to the
target's lm_head; no captured aux layers). Head i (0-based) is `num_hidden_layers` residual blocks
`x + SiLU(Linear(x))` followed by its own lm_head over the draft vocabulary. Offsets (docs/
ARCHITECTURE.md, "Medusa"): the target's own lm_head at position t predicts token t+1; head i at
position t predicts token t+2+i, so its teacher is the target's distribution at position t+1+i.

Initialisation (`init_from_target`, as in Medusa): every head's lm_head is the target's lm_head rows of
the draft vocabulary and the residual blocks' Linear weights and biases are zero, so each block is the
identity (SiLU(0) = 0) and every head starts out as the target's own next-token head.

Vocabulary: the same reduced draft vocabulary as EAGLE3 (`d2t` / `t2d` buffers, shared with it through
`family.VocabMappedDraft`); `to_target_ids` maps head outputs back to target ids.

Serving format: vLLM's `MedusaModel` (vLLM <= 0.32; vLLM 0.33 removed Medusa; SGLang has none). Read
from vLLM's `model_executor/models/medusa.py` and `transformers_utils/configs/medusa.py`:
  config.json  architectures ["MedusaModel"], model_type "medusa" (vLLM picks its MedusaConfig and the
               "medusa" method by it), hidden_size, vocab_size (the target's), num_heads,
               num_hidden_layers, truncated_vocab_size, medusa_fc_bias (vLLM defaults it to False, i.e.
               no bias tensors: we write it true and ship the biases). vLLM's MedusaConfig.from_pretrained
               renames *every* key holding "num" and "heads" to num_heads and "num" and "layers" to
               num_hidden_layers, so config.json must hold no other such key (none is written; the
               check refuses one).
  tensors      blocks.{i}.layers.{j}.weight [H, H], blocks.{i}.layers.{j}.bias [H],
               lm_heads.{i}.weight [truncated_vocab_size, H], and, when truncated_vocab_size <
               vocab_size, token_map [truncated_vocab_size] int64.
vLLM's truncated vocabulary is exactly our draft vocabulary: it computes logits over the
truncated_vocab_size rows and scatters them into a full-vocab row of -inf at `token_map` (target ids),
so token_map[i] = i + d2t[i] (ascending, as our d2t is) expresses the d2t mapping with no loss and no
full-vocab lm_head is needed. vLLM asserts that truncated_vocab_size == vocab_size or token_map is
present, and skips tensor names it does not know, so d2t / t2d are not written (the check would call
them unknown); `state_from_serving` rebuilds them from token_map (and vocab_size) on load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from .family import DraftFamily, VocabMappedDraft

ARCHITECTURE = "MedusaModel"
MODEL_TYPE = "medusa"
DEFAULT_NUM_HEADS = 3
DEFAULT_NUM_LAYERS = 1
# The one integer tensor of the serving file (vLLM's name for the draft-vocab -> target-id map).
TOKEN_MAP = "token_map"


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
class MedusaConfig(PretrainedConfig):
    """The draft's config: sizes only (no attention, no RoPE)."""

    model_type = MODEL_TYPE

    def __init__(self, hidden_size: int = 4096, vocab_size: int = 32000, draft_vocab_size: int | None = None,
                 num_heads: int = DEFAULT_NUM_HEADS, num_hidden_layers: int = DEFAULT_NUM_LAYERS,
                 medusa_fc_bias: bool = True, **kwargs):
        self.hidden_size = int(hidden_size)
        self.vocab_size = int(vocab_size)
        self.draft_vocab_size = int(draft_vocab_size or vocab_size)
        self.num_heads = int(num_heads)
        self.num_hidden_layers = int(num_hidden_layers)
        self.medusa_fc_bias = bool(medusa_fc_bias)
        kwargs.setdefault("architectures", [ARCHITECTURE])
        super().__init__(**kwargs)


def _text_config(cfg: PretrainedConfig) -> PretrainedConfig:
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _check_fields(d: dict, where: str) -> None:
    for k in ("hidden_size", "vocab_size", "draft_vocab_size", "num_heads", "num_hidden_layers"):
        v = d.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{where}: field {k!r} must be a positive integer, got {v!r}")
    if d.get("draft_vocab_size") and d.get("vocab_size") and d["draft_vocab_size"] > d["vocab_size"]:
        raise ValueError(f"{where}: draft_vocab_size ({d['draft_vocab_size']}) exceeds vocab_size ({d['vocab_size']})")
    arch = d.get("architectures")
    if arch is not None and (not isinstance(arch, list) or not arch or arch[0] != ARCHITECTURE):
        raise ValueError(f"{where}: field 'architectures' is {arch!r}; a Medusa draft is [{ARCHITECTURE!r}]")


def build_draft_config(target_config: PretrainedConfig, draft_vocab_size: int, layer_ids=None,
                       overrides: dict | None = None, num_heads: int = DEFAULT_NUM_HEADS,
                       num_layers: int = DEFAULT_NUM_LAYERS) -> MedusaConfig:
    """The Medusa config for this target: its hidden size and vocab, K heads of `num_layers` blocks.
    `layer_ids` is ignored (Medusa reads no aux layers); `overrides` (a JSON draft config) may set
    num_heads / num_hidden_layers / medusa_fc_bias."""
    t = _text_config(target_config)
    d: dict[str, Any] = {"architectures": [ARCHITECTURE], "hidden_size": int(t.hidden_size),
                         "vocab_size": int(t.vocab_size), "draft_vocab_size": int(draft_vocab_size),
                         "num_heads": int(num_heads), "num_hidden_layers": int(num_layers), "medusa_fc_bias": True}
    if overrides:
        if not isinstance(overrides, dict):
            raise ValueError(f"draft config overrides must be a JSON object, got {type(overrides).__name__}")
        for k in ("hidden_size", "vocab_size"):
            if k in overrides and overrides[k] != d[k]:
                raise ValueError(f"draft config overrides: {k} {overrides[k]!r} differs from the target's {d[k]}: "
                                 "Medusa heads read the target's last hidden state and map into its vocabulary")
        if overrides.get("draft_vocab_size") not in (None, draft_vocab_size):
            raise ValueError(f"draft config overrides: draft_vocab_size {overrides['draft_vocab_size']!r} differs "
                             f"from the data's draft vocabulary ({draft_vocab_size}); set --draft-vocab-size instead")
        d.update({k: v for k, v in overrides.items() if k in ("num_heads", "num_hidden_layers", "medusa_fc_bias",
                                                            "architectures")})
    _check_fields(d, "draft config")
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(t, k, None) is not None:
            d[k] = getattr(t, k)
    return MedusaConfig(**d)


def config_from_dict(cfg: dict, where: str = "config.json") -> MedusaConfig:
    """A config.json (serving export: truncated_vocab_size; or checkpoint: draft_vocab_size) -> MedusaConfig."""
    d = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version", "torch_dtype", "dtype")}
    if not d.get("architectures"):
        raise ValueError(f"{where}: field 'architectures' is missing (expected [{ARCHITECTURE!r}])")
    trunc = d.pop("truncated_vocab_size", None)
    if d.get("draft_vocab_size") is None:
        d["draft_vocab_size"] = trunc or d.get("vocab_size")
    _check_fields(d, where)
    return MedusaConfig(**d)


def layer_ids(cfg: dict) -> None:
    """Medusa reads no captured layers: only the target's last hidden state."""
    return None


# ------------------------------------------------------------------------------------------------
# Module
# ------------------------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """`num_layers` times x <- x + SiLU(Linear(x)); parameter names are vLLM's (`layers.{j}`)."""

    def __init__(self, hidden_size: int, num_layers: int, bias: bool):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(hidden_size, hidden_size, bias=bias) for _ in range(num_layers)])
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = x + self.act(layer(x))                                               # [..., H]
        return x


class MedusaDraft(VocabMappedDraft):
    """K Medusa heads (see the module docstring). Build it with `build_draft(config)`."""

    def __init__(self, config: MedusaConfig):
        super().__init__()
        self.config = config
        H, V = int(config.hidden_size), int(config.vocab_size)
        Vd = int(getattr(config, "draft_vocab_size", None) or V)
        self.hidden_size = self.target_hidden_size = H   # the heads read the target's own hidden state
        self.num_heads = int(config.num_heads)
        self.num_layers = int(config.num_hidden_layers)
        bias = bool(getattr(config, "medusa_fc_bias", True))
        self.blocks = nn.ModuleList([ResidualBlock(H, self.num_layers, bias) for _ in range(self.num_heads)])
        self.lm_heads = nn.ModuleList([nn.Linear(H, Vd, bias=False) for _ in range(self.num_heads)])  # H -> Vd
        self._init_vocab_buffers(V, Vd)  # d2t / t2d: identity until set_vocab_mapping
        self._init_weights()

    def _init_weights(self) -> None:
        # Zero blocks are the identity; lm_heads random until init_from_target copies the target's in.
        std = getattr(self.config, "initializer_range", 0.02)
        for block in self.blocks:
            for lin in block.layers:
                nn.init.zeros_(lin.weight)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        for head in self.lm_heads:
            nn.init.normal_(head.weight, mean=0.0, std=std)

    def init_from_target(self, lm_head_weight: Tensor, t2d: Tensor | None = None) -> None:
        """Every head's lm_head <- the target's lm_head rows [V, H] of the draft vocabulary (t2d, default
        this draft's), blocks zeroed: each head starts as the target's next-token head."""
        t2d = (self.t2d if t2d is None else torch.as_tensor(t2d)).bool().to(lm_head_weight.device)
        if tuple(lm_head_weight.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"target lm_head has shape {tuple(lm_head_weight.shape)}, the Medusa heads need "
                             f"{(self.vocab_size, self.hidden_size)} [vocab_size, hidden_size]")
        rows = lm_head_weight[t2d]                                                   # [Vd, H], ascending ids
        if rows.shape[0] != self.draft_vocab_size:
            raise ValueError(f"t2d marks {rows.shape[0]} target ids, expected {self.draft_vocab_size}")
        with torch.no_grad():
            for head in self.lm_heads:
                head.weight.copy_(rows.to(head.weight))
            for block in self.blocks:
                for lin in block.layers:
                    lin.weight.zero_()
                    if lin.bias is not None:
                        lin.bias.zero_()

    def head_logits(self, hidden: Tensor, i: int) -> Tensor:
        """hidden [B,T,H] -> head i's logits over the draft vocab [B,T,Vd] (predicting token t+2+i)."""
        x = hidden.to(self.lm_heads[i].weight.dtype)
        return self.lm_heads[i](self.blocks[i](x))                                   # [B,T,Vd]

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [B,T,H]: the target's last hidden state after its final norm -> logits [K,B,T,Vd]."""
        return torch.stack([self.head_logits(hidden, i) for i in range(self.num_heads)], dim=0)


# ------------------------------------------------------------------------------------------------
# Serving format (vLLM <= 0.32's MedusaModel; see the module docstring)
# ------------------------------------------------------------------------------------------------
_EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Keys vLLM's MedusaConfig understands (plus what a config.json always carries); nothing else is written.
_SERVING_KEYS = ("architectures", "model_type", "hidden_size", "vocab_size", "truncated_vocab_size",
                 "draft_vocab_size", "num_heads", "num_hidden_layers", "medusa_fc_bias", "torch_dtype", "dtype",
                 "bos_token_id", "eos_token_id", "pad_token_id")


def tensor_names(num_heads: int, num_layers: int, bias: bool, truncated: bool) -> list[str]:
    """The serving tensor names for this shape, in a stable order."""
    names = []
    for i in range(num_heads):
        for j in range(num_layers):
            names.append(f"blocks.{i}.layers.{j}.weight")
            if bias:
                names.append(f"blocks.{i}.layers.{j}.bias")
        names.append(f"lm_heads.{i}.weight")
    if truncated:
        names.append(TOKEN_MAP)
    return names


def serving_config(train_config: dict, state: dict[str, Tensor], dtype: str) -> dict:
    """vLLM's Medusa config.json from the checkpoint's draft config (sizes filled from the tensors)."""
    c = {k: v for k, v in dict(train_config).items() if k in _SERVING_KEYS}
    c["architectures"] = [ARCHITECTURE]
    c["model_type"] = MODEL_TYPE
    c["torch_dtype"] = dtype
    c["dtype"] = dtype
    if "lm_heads.0.weight" in state:
        c.setdefault("draft_vocab_size", int(state["lm_heads.0.weight"].shape[0]))
        c.setdefault("hidden_size", int(state["lm_heads.0.weight"].shape[1]))
    if "t2d" in state:
        c.setdefault("vocab_size", int(state["t2d"].shape[0]))
    c.setdefault("num_heads", len({k.split(".")[1] for k in state if k.startswith("lm_heads.")}))
    c.setdefault("medusa_fc_bias", any(k.endswith(".bias") for k in state if k.startswith("blocks.")))
    c["truncated_vocab_size"] = int(c.get("draft_vocab_size") or c.get("vocab_size"))
    return c


def serving_tensors(state: dict[str, Tensor], dtype: str) -> dict[str, Tensor]:
    """blocks.* and lm_heads.* in `dtype`; d2t -> vLLM's token_map (target ids, int64) when the draft
    vocabulary is smaller than the target's; t2d is implied by token_map and dropped."""
    want = _EXPORT_DTYPES[dtype]
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if k in ("d2t", "t2d"):
            continue
        out[k] = v.to(want).contiguous() if v.is_floating_point() else v.contiguous()
    if "d2t" in state:
        d2t = state["d2t"].to(torch.int64)
        V = int(state["t2d"].shape[0]) if "t2d" in state else None
        if V is None or d2t.numel() < V:
            out[TOKEN_MAP] = (torch.arange(d2t.numel(), dtype=torch.int64) + d2t).contiguous()
    return out


def state_from_serving(state: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """Serving tensors -> the module's state dict: token_map becomes d2t / t2d again. Without a
    token_map the draft vocabulary is the whole target vocabulary: identity d2t, all-true t2d."""
    out = {k: v for k, v in state.items() if k != TOKEN_MAP}
    V = int(config.get("vocab_size") or 0)
    if "d2t" in state or not V:
        return out
    tm = state[TOKEN_MAP].to(torch.int64) if TOKEN_MAP in state else torch.arange(V, dtype=torch.int64)
    out["d2t"] = tm - torch.arange(tm.numel(), dtype=torch.int64)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[tm.clamp(0, V - 1)] = True
    out["t2d"] = t2d
    return out


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


def check_serving(cfg: dict, tensors: dict, tcfg: dict | None) -> list[str]:
    """Config fields, fit to the target, tensor names, shapes and token_map of a Medusa serving checkpoint
    (float dtypes are checked by `models.serving` for every family)."""
    problems: list[str] = []
    if cfg:
        if cfg.get("model_type") != MODEL_TYPE:
            problems.append(f"config.json: model_type is {cfg.get('model_type')!r}, expected {MODEL_TYPE!r} "
                            "(vLLM picks its Medusa config and proposer by it)")
        clobber = [k for k in cfg if "num" in k and ("heads" in k or "layers" in k)
                   and k not in ("num_heads", "num_hidden_layers")]
        if clobber:
            problems.append(f"config.json: keys {clobber}: vLLM's MedusaConfig renames every key with 'num' and "
                            "'heads' / 'layers' to num_heads / num_hidden_layers, so they would overwrite them")
    K = _int_field(cfg, "num_heads", problems) if cfg else None
    L = _int_field(cfg, "num_hidden_layers", problems) if cfg else None
    H = _int_field(cfg, "hidden_size", problems) if cfg else None
    V = _int_field(cfg, "vocab_size", problems) if cfg else None
    Vt = _int_field(cfg, "truncated_vocab_size", problems, required=False) if cfg else None
    Vd = _int_field(cfg, "draft_vocab_size", problems, required=False) if cfg else None
    if Vt and Vd and Vt != Vd:
        problems.append(f"config.json: truncated_vocab_size {Vt} differs from draft_vocab_size {Vd}")
    Vt = Vt or Vd or V
    if V and Vt and Vt > V:
        problems.append(f"config.json: truncated_vocab_size {Vt} exceeds vocab_size {V}")
    bias = cfg.get("medusa_fc_bias", False) if cfg else False
    if not isinstance(bias, bool):
        problems.append(f"config.json: medusa_fc_bias must be true or false, got {bias!r}")
        bias = bool(bias)

    # -- target fit ---------------------------------------------------------------------------------
    t_vocab = tcfg.get("vocab_size") if tcfg else None
    t_hidden = tcfg.get("hidden_size") if tcfg else None
    if t_vocab and V and V != t_vocab:
        problems.append(f"config.json: vocab_size {V} does not match the target's vocab size {t_vocab} "
                        "(token_map and the heads map into the target's vocabulary)")
    if t_hidden and H and H != t_hidden:
        problems.append(f"config.json: hidden_size {H} does not match the target's hidden_size {t_hidden} "
                        "(the heads read the target's last hidden state)")

    # -- tensor names and shapes --------------------------------------------------------------------
    if not (K and L and H and V and Vt):
        return problems
    truncated = Vt < V
    want = tensor_names(K, L, bias, truncated)
    if tensors:
        for name in want:
            if name not in tensors:
                problems.append(f"tensor {name!r} is missing (vLLM would use random weights for it)")
        for name in sorted(tensors):
            if name not in want:
                why = ""
                if name.startswith(("blocks.", "lm_heads.")):
                    why = f" (config.json says num_heads {K}, num_hidden_layers {L}, medusa_fc_bias {bias})"
                elif name == TOKEN_MAP:
                    why = f" (truncated_vocab_size {Vt} == vocab_size {V}: vLLM ignores it)"
                problems.append(f"unknown tensor {name!r}: vLLM ignores names it does not know, so this weight "
                                f"would not be loaded{why}")
    for name in want:
        if name not in tensors:
            continue
        if name.endswith(".weight") and name.startswith("blocks."):
            shape = (H, H)
        elif name.endswith(".bias"):
            shape = (H,)
        elif name.startswith("lm_heads."):
            shape = (Vt, H)
        else:
            shape = (Vt,)
        if tuple(tensors[name][1]) != shape:
            problems.append(f"tensor {name!r} has shape {list(tensors[name][1])}, expected {list(shape)} "
                            "from config.json")
    if truncated and TOKEN_MAP in tensors and not any(TOKEN_MAP in p for p in problems):
        dt, _, where = tensors[TOKEN_MAP]
        if dt not in ("I64", "I32"):
            problems.append(f"tensor {TOKEN_MAP!r} is {dt}, expected I64 (target token ids)")
        else:
            from .serving import load_tensor

            tm = load_tensor(TOKEN_MAP, where).long()
            if (tm < 0).any() or (tm >= V).any():
                problems.append(f"tensor {TOKEN_MAP!r} holds ids outside the target vocabulary [0, {V})")
            elif not bool((tm[1:] > tm[:-1]).all()):
                problems.append(f"tensor {TOKEN_MAP!r}: the target ids are not strictly ascending (distinct)")
    return problems


FAMILY = DraftFamily(
    name="medusa",
    architecture=ARCHITECTURE,
    model=MedusaDraft,
    build_config=build_draft_config,
    config_from_dict=config_from_dict,
    serving_config=serving_config,
    serving_tensors=serving_tensors,
    check_serving=check_serving,
    layer_ids=layer_ids,
    # Names depend on num_heads / num_hidden_layers; `check_serving` lists them. These are the names
    # every Medusa file has, so `guess_family` recognises one under a wrong architecture name.
    required_tensors=("blocks.0.layers.0.weight", "lm_heads.0.weight"),
    state_from_serving=state_from_serving,
    reads_aux=False,
)
