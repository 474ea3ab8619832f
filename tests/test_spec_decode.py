"""In-process speculative decoding: greedy is lossless (chain and tree, random / partial / oracle drafts),
an oracle draft hits the maximum acceptance length, a random one gives about 1, the sampling rules keep
the target's distribution, the metrics pool correctly, and `specforge-wb evaluate` runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama_config
from specforge_core.evaluate.spec_decode import (DraftTree, GenerationResult, SpecConfig, SpecDecoder,
                                                 acceptance_summary, greedy_generate)
from specforge_core.events import null_events

ROOT = Path(__file__).resolve().parents[1]
V = 512


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: thread hand-offs cost more than they give, and other suites may share the CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup():
    from transformers import LlamaForCausalLM

    from specforge_core.models.eagle3 import build_draft_config
    from specforge_core.models.registry import build_draft
    from specforge_core.models.target import Target

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=V, num_hidden_layers=6)).eval()
    target = Target(model, layer_ids=[1, 2, 4])
    # A random draft over a reduced vocabulary (half the target's ids, scattered).
    draft = build_draft(build_draft_config(model.config, 256, target.layer_ids))
    draft.load_embedding(target.embedding_weight())
    keep = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:256].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[keep] = True
    draft.set_vocab_mapping(keep - torch.arange(256), t2d)
    draft.eval()
    # A full-vocab draft for oracle proposals (every target id is proposable).
    full = build_draft(build_draft_config(model.config, V, target.layer_ids))
    full.load_embedding(target.embedding_weight())
    full.eval()
    g = torch.Generator().manual_seed(123)
    prompts = [torch.randint(0, V, (int(torch.randint(1, 24, (), generator=g)),), generator=g).tolist()
               for _ in range(20)]
    return model, target, draft, full, prompts


def oracle(model, noise: float = 0.0, seed: int = 0):
    """The target's own next-token function as draft logits; `noise` > 0 makes it wrong part of the time
    (the true token usually stays among the top few, so trees accept off the first branch)."""
    gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def f(tokens):
        lg = model(torch.tensor([tokens])).logits[0, -1].float()
        if noise == 0:
            return torch.full_like(lg, -1e4).scatter(0, lg.argmax()[None], 0.0)  # one-hot: certain
        lg = (lg - lg.mean()) / lg.std()
        return lg + noise * torch.randn(lg.shape, generator=gen)
    return f


CONFIGS = [(3, 1, 4), (2, 2, 4), (4, 2, 6), (3, 4, 10)]
N_NEW = 24


@pytest.mark.unit
def test_plain_greedy_matches_hf_generate(setup):
    model, target, *_, prompts = setup
    for p in prompts[:5]:
        ref = model.generate(torch.tensor([p]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
        assert greedy_generate(target, p, N_NEW).tokens == ref[0, len(p):].tolist()


@pytest.mark.unit
@pytest.mark.parametrize("steps,topk,n", CONFIGS)
def test_greedy_lossless_random_draft(setup, steps, topk, n):
    _, target, draft, _, prompts = setup
    dec = SpecDecoder(target, draft, steps, topk, n)
    for p in prompts:
        ref = greedy_generate(target, p, N_NEW).tokens
        assert dec.generate(p, N_NEW).tokens == ref, p


@pytest.mark.unit
@pytest.mark.parametrize("steps,topk,n", CONFIGS)
def test_greedy_lossless_partial_oracle(setup, steps, topk, n):
    """A draft that is right part of the time: partial acceptance, tree paths off the first branch
    (the target cache is gathered, not cropped), rejections at every depth."""
    model, target, _, full, prompts = setup
    dec = SpecDecoder(target, full, steps, topk, n, propose_override=oracle(model, noise=0.6))
    results = []
    for p in prompts[:8]:
        ref = greedy_generate(target, p, N_NEW).tokens
        r = dec.generate(p, N_NEW)
        assert r.tokens == ref, p
        results.append(r)
    acc = [a for r in results for a in r.accepted]
    assert any(0 < a for a in acc) and any(a == 0 for a in acc)
    s = acceptance_summary(results, steps)
    assert 1.05 < s["acceptance_length"] < steps + 1


@pytest.mark.unit
@pytest.mark.parametrize("steps,topk,n", [(3, 1, 4), (5, 1, 6), (3, 2, 4), (3, 4, 8)])
def test_oracle_draft_reaches_maximum_acceptance(setup, steps, topk, n):
    model, target, _, full, prompts = setup
    dec = SpecDecoder(target, full, steps, topk, n, propose_override=oracle(model))
    results = [dec.generate(p, 1 + 4 * (steps + 1)) for p in prompts[:4]]
    for p, r in zip(prompts, results):
        assert r.tokens == greedy_generate(target, p, 1 + 4 * (steps + 1)).tokens
        assert r.accepted == [steps] * 4 and r.verify_steps == 4
    s = acceptance_summary(results, steps)
    assert s["acceptance_length"] == steps + 1
    assert s["per_position_accept_rate"] == [1.0] * steps
    assert s["accept_histogram"][str(steps)] == 16


@pytest.mark.unit
def test_random_draft_acceptance_about_one(setup):
    _, target, draft, _, prompts = setup
    dec = SpecDecoder(target, draft, 3, 1, 4)
    s = acceptance_summary([dec.generate(p, N_NEW) for p in prompts[:10]], 3)
    assert 1.0 <= s["acceptance_length"] < 1.2
    base = greedy_generate(target, prompts[0], N_NEW)
    assert acceptance_summary([base], 0)["acceptance_length"] == 1.0


@pytest.mark.unit
def test_pooled_vs_per_request_acceptance():
    # request A: 2 verify steps accepting 3 and 3 drafts -> 8 tokens / 2 = 4.0
    # request B: 6 verify steps accepting nothing        -> 6 tokens / 6 = 1.0
    a = GenerationResult(tokens=[0] * 9, verify_steps=2, accepted=[3, 3])
    b = GenerationResult(tokens=[0] * 7, verify_steps=6, accepted=[0] * 6)
    s = acceptance_summary([a, b], steps=3)
    assert s["acceptance_length"] == pytest.approx(14 / 8)
    assert s["acceptance_length_per_request_mean"] == pytest.approx((4.0 + 1.0) / 2)
    assert s["verify_steps"] == 8 and s["verified_tokens"] == 14
    assert s["accept_histogram"] == {"0": 6, "1": 0, "2": 0, "3": 2}
    assert s["per_position_accept_rate"] == [pytest.approx(2 / 8)] * 3
    c = GenerationResult(tokens=[0] * 4, verify_steps=2, accepted=[2, 0])
    s = acceptance_summary([c], steps=3)
    assert s["per_position_accept_rate"] == [0.5, 0.5, 0.0]


@pytest.mark.unit
def test_spec_config_parse():
    assert SpecConfig.parse("1,3,1,4") == SpecConfig(1, 3, 1, 4)
    assert not SpecConfig.parse("1,0,0,0").speculative
    assert SpecConfig.parse("4,5,8,32").draft_tokens == 32
    for bad, msg in [("1,3,1", "4 comma"), ("1,3,1,5", "steps \\+ 1"), ("1,x,1,4", "integer"),
                     ("0,3,1,4", "batch"), ("1,2,2,20", "exceeds"), ("1,3,0,4", "topk")]:
        with pytest.raises(ValueError, match=msg):
            SpecConfig.parse(bad)


def _first_token_freq(dec, tree, logits, n, seed=0):
    """Frequencies of the first output token over n acceptance draws; `tree` may be a function of the
    generator (a chain whose draft token is sampled from q, as the min(1, p/q) rule assumes)."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(logits.shape[1])
    make = tree if callable(tree) else (lambda _g: tree)
    for _ in range(n):
        t = make(gen)
        path, bonus = dec._accept(t, logits, gen)
        counts[t.tokens[path[0] - 1] if path else bonus] += 1
    return counts / n


