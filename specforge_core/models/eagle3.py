"""The EAGLE3 draft family: its config (derived from the target's), the module, its serving format.

The draft is one Llama decoder layer ("midlayer") whose attention reads `cat(input_layernorm(embed(x)),
hidden_norm(h))` (2H wide), where `h = fc(cat of 3 captured target hidden states)` at the first step
and the draft's own previous (pre-norm) output afterwards. `norm` + `lm_head` give logits over the
reduced draft vocabulary; `d2t` / `t2d` map between draft and target ids.

Parameter names are exactly the serving names SGLang and vLLM load (`midlayer.*`, `fc.weight`,
`norm.weight`, `lm_head.weight`, `d2t`, `t2d`); `embed_tokens.weight` is the target's (frozen) and is
dropped by export.

The module exposes pieces rather than one opaque forward, because the training-time test
(`models/ttt.py`) needs to interleave its own attention between them: `project` (fc), `embed`,
`midlayer.qkv` (norms, projections, RoPE), `midlayer.finish` (o_proj, residual, MLP) and `logits`.
`draft_step` is the incremental API for speculative decoding at inference time.

The serving format (what SGLang's and vLLM's `LlamaForCausalLMEagle3` load; docs/ARCHITECTURE.md,
"Serving formats") is defined here too: `serving_config` / `serving_tensors` write it,
`check_serving` checks it, `config_from_dict` reads it back. `FAMILY` bundles all of this for
`models.registry`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from .family import DraftFamily, VocabMappedDraft

ARCHITECTURE = "LlamaForCausalLMEagle3"
SERVING_ACT = "silu"


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def _text_config(cfg: PretrainedConfig) -> PretrainedConfig:
    # Multimodal targets keep the language model's fields in a sub-config.
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _rope_parameters(cfg: PretrainedConfig) -> dict:
    """The target's RoPE settings as a transformers-5 `rope_parameters` dict (theta included)."""
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and rp:
        out = copy.deepcopy(rp)
    else:
        out = dict(getattr(cfg, "rope_scaling", None) or {})
        out.setdefault("rope_type", out.pop("type", "default"))
    if "rope_theta" not in out:
        out["rope_theta"] = float(getattr(cfg, "rope_theta", 10000.0))
    return out


_POSITIVE_INT_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                        "max_position_embeddings", "vocab_size", "draft_vocab_size", "head_dim",
                        "target_hidden_size")


