"""The EAGLE3 draft: config derived from the target (RoPE, positions, overrides), the registry, the
serving tensor names in state_dict, embedding / vocab-mapping setup and the incremental draft step."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama_config
from specforge_core.models.eagle3 import Eagle3Draft, build_draft_config
from specforge_core.models.registry import DRAFT_ARCHITECTURES, build_draft, register_draft

pytestmark = pytest.mark.unit

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256, "rope_theta": 500000.0}

SERVING_NAMES = {
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight", "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight", "midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight",
    "midlayer.post_attention_layernorm.weight", "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
}


def test_config_copies_target_fields():
    t = tiny_llama_config(rope_parameters=dict(LLAMA3_ROPE))
    t.max_position_embeddings = 1024  # the fixture fixes 512; a copied 512 would pass by accident
    c = build_draft_config(t, 100, [1, 1, 0])
    assert c.architectures == ["LlamaForCausalLMEagle3"]
    assert c.num_hidden_layers == 1
    assert c.max_position_embeddings == 1024
    assert c.rope_parameters["rope_type"] == "llama3"
    assert c.rope_parameters["rope_theta"] == 500000.0
    assert c.rope_parameters["factor"] == 8.0
    for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
              "rms_norm_eps", "vocab_size"):
        assert getattr(c, k) == getattr(t, k), k
    assert c.draft_vocab_size == 100
    assert c.eagle_config == {"eagle_aux_hidden_state_layer_ids": [1, 1, 0]}
    assert "target_hidden_size" not in c.to_dict()
    # the draft's rotary embedding really uses the copied scaling
    d = build_draft(c)
    assert d.rotary_emb.rope_type == "llama3"
    plain = build_draft(build_draft_config(tiny_llama_config(), 100, [1, 1, 0]))
    assert not torch.allclose(d.rotary_emb.inv_freq, plain.rotary_emb.inv_freq)


def test_config_overrides():
    t = tiny_llama_config()
    ov = {"hidden_size": 32, "intermediate_size": 96, "rope_theta": 1234.0, "my_note": "kept",
          "rope_scaling": {"type": "linear", "factor": 2.0}}
    c = build_draft_config(t, 100, [1, 1, 0], overrides=ov)
    assert c.hidden_size == 32 and c.intermediate_size == 96
    assert c.head_dim == 32 // t.num_attention_heads
    assert c.target_hidden_size == 64                      # differs from the draft's: written
    assert c.rope_parameters["rope_theta"] == 1234.0 and c.rope_parameters["rope_type"] == "linear"
    assert c.to_dict()["my_note"] == "kept"
    d = build_draft(c)
    assert tuple(d.fc.weight.shape) == (32, 3 * 64)
    assert tuple(d.midlayer.self_attn.q_proj.weight.shape) == (32, 64)   # 2H in
    with pytest.raises(ValueError, match="hidden_size"):
        d.load_embedding(torch.zeros(512, 64))                             # target's H != draft's
    out = d.draft_step(torch.randn(1, 4, 192), torch.randint(0, 512, (1, 4)), torch.arange(4)[None])
    assert out[0].shape == (1, 4, 32) and out[1].shape == (1, 4, 100)


@pytest.mark.parametrize("ov, field", [
    ({"hidden_size": -4}, "hidden_size"),
    ({"num_attention_heads": "many"}, "num_attention_heads"),
    ({"num_hidden_layers": 2}, "num_hidden_layers"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"architectures": ["NotADraft"]}, "architectures"),
    ({"vocab_size": 1000}, "vocab_size"),
    ({"draft_vocab_size": 50}, "draft_vocab_size"),
    ({"rope_theta": "big"}, "rope_theta"),
    ({"target_hidden_size": 10}, "target_hidden_size"),
])
def test_config_nonsense_overrides(ov, field):
    with pytest.raises(ValueError, match=field):
        build_draft_config(tiny_llama_config(), 100, [1, 1, 0], overrides=ov)


def test_registry():
    assert DRAFT_ARCHITECTURES["LlamaForCausalLMEagle3"] is Eagle3Draft
    c = build_draft_config(tiny_llama_config(), 100, [1, 1, 0])
    assert isinstance(build_draft(c), Eagle3Draft)
    c.architectures = ["MedusaMaybe"]
    with pytest.raises(ValueError, match="unknown draft architecture 'MedusaMaybe'.*LlamaForCausalLMEagle3"):
        build_draft(c)
    c.architectures = None
    with pytest.raises(ValueError, match="architectures"):
        build_draft(c)

    @register_draft("TestOnlyDraft")
    class _D(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
    try:
        c.architectures = ["TestOnlyDraft"]
        assert isinstance(build_draft(c), _D)
    finally:
        DRAFT_ARCHITECTURES.pop("TestOnlyDraft")


def test_state_dict_serving_names_and_shapes():
    t = tiny_llama_config()
    d = build_draft(build_draft_config(t, 100, [1, 1, 0]))
    sd = d.state_dict()
    assert set(sd) == SERVING_NAMES | {"embed_tokens.weight"}
    H, V = t.hidden_size, t.vocab_size
    hd, nh, kv = t.head_dim, t.num_attention_heads, t.num_key_value_heads
    assert sd["lm_head.weight"].shape == (100, H)
    assert sd["fc.weight"].shape == (H, 3 * H)
    assert sd["midlayer.self_attn.q_proj.weight"].shape == (nh * hd, 2 * H)
    assert sd["midlayer.self_attn.k_proj.weight"].shape == (kv * hd, 2 * H)
    assert sd["midlayer.self_attn.o_proj.weight"].shape == (H, nh * hd)
    assert sd["embed_tokens.weight"].shape == (V, H)
    assert sd["d2t"].dtype == torch.int64 and sd["d2t"].shape == (100,)
    assert sd["t2d"].dtype == torch.bool and sd["t2d"].shape == (V,)
    trainable = {n for n, p in d.named_parameters() if p.requires_grad}
    assert "embed_tokens.weight" not in trainable and "fc.weight" in trainable


def test_embedding_and_vocab_mapping(tiny_llama):
    cfg = tiny_llama.config
    d = build_draft(build_draft_config(cfg, 5, [1, 1, 0]))
    w = tiny_llama.get_input_embeddings().weight
    d.load_embedding(w)
    assert torch.equal(d.embed_tokens.weight, w) and not d.embed_tokens.weight.requires_grad
    ids = torch.tensor([2, 9, 10, 40, 511])
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    d.set_vocab_mapping(ids - torch.arange(5), t2d)
    assert torch.equal(d.draft_to_target(torch.arange(5)), ids)
    assert torch.equal(d.state_dict()["t2d"], t2d)
    with pytest.raises(ValueError, match="disagree"):
        d.set_vocab_mapping(torch.zeros(5, dtype=torch.long), t2d)
    with pytest.raises(ValueError, match="shapes"):
        d.set_vocab_mapping(torch.zeros(4, dtype=torch.long), t2d)
    # round trip through state_dict keeps the mapping
    d2 = build_draft(build_draft_config(cfg, 5, [1, 1, 0]))
    d2.load_state_dict(d.state_dict())
    assert torch.equal(d2.d2t, d.d2t) and torch.equal(d2.t2d, t2d)


def test_draft_step_incremental_equals_full():
    torch.manual_seed(0)
    t = tiny_llama_config()
    d = build_draft(build_draft_config(t, 100, [1, 1, 0])).double()
    B, T = 2, 7
    aux = torch.randn(B, T, 3 * t.hidden_size, dtype=torch.float64)
    ids = torch.randint(0, t.vocab_size, (B, T))
    pos = torch.arange(T).expand(B, T)
    full_h, full_logits, (k, v) = d.draft_step(aux, ids, pos)
    assert k.shape == (B, t.num_key_value_heads, T, t.head_dim)
    # prefix, then one token at a time with the cache: same outputs
    h1, l1, kv = d.draft_step(aux[:, :4], ids[:, :4], pos[:, :4])
    outs = [l1]
    for i in range(4, T):
        _, li, kv = d.draft_step(aux[:, i:i + 1], ids[:, i:i + 1], pos[:, i:i + 1], kv)
        outs.append(li)
    assert torch.allclose(torch.cat(outs, dim=1), full_logits, atol=1e-10)
    # the H-wide draft hidden state is accepted as-is (no fc): a chained draft step runs
    h2, l2, _ = d.draft_step(full_h[:, -1:], ids[:, -1:], pos[:, -1:] + 1, (k, v))
    assert h2.shape == (B, 1, t.hidden_size) and l2.shape == (B, 1, 100)


@pytest.mark.integration
def test_config_from_default_target(default_model_dir):
    from transformers import AutoConfig

    t = AutoConfig.from_pretrained(default_model_dir)
    c = build_draft_config(t, 32000, [1, 14, 26])
    assert (c.hidden_size, c.vocab_size, c.max_position_embeddings) == (576, 49152, t.max_position_embeddings)
    assert c.rope_parameters["rope_theta"] == t.rope_parameters["rope_theta"]
    d = build_draft(c)
    assert d.lm_head.weight.shape == (32000, 576)
