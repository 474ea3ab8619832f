"""The memory estimate before launch: exact parameter counts from meta-device models, the FSDP2 target
shard at about 1/W, and a plan that cannot fit refused before anything is loaded, naming the number."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_llama_config
from specforge_core.events import null_events

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    import torch
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("mem_target")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(num_hidden_layers=8)).save_pretrained(d)
    return d


def _cfg(target: Path, tmp_path: Path, **kw):
    from specforge_core.training.config import TrainConfig

    args = dict(target_model=str(target), train_data=[str(tmp_path / "none.jsonl")], max_length=256,
                batch_size=2, draft_vocab_size=256, ttt_length=3, output_dir=str(tmp_path / "run"), device="cpu")
    args.update(kw)
    return TrainConfig(**args)


def test_counts_and_fsdp_shard(target, tmp_path):
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from specforge_core.training.memory import estimate_memory

    model = LlamaForCausalLM(AutoConfig.from_pretrained(target))
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    rep = estimate_memory(_cfg(target, tmp_path), 2)
    assert rep["params"]["target"] == total and rep["bytes"]["target"] == total * 4
    fs = estimate_memory(_cfg(target, tmp_path, target_parallel="fsdp"), 2)
    root = total - 8 * layer
    assert fs["bytes"]["target"] == int(total * 4 / 2 + (root + 2 * layer) * 4)
    assert fs["bytes"]["target"] < rep["bytes"]["target"]
    one = estimate_memory(_cfg(target, tmp_path, target_parallel="fsdp"), 1)   # one rank: nothing to shard
    assert one["bytes"]["target"] == total * 4
    # the optimizer: AdamW's two fp32 moments per trainable draft weight; FSDP2 shards them
    assert rep["bytes"]["optimizer"] == 8 * rep["params"]["draft_trainable"]
    fd = estimate_memory(_cfg(target, tmp_path, draft_parallel="fsdp"), 4)
    assert fd["bytes"]["optimizer"] == 8 * rep["params"]["draft_trainable"] // 4
    # activations grow with batch x length
    big = estimate_memory(_cfg(target, tmp_path, batch_size=4), 2)
    assert big["bytes"]["activations"] == pytest.approx(2 * rep["bytes"]["activations"], rel=0.01)
    assert torch is not None


def test_plan_that_cannot_fit_is_refused_naming_the_number(target, tmp_path, monkeypatch):
    from specforge_core.training import memory
    from specforge_core.training.trainer import train

    monkeypatch.setattr(memory, "available_bytes", lambda device, local_world=None: (1 << 20, "test: 1 MiB"))
    with pytest.raises(memory.PlanDoesNotFit) as e:
        train(_cfg(target, tmp_path), null_events())
    msg = str(e.value)
    assert "memory estimate per rank" in msg and "does not fit 0.00 GiB (test: 1 MiB)" in msg
    assert "the largest part is" in msg
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_estimate_memory_reports_and_stops(target, tmp_path):
    from specforge_core.training.trainer import train

    out = train(_cfg(target, tmp_path, estimate_memory=True), null_events())
    est = out["memory_estimate"]
    assert set(est["bytes"]) == {"target", "draft", "optimizer", "activations"}
    assert est["total_bytes"] == sum(est["bytes"].values()) and "capacity_bytes" in est
    assert not (tmp_path / "run").exists()   # nothing loaded, nothing written
