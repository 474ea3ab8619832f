"""In-process Medusa decoding: greedy is lossless (chain and tree; random, partial-oracle and oracle heads;
several prompts and lengths; eos), oracle heads reach the maximum acceptance length, the candidate tree
is ancestor-closed and best-first, sampling is seeded, and the summary has EAGLE3's fields."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import tiny_llama_config
from specforge_core.evaluate import medusa_decode
from specforge_core.evaluate.medusa_decode import MedusaDecoder, medusa_tree
from specforge_core.evaluate.spec_decode import acceptance_summary, greedy_generate

V = 512
K = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_medusa(target, num_heads: int, keep: torch.Tensor | None = None, seed: int = 0) -> nn.Module:
    """A Medusa draft over `keep` (ascending target ids; None = the full vocabulary), built through the
    registry, heads initialised from the target's lm_head (as the family does) and blocks randomised."""
    from specforge_core.models.registry import build_draft, family

    torch.manual_seed(seed)
    Vd = V if keep is None else keep.numel()
    draft = build_draft(family("medusa").build_config(target.config, Vd, None, {"num_heads": num_heads}))
    if keep is not None:
        t2d = torch.zeros(V, dtype=torch.bool)
        t2d[keep] = True
        draft.set_vocab_mapping(keep - torch.arange(Vd), t2d)
    draft.init_from_target(target.lm_head_weight().detach().float())
    with torch.no_grad():
        for block in draft.blocks:
            for lin in block.layers:
                lin.weight.normal_(0, 0.2)
    return draft.eval()


@pytest.fixture(scope="module")
def setup():
    from transformers import LlamaForCausalLM

    from specforge_core.models.target import Target

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=V, num_hidden_layers=4)).eval()
    target = Target(model, aux=False)
    keep = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:256].sort().values
    reduced = make_medusa(target, K, keep)
    full = make_medusa(target, K, None, seed=1)
    g = torch.Generator().manual_seed(123)
    prompts = [torch.randint(0, V, (int(torch.randint(1, 24, (), generator=g)),), generator=g).tolist()
               for _ in range(12)]
    return model, target, reduced, full, prompts


def oracle_heads(target, noise: float = 0.0, seed: int = 0):
    """Heads that know the target's greedy continuation: head i's logits peak at the token the target
    would produce i+1 tokens after the pending one. With `noise`, Gaussian logits with a bump at the true
    token: right at top-1 part of the time, often among the top few (tree paths off the first branch)."""
    gen = torch.Generator().manual_seed(seed)

    def f(tokens):
        truth = greedy_generate(target, tokens, K).tokens
        lg = torch.full((K, V), -1e4) if noise == 0 else noise * torch.randn(K, V, generator=gen)
        for i, t in enumerate(truth[:K]):
            lg[i, t] = 0.0 if noise == 0 else lg[i].max() + float(torch.randn((), generator=gen)) * noise
        return lg
    return f


CONFIGS = [(3, 1, 4), (1, 1, 2), (4, 1, 5), (2, 2, 4), (3, 2, 7), (3, 4, 10)]
LENGTHS = [1, 2, 5, 24]


@pytest.mark.unit
def test_medusa_tree_best_first_and_ancestor_closed():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    ids, parents, depths = medusa_tree(logits, 1, 3)          # chain: argmax of each head
    assert ids == logits.argmax(-1).tolist() and parents == [-1, 0, 1] and depths == [1, 2, 3]
    ids, parents, depths = medusa_tree(logits, 3, 9)
    logp = torch.log_softmax(logits, -1)
    assert len(ids) == 9 and depths[0] == 1
    score = []
    for i, (t, p, d) in enumerate(zip(ids, parents, depths)):
        assert p < i and (p == -1) == (d == 1) and (p < 0 or depths[p] == d - 1)
        assert t in logp[d - 1].topk(3).indices.tolist()
        score.append(float(logp[d - 1, t]) + (score[p] if p >= 0 else 0.0))
    # best-first: no unselected candidate scores above the worst selected node
    worst = min(score)
    for i in range(len(ids)):
        if depths[i] < 3:
            for t in logp[depths[i]].topk(3).indices.tolist():
                if not any(parents[j] == i and ids[j] == t for j in range(len(ids))):
                    assert score[i] + float(logp[depths[i], t]) <= worst + 1e-6
    top1 = logp[0].topk(3)
    assert all(float(top1.values[j]) <= worst + 1e-6 or top1.indices[j] in
               [ids[i] for i in range(9) if depths[i] == 1] for j in range(3))


@pytest.mark.unit
@pytest.mark.parametrize("steps,topk,n", CONFIGS)
def test_greedy_lossless_random_heads(setup, steps, topk, n):
    _, target, reduced, _, prompts = setup
    dec = MedusaDecoder(target, reduced, steps, topk, n)
    for p in prompts[:6]:
        for new in LENGTHS:
            ref = greedy_generate(target, p, new).tokens
            r = dec.generate(p, new)
            assert r.tokens == ref, (p, new)
            assert r.step_tokens >= len(r.tokens) - 1 and max(r.accepted or [0]) <= steps


