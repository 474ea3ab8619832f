"""The EAGLE3 draft model: its config (derived from the target's) and the module itself.

The draft is one Llama decoder layer ("midlayer") whose attention reads `cat(input_layernorm(embed(x)),
hidden_norm(h))` (2H wide), where `h = fc(cat of 3 captured target hidden states)` at the first step
and the draft's own previous (pre-norm) output afterwards. `norm` + `lm_head` give logits over the
reduced draft vocabulary; `d2t` / `t2d` map between draft and target ids.

Parameter names are exactly the serving names SGLang and vLLM load (`midlayer.*`, `fc.weight`,
`norm.weight`, `lm_head.weight`, `d2t`, `t2d`); `embed_tokens.weight` is the target's (frozen) and is
dropped by export.

The module exposes pieces rather than one opaque forward, because the training-time test
(`training/ttt.py`) needs to interleave its own attention between them: `project` (fc), `embed`,
`midlayer.qkv` (norms, projections, RoPE), `midlayer.finish` (o_proj, residual, MLP) and `logits`.
`draft_step` is the incremental API for speculative decoding at inference time.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from .registry import register_draft

ARCHITECTURE = "LlamaForCausalLMEagle3"


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
    from .registry import DRAFT_ARCHITECTURES
    if arch[0] not in DRAFT_ARCHITECTURES:
        raise ValueError(f"{where}: field 'architectures' names {arch[0]!r}; known draft architectures: "
                         f"{sorted(DRAFT_ARCHITECTURES)}")
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
        "hidden_act": getattr(t, "hidden_act", "silu"),
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


@register_draft(ARCHITECTURE)
class Eagle3Draft(nn.Module):
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
        # Identity mapping until set_vocab_mapping; both persist so checkpoints carry them.
        self.register_buffer("d2t", torch.zeros(Vd, dtype=torch.long), persistent=True)
        t2d = torch.zeros(V, dtype=torch.bool)
        t2d[:Vd] = True
        self.register_buffer("t2d", t2d, persistent=True)
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

    def set_vocab_mapping(self, d2t: Tensor, t2d: Tensor) -> None:
        """d2t: int offsets [draft_vocab] (target_id = i + d2t[i]); t2d: bool [V_target], draft_vocab True."""
        d2t = torch.as_tensor(d2t).long()
        t2d = torch.as_tensor(t2d).bool()
        if d2t.shape != (self.draft_vocab_size,) or t2d.shape != (self.vocab_size,):
            raise ValueError(f"vocab mapping shapes d2t {tuple(d2t.shape)}, t2d {tuple(t2d.shape)} do not fit "
                             f"draft_vocab_size {self.draft_vocab_size}, vocab_size {self.vocab_size}")
        if int(t2d.sum()) != self.draft_vocab_size:
            raise ValueError(f"t2d marks {int(t2d.sum())} target ids, expected {self.draft_vocab_size}")
        target_ids = torch.arange(self.draft_vocab_size) + d2t
        if not torch.equal(torch.nonzero(t2d).flatten().sort().values, target_ids.sort().values):
            raise ValueError("d2t and t2d disagree: the target ids d2t maps to are not the ones t2d marks")
        self.d2t.copy_(d2t.to(self.d2t.device))
        self.t2d.copy_(t2d.to(self.t2d.device))

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

    def draft_to_target(self, draft_ids: Tensor) -> Tensor:
        return draft_ids + self.d2t[draft_ids]

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def draft_step(self, hidden: Tensor, input_ids: Tensor, position_ids: Tensor,
                   past_kv: tuple[Tensor, Tensor] | None = None):
        """One incremental draft step for speculative decoding.

        hidden    [B,n,3*H_t] (target states: fc is applied) or [B,n,H] (the draft's own previous output)
        input_ids [B,n] the tokens that follow those states; position_ids [B,n] their positions
        past_kv   (k, v) [B,nkv,S,d] from earlier calls, or None
        returns   (out_hidden [B,n,H] pre-norm, to feed back; logits [B,n,Vd]; new (k, v) [B,nkv,S+n,d])
        The n new queries attend all S cached keys and, causally, each other.
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
        allowed = torch.ones(n, S + n, dtype=torch.bool, device=q.device).tril(diagonal=S)
        rep = q.shape[1] // k.shape[1]
        attn = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1),
                                              attn_mask=allowed)
        out = self.midlayer.finish(h, attn)
        return out, self.logits(out), (k, v)