def _check_draft_fields(d: dict, where: str) -> None:
    for k in _POSITIVE_INT_FIELDS:
        if k in d and d[k] is not None:
            v = d[k]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{where}: field {k!r} must be a positive integer, got {v!r}")
    if d.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"{where}: field 'num_hidden_layers' must be 1 for an EAGLE3 draft, "
                         f"got {d.get('num_hidden_layers')!r}")
    eps = d.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < 1):
        raise ValueError(f"{where}: field 'rms_norm_eps' must be a small positive number, got {eps!r}")
    arch = d.get("architectures")
    if not isinstance(arch, list) or not arch or not isinstance(arch[0], str):
        raise ValueError(f"{where}: field 'architectures' must be a list like [{ARCHITECTURE!r}], got {arch!r}")
    if arch[0] != ARCHITECTURE:
        raise ValueError(f"{where}: field 'architectures' names {arch[0]!r}; an EAGLE3 draft is "
                         f"[{ARCHITECTURE!r}]")
    heads, kv = d["num_attention_heads"], d["num_key_value_heads"]
    if heads % kv:
        raise ValueError(f"{where}: num_attention_heads ({heads}) must be a multiple of "
                         f"num_key_value_heads ({kv})")
    if not d.get("head_dim") and d["hidden_size"] % heads:
        raise ValueError(f"{where}: hidden_size ({d['hidden_size']}) is not divisible by "
                         f"num_attention_heads ({heads}); set head_dim")
    if d["draft_vocab_size"] > d["vocab_size"]:
        raise ValueError(f"{where}: draft_vocab_size ({d['draft_vocab_size']}) exceeds vocab_size "
                         f"({d['vocab_size']})")
    ids = (d.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != 3
                            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        raise ValueError(f"{where}: eagle_config.eagle_aux_hidden_state_layer_ids must be 3 integers, got {ids!r}")
    rp = d.get("rope_parameters")
    if rp is not None and not isinstance(rp, dict):
        raise ValueError(f"{where}: field 'rope_parameters' must be a dict, got {rp!r}")


def override_layer_ids(overrides: dict | None) -> list[int] | None:
    """The capture layers a SpecForge-style draft config names (nested `eagle_config` ids, our meaning:
    outputs of layer i), or None. A top-level `eagle_aux_hidden_state_layer_ids` is vLLM's meaning
    (the state entering layer k = output of k-1), so it is read back one lower."""
    if not isinstance(overrides, dict):
        return None
    nested = (overrides.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") \
        if isinstance(overrides.get("eagle_config"), dict) else None
    if nested is not None:
        return [int(i) for i in nested]
    top = overrides.get("eagle_aux_hidden_state_layer_ids")
    return [int(i) - 1 for i in top] if top is not None else None


def servable_layer_problems(ids: list[int], num_layers: int | None) -> list[str]:
    """Why SGLang / vLLM could not feed the draft these capture layers (outputs of layer i, 0-based).

    SGLang adds 1 and captures the input of layer i+1 in its loop over layers: ids come out in
    ascending order whatever the list says, a repeat is captured once, and i = L-1 (input of layer L)
    is never reached, so fc would get fewer states than it was trained on."""
    ids = [int(i) for i in ids]
    out = []
    if ids != sorted(ids):
        out.append(f"aux layer ids {ids} are not ascending: SGLang and vLLM capture in layer order, so fc "
                   f"would read them as {sorted(set(ids))}; use {sorted(set(ids))}")
    if len(set(ids)) != len(ids):
        out.append(f"aux layer ids {ids} repeat a layer: the servers capture it once, fc would get fewer states")
    if num_layers is not None and (num_layers - 1) in ids:
        out.append(f"aux layer id {num_layers - 1} is the target's last layer: SGLang reads the input of layer "
                   f"i+1 = {num_layers}, which its layer loop never reaches (fc would get "
                   f"{len(ids) - 1} states); use a layer below {num_layers - 1}")
    return out


def build_draft_config(target_config: PretrainedConfig, draft_vocab_size: int, layer_ids: list[int],
                       overrides: dict | None = None) -> LlamaConfig:
    """The draft's Llama config, derived from the target's; `overrides` (a SpecForge-style JSON draft
    config) replaces fields. Unknown keys in `overrides` are kept; a nonsense value raises ValueError."""
    t = _text_config(target_config)
    heads = int(t.num_attention_heads)
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": int(t.hidden_size),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(t, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(t, "head_dim", None) or t.hidden_size // heads),
        "intermediate_size": int(t.intermediate_size),
        # Not the target's: SGLang's and vLLM's LlamaMLP raise for anything but silu (ARCHITECTURE.md).
        "hidden_act": SERVING_ACT,
        "rms_norm_eps": float(getattr(t, "rms_norm_eps", 1e-6)),
        "max_position_embeddings": int(t.max_position_embeddings),
        "rope_parameters": _rope_parameters(t),
        "vocab_size": int(t.vocab_size),
        "draft_vocab_size": int(draft_vocab_size),
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [int(i) for i in layer_ids]},
    }
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(t, k, None) is not None:
            d[k] = getattr(t, k)
    target_hidden = int(t.hidden_size)
    if overrides:
        if not isinstance(overrides, dict):
            raise ValueError(f"draft config overrides must be a JSON object, got {type(overrides).__name__}")
        ov = copy.deepcopy(overrides)
        # SpecForge configs carry transformers-4 style rope fields; fold them into rope_parameters.
        rope = dict(d["rope_parameters"])
        if "rope_parameters" in ov and isinstance(ov["rope_parameters"], dict):
            rope = dict(ov.pop("rope_parameters"))
            rope.setdefault("rope_theta", d["rope_parameters"]["rope_theta"])
        if "rope_scaling" in ov:
            sc = ov.pop("rope_scaling")
            if sc is not None and not isinstance(sc, dict):
                raise ValueError(f"draft config overrides: field 'rope_scaling' must be a dict or null, got {sc!r}")
            theta = rope.get("rope_theta")
            rope = dict(sc or {"rope_type": "default"})
            rope.setdefault("rope_type", rope.pop("type", "default"))
            rope["rope_theta"] = theta
        if "rope_theta" in ov:
            th = ov.pop("rope_theta")
            if isinstance(th, bool) or not isinstance(th, (int, float)) or th <= 0:
                raise ValueError(f"draft config overrides: field 'rope_theta' must be a positive number, got {th!r}")
            rope["rope_theta"] = float(th)
        d["rope_parameters"] = rope
        if "hidden_size" in ov and "head_dim" not in ov and isinstance(ov.get("hidden_size"), int):
            n_heads = ov.get("num_attention_heads", d["num_attention_heads"])
            if isinstance(n_heads, int) and n_heads > 0:
                d["head_dim"] = ov["hidden_size"] // n_heads
        if "num_attention_heads" in ov and "head_dim" not in ov and "hidden_size" not in ov \
                and isinstance(ov["num_attention_heads"], int) and ov["num_attention_heads"] > 0:
            d["head_dim"] = d["hidden_size"] // ov["num_attention_heads"]
        if "vocab_size" in ov and ov["vocab_size"] != d["vocab_size"]:
            raise ValueError(f"draft config overrides: vocab_size {ov['vocab_size']!r} differs from the "
                             f"target's {d['vocab_size']}: the draft's embedding is the target's")
        if "target_hidden_size" in ov and ov["target_hidden_size"] not in (None, target_hidden):
            raise ValueError(f"draft config overrides: target_hidden_size {ov['target_hidden_size']!r} differs "
                             f"from the target's hidden_size {target_hidden}")
        if ov.get("hidden_act", SERVING_ACT) != SERVING_ACT:
            raise ValueError(f"draft config overrides: hidden_act {ov['hidden_act']!r}: SGLang's and vLLM's "
                             f"LlamaMLP refuse every activation but {SERVING_ACT!r}, so the draft could not be served")
        ov_ids = override_layer_ids(ov)
        if ov_ids is not None and ov_ids != [int(i) for i in layer_ids]:
            # One source of truth: the target captures `layer_ids`; a config naming others would train on
            # one set and tell the server to feed another.
            raise ValueError(f"draft config overrides: eagle_aux_hidden_state_layer_ids {ov_ids} differ from the "
                             f"layers the target captures {[int(i) for i in layer_ids]}; pass --aux-layer-ids "
                             f"{' '.join(str(i) for i in ov_ids)} (or drop the ids from the draft config)")
        ov.pop("eagle_aux_hidden_state_layer_ids", None)
        if ov.get("draft_vocab_size") not in (None, draft_vocab_size):
            # The vocab mapping (d2t/t2d) is built from the data for `draft_vocab_size`; a different
            # number in the JSON would give an lm_head that does not fit it.
            raise ValueError(f"draft config overrides: draft_vocab_size {ov['draft_vocab_size']!r} differs from "
                             f"the data's draft vocabulary ({draft_vocab_size}); set --draft-vocab-size instead")
        d.update(ov)
    _check_draft_fields(d, "draft config")
    if d["hidden_size"] != target_hidden:
        d["target_hidden_size"] = target_hidden
    else:
        d.pop("target_hidden_size", None)
    d.pop("model_type", None)
    d.pop("transformers_version", None)
    return LlamaConfig(**d)