@pytest.mark.unit
@pytest.mark.parametrize("steps,topk,n", CONFIGS)
def test_greedy_lossless_partial_oracle(setup, steps, topk, n, monkeypatch):
    """Heads right part of the time: partial acceptance at every depth and, for trees, accepted paths off
    the first branch (the target cache is gathered, not cropped)."""
    _, target, _, full, prompts = setup
    paths = []
    real = medusa_decode.accept_path

    def spy(tree, *a, **kw):
        path, bonus = real(tree, *a, **kw)
        paths.append(path)
        return path, bonus
    monkeypatch.setattr(medusa_decode, "accept_path", spy)
    dec = MedusaDecoder(target, full, steps, topk, n, propose_override=oracle_heads(target, noise=1.0))
    results = []
    for p in prompts[:8]:
        ref = greedy_generate(target, p, 24).tokens
        r = dec.generate(p, 24)
        assert r.tokens == ref, p
        results.append(r)
    acc = [a for r in results for a in r.accepted]
    assert any(a == 0 for a in acc) and any(a > 0 for a in acc)
    if topk > 1:
        assert any(path and path != list(range(1, len(path) + 1)) for path in paths)
    s = acceptance_summary(results, steps)
    assert 1.0 < s["acceptance_length"] <= steps + 1


@pytest.mark.unit
@pytest.mark.parametrize("steps,topk,n", [(3, 1, 4), (4, 1, 5), (2, 3, 5), (3, 2, 7)])
def test_oracle_heads_reach_maximum_acceptance(setup, steps, topk, n):
    _, target, _, full, prompts = setup
    dec = MedusaDecoder(target, full, steps, topk, n, propose_override=oracle_heads(target))
    new = 1 + 4 * (steps + 1)
    results = [dec.generate(p, new) for p in prompts[:3]]
    for p, r in zip(prompts, results):
        assert r.tokens == greedy_generate(target, p, new).tokens
        assert r.accepted == [steps] * 4 and r.verify_steps == 4
    s = acceptance_summary(results, steps)
    assert s["acceptance_length"] == steps + 1
    assert s["per_position_accept_rate"] == [1.0] * steps
    assert s["accept_histogram"] == {**{str(j): 0 for j in range(steps)}, str(steps): 12}
    for key in ("acceptance_length_sglang", "acceptance_length_per_request_mean", "verify_steps",
                "verified_tokens"):
        assert s[key] is not None


@pytest.mark.unit
@pytest.mark.parametrize("steps,topk,n", [(3, 1, 4), (3, 2, 7)])
def test_eos_stops_inside_accepted_drafts(setup, steps, topk, n):
    _, target, _, full, prompts = setup
    for p in prompts[:4]:
        ref = greedy_generate(target, p, 24).tokens
        eos = ref[6]
        stop = ref.index(eos)
        dec = MedusaDecoder(target, full, steps, topk, n, propose_override=oracle_heads(target))
        r = dec.generate(p, 24, eos_ids=[eos])
        assert r.tokens == ref[:stop + 1] and r.stopped == "eos"
        assert r.tokens == greedy_generate(target, p, 24, eos_ids=[eos]).tokens
    # eos as the very first token (from the prefill): no verify step at all
    first = greedy_generate(target, prompts[0], 1).tokens[0]
    r = MedusaDecoder(target, full, 3, 1, 4).generate(prompts[0], 24, eos_ids=[first])
    assert r.tokens == [first] and r.verify_steps == 0 and r.stopped == "eos"


@pytest.mark.unit
def test_sampling_is_seeded_and_bounded(setup):
    _, target, reduced, full, prompts = setup

    def run(draft, topk, n, override=None):
        dec = MedusaDecoder(target, draft, 3, topk, n, temperature=0.8, propose_override=override)
        return dec.generate(prompts[0], 20, generator=torch.Generator().manual_seed(5))
    for topk, n in [(1, 4), (2, 6)]:
        a, b = run(reduced, topk, n), run(reduced, topk, n)
        assert a.tokens == b.tokens and len(a.tokens) == 20
        c = run(full, topk, n, oracle_heads(target, noise=0.5, seed=3))
        assert len(c.tokens) == 20 and max(c.accepted) <= 3


@pytest.mark.unit
def test_config_errors(setup):
    _, target, reduced, _, _ = setup
    with pytest.raises(ValueError, match="4 heads"):
        MedusaDecoder(target, reduced, 5, 1, 6)
    with pytest.raises(ValueError, match="steps \\+ 1"):
        MedusaDecoder(target, reduced, 3, 1, 5)
    with pytest.raises(ValueError, match="steps"):
        MedusaDecoder(target, reduced, 0, 1, 1)


