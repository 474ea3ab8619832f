"""Train/serve consistency of the EAGLE3 draft: speculative decoding must run the draft exactly as the
training-time test (`models/ttt.py::ttt_forward`) does.

On a prompt plus the target's own greedy continuation, `ttt_forward` gives, for every position t and
step k, the draft's logits for token t+2+k with the real tokens teacher-forced. We capture those by
wrapping `draft.logits` during the TTT. Then `SpecDecoder` decodes the same prompt while we record,
at every verify step that starts with L tokens in the target's cache, the root logits it drafts from,
the logits of every drafting level, and the DraftTree it proposes. Whenever the proposals 1..j-1 of
that step are the target's greedy tokens (so the draft's inputs are the ones TTT teacher-forced),
proposal j must be TTT step-(j-1)'s argmax at t = L-1 (mapped to target ids with d2t), and the logits
must agree to float64 rounding: same alignment, same RoPE positions (t+k), same attention keys (step-0
keys j <= t plus the same-position keys of the earlier steps). Everything runs in float64 so argmax
ties cannot flip between the two attention implementations.

The draft is briefly trained (on the very sequences decoded here) so its proposals often ARE the
greedy tokens and the deep steps get compared, not only step 0; a random draft is checked too.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama_config
from specforge_core.evaluate import spec_decode as sd
from specforge_core.evaluate.spec_decode import SpecDecoder, greedy_generate
from specforge_core.models.ttt import ttt_forward

V = 384          # target vocab
VD = 192         # draft vocab (scattered subset, so d2t offsets are non-trivial)
N_NEW = 28       # tokens decoded per prompt
TTT_K = 6        # TTT steps computed (>= the deepest drafting level compared + 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _draft(model, layer_ids, seed):
    from specforge_core.models.eagle3 import build_draft_config
    from specforge_core.models.registry import build_draft

    torch.manual_seed(seed)
    draft = build_draft(build_draft_config(model.config, VD, layer_ids))
    draft.load_embedding(model.get_input_embeddings().weight)
    return draft


def _set_vocab(draft, seqs, seed):
    """Draft vocab = every token of the sequences (so the greedy path is proposable) + random fill."""
    used = sorted({t for s in seqs for t in s})
    assert len(used) <= VD, "test setup: the sequences use more distinct tokens than the draft vocab"
    g = torch.Generator().manual_seed(seed)
    rest = [t for t in torch.randperm(V, generator=g).tolist() if t not in set(used)]
    keep = torch.tensor(sorted(used + rest[:VD - len(used)]))
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[keep] = True
    draft.set_vocab_mapping(keep - torch.arange(VD), t2d)


@pytest.fixture(scope="module")
def setup():
    from transformers import LlamaForCausalLM

    from specforge_core.models.target import Target

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=V, hidden_size=64, num_hidden_layers=8)).double().eval()
    target = Target(model)                                   # default layers [1, 3, 4] of 8
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 11, 17)]
    # Greedy continuations long enough that TTT has every step at every decoded position.
    seqs = [p + greedy_generate(target, p, N_NEW + TTT_K + 2).tokens for p in prompts]

    random_draft = _draft(model, target.layer_ids, 1).double().eval()
    _set_vocab(random_draft, seqs, 2)

    trained = _draft(model, target.layer_ids, 3).double()
    _set_vocab(trained, seqs, 4)
    caps = [target.capture(torch.tensor([s])) for s in seqs]
    opt = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=5e-3)
    trained.train()
    for _ in range(120):
        for s, c in zip(seqs, caps):
            ids = torch.tensor([s])
            out = ttt_forward(trained, ids, c.aux_hidden, c.logits, torch.ones_like(ids), torch.ones_like(ids),
                              ttt_length=TTT_K)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    trained.eval()
    return model, target, prompts, seqs, random_draft, trained, out.acc


@torch.no_grad()
def ttt_logits(draft, target, seq, backend="sdpa"):
    """Per step k: the draft's logits [T-2-k, Vd] inside ttt_forward (row t predicts token t+2+k), from
    the step's output hidden state (ttt_forward runs the lm_head on the counted rows only, so the spy
    sits on the layer's output and applies the lm_head to every row itself)."""
    ids = torch.tensor([seq])
    cap = target.capture(ids)
    seen = []
    orig = draft.midlayer.finish
    T = len(seq)

    def spy(h, attn):
        out = orig(h, attn)
        k = len(seen)
        seen.append(draft.logits(out[:, :T - 2 - k])[0].clone())
        return out
    draft.midlayer.finish = spy             # instance attribute shadows the method ttt_forward calls
    try:
        ttt_forward(draft, ids, cap.aux_hidden, cap.logits, torch.ones_like(ids), torch.ones_like(ids),
                    ttt_length=TTT_K, attention_backend=backend)
    finally:
        del draft.midlayer.finish
    assert [x.shape[0] for x in seen] == [len(seq) - 2 - k for k in range(TTT_K)]
    return seen