@pytest.mark.unit
def test_chain_sampling_rule_keeps_target_distribution(setup):
    _, target, _, full, _ = setup
    dec = SpecDecoder(target, full, 1, 1, 2, temperature=1.0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.full((2, V), -1e9)
    logits[:, :4] = p.log()
    q = torch.zeros(V)
    q[:4] = torch.tensor([0.1, 0.6, 0.1, 0.2])   # the draft over-proposes token 1

    def chain(g):
        d = int(torch.multinomial(q, 1, generator=g))
        return DraftTree(tokens=[d], parents=[-1], depths=[1], draft_probs=[q])
    freq = _first_token_freq(dec, chain, logits, 4000)
    assert torch.allclose(freq[:4], p, atol=0.03), freq[:4]


@pytest.mark.unit
def test_tree_sampling_rule_keeps_target_distribution(setup):
    _, target, _, full, _ = setup
    dec = SpecDecoder(target, full, 1, 2, 3, temperature=1.0)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = torch.full((3, V), -1e9)
    logits[:, :4] = p.log()
    tree = DraftTree(tokens=[3, 1], parents=[-1, -1], depths=[1, 1], draft_probs=[None, None])
    freq = _first_token_freq(dec, tree, logits, 4000)
    assert torch.allclose(freq[:4], p, atol=0.03), freq[:4]


@pytest.mark.unit
@pytest.mark.parametrize("steps,topk,n", [(3, 1, 4), (3, 2, 6)])
def test_sampling_generation_is_seeded(setup, steps, topk, n):
    model, target, _, full, prompts = setup

    def run():   # a fresh oracle each time: its noise generator is state too
        dec = SpecDecoder(target, full, steps, topk, n, temperature=0.8, propose_override=oracle(model, noise=0.3))
        return dec.generate(prompts[0], 20, generator=torch.Generator().manual_seed(5))
    a, b = run(), run()
    assert a.tokens == b.tokens and len(a.tokens) == 20
    assert sum(x + 1 for x in a.accepted) >= 19 and max(a.accepted) <= steps


@pytest.mark.unit
def test_eos_stops_generation(setup):
    model, target, _, full, prompts = setup
    ref = greedy_generate(target, prompts[1], N_NEW).tokens
    eos = ref[7]
    stop = ref.index(eos)
    dec = SpecDecoder(target, full, 3, 1, 4, propose_override=oracle(model))
    r = dec.generate(prompts[1], N_NEW, eos_ids=[eos])
    assert r.tokens == ref[:stop + 1] and r.stopped == "eos"


# ------------------------------------------------------------------------------------------------
# The job and the CLI, on a tiny target with SmolLM2's real tokenizer
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from specforge_core.models.eagle3 import build_draft_config
    from specforge_core.models.registry import build_draft
    from specforge_core.models.target import default_layer_ids
    from specforge_core.targets import load_tokenizer
    from specforge_core.training.checkpoint import save_checkpoint
    from specforge_core.training.config import ExportConfig
    from specforge_core.training.export import export_draft

    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab_size=49152, hidden_size=32, num_hidden_layers=8)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    LlamaForCausalLM(cfg).save_pretrained(root / "target")
    load_tokenizer("default").save_pretrained(root / "target")
    dcfg = build_draft_config(cfg, 512, default_layer_ids(8))
    draft = build_draft(dcfg)
    keep = torch.randperm(49152, generator=torch.Generator().manual_seed(2))[:512].sort().values
    t2d = torch.zeros(49152, dtype=torch.bool)
    t2d[keep] = True
    draft.set_vocab_mapping(keep - torch.arange(512), t2d)
    save_checkpoint(root / "run", 1, draft.state_dict(), None, None, {"step": 1}, dcfg.to_dict(), 1, True)
    export_draft(ExportConfig(checkpoint=str(root / "run"), output=str(root / "serve"), target=str(root / "target"),
                              dtype="float32"), null_events())
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": "What is the capital of France?"},
            {"id": "c1", "conversations": [{"role": "user", "content": "Say hi."},
                                           {"role": "assistant", "content": "Hi!"}]},
            {"turns": ["Tell me a story.", "Shorter."], "category": "writing"},
            "not an object",
            {"conversations": [{"role": "wizard", "content": "?"}]}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n", encoding="utf-8")
    return root