# ------------------------------------------------------------------------------------------------
# Module
# ------------------------------------------------------------------------------------------------
class Eagle3Attention(nn.Module):
    """q/k/v read the 2H-wide concatenation; o_proj writes H. Attention itself is done by the caller."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        H = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or H // self.num_heads
        self.q_proj = nn.Linear(2 * H, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * H, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * H, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, H, bias=False)


class Eagle3Midlayer(nn.Module):
    """The draft's single decoder layer, split at the attention so the TTT can supply its own."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        H = config.hidden_size
        self.self_attn = Eagle3Attention(config)
        self.mlp = LlamaMLP(config)
        self.hidden_norm = LlamaRMSNorm(H, eps=config.rms_norm_eps)
        self.input_layernorm = LlamaRMSNorm(H, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(H, eps=config.rms_norm_eps)

    def qkv(self, emb: Tensor, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """emb, h [B,T,H]; cos/sin [B,T,d] -> q [B,nh,T,d], k, v [B,nkv,T,d] (RoPE applied to q, k)."""
        a = self.self_attn
        B, T, _ = h.shape
        x = torch.cat([self.input_layernorm(emb), self.hidden_norm(h)], dim=-1)        # [B,T,2H]
        q = a.q_proj(x).view(B, T, a.num_heads, a.head_dim).transpose(1, 2)             # [B,nh,T,d]
        k = a.k_proj(x).view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)          # [B,nkv,T,d]
        v = a.v_proj(x).view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)          # [B,nkv,T,d]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def finish(self, h: Tensor, attn: Tensor) -> Tensor:
        """h [B,T,H] (the residual), attn [B,nh,T,d] -> the layer's pre-norm output [B,T,H]."""
        B, _, T, _ = attn.shape
        x = h + self.self_attn.o_proj(attn.transpose(1, 2).reshape(B, T, -1))          # [B,T,H]
        return x + self.mlp(self.post_attention_layernorm(x))                            # [B,T,H]


