"""The in-process regeneration decoder (specforge_core/regen/local.py): the continuous-batching fast
decoder must give exactly the tokens of a plain one-sequence greedy loop / HF `generate`, whatever
the batch size, slot count, cache growth or memory budget; sampling must be seeded and reproducible."""

from __future__ import annotations

import pytest

PROMPTS = [
    "What is 12 times 7?",
    "Write a haiku about the sea.",
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
     "How many clips did Natalia sell altogether in April and May?"),
    "Hi",
    "Explain in two sentences why the sky is blue, and then give one everyday example of the same effect.",
]


def _convs():
    return [[{"role": "user", "content": p}] for p in PROMPTS]


def plain_greedy(model, prompt: list[int], max_tokens: int, eos: list[int]) -> tuple[list[int], str]:
    """The reference: one sequence, HF forward with its own cache, argmax each step."""
    import torch

    out: list[int] = []
    with torch.inference_mode():
        o = model(torch.tensor([prompt]), use_cache=True)
        while True:
            t = int(o.logits[0, -1].argmax())
            if t in eos:
                return out, "stop"
            out.append(t)
            if len(out) >= max_tokens:
                return out, "length"
            o = model(torch.tensor([[t]]), cache=o.past_key_values, use_cache=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    import torch
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab_size=len(smol_tokenizer), hidden_size=64, num_hidden_layers=2,
                            eos_token_id=smol_tokenizer.eos_token_id, bos_token_id=smol_tokenizer.bos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make end-of-turn likely enough that some rows stop early
        model.lm_head.weight[smol_tokenizer.eos_token_id] *= 3
    d = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_gen(tiny_dir):
    from specforge_core.regen.local import LocalGenerator

    return LocalGenerator(str(tiny_dir), device="cpu", batch_size=3)


@pytest.mark.unit
def test_fast_decoder_is_chosen_for_llama(tiny_gen):
    assert tiny_gen.decoder == "fast"


@pytest.mark.unit
@pytest.mark.parametrize("batch,budget_mb,reuse_prefix,admit_min", [
    (1, 2048, True, 1), (3, 2048, True, 1), (3, 2048, False, 1), (64, 2048, True, 1), (4, 0.1, True, 1),
    (4, 2048, True, 2), (8, 2048, True, 3)])
def test_fast_greedy_equals_plain_loop(tiny_gen, batch, budget_mb, reuse_prefix, admit_min):
    """Every scheduling path (one slot, refilled slots, more slots than prompts, a budget so small the
    cache must shrink its slot count as prompts get longer, with and without the shared chat-template
    prefix computed once, slots refilled in groups once `admit_min` are free) gives the one-sequence
    greedy tokens."""
    from specforge_core.regen.local import _FastDecoder

    fd = _FastDecoder(tiny_gen.model, kv_budget_mb=budget_mb)
    fd.reuse_prefix = reuse_prefix
    fd.admit_min = admit_min
    prompts = [tiny_gen.render(c) for c in _convs()] * 2
    prompts += [p[:-3] + p[-3:] + [100 + i] for i, p in enumerate(prompts[:3])]
    ref = [plain_greedy(tiny_gen.model, p, 20, tiny_gen.eos_ids) for p in prompts]
    import torch

    with torch.inference_mode():
        got = fd.run(prompts, 20, tiny_gen.eos_ids, batch, tiny_gen._pick(0.0, 1.0))
    assert [tuple(g) for g in got] == [tuple(r) for r in ref]
    assert {r[1] for r in ref} == {"stop", "length"}  # both finish paths were exercised
    if reuse_prefix:
        with torch.inference_mode():
            assert fd.shared_prefix(prompts)[0] >= 20  # the system turn and the user header


@pytest.mark.unit
def test_fast_equals_hf_generate_replies(tiny_dir):
    from specforge_core.regen.local import LocalGenerator

    fast = LocalGenerator(str(tiny_dir), device="cpu", batch_size=4, decoder="fast")
    hf = LocalGenerator(str(tiny_dir), device="cpu", batch_size=1, decoder="hf")
    convs = _convs()
    a = fast.generate(convs, max_tokens=16, stop=["\n\n"])
    b = hf.generate(convs, max_tokens=16, stop=["\n\n"])
    assert a == b                                    # the generated ids too
    # The ids are the reply's tokens (a stop string cuts the text, not them).
    assert all(len(r.token_ids) == r.completion_tokens and r.completion_tokens > 0 for r in a)
    for r in fast.generate(convs, max_tokens=16):
        assert fast.tokenizer.decode(r.token_ids, skip_special_tokens=True) == r.content


@pytest.mark.unit
def test_sampling_is_seeded(tiny_dir):
    from specforge_core.regen.local import LocalGenerator

    convs = _convs()

    def run(seed):
        g = LocalGenerator(str(tiny_dir), device="cpu", batch_size=2, seed=seed)
        return [r.content for r in g.generate(convs, max_tokens=12, temperature=1.0, top_p=0.9)]

    first = run(1)
    assert first == run(1)
    assert first != run(2)


@pytest.mark.unit
def test_top_p_filter_matches_hf_warper():
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    from specforge_core.regen.local import _top_p_filter

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for p in (0.1, 0.5, 0.9):
        assert torch.equal(_top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits.clone()))


