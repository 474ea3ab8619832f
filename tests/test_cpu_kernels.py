"""The CPU decoding kernels (`cpu_kernels.py`): prepacked oneDNN linears (bf16 where the CPU has native bf16
matmuls, fp32 on any x86 CPU; each test runs for every kernel this CPU has) give each row the same bits
whatever the number of rows in the call, row-wise attention makes a verify forward (chain or
tree) bit-identical to decoding its tokens one by one, and `evaluate` uses them for every mode alike,
says so in its results, and stays token-identical to plain greedy decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama_config
from specforge_core.evaluate.spec_decode import DraftTree, TargetRunner, verify_inputs
from specforge_core.cpu_kernels import (PACKED_KERNELS, PackedLinear, onednn_bf16_available, onednn_fp32_available,
                                        pack_linears, use_rowwise_attention)
from test_spec_decode import tiny_dirs  # noqa: F401 - the fixture: a tiny target, a draft run, prompts

pytestmark = pytest.mark.unit
KERNELS = [pytest.param("onednn-bf16", marks=pytest.mark.skipif(not onednn_bf16_available(),
                                                                reason="this CPU has no native oneDNN bf16")),
           pytest.param("onednn-fp32", marks=pytest.mark.skipif(not onednn_fp32_available(),
                                                                reason="this PyTorch build has no oneDNN"))]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_linear_rows_do_not_depend_on_the_batch(kernel):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 200, bias=True)
    dtype = PACKED_KERNELS[kernel]
    packed = PackedLinear(lin, dtype=dtype)
    x = torch.randn(2, 4, 96)
    y = packed(x)
    assert y.shape == (2, 4, 200) and y.dtype == torch.float32
    ref = F.linear(x.to(dtype).float(), lin.weight.to(dtype).float(), lin.bias.to(dtype).float())
    tol = dict(atol=0.05, rtol=0.02) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    assert torch.allclose(y, ref, **tol)
    rows = torch.cat([packed(x.reshape(8, 96)[i:i + 1]) for i in range(8)])
    assert torch.equal(rows, y.reshape(8, 200))            # bit for bit, 1 row at a time vs 8
    assert packed.weight is lin.weight                      # code reading .weight.dtype still works


@pytest.mark.parametrize("kernel", KERNELS)
def test_pack_linears_swaps_every_linear_and_keeps_the_state_dict(tiny_llama, kernel):
    names = set(tiny_llama.state_dict())
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in tiny_llama.modules())
    assert pack_linears(tiny_llama, kernel) == n_linear > 0
    assert not any(isinstance(m, torch.nn.Linear) for m in tiny_llama.modules())
    assert {m.compute_dtype for m in tiny_llama.modules() if isinstance(m, PackedLinear)} == {PACKED_KERNELS[kernel]}
    assert set(tiny_llama.state_dict()) == names


@pytest.fixture(scope="module", params=KERNELS)
def packed_target(request):
    from transformers import LlamaForCausalLM

    from specforge_core.models.target import Target

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=512, num_hidden_layers=4)).eval()
    pack_linears(model, request.param)
    use_rowwise_attention(model)
    return Target(model, layer_ids=[0, 1, 2])


def _prefill(runner, ids):
    cache = runner.new_cache()
    runner.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache, capture=False)
    return cache


def _decode(runner, prompt, path):
    """Logits [len(path), V] of decoding `path` one token at a time after `prompt`."""
    cache = _prefill(runner, prompt)
    out = []
    for j, t in enumerate(path):
        logits, _ = runner.forward(torch.tensor([[t]]), torch.tensor([[len(prompt) + j]]), cache, capture=False)
        out.append(logits[-1])
    return torch.stack(out)


def test_a_chain_verify_equals_decode_steps_bit_for_bit(packed_target):
    runner = TargetRunner(packed_target)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 512, (37,), generator=g).tolist()
    new = torch.randint(0, 512, (6,), generator=g).tolist()
    steps = _decode(runner, prompt, new)
    cache = _prefill(runner, prompt)
    P = len(prompt)
    for allowed in (None, torch.tril(torch.ones(6, 6, dtype=torch.bool))):
        cache = _prefill(runner, prompt)
        wide, _ = runner.forward(torch.tensor([new]), torch.arange(P, P + 6)[None], cache, allowed=allowed,
                                 capture=False)
        assert torch.equal(wide, steps)


def test_a_tree_verify_equals_decoding_each_nodes_path(packed_target):
    runner = TargetRunner(packed_target)
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 512, (29,), generator=g).tolist()
    pending = 7
    # root -> a, b; a -> c, d; b -> e; c -> f
    tree = DraftTree(tokens=[11, 12, 13, 14, 15, 16], parents=[-1, -1, 0, 0, 1, 2], depths=[1, 1, 2, 2, 2, 3])
    ids, pos, allowed = verify_inputs(pending, tree, len(prompt), "cpu")
    assert allowed is not None
    cache = _prefill(runner, prompt)
    wide, _ = runner.forward(ids, pos, cache, allowed=allowed, capture=False)
    for node in range(len(tree.tokens)):
        path, a = [], node
        while a >= 0:
            path.insert(0, tree.tokens[a])
            a = tree.parents[a]
        steps = _decode(runner, prompt, [pending] + path)
        assert torch.equal(wide[node + 1], steps[-1]), f"node {node}"
    assert torch.equal(wide[0], _decode(runner, prompt, [pending])[0])


def _evaluate(root, out, kernel):
    from specforge_core.evaluate.config import EvaluateConfig
    from specforge_core.evaluate.inprocess import evaluate
    from specforge_core.events import null_events

    cfg = EvaluateConfig(target=str(root / "target"), draft=str(root / "run"), prompts=str(root / "prompts.jsonl"),
                         configs=["1,3,1,4", "1,2,3,6"], max_new_tokens=24, output=str(out), device="cpu",
                         linear_kernel=kernel)
    return evaluate(cfg, null_events())


def test_evaluate_uses_the_kernels_for_every_mode_and_stays_token_identical(tiny_dirs, tmp_path):  # noqa: F811
    if not onednn_fp32_available():
        pytest.skip("this PyTorch build has no oneDNN")
    res = _evaluate(tiny_dirs, tmp_path / "auto.json", "auto")
    # fp32 on a CPU: bf16 matmuls where the CPU has them natively, else prepacked fp32
    assert res["linear_kernel"] == ("onednn-bf16" if onednn_bf16_available() else "onednn-fp32")
    for r in res["results"]:
        assert r["mismatches_vs_baseline"] == 0, r["config"]
        assert r["acceptance_length"] >= 1.0
    for kernel in ("native", "onednn-fp32"):
        other = _evaluate(tiny_dirs, tmp_path / f"{kernel}.json", kernel)
        assert other["linear_kernel"] == kernel
        assert all(r["mismatches_vs_baseline"] == 0 for r in other["results"])


def test_evaluate_refuses_onednn_where_it_cannot_run(tiny_dirs, tmp_path, monkeypatch):  # noqa: F811
    import specforge_core.cpu_kernels as ck

    monkeypatch.setattr(ck, "onednn_bf16_available", lambda: False)
    with pytest.raises(ValueError, match="no native oneDNN bf16"):
        _evaluate(tiny_dirs, tmp_path / "x.json", "onednn-bf16")
    if onednn_fp32_available():                                     # auto falls back to fp32, says so
        assert _evaluate(tiny_dirs, tmp_path / "auto.json", "auto")["linear_kernel"] == "onednn-fp32"
    monkeypatch.setattr(ck, "onednn_fp32_available", lambda: False)
    with pytest.raises(ValueError, match="no oneDNN"):
        _evaluate(tiny_dirs, tmp_path / "y.json", "onednn-fp32")
    res = _evaluate(tiny_dirs, tmp_path / "auto2.json", "auto")    # and to native without oneDNN
    assert res["linear_kernel"] == "native"