def record_decoding(dec, prompt, n_new):
    """Decode, recording per verify step: L, root logits, the logits of each drafting level, the tree."""
    steps = []
    orig_tree, orig_fwd = SpecDecoder._tree, sd.draft_forward
    levels: list | None = None

    def fwd(*a, **kw):
        out = orig_fwd(*a, **kw)
        if levels is not None:
            levels.append((a[2].clone(), a[3].clone(), out[1][0].clone()))    # ids, positions, logits [m,Vd]
        return out

    def tree(self, past, root_hidden, root_logits, root_pos, generator, context=()):
        nonlocal levels
        levels = []
        try:
            t = orig_tree(self, past, root_hidden, root_logits, root_pos, generator, context)
        finally:
            lv, levels = levels, None
        steps.append({"L": root_pos + 1, "past_len": past[0].shape[2], "root_logits": root_logits.clone(),
                      "levels": lv, "tree": t})
        return t
    sd.draft_forward = fwd
    SpecDecoder._tree = tree
    try:
        res = dec.generate(prompt, n_new)
    finally:
        SpecDecoder._tree = orig_tree
        sd.draft_forward = orig_fwd
    return res, steps


def check_consistency(draft, target, prompt, seq, steps_cfg, topk, n_tokens, tol=1e-9):
    """Returns (comparisons made, deepest step compared); asserts on any disagreement."""
    dec = SpecDecoder(target, draft, steps_cfg, topk, n_tokens)
    res, rec = record_decoding(dec, prompt, N_NEW)
    assert prompt + res.tokens == seq[:len(prompt) + len(res.tokens)], "greedy speculative decoding is not lossless"
    ttt = ttt_logits(draft, target, seq)
    d2t = draft.d2t
    n_cmp, deepest = 0, 0
    for st in rec:
        L, tr = st["L"], st["tree"]
        t = L - 1
        # The draft has consumed exactly the pairs (aux_j, token j+1), j < L, and token L is pending.
        assert st["past_len"] == L
        where = f"prompt len {len(prompt)}, verify step at L={L}, config {steps_cfg},{topk},{n_tokens}"
        torch.testing.assert_close(st["root_logits"], ttt[0][t], atol=tol, rtol=0, msg=lambda m: f"{where}: step 0 "
                                   f"logits differ from TTT at t={t}: {m}")
        top = int(ttt[0][t].argmax())
        assert tr.tokens[0] == top + int(d2t[top]), f"{where}: first proposal is not TTT step-0's argmax"
        n_cmp += 1
        # Walk the greedy path through the tree: node at depth d on it was fed the real token L+d.
        # Its first kept child (highest draft score among siblings) must be TTT step d's argmax.
        parent, d = -1, 0
        while True:
            kids = [i for i, p in enumerate(tr.parents) if p == parent]
            if not kids:
                break
            if d > 0:
                k = d
                top = int(ttt[k][t].argmax())
                assert tr.tokens[kids[0]] == top + int(d2t[top]), \
                    f"{where}: proposal {d + 1} (after {d} greedy-correct ones) is not TTT step-{k}'s argmax"
                n_cmp += 1
                deepest = max(deepest, k)
                # The level that expanded this path's node computed the same logits as TTT step k.
                ids, pos, lg = st["levels"][k - 1]
                row = [r for r in range(ids.shape[1]) if int(ids[0, r]) == seq[L + d]]
                assert all(int(p) == L - 1 + k for p in pos[0]), f"{where}: level {k} RoPE position != t + {k}"
                assert row, f"{where}: greedy node of depth {d} was expanded but is not in level {k}'s queries"
                # (Two frontier nodes may carry the same token under different parents: one must match.)
                err = min(float((lg[r] - ttt[k][t]).abs().max()) for r in row)
                assert err <= tol, f"{where}: step {k} logits differ from TTT by {err:.3g}"
            nxt = next((i for i in kids if tr.tokens[i] == seq[L + d + 1]), None)
            if nxt is None:
                break
            parent, d = nxt, d + 1
    return n_cmp, deepest


@pytest.mark.unit
def test_trained_draft_learned_the_sequences(setup):
    *_, acc = setup
    # Otherwise the deep comparisons below would rarely happen (proposals seldom on the greedy path).
    assert min(acc[:3]) > 0.5, acc


@pytest.mark.unit
@pytest.mark.parametrize("which", ["trained", "random"])
@pytest.mark.parametrize("steps,topk,n", [(3, 1, 4), (5, 1, 6), (3, 2, 8), (4, 2, 10)])
def test_spec_decode_drafts_exactly_like_ttt(setup, which, steps, topk, n):
    model, target, prompts, seqs, random_draft, trained, _ = setup
    draft = trained if which == "trained" else random_draft
    total, deepest = 0, 0
    for p, s in zip(prompts, seqs):
        c, dmax = check_consistency(draft, target, p, s, steps, topk, n)
        total, deepest = total + c, max(deepest, dmax)
    assert total > 10
    if which == "trained":
        # The trained draft is on the greedy path often enough to compare every drafting level (a tree
        # keeps its best-scored nodes, which need not reach the last level, but goes past the first).
        assert deepest == steps - 1 if topk == 1 else deepest >= 2, deepest


