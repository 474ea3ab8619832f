"""Serving checkpoint: export round trip, check-draft catching each kind of breakage, export refusing."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_llama_config
from specforge_core.config import add_config_args, config_from_args
from specforge_core.events import null_events
from specforge_core.training.checkpoint import save_checkpoint
from specforge_core.models.eagle3 import REQUIRED_TENSORS
from specforge_core.models.serving import check_draft_dir
from specforge_core.training.config import CheckDraftConfig, ExportConfig
from specforge_core.training.export import check_draft, export_draft

H, HEADS, KV, HD, INTER, V, VD = 32, 4, 2, 8, 64, 128, 40


def draft_config(H_t: int = H, **kw) -> dict:
    """A draft config as `build_draft_config(...).to_dict()` writes it into a training checkpoint."""
    c = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
         "hidden_size": H, "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HD,
         "intermediate_size": INTER, "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
         "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "vocab_size": V,
         "draft_vocab_size": VD, "tie_word_embeddings": False, "transformers_version": "5.0",
         "id2label": {"0": "LABEL_0"}, "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 2]}}
    if H_t != H:
        c["target_hidden_size"] = H_t
    c.update(kw)
    return c


def vocab_mapping(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(V, generator=g)[:VD].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(VD), t2d


def draft_state(H_t: int = H, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors with the draft's (serving) names and shapes, plus the frozen embedding."""
    torch.manual_seed(seed)
    s = {
        "embed_tokens.weight": torch.randn(V, H),
        "fc.weight": torch.randn(H, 3 * H_t),
        "midlayer.self_attn.q_proj.weight": torch.randn(HEADS * HD, 2 * H),
        "midlayer.self_attn.k_proj.weight": torch.randn(KV * HD, 2 * H),
        "midlayer.self_attn.v_proj.weight": torch.randn(KV * HD, 2 * H),
        "midlayer.self_attn.o_proj.weight": torch.randn(H, HEADS * HD),
        "midlayer.mlp.gate_proj.weight": torch.randn(INTER, H),
        "midlayer.mlp.up_proj.weight": torch.randn(INTER, H),
        "midlayer.mlp.down_proj.weight": torch.randn(H, INTER),
        "midlayer.hidden_norm.weight": torch.ones(H),
        "midlayer.input_layernorm.weight": torch.ones(H),
        "midlayer.post_attention_layernorm.weight": torch.ones(H),
        "norm.weight": torch.ones(H),
        "lm_head.weight": torch.randn(VD, H),
    }
    s["d2t"], s["t2d"] = vocab_mapping(seed)
    return s


def make_checkpoint(run_dir, state=None, config=None, step=5):
    return save_checkpoint(run_dir, step, state if state is not None else draft_state(), None, None,
                           extra={"step": step, "epoch": 0, "micro": 0, "reason": "final"},
                           config=config if config is not None else draft_config(), keep_last=2, is_main=True)


def target_dir(tmp_path, name="target", **kw):
    """A target model directory (config.json is all a check reads)."""
    d = tmp_path / name
    tiny_llama_config(**kw).save_pretrained(d)
    return d


def write_serving(d, state, config):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    return d


def good_serving(d, dtype=torch.bfloat16):
    st = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in draft_state().items()
          if k != "embed_tokens.weight"}
    # A serving config carries the capture layers in both servers' meanings (issue 12).
    return write_serving(d, st, draft_config(torch_dtype=str(dtype).split(".")[1], num_hidden_layers=1,
                                             eagle_aux_hidden_state_layer_ids=[1, 2, 3]))


