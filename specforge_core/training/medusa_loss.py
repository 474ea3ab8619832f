"""The Medusa loss (Medusa-1: the target frozen): every head against the target's distribution at its offset.

Alignment (docs/ARCHITECTURE.md, "Medusa"): the heads read the target's final normed last hidden state
at position t; head i (0-based) predicts token t+2+i, whose distribution under the target is its
logits at position t+1+i. A prediction is counted with the gates EAGLE3's TTT uses for its step i
(`models/ttt.py`): token t+2+i exists and is real (attention_mask at t, t+1+i, t+2+i), is trained
(loss_mask[t+2+i]) and the target's argmax for it lies in the draft vocabulary. The teacher is
softmax(target_logits[..., t2d]) (the target restricted to the draft vocabulary, as in the TTT); the
loss of head i is the soft cross-entropy averaged over its counted positions, weighted decay**i and
summed over heads. The output is a `TTTOutput` with one entry per head, so `TTTMetrics`, `metrics.jsonl`
(`acc_i`, `ploss_i`, `chain_i`, `sim_accept_len`), keep-best and early stopping treat heads as the TTT's steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.ttt import TTTOutput, _up, chain_anchors, draft_teacher


def _check_inputs(draft, last_hidden: Tensor, target_logits: Tensor, loss_mask: Tensor,
                  attention_mask: Tensor) -> None:
    B, T = loss_mask.shape
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"medusa_forward: attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)}")
    if tuple(last_hidden.shape) != (B, T, draft.hidden_size):
        raise ValueError(f"medusa_forward: last_hidden has shape {tuple(last_hidden.shape)}, expected "
                         f"{(B, T, draft.hidden_size)} (the target's final normed hidden state)")
    if tuple(target_logits.shape) != (B, T, draft.vocab_size):
        raise ValueError(f"medusa_forward: target_logits has shape {tuple(target_logits.shape)}, expected "
                         f"{(B, T, draft.vocab_size)} (target vocab)")


def medusa_forward(draft, last_hidden: Tensor, target_logits: Tensor, loss_mask: Tensor, attention_mask: Tensor,
                   decay: float = 0.8) -> TTTOutput:
    """Loss, per-head loss / accuracy / counts of the Medusa heads on one batch (see the module docstring).

    last_hidden [B,T,H] the target's final normed hidden state; target_logits [B,T,V]; masks [B,T]."""
    _check_inputs(draft, last_hidden, target_logits, loss_mask, attention_mask)
    B, T = loss_mask.shape
    dev = last_hidden.device
    am = attention_mask.bool()
    lm = loss_mask.bool()
    t2d = draft.t2d.to(dev)

    with torch.no_grad():
        draft_logits, target_arg = draft_teacher(target_logits, t2d)                       # [B,T,Vd], [B,T]
        in_draft = t2d[target_arg]                                                          # [B,T]

    total = None
    ploss, accs, counts, chain = [], [], [], []
    alive = chain_anchors(am, lm)                                           # [B,T-2]
    anchors = int(alive.sum())
    for i in range(draft.num_heads):
        n = T - 2 - i                                  # positions t whose predicted token t+2+i exists
        if n <= 0:
            lk = sum(p.sum() for p in draft.blocks[i].parameters()) * 0.0   # keeps every head in the graph
            cnt, acc_i = 0, 0.0
            alive = alive[:, :0]
        else:
            sl = slice(1 + i, 1 + i + n)               # teacher index t+1+i
            tk = slice(2 + i, 2 + i + n)               # predicted token t+2+i
            mask = am[:, :n] & am[:, sl] & am[:, tk] & lm[:, tk] & in_draft[:, sl]          # [B,n]
            with torch.no_grad():
                teacher = torch.softmax(_up(draft_logits[:, sl]), dim=-1)                  # [B,n,Vd]
            logits = draft.head_logits(last_hidden[:, :n], i)                               # [B,n,Vd]
            logp = torch.log_softmax(_up(logits), dim=-1)
            ce = -(teacher * logp).sum(-1)                                                  # [B,n]
            cnt = int(mask.sum())
            lk = (ce * mask).sum() / max(cnt, 1)
            with torch.no_grad():
                pred = draft.to_target_ids(logits.argmax(-1))
                hit = (pred == target_arg[:, sl]) & mask
                acc_i = float(hit.sum()) / max(cnt, 1)
                alive = alive[:, :n] & hit                 # heads 0..i all right at anchor t
        total = (decay ** i) * lk if total is None else total + (decay ** i) * lk
        ploss.append(float(lk.detach()))
        accs.append(acc_i)
        counts.append(cnt)
        chain.append(int(alive.sum()))
    return TTTOutput(loss=total, ploss=ploss, acc=accs, counts=counts, chain=chain, anchors=anchors)