@pytest.mark.unit
def test_ttt_backends_agree_on_logits(setup):
    """The comparison above uses the default sdpa backend; eager (dense scores) must give the same."""
    _, target, _, seqs, _, trained, _ = setup
    a = ttt_logits(trained, target, seqs[1], "sdpa")
    b = ttt_logits(trained, target, seqs[1], "eager")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=0)


@pytest.mark.unit
def test_a_misaligned_draft_would_be_caught(setup):
    """The check can fail: drafted tokens placed one RoPE position too early (at t, not t+k, as if
    training had not shifted step k's positions) break it, although decoding stays lossless."""
    _, target, prompts, seqs, _, trained, _ = setup
    orig_fwd, orig_tree = sd.draft_forward, SpecDecoder._tree
    inside = []

    def fwd(draft, hidden, ids, positions, past, allowed):
        return orig_fwd(draft, hidden, ids, positions - 1 if inside else positions, past, allowed)

    def tree(self, *a, **kw):
        inside.append(1)
        try:
            return orig_tree(self, *a, **kw)
        finally:
            inside.pop()
    sd.draft_forward, SpecDecoder._tree = fwd, tree
    try:
        with pytest.raises(AssertionError, match="step 1 logits differ|step-1's argmax"):
            check_consistency(trained, target, prompts[0], seqs[0], 3, 1, 4)
    finally:
        sd.draft_forward, SpecDecoder._tree = orig_fwd, orig_tree


@pytest.mark.unit
@pytest.mark.parametrize("which", ["trained", "random"])
def test_teacher_forced_pass_predicts_every_verify_step(setup, which):
    """`evaluate`'s teacher-forced pass: the TTT's run lengths over the baseline's own answers predict how
    many drafts each in-process verify step accepts, exactly (float64: no near-tie can flip)."""
    from specforge_core.evaluate.teacher_forced import teacher_forced

    _, target, prompts, _, random_draft, trained, _ = setup
    draft = trained if which == "trained" else random_draft
    specs = [sd.SpecConfig.parse(c) for c in ("1,3,1,4", "1,5,1,6", "1,3,2,8")]
    base = [greedy_generate(target, p, N_NEW) for p in prompts]
    outs = {s.label: [SpecDecoder(target, draft, s.steps, s.topk, s.draft_tokens).generate(p, N_NEW)
                      for p in prompts] for s in specs if s.topk == 1}
    tf = teacher_forced(target, draft, prompts, base, specs, outs)
    assert set(tf) == {"1,3,1,4", "1,5,1,6"}                 # a tree has no chain to replay
    for label, row in tf.items():
        assert [o.tokens for o in outs[label]] == [b.tokens for b in base]
        assert row["replayed_steps"] > 10 and row["agreement"] == 1.0, (label, row)
        accepted = [a for o in outs[label] for a in o.accepted]
        if which == "trained":
            assert max(accepted) >= 2, accepted             # the replay covered accepted chains, not only misses
            assert row["acceptance_length"] > 1.5, row
        else:
            assert row["acceptance_length"] < 1.3, row


@pytest.mark.unit
def test_teacher_forced_replay_would_catch_a_shifted_anchor(setup):
    """The replay can fail: anchoring one position late (as if the prefill's token were a verify step's)
    disagrees with the decoder on the trained draft."""
    from specforge_core.evaluate import teacher_forced as tfm

    _, target, prompts, _, _, trained, _ = setup
    spec = sd.SpecConfig.parse("1,3,1,4")
    base = [greedy_generate(target, p, N_NEW) for p in prompts]
    outs = {spec.label: [SpecDecoder(target, trained, 3, 1, 4).generate(p, N_NEW) for p in prompts]}
    orig = tfm.answer_runs
    tfm.answer_runs = lambda *a, **kw: orig(*a, **kw)[1:]
    try:
        row = tfm.teacher_forced(target, trained, prompts, base, [spec], outs)[spec.label]
    finally:
        tfm.answer_runs = orig
    assert row["agreement"] < 0.8, row


@pytest.mark.unit
def test_replay_walks_the_anchors_and_stops_at_the_text_end():
    from specforge_core.evaluate.teacher_forced import replay

    runs = [2, 0, 3, 5, 1, 0, 0, 0, 0]                    # 10 answer tokens: anchors 0..8
    # anchor 0 runs 2 -> accept 2, anchor 3 runs 5 -> accept min(5, 3), anchor 7: its drafts pass token 9
    r = sd.GenerationResult(tokens=list(range(10)), verify_steps=3, accepted=[2, 3, 1])
    assert replay(runs, r, 3) == (2, 2)
    # a wrong count moves the walk too: anchor 0 right, anchor 3 (1, not 3) and anchor 5 (1, not 0) wrong
    r = sd.GenerationResult(tokens=list(range(10)), verify_steps=3, accepted=[2, 1, 1])
    assert replay(runs, r, 3) == (3, 1)
    # one draft per step: anchors 0 (1), 2 (0: its run says 1) and 3 (1)
    assert replay(runs, sd.GenerationResult(tokens=list(range(10)), accepted=[1, 0, 1]), 1) == (3, 2)