@pytest.mark.unit
def test_should_stop_and_zero_tokens(tiny_gen):
    convs = _convs()
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    replies = tiny_gen.generate(convs, max_tokens=30, should_stop=stop)
    assert len(replies) == len(convs) and any(r is None for r in replies)
    assert all(r.content == "" and r.finish_reason == "length" for r in tiny_gen.generate(convs, max_tokens=0))


@pytest.mark.unit
def test_unsupported_architecture_falls_back_to_hf(tiny_gen):
    from specforge_core.regen.local import fast_decoder_supported

    cfg = tiny_gen.model.config
    assert fast_decoder_supported(cfg) is None
    import copy

    other = copy.copy(cfg)
    other.model_type = "gpt2"
    assert "gpt2" in fast_decoder_supported(other)


@pytest.mark.integration
def test_smollm2_fast_greedy_equals_hf_generate(default_model_dir):
    """The acceptance check: SmolLM2 answers from the batched fast decoder equal HF `generate`
    (greedy, one prompt at a time) token for token, both in fp32 (native kernels)."""
    import torch

    from specforge_core.regen.local import LocalGenerator

    gen = LocalGenerator("default", device="cpu", batch_size=8, linear_kernel="native")
    assert gen.decoder == "fast"
    prompts = [gen.render(c) for c in _convs()]
    with torch.inference_mode():
        got = gen._fast.run(prompts, 48, gen.eos_ids, 8, gen._pick(0.0, 1.0))
    for p, (toks, finish) in zip(prompts, got):
        out = gen.model.generate(input_ids=torch.tensor([p]), max_new_tokens=48, do_sample=False,
                                 pad_token_id=gen.pad_id, eos_token_id=gen.eos_ids)[0, len(p):].tolist()
        cut = next((k for k, t in enumerate(out) if t in gen.eos_ids), None)
        ref, ref_finish = (out, "length") if cut is None else (out[:cut], "stop")
        assert toks == ref, gen.tokenizer.decode(toks) + " != " + gen.tokenizer.decode(ref)
        assert finish == ref_finish


@pytest.mark.integration
def test_smollm2_fast_decoder_under_the_packed_onednn_kernels(default_model_dir):
    """`linear_kernel=auto` runs the fast decoder's fused projections and lm_head as prepacked oneDNN
    matmuls: bf16 on a CPU that has native bf16 matmuls, fp32 elsewhere. Its next-token logits stay within
    bf16 rounding (fp32: float rounding) of F.linear's and pick the same tokens."""
    import torch

    from specforge_core.cpu_kernels import onednn_bf16_available, onednn_fp32_available
    from specforge_core.regen.local import LocalGenerator, _FastDecoder

    if not onednn_fp32_available():
        pytest.skip("this PyTorch build has no oneDNN")
    gen = LocalGenerator("default", device="cpu", batch_size=8)
    kernel = "onednn-bf16" if onednn_bf16_available() else "onednn-fp32"
    assert gen.linear_kernel == kernel and gen._fast.linear_kernel == kernel
    native = _FastDecoder(gen.model, linear_kernel="native")
    prompts = [gen.render(c) for c in _convs()]
    logits = {}
    with torch.inference_mode():
        for name, fd in (("packed", gen._fast), ("fp32", native)):
            shape = (fd.n_layers, len(prompts), fd.n_kv, 64 + max(map(len, prompts)), fd.head_dim)
            k, v = torch.zeros(shape), torch.zeros(shape)
            logits[name] = fd.prefill(k, v, list(range(len(prompts))), prompts)    # [n, vocab]
    assert torch.equal(logits["packed"].argmax(-1), logits["fp32"].argmax(-1))
    # Measured: logits std 4.4, bf16 off by 0.04 on average and 0.36 at most; a wrongly packed weight is off by ~std.
    spread, diff = logits["fp32"].std().item(), (logits["packed"] - logits["fp32"]).abs()
    if kernel == "onednn-bf16":
        assert 0 < diff.max().item() < 0.25 * spread and diff.mean().item() < 0.02 * spread
    else:
        assert diff.max().item() < 1e-3 * spread


@pytest.mark.unit
def test_replies_are_reported_as_each_one_finishes(tiny_gen):
    # The regeneration job writes each sample when its reply is done, not after the whole call.
    seen = []
    replies = tiny_gen.generate(_convs(), max_tokens=12, on_reply=lambda i, r: seen.append((i, r)))
    assert sorted(i for i, _ in seen) == list(range(len(replies)))
    assert all(replies[i] is r for i, r in seen)