class Eagle3Draft(VocabMappedDraft):
    """The EAGLE3 draft (see the module docstring). Build it with `build_draft(config)`."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        H = config.hidden_size
        H_t = getattr(config, "target_hidden_size", None) or H
        V = config.vocab_size
        Vd = getattr(config, "draft_vocab_size", None) or V
        self.hidden_size, self.target_hidden_size, self.vocab_size, self.draft_vocab_size = H, H_t, V, Vd
        self.embed_tokens = nn.Embedding(V, H)                       # [V_target, H], the target's, frozen
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(3 * H_t, H, bias=False)                  # 3*H_t -> H
        self.midlayer = Eagle3Midlayer(config)
        self.norm = LlamaRMSNorm(H, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(H, Vd, bias=False)                  # H -> draft vocab
        self.rotary_emb = LlamaRotaryEmbedding(config)               # non-persistent buffers only
        self._init_vocab_buffers(V, Vd)  # d2t / t2d: identity until set_vocab_mapping
        self._init_weights()

    def _init_weights(self) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        for m in (self.fc, self.lm_head, self.midlayer.self_attn.q_proj, self.midlayer.self_attn.k_proj,
                  self.midlayer.self_attn.v_proj, self.midlayer.self_attn.o_proj, self.midlayer.mlp.gate_proj,
                  self.midlayer.mlp.up_proj, self.midlayer.mlp.down_proj):
            nn.init.normal_(m.weight, mean=0.0, std=std)

    # -- setup ---------------------------------------------------------------------------------
    def load_embedding(self, weight: Tensor) -> None:
        """Copy the target's input embedding [V_target, H] in (frozen)."""
        if tuple(weight.shape) != tuple(self.embed_tokens.weight.shape):
            raise ValueError(f"target embedding has shape {tuple(weight.shape)}, the draft needs "
                             f"{tuple(self.embed_tokens.weight.shape)} [vocab_size, hidden_size]; a draft whose "
                             "hidden_size differs from the target's cannot share its embedding")
        with torch.no_grad():
            self.embed_tokens.weight.copy_(weight.to(self.embed_tokens.weight.dtype))
        self.embed_tokens.weight.requires_grad_(False)

    # -- pieces --------------------------------------------------------------------------------
    def project(self, aux_hidden: Tensor) -> Tensor:
        """aux [B,T,3*H_t] -> h [B,T,H]."""
        return self.fc(aux_hidden.to(self.fc.weight.dtype))

    def embed(self, input_ids: Tensor) -> Tensor:
        """ids [B,T] -> [B,T,H] (no grad: the embedding is frozen)."""
        return self.embed_tokens(input_ids)

    def rope(self, ref: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """position_ids [B,T] -> cos, sin [B,T,d] in ref's dtype."""
        return self.rotary_emb(ref, position_ids)

    def logits(self, hidden: Tensor) -> Tensor:
        """pre-norm hidden [B,T,H] -> logits over the draft vocab [B,T,Vd]."""
        return self.lm_head(self.norm(hidden))

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def draft_step(self, hidden: Tensor, input_ids: Tensor, position_ids: Tensor,
                   past_kv: tuple[Tensor, Tensor] | None = None, allowed: Tensor | None = None):
        """One incremental draft step for speculative decoding (chains and trees).

        hidden    [B,n,3*H_t] (target states: fc is applied) or [B,n,H] (the draft's own previous output)
        input_ids [B,n] the TARGET ids that follow those states; position_ids [B,n] their positions
        past_kv   (k, v) [B,nkv,S,d] from earlier calls, or None
        allowed   bool [n, S+n]: which keys each new query sees (a tree's ancestors); default: all S
                  cached keys and, causally, each other
        returns   (out_hidden [B,n,H] pre-norm, to feed back; logits [B,n,Vd]; (k, v) [B,nkv,S+n,d], the
                  cache with the n new keys appended: `k[:, :, -n:]` are the new ones)
        """
        h = self.project(hidden) if hidden.shape[-1] != self.hidden_size else hidden
        h = h.to(self.fc.weight.dtype)
        emb = self.embed(input_ids).to(h.dtype)
        cos, sin = self.rope(h, position_ids)
        q, k, v = self.midlayer.qkv(emb, h, cos, sin)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        n, S = q.shape[2], k.shape[2] - q.shape[2]
        if allowed is None:
            allowed = torch.ones(n, S + n, dtype=torch.bool, device=q.device).tril(diagonal=S)
        rep = q.shape[1] // k.shape[1]
        kk, vv = (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)) if rep > 1 else (k, v)
        attn = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed)
        out = self.midlayer.finish(h, attn)
        return out, self.logits(out), (k, v)


