"""Tracking: metrics.jsonl always (append, resume truncation), TensorBoard and wandb (offline) when asked."""

from __future__ import annotations

import json

import pytest

from specforge_core.training.tracking import Tracker

pytestmark = pytest.mark.unit


def test_metrics_jsonl_and_resume_truncation(tmp_path):
    t = Tracker(tmp_path, [], {"x": 1})
    for s in range(1, 6):
        t.log({"split": "train", "step": s, "loss": 1.0 / s})
    t.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 6, "lo')  # torn line from a kill
    Tracker(tmp_path, [], {}).truncate_after(3)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_non_main_rank_writes_nothing(tmp_path):
    t = Tracker(tmp_path / "r", [], {}, is_main=False)
    t.log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = Tracker(tmp_path, ["tensorboard"], {})
    for s in range(1, 4):
        t.log({"split": "train", "step": s, "loss": 2.0 - s * 0.5, "acc_0": 0.1 * s})
    t.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [1.5, 1.0, 0.5]
    assert [e.step for e in acc.Scalars("train/acc_0")] == [1, 2, 3]


def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    t = Tracker(tmp_path, ["wandb"], {"lr": 1e-4}, wandb_project="test", wandb_name="t")
    t.log({"split": "train", "step": 1, "loss": 1.0})
    t.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())
    assert (tmp_path / "metrics.jsonl").exists()


def test_run_sync_inside_a_running_loop():
    import asyncio

    from specforge_core.asyncutil import run_sync

    async def inner():
        await asyncio.sleep(0)
        return 42

    async def outer():  # like a Jupyter cell: a loop is already running
        return run_sync(inner())

    assert run_sync(inner()) == 42
    assert asyncio.run(outer()) == 42