@pytest.mark.unit
def test_evaluate_job_on_checkpoint_dir(tiny_dirs, tmp_path):
    from specforge_core.evaluate.config import EvaluateConfig
    from specforge_core.evaluate.inprocess import evaluate
    from specforge_core.events import Events

    ev = Events(None, echo=False)
    cfg = EvaluateConfig(target=str(tiny_dirs / "target"), draft=str(tiny_dirs / "run"),
                         prompts=str(tiny_dirs / "prompts.jsonl"), configs=["1,2,1,3", "1,2,2,4"],
                         max_new_tokens=12, output=str(tmp_path / "res.json"), device="cpu")
    out = evaluate(cfg, ev)
    assert out["prompts"] == 3 and out["finished"]
    warnings = [r["message"] for r in ev.records if r["event"] == "warning"]
    assert any("prompts.jsonl:4" in w for w in warnings) and any("3 prompt row(s) skipped" in w for w in warnings)
    saved = json.loads((tmp_path / "res.json").read_text())
    assert saved["baseline"]["acceptance_length"] == 1.0
    assert [r["config"] for r in saved["results"]] == ["1,2,1,3", "1,2,2,4"]
    for r in saved["results"]:
        assert r["mismatches_vs_baseline"] == 0
        assert 1.0 <= r["acceptance_length"] < 1.5 and r["speedup"] > 0
        assert r["completion_tokens"] == saved["baseline"]["completion_tokens"]
        assert len(r["per_position_accept_rate"]) == 2
        # The profile adds up: prefill + target + draft + bookkeeping = the mode's wall time.
        tb = r["time_breakdown"]
        assert tb["target_s"] > 0 and tb["draft_s"] > 0 and tb["other_s"] >= 0
        assert abs(tb["prefill_s"] + tb["target_s"] + tb["draft_s"] + tb["other_s"] - r["wall_s"]) < 1e-2
        assert r["verify_step_cost_in_decode_steps"] > 0
    assert saved["baseline"]["time_breakdown"]["draft_s"] == 0 and saved["prompts_done"] == 3
    # MT-bench-style rows carry a category: each mode is broken down by it (the other prompts have none)
    chain, tree = saved["results"]
    for r in (chain, tree):
        (cat,) = r["by_category"].items()
        assert cat[0] == "writing" and cat[1]["prompts"] == 1 and cat[1]["acceptance_length"] >= 1.0, r["by_category"]
    assert saved["baseline"]["by_category"]["writing"]["speedup"] is None
    # the teacher-forced pass: chain configs only, over every prompt, and by category
    tf = chain["teacher_forced"]
    assert tf["anchors"] > 0 and tf["replayed_steps"] > 0 and 1.0 <= tf["acceptance_length"] < 1.5, tf
    assert set(tf["by_category"]) == {"writing"} and tf["by_category"]["writing"]["anchors"] < tf["anchors"]
    assert "teacher_forced" not in tree and "teacher_forced" in saved["teacher_forced_definition"]