# ------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_export_round_trip(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run)
    tdir = target_dir(tmp_path, vocab_size=V, hidden_size=H)
    out = tmp_path / "serve"
    res = export_draft(ExportConfig(checkpoint=str(run), output=str(out), target=str(tdir)), null_events())
    assert res["ok"] and res["target_checked"] and res["draft_vocab_size"] == VD
    assert res["aux_layer_ids"] == [0, 1, 2]

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["vocab_size"] == V and cfg["draft_vocab_size"] == VD and "target_hidden_size" not in cfg
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert cfg["rope_theta"] == 500000.0  # spelled out for servers on transformers 4
    assert cfg["torch_dtype"] == "bfloat16" and "id2label" not in cfg

    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == set(REQUIRED_TENSORS)  # embed_tokens dropped, nothing extra
    src = draft_state()
    for k, t in tensors.items():
        if k == "d2t":
            assert t.dtype == torch.int64 and torch.equal(t, src[k])
        elif k == "t2d":
            assert t.dtype == torch.bool and torch.equal(t, src[k])
        else:
            assert t.dtype == torch.bfloat16 and torch.equal(t, src[k].to(torch.bfloat16)), k
    assert (out / "run.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left

    res = check_draft(CheckDraftConfig(path=str(out), target=str(tdir)), null_events())
    assert res == {**res, "ok": True, "problems": [], "exit_code": 0, "target_checked": True}


@pytest.mark.unit
def test_export_target_hidden_size_and_float16(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, state=draft_state(H_t=48), config=draft_config(H_t=48))
    tdir = target_dir(tmp_path, vocab_size=V, hidden_size=48)
    out = tmp_path / "serve"
    export_draft(ExportConfig(checkpoint=str(run), output=str(out), target=str(tdir), dtype="float16"),
                 null_events())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["target_hidden_size"] == 48 and cfg["hidden_size"] == H
    assert load_file(str(out / "model.safetensors"))["fc.weight"].dtype == torch.float16
    assert check_draft_dir(out, target_config=json.loads((tdir / "config.json").read_text())) == []
    # the same draft against a target of hidden size 32 does not fit
    other = target_dir(tmp_path, "other", vocab_size=V, hidden_size=H)
    problems = check_draft_dir(out, target_config=json.loads((other / "config.json").read_text()))
    assert any("target_hidden_size is 48" in p and "hidden_size is 32" in p for p in problems)
    assert any("'fc.weight' reads 144 inputs" in p and "3 * 32 = 96" in p for p in problems)


@pytest.mark.unit
def test_check_good_dir(tmp_path):
    d = good_serving(tmp_path / "ok")
    assert check_draft_dir(d) == []
    assert check_draft_dir(d, target_vocab=V) == []
    assert check_draft_dir(d, dtype="float32") != []  # bf16 on disk, float32 asked: every float tensor named


@pytest.mark.unit
def test_check_renamed_tensor(tmp_path):
    d = good_serving(tmp_path / "x")
    st = load_file(str(d / "model.safetensors"))
    st["model.layers.0.self_attn.q_proj.weight"] = st.pop("midlayer.self_attn.q_proj.weight")
    save_file(st, str(d / "model.safetensors"))
    problems = check_draft_dir(d)
    assert len(problems) == 2, problems
    assert any("'midlayer.self_attn.q_proj.weight' is missing" in p and "random" in p for p in problems)
    assert any("unknown tensor 'model.layers.0.self_attn.q_proj.weight'" in p and "SGLang ignores" in p
               for p in problems)
    res = check_draft(CheckDraftConfig(path=str(d)), null_events())
    assert not res["ok"] and res["exit_code"] == 1 and res["problems"] == problems


@pytest.mark.unit
def test_check_wrong_shape(tmp_path):
    d = good_serving(tmp_path / "x")
    st = load_file(str(d / "model.safetensors"))
    st["midlayer.self_attn.k_proj.weight"] = torch.zeros(HEADS * HD, 2 * H, dtype=torch.bfloat16)  # kv heads ignored
    st["lm_head.weight"] = torch.zeros(V, H, dtype=torch.bfloat16)  # full vocab instead of the draft vocab
    save_file(st, str(d / "model.safetensors"))
    problems = check_draft_dir(d)
    assert any("'midlayer.self_attn.k_proj.weight' has shape [32, 64], expected [16, 64]" in p for p in problems)
    assert any("'lm_head.weight' has shape [128, 32], expected [40, 32]" in p for p in problems)
    assert len(problems) == 2, problems


@pytest.mark.unit
def test_check_vocab_mapping(tmp_path):
    d = good_serving(tmp_path / "x")
    st = load_file(str(d / "model.safetensors"))
    t2d = st["t2d"].clone()
    first = int(torch.nonzero(t2d)[0])
    free = int(torch.nonzero(~t2d)[-1])
    t2d[first], t2d[free] = False, True  # same count, one id moved: d2t no longer agrees
    st["t2d"] = t2d
    save_file(st, str(d / "model.safetensors"))
    problems = check_draft_dir(d)
    assert len(problems) == 1 and "d2t and t2d disagree" in problems[0], problems

    st["t2d"][free] = False  # now one fewer marked than draft_vocab_size
    st["d2t"] = st["d2t"].to(torch.int32)
    save_file(st, str(d / "model.safetensors"))
    problems = check_draft_dir(d)
    assert any("'d2t' is I32, expected I64" in p for p in problems)
    st["d2t"] = st["d2t"].long()
    save_file(st, str(d / "model.safetensors"))
    problems = check_draft_dir(d)
    assert any(f"t2d marks {VD - 1} target ids, expected draft_vocab_size {VD}" in p for p in problems)


@pytest.mark.unit
def test_check_architecture_target_vocab_and_all_problems(tmp_path):
    d = good_serving(tmp_path / "x")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    problems = check_draft_dir(d)
    assert len(problems) == 1 and "architectures is ['LlamaForCausalLM']" in problems[0]
    assert "LlamaForCausalLMEagle3" in problems[0]

    tdir = target_dir(tmp_path, vocab_size=256, hidden_size=H)
    res = check_draft(CheckDraftConfig(path=str(d), target=str(tdir)), null_events())
    assert not res["ok"] and res["exit_code"] == 1
    assert any("vocab_size 128 does not match the target's vocab size 256" in p for p in res["problems"])
    assert any("architectures" in p for p in res["problems"])  # all problems, not just the first
    assert len(res["problems"]) == 2


@pytest.mark.unit
def test_check_missing_files(tmp_path):
    (tmp_path / "empty").mkdir()
    problems = check_draft_dir(tmp_path / "empty")
    assert "config.json is missing" in problems and "model.safetensors is missing" in problems
    assert check_draft_dir(tmp_path / "nope") == [f"{tmp_path / 'nope'}: not a directory"]


@pytest.mark.unit
def test_export_refuses_broken_checkpoint(tmp_path):
    st = draft_state()
    st["midlayer.attn.q_proj.weight"] = st.pop("midlayer.self_attn.q_proj.weight")  # a renamed module
    run = tmp_path / "run"
    make_checkpoint(run, state=st)
    out = tmp_path / "serve"
    with pytest.raises(ValueError) as ei:
        export_draft(ExportConfig(checkpoint=str(run), output=str(out)), null_events())
    msg = str(ei.value)
    assert "refusing to export" in msg and "2 problems" in msg
    assert "'midlayer.self_attn.q_proj.weight' is missing" in msg
    assert "unknown tensor 'midlayer.attn.q_proj.weight'" in msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temp dir left behind


@pytest.mark.unit
def test_export_refuses_target_mismatch_and_existing_output(tmp_path):
    run = tmp_path / "run"
    ck = make_checkpoint(run)
    out = tmp_path / "serve"
    tdir = target_dir(tmp_path, vocab_size=512, hidden_size=H)
    with pytest.raises(ValueError, match="vocab size 512"):
        export_draft(ExportConfig(checkpoint=str(ck), output=str(out), target=str(tdir)), null_events())
    assert not out.exists()

    export_draft(ExportConfig(checkpoint=str(ck), output=str(out)), null_events())
    with pytest.raises(ValueError, match="already exists"):
        export_draft(ExportConfig(checkpoint=str(ck), output=str(out)), null_events())
    res = export_draft(ExportConfig(checkpoint=str(ck), output=str(out), overwrite=True, dtype="float32"),
                       null_events())
    assert res["ok"] and load_file(str(out / "model.safetensors"))["norm.weight"].dtype == torch.float32
    with pytest.raises(FileNotFoundError):
        export_draft(ExportConfig(checkpoint=str(tmp_path / "missing"), output=str(tmp_path / "o2")), null_events())


@pytest.mark.unit
def test_cli_positionals():
    p = argparse.ArgumentParser()
    add_config_args(p, ExportConfig)
    cfg = config_from_args(ExportConfig, p.parse_args(["runs/a", "--output", "out", "--dtype", "float16"]))
    assert cfg.checkpoint == "runs/a" and cfg.output == "out" and cfg.dtype == "float16"
    p = argparse.ArgumentParser()
    add_config_args(p, CheckDraftConfig)
    cfg = config_from_args(CheckDraftConfig, p.parse_args(["serve", "--target", "default"]))
    assert cfg.path == "serve" and cfg.target == "default"


@pytest.mark.unit
def test_round_trip_through_eagle3_draft(tmp_path):
    from specforge_core.models import eagle3
    from specforge_core.models.registry import build_draft

    tcfg = tiny_llama_config()
    dcfg = eagle3.build_draft_config(tcfg, 100, layer_ids=[0, 1, 2])
    torch.manual_seed(0)
    draft = build_draft(dcfg)
    ids = torch.randperm(tcfg.vocab_size)[:100].sort().values
    t2d = torch.zeros(tcfg.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    draft.set_vocab_mapping(ids - torch.arange(100), t2d)
    run = tmp_path / "run"
    save_checkpoint(run, 3, draft.state_dict(), None, None, extra={"step": 3}, config=dcfg.to_dict(),
                    keep_last=1, is_main=True)
    tdir = tmp_path / "target"
    tcfg.save_pretrained(tdir)
    out = tmp_path / "serve"
    export_draft(ExportConfig(checkpoint=str(run), output=str(out), target=str(tdir), dtype="float32"), null_events())
    assert check_draft_dir(out, target_config=tcfg) == []
    # the exported tensors load back into a fresh draft (only the target's embedding is absent)
    fresh = build_draft(dcfg)
    missing, unexpected = fresh.load_state_dict(load_file(str(out / "model.safetensors")), strict=False)
    assert missing == ["embed_tokens.weight"] and unexpected == []
    for k, v in draft.state_dict().items():
        if k != "embed_tokens.weight":
            assert torch.equal(fresh.state_dict()[k], v), k
