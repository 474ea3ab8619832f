"""The training-time test: the fast TTT equals the naive reference (values and gradients), the
alignment and gating are the ones docs/ARCHITECTURE.md states ("EAGLE3 alignment", "TTT"), d2t/t2d are
used, and a tiny draft can overfit a batch."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_llama_config
from specforge_core.models.eagle3 import build_draft_config
from specforge_core.models.registry import build_draft
from specforge_core.training.metrics import TTTMetrics, simulated_acceptance_length
from specforge_core.models.ttt import ATTENTION_BACKENDS, causal_lse, ttt_forward
from ttt_reference import ttt_reference

pytestmark = pytest.mark.unit

V, VD, H = 64, 24, 32


def make_draft(seed=0, dtype=torch.float64, heads=4, kv=2, vocab_ids=None):
    torch.manual_seed(seed)
    tcfg = tiny_llama_config(vocab_size=V, hidden_size=H)
    draft = build_draft(build_draft_config(tcfg, VD, [1, 1, 2],
                                           overrides={"num_attention_heads": heads, "num_key_value_heads": kv}))
    g = torch.Generator().manual_seed(seed + 1)
    ids = vocab_ids if vocab_ids is not None else torch.randperm(V, generator=g)[:VD].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    draft.set_vocab_mapping(ids - torch.arange(VD), t2d)
    draft.load_embedding(torch.randn(V, H, generator=g))
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for n, p in draft.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.requires_grad:
                p.mul_(5.0)  # bigger weights: attention far from uniform, so a wrong mask changes numbers
    return draft.to(dtype)


def make_batch(draft, B=3, T=11, seed=0, left_pad=False, plant=0.0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = [T, T - 3, T - 5][:B]
    am = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left_pad:
            am[b, T - n:] = 1
        else:
            am[b, :n] = 1
    lm = (torch.rand(B, T, generator=g) > 0.3).long() * am
    aux = torch.randn(B, T, 3 * H, generator=g, dtype=torch.float64)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    logits[..., draft.t2d] += 1.0  # some argmaxes inside the draft vocab, some outside
    if plant:
        # Make the target agree with the draft's own step-0 guess at some positions, so acc is not ~0.
        pos = torch.arange(T).expand(B, T)
        ids_next = torch.cat([ids[:, 1:], ids.new_zeros(B, 1)], dim=1)
        _, dl, _ = draft.draft_step(aux.to(draft.fc.weight.dtype), ids_next, pos)
        tgt = draft.draft_to_target(dl.argmax(-1))                    # [B,T] target ids predicted at t
        pick = torch.rand(B, T, generator=g) < plant
        for b in range(B):
            for t in range(T - 1):
                if pick[b, t]:
                    logits[b, t + 1, tgt[b, t]] = logits[b, t + 1].max() + 5.0
    return ids, aux, logits, lm, am


def grads(draft):
    return {n: p.grad.clone() for n, p in draft.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("K", [1, 3, 7])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("left_pad", [False, True])
def test_matches_reference(K, backend, left_pad):
    draft = make_draft()
    batch = make_batch(draft, left_pad=left_pad, plant=0.5)
    draft.zero_grad()
    ref = ttt_reference(draft, *batch, ttt_length=K, decay=0.8)
    ref.loss.backward()
    g_ref = grads(draft)
    draft.zero_grad()
    out = ttt_forward(draft, *batch, ttt_length=K, decay=0.8, attention_backend=backend)
    out.loss.backward()
    g_out = grads(draft)

    assert out.counts == ref.counts
    assert sum(out.counts) > 0
    assert out.acc == pytest.approx(ref.acc, abs=1e-12)
    assert max(ref.acc) > 0  # the planted agreement makes accuracy a real check
    assert (out.chain, out.anchors) == (ref.chain, ref.anchors)
    # run_lengths is the chain per anchor: chain_k anchors ran past step k.
    assert [int((out.run_lengths > k).sum()) for k in range(K)] == out.chain
    assert ref.chain[0] > 0 and ref.anchors > ref.counts[0]  # some chains start; some targets lie outside the vocab
    assert out.ploss == pytest.approx(ref.ploss, abs=1e-6)
    assert float(out.loss.detach()) == pytest.approx(float(ref.loss.detach()), abs=1e-6)
    assert float(out.loss.detach()) == pytest.approx(sum(0.8 ** k * p for k, p in enumerate(out.ploss)), abs=1e-9)
    for n in g_ref:
        assert torch.allclose(g_out[n], g_ref[n], atol=1e-6, rtol=1e-6), n
    assert g_out["midlayer.self_attn.q_proj.weight"].abs().sum() > 0


def test_mha_and_single_kv_head():
    for heads, kv in ((4, 4), (4, 1)):
        draft = make_draft(heads=heads, kv=kv)
        batch = make_batch(draft, plant=0.3)
        ref = ttt_reference(draft, *batch, ttt_length=3)
        out = ttt_forward(draft, *batch, ttt_length=3)
        assert out.counts == ref.counts
        assert out.ploss == pytest.approx(ref.ploss, abs=1e-6)


def test_draft_step_is_ttt_step0():
    # Planting the draft's own step-0 argmax (computed by draft_step) at every position makes acc_0 exactly 1.
    draft = make_draft()
    batch = make_batch(draft, plant=1.0)
    out = ttt_forward(draft, *batch, ttt_length=2)
    assert out.counts[0] > 0 and out.acc[0] == 1.0
    assert out.acc[1] < 1.0


def test_chunked_lse_matches_dense(monkeypatch):
    import specforge_core.models.ttt as ttt

    monkeypatch.setattr(ttt, "LSE_CHUNK_ELEMENTS", 1)  # forces the smallest chunks: 16 queries
    torch.manual_seed(0)
    B, nh, kv, T, d = 2, 4, 2, 40, 8
    q = torch.randn(B, nh, T, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, kv, T, d, dtype=torch.float64, requires_grad=True)
    ok = torch.rand(B, T) > 0.3
    lse = causal_lse(q, k, ok, 0.5)
    s = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.5
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & (ok[:, None, :] | torch.eye(T, dtype=torch.bool))
    dense = torch.logsumexp(s.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    assert torch.allclose(lse, dense, atol=1e-10)
    w = torch.randn(lse.shape, dtype=torch.float64)
    g1 = torch.autograd.grad((causal_lse(q, k, ok, 0.5) * w).sum(), [q, k])
    g2 = torch.autograd.grad((dense * w).sum(), [q, k])
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-10)


def _hand_case():
    """user u0 u1 u2, assistant a0 a1 a2 <eot>; the target predicts the next token one-hot."""
    draft_ids = torch.tensor([3, 7, 9, 11, 13, 20, 21, 30, 31, 40, 41, 42, 50, 51, 52, 53, 54, 55, 56, 57, 58,
                              59, 60, 61])
    draft = make_draft(vocab_ids=draft_ids)
    with torch.no_grad():
        draft.lm_head.weight.zero_()  # uniform draft: argmax is draft id 0 -> target id 3
    ids = torch.tensor([[1, 2, 4, 7, 3, 9, 11, 0]])                 # u0 u1 u2 a0 a1 a2 eot pad
    am = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    lm = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0]])                   # a0..eot trained
    T = ids.shape[1]
    logits = torch.full((1, T, V), -5.0, dtype=torch.float64)
    for i in range(T - 1):
        logits[0, i, ids[0, i + 1]] = 5.0                           # target at i predicts token i+1
    aux = torch.randn(1, T, 3 * H, dtype=torch.float64)
    return draft, (ids, aux, logits, lm, am)


def test_alignment_second_assistant_token_trained():
    draft, batch = _hand_case()
    out = ttt_forward(draft, *batch, ttt_length=6)
    ref = ttt_reference(draft, *batch, ttt_length=6)
    # step k counts t with t+2+k in the trained span 3..6: t = 1..4 at step 0 (t=2 predicts a1, the second
    # assistant token), 0..3 at step 1, then fewer as the span runs out on the left.
    assert out.counts == ref.counts == [4, 4, 3, 2, 1, 0]
    # the draft always proposes target id 3 == a1 (position 4): one hit at steps 0..2, none once t would be < 0
    assert out.acc[:3] == [0.25, 0.25, pytest.approx(1 / 3)]
    assert out.acc[3] == 0.0 and out.acc[4] == 0.0
    # uniform draft over the draft vocab: soft CE = log(VD) wherever something is counted
    for k in range(5):
        assert out.ploss[k] == pytest.approx(math.log(VD), abs=1e-9)
    assert out.ploss[5] == 0.0


def test_out_of_draft_targets_are_masked():
    draft, (ids, aux, logits, lm, am) = _hand_case()
    logits2 = logits.clone()
    logits2[0, 3, 5] = 50.0      # target at 3 now predicts id 5, not in the draft vocab: (t=2, k=0) drops
    out = ttt_forward(draft, ids, aux, logits2, lm, am, ttt_length=2)
    assert out.counts == [3, 4 - 1]   # step 1 reads the teacher at 3 for t=1
    assert out.acc[0] == 0.0         # the only hit (a1) was that position
    # ...but the chain still anchors there: a serving draft cannot propose id 5, so it is a miss
    assert out.anchors == 4 and out.chain == [0, 0]


def test_loss_mask_and_padding_gate():
    draft, (ids, aux, logits, lm, am) = _hand_case()
    lm2 = lm.clone()
    lm2[0, 4] = 0                                                     # stop training on a1
    out = ttt_forward(draft, ids, aux, logits, lm2, am, ttt_length=1)
    assert out.counts == [3] and out.acc == [0.0]
    am2 = am.clone()
    am2[0, 6] = 0                                                     # eot becomes padding
    out = ttt_forward(draft, ids, aux, logits, lm, am2, ttt_length=1)
    assert out.counts == [3]


def test_d2t_maps_draft_argmax_to_target_ids():
    draft, batch = _hand_case()
    out = ttt_forward(draft, *batch, ttt_length=1)
    assert out.acc == [0.25]
    # Same draft vocab as a set, but draft id 0 now maps to target id 7 (a0, predicted by t=1 only).
    ids2 = torch.tensor([7, 3, 9, 11, 13, 20, 21, 30, 31, 40, 41, 42, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61])
    draft2, batch2 = _hand_case()
    with pytest.raises(ValueError, match="disagree"):
        # offsets that point at ids t2d does not mark must be refused
        bad = torch.zeros(VD, dtype=torch.long)
        draft2.set_vocab_mapping(bad, draft2.t2d.clone())
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids2] = True
    # d2t is i -> ids2[i] - i (unsorted ids2 is a legal mapping for the acc check; t2d is just the set)
    draft2.set_vocab_mapping(ids2 - torch.arange(VD), t2d)
    out2 = ttt_forward(draft2, *batch2, ttt_length=1)
    assert out2.acc == [0.25]                 # draft id 0 -> target 7 == a0, predicted by t=1 only
    assert int(draft2.draft_to_target(torch.tensor([0, 1]))[0]) == 7


def test_backends_and_bad_inputs():
    draft = make_draft()
    ids, aux, logits, lm, am = make_batch(draft)
    assert set(ATTENTION_BACKENDS) == {"sdpa", "flex", "eager"}
    with pytest.raises(ValueError, match="attention_backend"):
        ttt_forward(draft, ids, aux, logits, lm, am, attention_backend="nope")
    with pytest.raises(ValueError, match="flex"):
        ttt_forward(draft, ids, aux, logits, lm, am, attention_backend="flex")  # CPU
    with pytest.raises(ValueError, match="target_logits"):
        ttt_forward(draft, ids, aux, logits[..., :10], lm, am)
    with pytest.raises(ValueError, match="aux_hidden"):
        ttt_forward(draft, ids, aux[..., :H], logits, lm, am)
    with pytest.raises(ValueError, match="loss_mask"):
        ttt_forward(draft, ids, aux, logits, lm[:, :3], am)


def test_short_sequence_and_no_grad():
    draft = make_draft()
    ids, aux, logits, lm, am = make_batch(draft, B=1, T=3)
    out = ttt_forward(draft, ids, aux, logits, lm, am, ttt_length=4)
    assert len(out.ploss) == 4 and out.counts[1:] == [0, 0, 0]
    out.loss.backward()  # counted-nothing steps still backprop
    with torch.no_grad():
        out = ttt_forward(draft, ids, aux, logits, lm, am, ttt_length=2)
    assert not out.loss.requires_grad


def test_chain_counts_consecutive_hits_per_anchor():
    draft, batch = _hand_case()
    out = ttt_forward(draft, *batch, ttt_length=3)
    # anchors t = 1..4; the draft always says id 3 (a1, token 4): step 0 is right at t=2, step 1 at t=1
    # (token 1+2+1), step 2 at t=0 - each at a different anchor, so no chain of two survives.
    assert out.anchors == 4 and out.chain == [1, 0, 0]
    # Per anchor: only t=2 has a run (step 0 right, step 1 wrong); t=1's step-1 hit follows a miss.
    assert out.run_lengths[0].tolist() == [0, 0, 1, 0, 0, 0]
    m = TTTMetrics(3)
    m.add(out)
    row = m.row(0.8)
    assert row["chain_0"] == 0.25 and row["chain_1"] == 0.0
    assert row["sim_accept_len"] == pytest.approx(1.25)
    # the independent product would credit step 1's hit at another anchor
    assert row["sim_accept_len_indep"] == pytest.approx(1 + 0.25 + 0.25 * 0.25 + 0.25 * 0.25 * (1 / 3))


def test_simulated_acceptance_length():
    assert simulated_acceptance_length([]) == 1.0
    assert simulated_acceptance_length([1.0, 1.0, 1.0]) == 4.0
    assert simulated_acceptance_length([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
    assert simulated_acceptance_length([0.0, 1.0]) == 1.0


def test_overfit_fixed_batch():
    torch.manual_seed(0)
    draft = make_draft(dtype=torch.float32)
    with torch.no_grad():
        for p in draft.parameters():
            if p.requires_grad and p.dim() > 1:
                p.div_(5.0)
    ids, aux, logits, lm, am = make_batch(draft, B=2, T=16, seed=3)
    logits = logits.clone()
    logits[..., draft.t2d] += 4.0  # peaked teacher inside the draft vocab
    batch = (ids, aux.float(), (logits * 2).float(), lm, am)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=5e-3)
    first = ttt_forward(draft, *batch, ttt_length=2)
    for _ in range(40):
        opt.zero_grad()
        out = ttt_forward(draft, *batch, ttt_length=2)
        out.loss.backward()
        opt.step()
    last = ttt_forward(draft, *batch, ttt_length=2)
    assert float(last.loss.detach()) < 0.5 * float(first.loss.detach())
    assert last.acc[0] > first.acc[0] + 0.3
    assert last.acc[0] > 0.8