# ------------------------------------------------------------------------------------------------
# Serving format (docs/ARCHITECTURE.md, "Serving formats")
# ------------------------------------------------------------------------------------------------
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
# transformers' runtime fields that mean nothing to a server reading config.json.
_CONFIG_JUNK = ("id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
                "output_attentions", "output_hidden_states", "return_dict", "_name_or_path", "use_cache",
                "transformers_version")
_EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def config_from_dict(cfg: dict, where: str = "config.json") -> LlamaConfig:
    """A config.json (serving export: transformers-4 rope fields; or checkpoint: rope_parameters) -> LlamaConfig."""
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
    if not d.get("architectures"):
        raise ValueError(f"{where}: field 'architectures' is missing (expected [{ARCHITECTURE!r}])")
    return LlamaConfig(**d)


def layer_ids(cfg: dict) -> list[int] | None:
    """The target layers (outputs of, 0-based) the draft reads, from its config.json."""
    ids = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return [int(i) for i in ids] if ids else None


def serving_config(train_config: dict, state: dict[str, Tensor], dtype: str) -> dict:
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
    # The two servers read the capture layers from different keys, in different meanings
    # (ARCHITECTURE.md, "Serving formats"): SGLang the nested ids (output of layer i), vLLM the
    # top-level ids first (the state entering layer k = output of k-1). Both are written, each in its
    # reader's meaning, so both feed fc the layers it was trained on.
    ids = layer_ids(c)
    if ids:
        c["eagle_aux_hidden_state_layer_ids"] = vllm_layer_ids(ids)
    return c


def vllm_layer_ids(ids: list[int]) -> list[int]:
    """Our capture ids (output of layer i) in vLLM's meaning (the state entering layer i+1)."""
    return [int(i) + 1 for i in ids]


