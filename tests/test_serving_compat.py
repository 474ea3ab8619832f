"""Serving compatibility (issue 12): an exported draft must load on SGLang and vLLM exactly as it was
trained. One test per way it could not (each failed on the code before the fix), and golden files of
the exported config keys and tensor shapes for the embedded default and a Llama-3-8B-shaped target.

What the servers do is in docs/ARCHITECTURE.md, "Serving formats" (read from SGLang 0.5.23 and
vLLM 0.33.0 sources)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

from conftest import tiny_llama_config
from test_export import good_serving, make_checkpoint, target_dir, H, V
from specforge_core.events import null_events
from specforge_core.evaluate.bench import parse_config
from specforge_core.evaluate.launcher import check_spec_params, sglang_argv
from specforge_core.evaluate.spec_decode import GenerationResult, SpecConfig, acceptance_summary
from specforge_core.models.eagle3 import build_draft_config, override_layer_ids, servable_layer_problems
from specforge_core.models.registry import build_draft, family
from specforge_core.models.serving import check_draft_dir
from specforge_core.training.config import ExportConfig
from specforge_core.training.export import export_draft




def _rewrite_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


# -- 1. vLLM reads the capture layers one lower ------------------------------------------------------
@pytest.mark.unit
def test_export_writes_capture_layers_in_both_servers_meanings(tmp_path):
    make_checkpoint(tmp_path / "run")
    out = tmp_path / "serve"
    export_draft(ExportConfig(checkpoint=str(tmp_path / "run"), output=str(out),
                              target=str(target_dir(tmp_path, vocab_size=V, hidden_size=H))), null_events())
    cfg = json.loads((out / "config.json").read_text())
    # SGLang: nested, "output of layer i" (it adds 1 and captures the input of layer i+1).
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    # vLLM: top-level first, "the state entering layer k" = output of layer k-1.
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert check_draft_dir(out) == []


@pytest.mark.unit
def test_check_names_a_missing_or_wrong_vllm_key(tmp_path):
    missing = _rewrite_config(good_serving(tmp_path / "a"), eagle_aux_hidden_state_layer_ids=None)
    problems = check_draft_dir(missing)
    assert len(problems) == 1 and "vLLM" in problems[0] and "[-1, 0, 1]" in problems[0] and "[1, 2, 3]" in problems[0]
    wrong = _rewrite_config(good_serving(tmp_path / "b"), eagle_aux_hidden_state_layer_ids=[0, 1, 2])
    problems = check_draft_dir(wrong)
    assert len(problems) == 1 and "do not match the nested ids [0, 1, 2]" in problems[0]


# -- 2. a draft config cannot silently replace the trained layers -----------------------------------
@pytest.mark.unit
def test_draft_config_with_other_layer_ids_is_refused_naming_both():
    specforge_gpt_oss = {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 11, 21]}}
    with pytest.raises(ValueError, match=r"\[1, 11, 21\].*\[1, 3, 4\]"):
        build_draft_config(tiny_llama_config(num_hidden_layers=8), 100, [1, 3, 4], overrides=specforge_gpt_oss)
    # the same ids are fine, and the draft says them
    c = build_draft_config(tiny_llama_config(num_hidden_layers=24), 100, [1, 11, 21], overrides=specforge_gpt_oss)
    assert c.eagle_config["eagle_aux_hidden_state_layer_ids"] == [1, 11, 21]


@pytest.mark.unit
def test_override_layer_ids_reads_each_meaning():
    assert override_layer_ids({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 11, 21]}}) == [1, 11, 21]
    assert override_layer_ids({"eagle_aux_hidden_state_layer_ids": [2, 12, 22]}) == [1, 11, 21]  # vLLM's meaning
    assert override_layer_ids({"hidden_size": 8}) is None


# -- 3. capture layers the servers cannot honour --------------------------------------------------
@pytest.mark.unit
def test_unservable_layer_ids_are_named():
    assert servable_layer_problems([1, 14, 26], 30) == []
    (p,) = servable_layer_problems([14, 1, 26], 30)
    assert "ascending" in p and "[1, 14, 26]" in p
    (p,) = servable_layer_problems([1, 14, 29], 30)
    assert "last layer" in p and "never reaches" in p
    assert any("repeat" in p for p in servable_layer_problems([1, 1, 2], 30))


@pytest.mark.unit
def test_check_draft_flags_unsorted_and_last_layer_ids(tmp_path):
    d = _rewrite_config(good_serving(tmp_path / "a"), eagle_config={"eagle_aux_hidden_state_layer_ids": [2, 0, 1]},
                        eagle_aux_hidden_state_layer_ids=[3, 1, 2])
    assert any("not ascending" in p for p in check_draft_dir(d))
    d = good_serving(tmp_path / "b")   # ids [0, 1, 2]: for a 3-layer target, 2 is the last layer
    problems = check_draft_dir(d, target_config={"vocab_size": V, "hidden_size": H, "num_hidden_layers": 3})
    assert len(problems) == 1 and "never reaches" in problems[0]


# -- 4. valid SGLang trees are accepted ---------------------------------------------------------------
@pytest.mark.unit
def test_sglang_tree_bound_is_topk_plus_steps_times_topk_squared():
    check_spec_params(3, 4, 16)                      # 15 <= 4 + 2 * 16 = 36
    assert parse_config("1,3,4,16").draft_tokens == 16
    assert SpecConfig.parse("1,3,4,16").draft_tokens == 16
    assert "--speculative-num-draft-tokens" in sglang_argv("t", "d", 3, 4, 16)
    check_spec_params(3, 4, 37)
    with pytest.raises(ValueError, match="exceeds"):
        check_spec_params(3, 4, 38)
    with pytest.raises(ValueError, match="steps \\+ 1"):
        check_spec_params(3, 1, 5)


# -- 5. only SiLU MLPs load ---------------------------------------------------------------------------
@pytest.mark.unit
def test_draft_mlp_is_silu_whatever_the_target():
    gelu_target = tiny_llama_config(hidden_act="gelu_pytorch_tanh")
    assert build_draft_config(gelu_target, 100, [1, 1, 0]).hidden_act == "silu"
    with pytest.raises(ValueError, match="hidden_act.*silu"):
        build_draft_config(tiny_llama_config(), 100, [1, 1, 0], overrides={"hidden_act": "gelu"})


@pytest.mark.unit
def test_check_draft_flags_a_non_silu_activation(tmp_path):
    d = _rewrite_config(good_serving(tmp_path / "a"), hidden_act="gelu")
    (p,) = check_draft_dir(d)
    assert "hidden_act" in p and "silu" in p


# -- acceptance length both ways ------------------------------------------------------------------------
@pytest.mark.unit
def test_acceptance_length_is_reported_as_ours_and_as_sglang_counts_it():
    # one request: prefill token + 2 verify steps accepting 2 and 0 drafts -> 1 + 3 + 1 = 5 tokens
    r = GenerationResult(tokens=[5, 6, 7, 8, 9], verify_steps=2, accepted=[2, 0])
    s = acceptance_summary([r], steps=3)
    assert s["acceptance_length"] == 2.0          # (3 + 1) / 2: what each verify step produced
    assert s["acceptance_length_sglang"] == 2.5   # completion_tokens / spec_verify_ct, prefill token counted


# -- golden: exported names, shapes and config keys ------------------------------------------------------
CONFIG_KEYS = ["architectures", "attention_bias", "attention_dropout", "bos_token_id", "draft_vocab_size", "dtype",
               "eagle_aux_hidden_state_layer_ids", "eagle_config", "eos_token_id", "head_dim", "hidden_act",
               "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings", "mlp_bias",
               "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pad_token_id",
               "pretraining_tp", "rms_norm_eps", "rope_parameters", "rope_scaling", "rope_theta",
               "tie_word_embeddings", "torch_dtype", "vocab_size"]


def _golden_shapes(H, inter, q, kv, Vd, V):
    return {"d2t": [Vd], "fc.weight": [H, 3 * H], "lm_head.weight": [Vd, H], "midlayer.hidden_norm.weight": [H],
            "midlayer.input_layernorm.weight": [H], "midlayer.mlp.down_proj.weight": [H, inter],
            "midlayer.mlp.gate_proj.weight": [inter, H], "midlayer.mlp.up_proj.weight": [inter, H],
            "midlayer.post_attention_layernorm.weight": [H], "midlayer.self_attn.k_proj.weight": [kv, 2 * H],
            "midlayer.self_attn.o_proj.weight": [H, q], "midlayer.self_attn.q_proj.weight": [q, 2 * H],
            "midlayer.self_attn.v_proj.weight": [kv, 2 * H], "norm.weight": [H], "t2d": [V]}


def _export_on_meta(target_config, draft_vocab):
    fam = family("eagle3")
    L = target_config.num_hidden_layers
    dc = fam.build_config(target_config, draft_vocab, [1, L // 2 - 1, L - 4])
    with torch.device("meta"):
        state = build_draft(dc).state_dict()
    return fam.serving_config(dc.to_dict(), state, "bfloat16"), fam.serving_tensors(state, "bfloat16")


@pytest.mark.unit
def test_golden_llama3_8b_shaped_export():
    llama3_8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                            rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000,
                            eos_token_id=[128001, 128008, 128009],
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cfg, tensors = _export_on_meta(llama3_8b, 32000)
    assert sorted(cfg) == CONFIG_KEYS
    assert {k: list(v.shape) for k, v in tensors.items()} == _golden_shapes(4096, 14336, 4096, 1024, 32000, 128256)
    assert cfg["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [1, 15, 28]}
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 16, 29]
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"]["rope_type"] == "llama3"
    assert (cfg["architectures"], cfg["num_hidden_layers"], cfg["hidden_act"]) == (["LlamaForCausalLMEagle3"], 1, "silu")
    assert {t.dtype for k, t in tensors.items() if k not in ("d2t", "t2d")} == {torch.bfloat16}


@pytest.mark.integration
def test_golden_smollm2_default_export():
    from specforge_core.models.serving import load_target_config

    cfg, tensors = _export_on_meta(LlamaConfig(**load_target_config("default")), 32000)
    assert sorted(cfg) == CONFIG_KEYS
    assert {k: list(v.shape) for k, v in tensors.items()} == _golden_shapes(576, 1536, 576, 192, 32000, 49152)
    assert cfg["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [1, 14, 26]}
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]
    assert cfg["rope_theta"] == 100000.0 and cfg["rope_scaling"] is None and cfg["head_dim"] == 64


@pytest.mark.unit
def test_training_takes_capture_layers_from_one_source(tmp_path):
    from specforge_core.training.config import TrainConfig
    from specforge_core.training.trainer import capture_layers, servable_or_raise

    f = tmp_path / "draft.json"
    f.write_text(json.dumps({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 11, 21]}}))
    base = dict(train_data=["x.jsonl"], output_dir=str(tmp_path / "run"))
    assert capture_layers(TrainConfig(**base, draft_model_config=str(f))) == [1, 11, 21]   # the config sets them
    assert capture_layers(TrainConfig(**base, aux_layer_ids=[1, 11, 21], draft_model_config=str(f))) == [1, 11, 21]
    with pytest.raises(ValueError, match=r"\[1, 3, 4\].*\[1, 11, 21\]"):
        capture_layers(TrainConfig(**base, aux_layer_ids=[1, 3, 4], draft_model_config=str(f)))
    assert capture_layers(TrainConfig(**base)) is None                                      # the target's default
    with pytest.raises(ValueError, match="last layer"):
        servable_or_raise([1, 14, 29], 30)
    with pytest.raises(ValueError, match="ascending"):
        servable_or_raise([14, 1, 26], 30)


# -- the shipped default draft: `--draft default` ------------------------------------------------------
@pytest.mark.unit
def test_draft_default_names_the_shipped_dir_or_says_it_is_missing(tmp_path, monkeypatch):
    from specforge_core import targets
    from specforge_core.models.serving import locate_draft

    monkeypatch.setattr(targets, "SHIPPED_DRAFTS_DIR", tmp_path / "drafts")
    with pytest.raises(FileNotFoundError, match="recipe run smollm2-cpu"):
        locate_draft("default")
    shipped = tmp_path / "drafts" / targets.DEFAULT_DRAFT
    good_serving(shipped)
    for name in ("default", "smollm2", targets.DEFAULT_DRAFT):
        src = locate_draft(name)
        assert src.kind == "serving" and src.path == shipped
    # A path is a path: a local draft dir is never mistaken for a shipped one.
    assert locate_draft(str(shipped)).path == shipped