# ------------------------------------------------------------------------------------------------
# The evaluate job on a tiny target with SmolLM2's real tokenizer: checkpoint and serving export
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def medusa_dirs(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from specforge_core.events import null_events
    from specforge_core.models.registry import build_draft, family
    from specforge_core.targets import load_tokenizer
    from specforge_core.training.checkpoint import save_checkpoint
    from specforge_core.training.config import ExportConfig
    from specforge_core.training.export import export_draft

    root = tmp_path_factory.mktemp("evaluate_medusa")
    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab_size=49152, hidden_size=32, num_hidden_layers=4)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "target")
    load_tokenizer("default").save_pretrained(root / "target")
    dcfg = family("medusa").build_config(cfg, 512, None, {"num_heads": 3})
    draft = build_draft(dcfg)
    keep = torch.randperm(49152, generator=torch.Generator().manual_seed(2))[:512].sort().values
    t2d = torch.zeros(49152, dtype=torch.bool)
    t2d[keep] = True
    draft.set_vocab_mapping(keep - torch.arange(512), t2d)
    draft.init_from_target(model.lm_head.weight.detach())
    save_checkpoint(root / "run", 1, draft.state_dict(), None, None, {"step": 1}, dcfg.to_dict(), 1, True)
    export_draft(ExportConfig(checkpoint=str(root / "run"), output=str(root / "serve"), target=str(root / "target"),
                              dtype="float32"), null_events())
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": "What is the capital of France?"}, {"turns": ["Tell me a story.", "Shorter."]},
            {"prompt": "Count to ten."}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return root


@pytest.mark.unit
@pytest.mark.parametrize("which", ["serve", "run"])
def test_evaluate_job_runs_medusa(medusa_dirs, tmp_path, which):
    from specforge_core.evaluate.config import EvaluateConfig
    from specforge_core.evaluate.inprocess import evaluate
    from specforge_core.events import Events

    ev = Events(None, echo=False)
    out = tmp_path / "res.json"
    cfg = EvaluateConfig(target=str(medusa_dirs / "target"), draft=str(medusa_dirs / which),
                         prompts=str(medusa_dirs / "prompts.jsonl"), configs=["1,3,1,4", "1,2,2,4", "1,3,3,8"],
                         max_new_tokens=12, output=str(out), device="cpu")
    res = evaluate(cfg, ev)
    saved = json.loads(out.read_text())
    assert res["finished"] and saved["finished"] and saved["draft_family"] == "medusa"
    assert saved["draft_kind"] == ("serving" if which == "serve" else "checkpoint")
    assert saved["baseline"]["acceptance_length"] == 1.0
    assert [r["config"] for r in saved["results"]] == ["1,3,1,4", "1,2,2,4", "1,3,3,8"]
    start = next(r for r in ev.records if r["event"] == "evaluate_start")
    assert start["draft_family"] == "medusa" and start["aux_layer_ids"] == []
    # The same fields as an EAGLE3 run, so the two families share one table.
    for r in saved["results"]:
        for key in ("acceptance_length", "acceptance_length_sglang", "acceptance_length_per_request_mean",
                    "accept_histogram", "per_position_accept_rate", "tokens_per_s", "speedup",
                    "completion_tokens", "verify_steps", "mismatches_vs_baseline"):
            assert r[key] is not None, key
        assert r["mismatches_vs_baseline"] == 0 and r["draft_family"] == "medusa"
        assert r["completion_tokens"] == saved["baseline"]["completion_tokens"]
        assert len(r["per_position_accept_rate"]) == r["steps"] and len(r["accept_histogram"]) == r["steps"] + 1
        assert 1.0 <= r["acceptance_length"] <= r["steps"] + 1


@pytest.mark.unit
def test_evaluate_refuses_more_heads_than_the_draft_has(medusa_dirs, tmp_path):
    from specforge_core.evaluate.config import EvaluateConfig
    from specforge_core.evaluate.inprocess import evaluate
    from specforge_core.events import Events

    ev = Events(None, echo=False)
    cfg = EvaluateConfig(target=str(medusa_dirs / "target"), draft=str(medusa_dirs / "serve"),
                         prompts=str(medusa_dirs / "prompts.jsonl"), configs=["1,3,1,4", "1,4,1,5"],
                         max_new_tokens=4, output=str(tmp_path / "res.json"), device="cpu")
    with pytest.raises(ValueError, match="3 heads"):
        evaluate(cfg, ev)
    assert not (tmp_path / "res.json").exists()   # refused before any generation (not even the baseline)


@pytest.mark.unit
def test_reference_server_decoder_for_medusa(medusa_dirs):
    """`serve-reference --draft MEDUSA_DIR` decodes with the Medusa decoder (lossless) and says MEDUSA."""
    from specforge_core.evaluate.config import ServeReferenceConfig
    from specforge_core.evaluate.refserver import load_decoder

    dec, tok = load_decoder(ServeReferenceConfig(target=str(medusa_dirs / "target"), draft=str(medusa_dirs / "serve"),
                                                 steps=2, topk=2, device="cpu"))
    assert isinstance(dec.dec, MedusaDecoder) and dec.algorithm == "MEDUSA"
    ids = tok("Hello there")["input_ids"]
    out, verify, accepted = dec.generate(ids, 10, 0.0)
    assert out == greedy_generate(dec.dec.target, ids, 10, dec.eos_ids).tokens and len(accepted) == verify