def serving_tensors(state: dict[str, Tensor], dtype: str) -> dict[str, Tensor]:
    want = _EXPORT_DTYPES[dtype]
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
    """Config fields, fit to the target, tensor names and shapes of an EAGLE3 serving checkpoint
    (dtypes and the d2t/t2d mapping are checked by `models.serving` for every family)."""
    problems: list[str] = []
    # -- config fields ------------------------------------------------------------------------------
    if cfg:
        arch = cfg.get("architectures")
        if arch != [ARCHITECTURE] and isinstance(arch, list) and arch and arch[0] == ARCHITECTURE:
            problems.append(f"config.json: architectures is {arch!r}, expected [{ARCHITECTURE!r}]")
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
    ids = None
    if eagle is not None:
        ids = eagle.get("eagle_aux_hidden_state_layer_ids") if isinstance(eagle, dict) else None
        if ids is not None and (not isinstance(ids, list) or len(ids) != 3 or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
            problems.append(f"config.json: eagle_config.eagle_aux_hidden_state_layer_ids must be 3 non-negative "
                            f"integers, got {ids!r}")
            ids = None
    if ids is not None:
        top = cfg.get("eagle_aux_hidden_state_layer_ids")
        if top is None:
            problems.append(f"config.json: no top-level eagle_aux_hidden_state_layer_ids: vLLM's V1 runner then "
                            f"reads the nested ids {ids} as the states entering those layers and feeds the outputs "
                            f"of layers {[i - 1 for i in ids]} (one lower than trained); write "
                            f"{vllm_layer_ids(ids)} there (re-export)")
        elif top != vllm_layer_ids(ids):
            problems.append(f"config.json: top-level eagle_aux_hidden_state_layer_ids {top} (vLLM reads them as the "
                            f"states entering layer k) do not match the nested ids {ids} (outputs of layer i, "
                            f"what SGLang reads): expected {vllm_layer_ids(ids)}")
        problems += [f"config.json: {p}" for p in servable_layer_problems(ids, None)]
    act = cfg.get("hidden_act", SERVING_ACT) if cfg else SERVING_ACT
    if act != SERVING_ACT:
        problems.append(f"config.json: hidden_act is {act!r}: SGLang's and vLLM's LlamaMLP raise for every "
                        f"activation but {SERVING_ACT!r}")
    rp = cfg.get("rope_parameters") if cfg else None
    if isinstance(rp, dict) and cfg.get("rope_theta") is not None and rp.get("rope_theta") is not None \
            and float(rp["rope_theta"]) != float(cfg["rope_theta"]):
        problems.append(f"config.json: rope_theta {cfg['rope_theta']} disagrees with rope_parameters.rope_theta "
                        f"{rp['rope_theta']}")

    # -- target fit ---------------------------------------------------------------------------------
    t_vocab = tcfg.get("vocab_size") if tcfg else None
    t_hidden = tcfg.get("hidden_size") if tcfg else None
    t_layers = tcfg.get("num_hidden_layers") if tcfg else None
    if t_vocab and V and V != t_vocab:
        problems.append(f"config.json: vocab_size {V} does not match the target's vocab size {t_vocab} "
                        "(d2t/t2d map into the target's vocabulary)")
    if t_hidden and H_t and H_t != t_hidden:
        what = "target_hidden_size" if cfg.get("target_hidden_size") else "hidden_size (no target_hidden_size)"
        problems.append(f"config.json: {what} is {H_t}, but the target's hidden_size is {t_hidden}")
    if t_layers and ids:
        bad = [i for i in ids if i >= t_layers]
        if bad:
            problems.append(f"config.json: aux layer ids {bad} do not exist in the target ({t_layers} layers)")
        elif t_layers - 1 in ids:
            problems += [f"config.json: {p}" for p in servable_layer_problems([t_layers - 1], t_layers)]

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
    expected: dict[str, tuple[int, ...]] = {}
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
        if name in tensors and tensors[name][1] != shape:
            problems.append(f"tensor {name!r} has shape {list(tensors[name][1])}, expected {list(shape)} "
                            f"from config.json")
    if t_hidden and "fc.weight" in tensors and len(tensors["fc.weight"][1]) == 2 \
            and tensors["fc.weight"][1][1] != 3 * t_hidden:
        problems.append(f"tensor 'fc.weight' reads {tensors['fc.weight'][1][1]} inputs, but the target gives "
                        f"3 * {t_hidden} = {3 * t_hidden}")
    return problems


FAMILY = DraftFamily(
    name="eagle3",
    architecture=ARCHITECTURE,
    model=Eagle3Draft,
    build_config=build_draft_config,
    config_from_dict=config_from_dict,
    serving_config=serving_config,
    serving_tensors=serving_tensors,
    check_serving=check_serving,
    layer_ids=layer_ids,
    layer_problems=servable_layer_problems,
    layers_from_overrides=override_layer_ids,
    required_tensors=REQUIRED_TENSORS,
    optional_tensors=OPTIONAL_TENSORS,
)
