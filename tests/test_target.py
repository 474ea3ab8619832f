"""Target wrapper: hooked capture equals HF's output_hidden_states, layer ids, errors, the real default."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama_config
from specforge_core.models.target import Capture, Target, default_layer_ids, load_target


@pytest.mark.unit
def test_default_layer_ids():
    assert default_layer_ids(30) == [1, 14, 26]
    assert default_layer_ids(32) == [1, 15, 28]
    assert default_layer_ids(7) == [1, 2, 3]
    for L in (4, 5, 6):  # [1, L//2-1, L-4] would repeat a layer: refuse rather than capture twice
        with pytest.raises(ValueError, match="at least 7"):
            default_layer_ids(L)


@pytest.mark.unit
def test_capture_equals_output_hidden_states(tiny_llama):
    layer_ids = [0, 2, 1]  # deliberately not sorted: the order of layer_ids is the concat order
    target = Target.from_model(tiny_llama, layer_ids=layer_ids)
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding on the second row
    cap = target.capture(ids, mask)
    assert isinstance(cap, Capture)
    with torch.no_grad():
        ref = tiny_llama(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hs = ref.hidden_states
    assert len(hs) == 4 + 1  # embeddings + one per layer
    expected = torch.cat([hs[i + 1] for i in layer_ids], dim=-1)
    assert cap.aux_hidden.shape == (2, 9, 3 * 64)
    torch.testing.assert_close(cap.aux_hidden, expected)
    torch.testing.assert_close(cap.logits, ref.logits)
    assert cap.logits.shape == (2, 9, 512)
    # the final normed state recomputes the logits with the target's lm_head
    torch.testing.assert_close(cap.last_hidden @ target.lm_head_weight().T, ref.logits, rtol=1e-5, atol=1e-5)
    # a wrong layer would not match: the check can fail
    wrong = torch.cat([hs[i] for i in layer_ids], dim=-1)
    assert not torch.allclose(cap.aux_hidden, wrong)


@pytest.mark.unit
def test_capture_leaves_no_hooks_and_no_grad(tiny_llama):
    target = Target.from_model(tiny_llama, layer_ids=[1, 2, 3])
    ids = torch.randint(0, 512, (1, 5))
    cap = target.capture(ids, torch.ones_like(ids))
    assert not cap.aux_hidden.requires_grad and not cap.logits.requires_grad
    assert all(len(layer._forward_hooks) == 0 for layer in tiny_llama.model.layers)
    assert all(not p.requires_grad for p in tiny_llama.parameters())


@pytest.mark.unit
def test_target_attributes(tiny_llama):
    target = Target.from_model(tiny_llama, layer_ids=[0, 1, 3], pad_token_id=7)
    assert target.vocab_size == 512 and target.pad_token_id == 7
    assert target.embedding_weight().shape == (512, 64)
    assert target.lm_head_weight().shape == (512, 64)
    assert target.embedding_weight() is tiny_llama.model.embed_tokens.weight


@pytest.mark.unit
def test_default_layers_on_deeper_model_and_errors(tiny_llama):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=8, hidden_size=32))
    t = Target.from_model(m)
    assert t.layer_ids == [1, 3, 4]
    ids = torch.randint(0, 512, (1, 4))
    assert t.capture(ids, torch.ones_like(ids)).aux_hidden.shape == (1, 4, 96)
    with pytest.raises(ValueError, match="at least 7"):
        Target.from_model(tiny_llama)  # 4 layers, no override
    with pytest.raises(ValueError, match="out of range"):
        Target.from_model(tiny_llama, layer_ids=[1, 2, 4])
    with pytest.raises(ValueError, match="model.model.layers"):
        Target.from_model(torch.nn.Linear(3, 3), layer_ids=[0])


@pytest.mark.unit
def test_load_target_from_local_dir(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "tiny")
    t = load_target(str(tmp_path / "tiny"), layer_ids=[0, 1, 2])
    assert t.vocab_size == 512 and t.layer_ids == [0, 1, 2]
    ids = torch.randint(0, 512, (1, 6))
    a = t.capture(ids, torch.ones_like(ids))
    b = Target.from_model(tiny_llama, layer_ids=[0, 1, 2]).capture(ids, torch.ones_like(ids))
    torch.testing.assert_close(a.aux_hidden, b.aux_hidden)
    with pytest.raises(FileNotFoundError):
        load_target(str(tmp_path / "missing"))


@pytest.mark.integration
def test_default_target_smollm2(default_model_dir):
    t = load_target("default")
    assert t.layer_ids == [1, 14, 26]
    assert t.vocab_size == 49152 and t.hidden_size == 576
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    cap = t.capture(ids, torch.ones_like(ids))
    assert cap.aux_hidden.shape == (1, 5, 3 * 576)
    assert cap.logits.shape == (1, 5, 49152)
    assert cap.last_hidden.shape == (1, 5, 576)