@pytest.mark.unit
def test_a_stopped_evaluation_resumes_where_it_stopped(tiny_dirs, tmp_path):
    from specforge_core.config import ConfigError
    from specforge_core.evaluate.config import EvaluateConfig
    from specforge_core.evaluate.inprocess import evaluate, generations_path
    from specforge_core.events import Events, JobCancelled

    def cfg(out, **kw):
        return EvaluateConfig(**{"target": str(tiny_dirs / "target"), "draft": str(tiny_dirs / "run"),
                                 "prompts": str(tiny_dirs / "prompts.jsonl"), "configs": ["1,2,1,3", "1,2,2,4"],
                                 "max_new_tokens": 10, "output": str(out), "device": "cpu", **kw})

    whole = evaluate(cfg(tmp_path / "whole.json"), Events(None, echo=False))

    class StopAt(Events):   # a user pressing Cancel during the second prompt's second mode
        def progress(self, done, total, what="items", force=False, **f):
            if done == 5:
                self.cancel()
            return super().progress(done, total, what, force, **f)

    out = tmp_path / "r.json"
    with pytest.raises(JobCancelled, match="--resume"):
        evaluate(cfg(out), StopAt(None, echo=False, progress_interval=0))
    gens = generations_path(out)
    assert len(gens.read_text().splitlines()) == 1 + 1           # header + the one prompt every mode ran
    assert json.loads(out.read_text())["prompts_done"] == 1
    with open(gens, "a") as f:                                    # a kill in the middle of the next line
        f.write('{"prompt": 1, "id": "c1", "resu')

    ev = Events(None, echo=False, progress_interval=0)
    res = evaluate(cfg(out, resume=True), ev)
    resumed = [r for r in ev.records if r["event"] == "evaluate_resumed"]
    assert resumed and resumed[0]["prompts_done"] == 1
    assert any("torn last line" in r.get("message", "") for r in ev.records if r["event"] == "warning")
    ran = [r["done"] for r in ev.records if r["event"] == "progress" and r["what"] == "generations"]
    assert ran[0] == 4 and ran[-1] == 9                          # only prompts 2 and 3 ran again
    assert res["finished"] and res["prompts_done"] == 3
    for a, b in zip(res["results"], whole["results"]):
        assert a["completion_tokens"] == b["completion_tokens"] and a["mismatches_vs_baseline"] == 0
        assert a["acceptance_length"] == pytest.approx(b["acceptance_length"])

    with pytest.raises(ConfigError, match=r"r\.generations\.jsonl.*max_new_tokens was 10, now 12"):
        evaluate(cfg(out, resume=True, max_new_tokens=12), Events(None, echo=False))
    fresh = evaluate(cfg(out, max_new_tokens=12), Events(None, echo=False))   # without --resume: over
    assert fresh["prompts_done"] == 3 and len(gens.read_text().splitlines()) == 4


@pytest.mark.unit
def test_evaluate_cli_on_serving_export(tiny_dirs, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "cli.json"
    cmd = [sys.executable, "-m", "specforge_core", "evaluate", "--quiet", "--json",
           "--target", str(tiny_dirs / "target"), "--draft", str(tiny_dirs / "serve"),
           "--prompts", str(tiny_dirs / "prompts.jsonl"), "--config", "1,3,1,4", "1,1,4,5",
           "--max-new-tokens", "8", "--max-prompts", "2", "--output", str(out), "--device", "cpu"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["draft_kind"] == "serving" and res["prompts"] == 2
    assert [r["config"] for r in res["results"]] == ["1,3,1,4", "1,1,4,5"]
    assert json.loads(out.read_text())["finished"]
    bad = subprocess.run(cmd[:-8] + ["--config", "1,3,1,5"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "steps + 1" in bad.stderr
