"""The EAGLE3 training-time test (TTT): unroll the draft `ttt_length` steps and score it against the target.

Alignment (docs/ARCHITECTURE.md, "EAGLE3 alignment"; the unroll and its gates: "TTT"): position t
pairs the target state of token t with the embedding of token t+1 and learns the target's
distribution for token t+2 (the target logits at t+1). Step k (0-based) feeds the embedding of token
t+1+k, the draft's own previous pre-norm output (k>0), sits at RoPE position t+k and predicts token
t+2+k. A prediction is counted when token t+2+k exists, is real (attention_mask at t, t+1+k, t+2+k),
is trained (loss_mask[t+2+k]) and the target's argmax for it lies in the draft vocabulary. Losses
are soft cross-entropy against softmax(target_logits[..., t2d]) (`draft_teacher`: dense logits, or a top-k
store's ids read straight into the draft vocab), averaged over the counted positions
(not B*T: the scale must not depend on padding), weighted decay**k and summed over steps.

Attention at step k: query t sees the step-0 keys j <= t (those with attention_mask[j], and always its
own) plus its own position's keys from steps 1..k. Backends:
  sdpa  (default, CPU and GPU) F.scaled_dot_product_attention for the causal block (fused, memory-
        efficient backward), plus the block's log-sum-exp computed in query chunks under activation
        checkpointing (sdpa does not return it), merged with the k diagonal scores by a log-sum-exp
        weighting. Extra memory per step is O(T*heads*d); nothing T x T is kept for backward.
  flex  (CUDA) flex_attention with a causal BlockMask, asking it for the lse; same merge.
  eager dense scores [T, T + k] per step: simple, O(T^2) per step; for debugging and small inputs.
`tests/ttt_reference.py` is the naive version (full (k+1)T-wide masks, Python loops) the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

ATTENTION_BACKENDS = ("sdpa", "flex", "eager")

# Elements of one chunk's score block [B, heads, chunk, T] in the lse pass; bounds its transient memory.
LSE_CHUNK_ELEMENTS = 1 << 24


@dataclass
class TTTOutput:
    loss: Tensor                                   # scalar with grad: sum_k decay**k * ploss_k
    ploss: list[float] = field(default_factory=list)   # per step, masked soft CE over counted positions
    acc: list[float] = field(default_factory=list)     # per step, draft argmax (as target id) == target argmax
    counts: list[int] = field(default_factory=list)    # counted positions per step
    # Acceptance as a chain decoder sees it: anchors are the positions step 0 would count if every target
    # token were in the draft vocab; chain[k] is how many anchors had steps 0..k all right (a token the
    # draft vocab lacks is a miss there, as in serving, where the draft cannot propose it).
    chain: list[int] = field(default_factory=list)
    anchors: int = 0
    # Per position t [B, T-2]: how many leading steps of the chain anchored at t were right (0..K; 0 where
    # t anchors nothing). A greedy chain decoder whose verify step starts at t accepts min(this, steps) drafts:
    # `evaluate` replays its verify steps against it (training's view of acceptance beside serving's).
    run_lengths: Tensor | None = None


# ------------------------------------------------------------------------------------------------
# Attention pieces
# ------------------------------------------------------------------------------------------------
def _allowed_block(key_ok: Tensor | None, q_start: int, q_end: int, k_end: int, device) -> Tensor:
    """Bool [B or 1, 1, 1, c, k_end]: causal, key j real or j == t (so no query is left without keys)."""
    t = torch.arange(q_start, q_end, device=device)[:, None]
    j = torch.arange(k_end, device=device)[None, :]
    allowed = j <= t                                                      # [c, e]
    if key_ok is not None:
        allowed = allowed & (key_ok[:, None, :k_end] | (j == t))          # [B, c, e]
    else:
        allowed = allowed[None]
    return allowed[:, None, None]                                         # [B, 1, 1, c, e]


def _lse_chunk(qc: Tensor, ke: Tensor, key_ok: Tensor | None, q_start: int, scale: float) -> Tensor:
    # qc [B,kv,rep,c,d], ke [B,kv,1,e,d] -> lse [B,kv,rep,c]
    s = torch.matmul(qc, ke.transpose(-1, -2)) * scale                    # [B,kv,rep,c,e]
    allowed = _allowed_block(key_ok, q_start, q_start + qc.shape[3], ke.shape[3], qc.device)
    s = s.to(torch.promote_types(s.dtype, torch.float32)).masked_fill(~allowed, float("-inf"))
    return torch.logsumexp(s, dim=-1)


def causal_lse(q: Tensor, k: Tensor, key_ok: Tensor | None, scale: float) -> Tensor:
    """Log-sum-exp of the masked causal scores, q [B,nh,T,d], k [B,nkv,T,d] -> [B,nh,T] (fp32+).

    Computed in query chunks (only keys <= the chunk's last query), each under checkpointing, so the
    forward holds one chunk's scores at a time and backward recomputes them instead of storing T x T.
    """
    B, nh, T, d = q.shape
    kv = k.shape[1]
    qg = q.view(B, kv, nh // kv, T, d)
    kg = k[:, :, None]                                                    # [B,kv,1,T,d]
    chunk = max(16, min(T, LSE_CHUNK_ELEMENTS // max(1, B * nh * T)))
    need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    parts = []
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        if need_grad:
            parts.append(checkpoint(_lse_chunk, qg[:, :, :, s:e], kg[:, :, :, :e], key_ok, s, scale,
                                    use_reentrant=False))
        else:
            parts.append(_lse_chunk(qg[:, :, :, s:e], kg[:, :, :, :e], key_ok, s, scale))
    return torch.cat(parts, dim=-1).reshape(B, nh, T)


def _merge(o0: Tensor, lse0: Tensor, q: Tensor, diag_k: list[Tensor], diag_v: list[Tensor], scale: float) -> Tensor:
    """Combine the causal block (normalised output o0, its lse) with the per-position diagonal keys.

    softmax over the union = exp(lse0 - L) * o0 + sum_j exp(s_j - L) * v_j, L = logsumexp(lse0, s_1..s_k).
    """
    B, nh, T, d = q.shape
    kv = diag_k[0].shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.view(B, kv, nh // kv, T, d).to(acc)
    s = [(qg * kj[:, :, None].to(acc)).sum(-1).reshape(B, nh, T) * scale for kj in diag_k]   # k x [B,nh,T]
    L = torch.logsumexp(torch.stack([lse0.to(acc)] + s, dim=0), dim=0)                        # [B,nh,T]
    out = torch.exp(lse0.to(acc) - L)[..., None] * o0.to(acc)                                 # [B,nh,T,d]
    out = out.view(B, kv, nh // kv, T, d)
    for sj, vj in zip(s, diag_v):
        out = out + torch.exp(sj - L).view(B, kv, nh // kv, T, 1) * vj[:, :, None].to(acc)
    return out.reshape(B, nh, T, d).to(q.dtype)


def _sdpa_mask(key_ok: Tensor | None, T: int, device) -> Tensor | None:
    return None if key_ok is None else _allowed_block(key_ok, 0, T, T, device)[:, 0]          # [B,1,T,T]


def attend(q: Tensor, k0: Tensor, v0: Tensor, diag_k: list[Tensor], diag_v: list[Tensor],
           key_ok: Tensor | None, backend: str = "sdpa", sdpa_mask: Tensor | None = None) -> Tensor:
    """q [B,nh,T,d] attends step-0 keys k0/v0 [B,nkv,T,d] causally plus its own diagonal keys.

    key_ok [B,T] bool, or None when every query that matters sees only real keys (right padding).
    Returns [B,nh,T,d].
    """
    B, nh, T, d = q.shape
    scale = d ** -0.5
    if backend == "eager":
        return _attend_eager(q, k0, v0, diag_k, diag_v, key_ok, scale)
    if backend == "flex":
        o0, lse0 = _flex_block(q, k0, v0, key_ok, scale)
        return o0 if not diag_k else _merge(o0, lse0, q, diag_k, diag_v, scale)
    if backend != "sdpa":
        raise ValueError(f"unknown attention_backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    gqa = k0.shape[1] != nh
    if key_ok is None:
        o0 = F.scaled_dot_product_attention(q, k0, v0, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        mask = sdpa_mask if sdpa_mask is not None else _sdpa_mask(key_ok, T, q.device)
        o0 = F.scaled_dot_product_attention(q, k0, v0, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if not diag_k:
        return o0
    return _merge(o0, causal_lse(q, k0, key_ok, scale), q, diag_k, diag_v, scale)


def _attend_eager(q, k0, v0, diag_k, diag_v, key_ok, scale):
    B, nh, T, d = q.shape
    kv = k0.shape[1]
    qg = q.view(B, kv, nh // kv, T, d)
    s0 = torch.matmul(qg, k0[:, :, None].transpose(-1, -2)) * scale                         # [B,kv,rep,T,T]
    s0 = s0.masked_fill(~_allowed_block(key_ok, 0, T, T, q.device), float("-inf"))
    sd = [(qg * kj[:, :, None]).sum(-1, keepdim=True) * scale for kj in diag_k]              # k x [B,kv,rep,T,1]
    p = torch.softmax(torch.cat([s0] + sd, dim=-1), dim=-1)
    out = torch.matmul(p[..., :T], v0[:, :, None])
    for i, vj in enumerate(diag_v):
        out = out + p[..., T + i:T + i + 1] * vj[:, :, None]
    return out.reshape(B, nh, T, d)


def _flex_block(q, k0, v0, key_ok, scale):
    if not q.is_cuda:
        raise ValueError("attention_backend 'flex' needs a CUDA GPU; use 'sdpa' on CPU")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, nh, T, d = q.shape
    if key_ok is None:
        def mask_mod(b, h, qi, ki):
            return ki <= qi
        mb = None
    else:
        ok = key_ok

        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & (ok[b, ki] | (ki == qi))
        mb = B
    block = create_block_mask(mask_mod, mb, None, T, T, device=q.device)
    try:
        from torch.nn.attention.flex_attention import AuxRequest
        o0, aux = flex_attention(q, k0, v0, block_mask=block, scale=scale, enable_gqa=k0.shape[1] != nh,
                                 return_aux=AuxRequest(lse=True))
        lse = aux.lse
    except ImportError:  # older torch: the lse came back directly
        o0, lse = flex_attention(q, k0, v0, block_mask=block, scale=scale, enable_gqa=k0.shape[1] != nh,
                                 return_lse=True)
    return o0, lse


# ------------------------------------------------------------------------------------------------
# Targets and gates
# ------------------------------------------------------------------------------------------------
def _up(x: Tensor) -> Tensor:
    # Softmaxes over the vocab in at least fp32 (bf16 logits lose the tail), float64 kept for tests.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def draft_teacher(target_logits, t2d: Tensor) -> tuple[Tensor, Tensor]:
    """(the target's logits over the draft vocab [B,T,Vd], its argmax as target ids [B,T]).

    `target_logits` is a dense [B,T,V] tensor, or a top-k store's teacher (`offline.store.TopKLogits`:
    values, ids, vocab_size, dtype): then both come straight from the k stored ids, without the [B,T,V]
    rebuild, and equal what the rebuilt dense logits give bit for bit (same values in the same dtype, the
    floor elsewhere; argmax ties go to the lowest id, as torch's do)."""
    if isinstance(target_logits, Tensor):
        return target_logits[..., t2d], target_logits.argmax(-1)
    vals, ids = target_logits.values.to(target_logits.dtype), target_logits.ids.long()
    V, Vd = int(target_logits.vocab_size), int(t2d.sum())
    top = vals == vals[..., :1]                                          # ties with the top-1 value
    target_arg = torch.where(top, ids, torch.full_like(ids, V)).amin(-1)                    # [B,T]
    to_draft = torch.full((V,), Vd, dtype=torch.long, device=ids.device)   # target id -> draft id, Vd: none
    to_draft[t2d] = torch.arange(Vd, device=ids.device)
    out = torch.full((*ids.shape[:-1], Vd + 1), torch.finfo(target_logits.dtype).min,
                     dtype=target_logits.dtype, device=ids.device)
    out.scatter_(-1, to_draft[ids], vals)                   # ids outside the draft vocab land in column Vd
    return out[..., :Vd], target_arg


def _right_padded(attention_mask: Tensor) -> bool:
    # Non-increasing rows: every query that is counted only sees real keys, so plain causal suffices.
    am = attention_mask.bool()
    return bool((am[:, 1:] <= am[:, :-1]).all()) if am.shape[1] > 1 else True


def chain_anchors(am: Tensor, lm: Tensor) -> Tensor:
    """Bool [B, T-2]: positions t that anchor a chain - step 0's gates (t, t+1, t+2 real, t+2 trained)
    without the draft-vocab one, so a target the vocab lacks is a miss rather than not counted."""
    n0 = max(am.shape[1] - 2, 0)
    return am[:, :n0] & am[:, 1:1 + n0] & am[:, 2:2 + n0] & lm[:, 2:2 + n0]


def _check_inputs(input_ids, aux_hidden, target_logits, loss_mask, attention_mask, draft, ttt_length):
    B, T = input_ids.shape
    for name, x in (("loss_mask", loss_mask), ("attention_mask", attention_mask)):
        if tuple(x.shape) != (B, T):
            raise ValueError(f"ttt_forward: {name} has shape {tuple(x.shape)}, expected {(B, T)} like input_ids")
    if tuple(aux_hidden.shape[:2]) != (B, T) or aux_hidden.shape[2] != 3 * draft.target_hidden_size:
        raise ValueError(f"ttt_forward: aux_hidden has shape {tuple(aux_hidden.shape)}, expected "
                         f"{(B, T, 3 * draft.target_hidden_size)} (3 captured layers x target hidden size)")
    if tuple(target_logits.shape) != (B, T, draft.vocab_size):
        raise ValueError(f"ttt_forward: target_logits has shape {tuple(target_logits.shape)}, expected "
                         f"{(B, T, draft.vocab_size)} (target vocab)")
    if ttt_length < 1:
        raise ValueError(f"ttt_forward: ttt_length must be >= 1, got {ttt_length}")


# ------------------------------------------------------------------------------------------------
# The TTT
# ------------------------------------------------------------------------------------------------
def ttt_forward(draft, input_ids: Tensor, aux_hidden: Tensor, target_logits: Tensor, loss_mask: Tensor,
                attention_mask: Tensor, ttt_length: int = 7, decay: float = 0.8,
                attention_backend: str = "sdpa", position_ids: Tensor | None = None) -> TTTOutput:
    """Unrolled TTT loss for one batch (see the module docstring for alignment and masking)."""
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention_backend {attention_backend!r}; choose one of {ATTENTION_BACKENDS}")
    _check_inputs(input_ids, aux_hidden, target_logits, loss_mask, attention_mask, draft, ttt_length)
    B, T = input_ids.shape
    dev = input_ids.device
    am = attention_mask.bool()
    lm = loss_mask.bool()
    t2d = draft.t2d.to(dev)
    d2t = draft.d2t.to(dev)

    # Teacher, once for all steps; step k reads it at t+1+k through a slice (a view, no copy).
    with torch.no_grad():
        draft_logits, target_arg = draft_teacher(target_logits, t2d)                       # [B,T,Vd], [B,T]
        teacher = torch.softmax(_up(draft_logits), dim=-1)                                  # [B,T,Vd]
        in_draft = t2d[target_arg]                                                          # [B,T]

    key_ok = None if _right_padded(attention_mask) else am
    sdpa_mask = _sdpa_mask(key_ok, T, dev) if attention_backend == "sdpa" else None
    pos = position_ids if position_ids is not None else torch.arange(T, device=dev).expand(B, T)
    # Token t+1+k for step k is ids_next[:, k + t]; past the end it is a placeholder never counted.
    ids_next = torch.cat([input_ids[:, 1:], input_ids.new_zeros(B, ttt_length)], dim=1)    # [B,T-1+K]

    h = draft.project(aux_hidden)                                                           # [B,T,H]
    k0 = v0 = None
    diag_k: list[Tensor] = []
    diag_v: list[Tensor] = []
    total = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    ploss, accs, counts, chain = [], [], [], []
    # Step k at position t extends the chain anchored at t (h stays at t), so one bool per anchor suffices.
    alive = chain_anchors(am, lm)                                                          # [B,T-2]
    anchors = int(alive.sum())
    run_lengths = torch.zeros(alive.shape, dtype=torch.long, device=dev)                    # [B,T-2]
    for k in range(ttt_length):
        emb = draft.embed(ids_next[:, k:k + T]).to(h.dtype)                                 # [B,T,H]
        cos, sin = draft.rope(h, pos + k)                                                   # query/key at t+k
        q, kk, vv = draft.midlayer.qkv(emb, h, cos, sin)                                    # [B,nh|nkv,T,d]
        if k == 0:
            k0, v0 = kk, vv
        else:
            diag_k.append(kk)
            diag_v.append(vv)
        attn = attend(q, k0, v0, diag_k, diag_v, key_ok, attention_backend, sdpa_mask)      # [B,nh,T,d]
        out = draft.midlayer.finish(h, attn)                                                # [B,T,H]

        n = T - 2 - k                                     # positions whose predicted token t+2+k exists
        if n > 0:
            sl = slice(1 + k, 1 + k + n)                  # teacher index t+1+k
            tk = slice(2 + k, 2 + k + n)                  # predicted token t+2+k
            mask = am[:, :n] & am[:, sl] & am[:, tk] & lm[:, tk] & in_draft[:, sl]          # [B,n]
            # The lm_head and its softmax are most of a step's cost: run them on the counted positions
            # only (about half: prompts, padding and untrained turns drop out). Same loss, same gradients.
            logits = draft.logits(out[:, :n][mask])                                         # [cnt,Vd]
            logp = torch.log_softmax(_up(logits), dim=-1)
            ce = -(teacher[:, sl][mask] * logp).sum(-1)                                     # [cnt]
            cnt = int(mask.sum())
            lk = ce.sum() / max(cnt, 1)
            with torch.no_grad():
                pred = logits.argmax(-1)
                correct = pred + d2t[pred] == target_arg[:, sl][mask]
                acc_k = float(correct.sum()) / max(cnt, 1)
                hit = torch.zeros_like(mask)
                hit[mask] = correct
                alive = alive[:, :n] & hit
                run_lengths[:, :n] += alive
        else:
            cnt, acc_k = 0, 0.0
            lk = out.sum() * 0.0                          # keeps the graph alive for backward
            alive = alive[:, :0]
        total = total + (decay ** k) * lk
        ploss.append(float(lk.detach()))
        accs.append(acc_k)
        counts.append(cnt)
        chain.append(int(alive.sum()))
        h = out
    return TTTOutput(loss=total, ploss=ploss, acc=accs, counts=counts, chain=chain, anchors=anchors,
                     run_lengths=run_lengths)
