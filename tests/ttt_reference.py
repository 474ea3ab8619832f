"""The TTT written the obvious way, for checking `specforge_core.models.ttt.ttt_forward` against.

Explicit full masks over all (k+1)*T keys and Python loops for the gates: O(K * T * K*T) memory, so
only for tiny inputs. Kept out of the engine because nothing but the tests (and `bench/ttt_memory.py`,
which imports it from here to show what the fast backends save) runs it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from specforge_core.models.ttt import TTTOutput


def _up(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def ttt_reference(draft, input_ids: Tensor, aux_hidden: Tensor, target_logits: Tensor, loss_mask: Tensor,
                  attention_mask: Tensor, ttt_length: int = 7, decay: float = 0.8) -> TTTOutput:
    """The TTT written the obvious way: O(K * T * K*T) memory; for checking `ttt_forward` only."""
    B, T = input_ids.shape
    a = draft.midlayer.self_attn
    nh, nkv, d = a.num_heads, a.num_kv_heads, a.head_dim
    t2d_ids = torch.nonzero(draft.t2d).flatten()                       # draft id i -> target id
    ml = draft.midlayer

    def rot(x, positions):
        cos, sin = draft.rotary_emb(x, positions)                     # [B,T,d]
        cos, sin = cos[:, None], sin[:, None]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    h = draft.fc(aux_hidden)
    keys, values = [], []
    total = 0.0
    ploss, accs, counts = [], [], []
    hits = set()                                                       # (b, t, k): step k right at anchor t
    for k in range(ttt_length):
        ids = torch.zeros_like(input_ids)
        for b in range(B):
            for t in range(T):
                if t + 1 + k < T:
                    ids[b, t] = input_ids[b, t + 1 + k]
        x = torch.cat([ml.input_layernorm(draft.embed_tokens(ids)), ml.hidden_norm(h)], dim=-1)
        positions = torch.arange(T).expand(B, T) + k
        q = rot(a.q_proj(x).view(B, T, nh, d).transpose(1, 2), positions)
        kk = rot(a.k_proj(x).view(B, T, nkv, d).transpose(1, 2), positions)
        vv = a.v_proj(x).view(B, T, nkv, d).transpose(1, 2)
        keys.append(kk.repeat_interleave(nh // nkv, dim=1))
        values.append(vv.repeat_interleave(nh // nkv, dim=1))
        K = torch.cat(keys, dim=2)                                     # [B,nh,(k+1)T,d]
        V = torch.cat(values, dim=2)
        allowed = torch.zeros(B, T, (k + 1) * T, dtype=torch.bool)
        for b in range(B):
            for t in range(T):
                allowed[b, t, :t + 1] = attention_mask[b, :t + 1].bool()   # step-0 keys j <= t, real ones
                allowed[b, t, t] = True                                     # and always its own
                for s in range(1, k + 1):
                    allowed[b, t, s * T + t] = True                         # its own keys of steps 1..k
        scores = (q @ K.transpose(-1, -2)) / d ** 0.5
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ V                       # [B,nh,T,d]
        o = h + a.o_proj(attn.transpose(1, 2).reshape(B, T, nh * d))
        out = o + ml.mlp(ml.post_attention_layernorm(o))
        logits = draft.lm_head(draft.norm(out))                        # [B,T,Vd]

        loss_sum = logits.sum() * 0.0
        cnt, correct = 0, 0
        for b in range(B):
            for t in range(T):
                p = t + 2 + k                                          # the predicted token
                if p >= T:
                    continue
                if not (attention_mask[b, t] and attention_mask[b, t + 1 + k] and attention_mask[b, p]
                        and loss_mask[b, p]):
                    continue
                tl = target_logits[b, t + 1 + k]
                if not bool(draft.t2d[int(tl.argmax())]):
                    continue
                teacher = torch.softmax(_up(tl[t2d_ids]), dim=-1)
                loss_sum = loss_sum - (teacher * torch.log_softmax(_up(logits[b, t]), dim=-1)).sum()
                cnt += 1
                hit = int(t2d_ids[int(logits[b, t].argmax())]) == int(tl.argmax())
                correct += int(hit)
                if hit:
                    hits.add((b, t, k))
        lk = loss_sum / max(cnt, 1)
        total = total + decay ** k * lk
        ploss.append(float(lk.detach()))
        accs.append(correct / max(cnt, 1))
        counts.append(cnt)
        h = out
    # A chain decoder anchored at t accepts drafts 0..k when each was right; an anchor is any t whose
    # first prediction (token t+2) is real and trained, whether or not the draft vocab holds it.
    anchors = [(b, t) for b in range(B) for t in range(T - 2)
               if attention_mask[b, t] and attention_mask[b, t + 1] and attention_mask[b, t + 2] and loss_mask[b, t + 2]]
    chain = [sum(all((b, t, j) in hits for j in range(k + 1)) for b, t in anchors) for k in range(ttt_length)]
    return TTTOutput(loss=total, ploss=ploss, acc=accs, counts=counts, chain=chain, anchors=len(anchors))
