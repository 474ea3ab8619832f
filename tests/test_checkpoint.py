"""Checkpoints: atomic layout, latest_checkpoint ignoring torn dirs, keep_last, full resume round trip."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from specforge_core.training.checkpoint import (COMPLETE, latest_checkpoint, load_checkpoint, resolve_checkpoint,
                                                restore_rng, save_checkpoint)


class TinyDraft(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(32, 8)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = torch.nn.Linear(24, 8, bias=False)
        self.lm_head = torch.nn.Linear(8, 16, bias=False)
        self.register_buffer("d2t", torch.arange(16, dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(32, dtype=torch.bool))

    def forward(self, x):
        return self.lm_head(self.fc(x))


def _setup(seed=0):
    torch.manual_seed(seed)
    model = TinyDraft()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def _train_steps(model, opt, sched, n):
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(4, 24)).pow(2).mean().backward()
        opt.step()
        sched.step()


def _save(run, step, model, opt, sched, keep_last=3, reason="periodic"):
    return save_checkpoint(run, step, model.state_dict(), opt, sched,
                           extra={"step": step, "epoch": 0, "micro": step * 2, "reason": reason},
                           config={"hidden_size": 8, "draft_vocab_size": 16}, keep_last=keep_last, is_main=True)


@pytest.mark.unit
def test_layout_and_round_trip(tmp_path):
    model, opt, sched = _setup()
    _train_steps(model, opt, sched, 3)
    random.seed(5)
    np.random.seed(6)
    ck = _save(tmp_path, 3, model, opt, sched)
    assert ck == tmp_path / "checkpoints" / "step_00000003"
    names = {p.name for p in ck.iterdir()}
    assert names == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json",
                     "config.json", COMPLETE}
    expected_rand = torch.rand(5)
    expected_py = random.random()
    expected_np = np.random.rand(3)

    data = load_checkpoint(tmp_path)  # a run dir means its latest
    assert data["path"] == ck
    assert "embed_tokens.weight" not in data["model_state"]  # frozen, reloaded from the target
    assert data["trainer_state"] == {"step": 3, "epoch": 0, "micro": 6, "reason": "periodic"}
    assert data["config"]["draft_vocab_size"] == 16
    assert data["model_state"]["d2t"].dtype == torch.int64 and data["model_state"]["t2d"].dtype == torch.bool

    # a fresh model/optimizer/scheduler restored from the checkpoint continues exactly like the original
    model2, opt2, sched2 = _setup(seed=123)
    missing, unexpected = model2.load_state_dict(data["model_state"], strict=False)
    assert missing == ["embed_tokens.weight"] and unexpected == []
    opt2.load_state_dict(data["optimizer_state"])
    sched2.load_state_dict(data["scheduler_state"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    for a, b in zip(model.fc.parameters(), model2.fc.parameters()):
        torch.testing.assert_close(a, b)

    torch.manual_seed(999)  # disturb every generator, then restore
    random.seed(999)
    np.random.seed(999)
    restore_rng(data["rng"])
    torch.testing.assert_close(torch.rand(5), expected_rand)
    assert random.random() == expected_py
    np.testing.assert_array_equal(np.random.rand(3), expected_np)

    # one more step on each side, from the same restored generator (same random batch)
    restore_rng(data["rng"])
    _train_steps(model, opt, sched, 1)
    restore_rng(data["rng"])
    _train_steps(model2, opt2, sched2, 1)
    torch.testing.assert_close(model.fc.weight, model2.fc.weight)
    torch.testing.assert_close(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])


@pytest.mark.unit
def test_latest_ignores_temp_and_incomplete(tmp_path):
    model, opt, sched = _setup()
    assert latest_checkpoint(tmp_path) is None
    ck2 = _save(tmp_path, 2, model, opt, sched)
    root = tmp_path / "checkpoints"
    # a crash mid-save: a leftover temp dir and a step dir without its marker, both newer
    (root / ".tmp_step_00000009_abc").mkdir()
    (root / ".tmp_step_00000009_abc" / "model.safetensors").write_bytes(b"partial")
    torn = root / "step_00000007"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == ck2
    assert latest_checkpoint(root) == ck2
    assert latest_checkpoint(ck2) == ck2
    with pytest.raises(ValueError, match="incomplete"):
        load_checkpoint(torn)
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(ValueError, match="incomplete"):
        resolve_checkpoint(root / ".tmp_step_00000009_abc")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    # the next save cleans the leftovers up (they are older or not checkpoints at all)
    ck8 = _save(tmp_path, 8, model, opt, sched)
    assert latest_checkpoint(tmp_path) == ck8
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000008"]


@pytest.mark.unit
def test_keep_last_and_resave_same_step(tmp_path):
    model, opt, sched = _setup()
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, model, opt, sched, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]
    # the same step saved again (cancel, then final after resume) replaces it in place
    _train_steps(model, opt, sched, 1)
    ck = _save(tmp_path, 4, model, opt, sched, keep_last=2, reason="final")
    assert json.loads((ck / "trainer_state.json").read_text())["reason"] == "final"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]
    torch.testing.assert_close(load_checkpoint(ck)["model_state"]["fc.weight"], model.fc.weight.detach())


@pytest.mark.unit
def test_non_main_rank_writes_nothing(tmp_path):
    model, opt, sched = _setup()
    out = save_checkpoint(tmp_path, 1, model.state_dict(), opt, sched, extra={}, config={}, keep_last=1,
                          is_main=False)
    assert out is None and not (tmp_path / "checkpoints").exists()


@pytest.mark.unit
def test_failed_save_leaves_nothing(tmp_path):
    model, opt, sched = _setup()
    ck1 = _save(tmp_path, 1, model, opt, sched)
    bad_state = dict(model.state_dict(), oops="not a tensor")
    with pytest.raises(TypeError, match="oops"):
        save_checkpoint(tmp_path, 2, bad_state, opt, sched, extra={}, config={}, keep_last=2, is_main=True)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    assert latest_checkpoint(tmp_path) == ck1


@pytest.mark.unit
def test_tied_tensors_are_saved(tmp_path):
    model, opt, sched = _setup()
    state = model.state_dict()
    state["alias.weight"] = state["fc.weight"]  # shared storage: safetensors would refuse it as is
    ck = save_checkpoint(tmp_path, 1, state, opt, sched, extra={}, config={}, keep_last=1, is_main=True)
    loaded = load_checkpoint(ck)["model_state"]
    torch.testing.assert_close(loaded["alias.weight"], loaded["fc.weight"])
