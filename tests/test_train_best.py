"""Keeping the best checkpoint by held-out simulated acceptance length, early stopping, and the warm
start of the draft's lm_head and norm from the target (recipe levers, issue 13)."""

from __future__ import annotations

import json

import pytest
import torch

from specforge_core.data.toy import write_conversations
from specforge_core.events import null_events, read_events
from specforge_core.models.checkpoints import best_checkpoint, resolve_checkpoint
from specforge_core.training.config import TrainConfig
from specforge_core.training.trainer import train
from test_train import base_args, tiny_target  # noqa: F401 - the fixture


@pytest.mark.unit
def test_best_checkpoint_and_early_stop(tmp_path, tiny_target):  # noqa: F811
    data = tmp_path / "d.jsonl"
    write_conversations(data, 24, seed=1)
    ev = tmp_path / "e.jsonl"
    write_conversations(ev, 6, seed=2)
    # A learning rate of ~0 cannot improve the held-out metric: the first eval is the best, the second
    # one does not beat it and patience 1 stops the run there.
    args = base_args(tiny_target, data, tmp_path / "run", tmp_path / "cache", eval_data=[str(ev)], lr=1e-12,
                     eval_every=1, early_stop_patience=1, epochs=5)
    res = train(TrainConfig(**args), null_events())
    assert res["steps"] == 2 and res["best_sim_accept_len"] is not None
    best = best_checkpoint(tmp_path / "run")
    assert best is not None and best.name == "step_00000001"
    assert resolve_checkpoint(tmp_path / "run" / "best") == best
    st = json.loads((best / "trainer_state.json").read_text())
    assert st["reason"] == "best" and st["eval"]["sim_accept_len"] == res["best_sim_accept_len"]
    evals = [r for r in read_events(tmp_path / "run" / "metrics.jsonl") if r.get("split") == "eval"]
    assert [r["step"] for r in evals][:2] == [1, 2]


@pytest.mark.unit
def test_warm_start_copies_the_targets_head_rows_and_norm(tmp_path, tiny_target):  # noqa: F811
    from specforge_core.models.target import load_target
    from specforge_core.training.trainer import build_draft_model, load_training_data
    from specforge_core.training.distributed import init_distributed

    data = tmp_path / "d.jsonl"
    write_conversations(data, 8, seed=1)
    cfg = TrainConfig(**base_args(tiny_target, data, tmp_path / "run", tmp_path / "cache", init_from_target=True))
    target = load_target(str(tiny_target), device="cpu")
    d = load_training_data(cfg, init_distributed("cpu"), null_events(), target.vocab_size)
    draft, _ = build_draft_model(cfg, target, d, torch.device("cpu"))
    ids = d.vocab.target_ids
    assert torch.equal(draft.lm_head.weight, target.lm_head_weight()[ids].float())
    assert torch.equal(draft.norm.weight, target.final_norm_weight().float())
