"""The online EAGLE3 trainer end to end: metrics, checkpoints, SIGKILL + resume, torchrun on gloo,
export of the result, and a real run on SmolLM2 whose loss falls and acc_0 rises."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_llama_config
from specforge_core.events import null_events, read_events
from specforge_core.data.toy import write_conversations  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    """A random 8-layer Llama with SmolLM2's real tokenizer (vocab 49152), saved as a local HF folder."""
    import torch
    from transformers import LlamaForCausalLM

    from specforge_core.targets import load_tokenizer

    d = tmp_path_factory.mktemp("tiny_target")
    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab_size=49152, hidden_size=32, num_hidden_layers=8)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    LlamaForCausalLM(cfg).save_pretrained(d)
    load_tokenizer("default").save_pretrained(d)
    return d


def base_args(target: Path, data: Path, out: Path, cache: Path, **kw) -> dict:
    args = dict(target_model=str(target), train_data=[str(data)], chat_template="chatml", max_length=128,
                draft_vocab_size=512, ttt_length=3, lr=3e-3, batch_size=2, epochs=2, output_dir=str(out),
                cache_dir=str(cache), num_proc=1, warmup_ratio=0.1, seed=3, device="cpu")
    args.update(kw)
    return args


def to_argv(args: dict) -> list[str]:
    argv = []
    for k, v in args.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, list):
            argv += [flag, *map(str, v)]
        else:
            argv += [flag, str(v)]
    return argv


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_events(run_dir / "metrics.jsonl") if r.get("split") == "train"]


@pytest.mark.unit
def test_train_tiny_target_writes_metrics_checkpoint_and_exports(tmp_path, tiny_target):
    from specforge_core.training.config import TrainConfig
    from specforge_core.training.config import CheckDraftConfig, ExportConfig
    from specforge_core.training.export import check_draft, export_draft
    from specforge_core.training.trainer import train

    data = write_conversations(tmp_path / "train.jsonl", 24)
    ev = write_conversations(tmp_path / "eval.jsonl", 6, seed=1)
    cfg = TrainConfig(**base_args(tiny_target, data, tmp_path / "run", tmp_path / "cache",
                                  eval_data=[str(ev)], eval_every=6))
    out = train(cfg, null_events())
    assert out["steps"] == 24  # 24 samples / batch 2 * 2 epochs
    rows = train_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 25))
    for k in ("loss", "acc_0", "acc_2", "ploss_0", "sim_accept_len", "lr", "grad_norm"):
        assert k in rows[0]
    evals = [r for r in read_events(tmp_path / "run" / "metrics.jsonl") if r.get("split") == "eval"]
    assert len(evals) >= 4 and evals[-1]["samples"] == 6
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["kind"] == "train-eagle3" and run["config"]["ttt_length"] == 3
    # export the result and check it against the target
    res = export_draft(ExportConfig(checkpoint=str(tmp_path / "run"), output=str(tmp_path / "serve"),
                                    target=str(tiny_target)), null_events())
    assert (tmp_path / "serve" / "model.safetensors").exists()
    chk = check_draft(CheckDraftConfig(path=str(tmp_path / "serve"), target=str(tiny_target)), null_events())
    assert chk["ok"], chk["problems"]
    assert res


@pytest.mark.unit
def test_bfloat16_on_a_cpu_without_native_bf16_trains_in_fp32_and_says_so(tmp_path, tiny_target):
    """Emulated bf16 matmuls run hundreds of times slower than fp32 (an AVX2 CPU: 0.3 vs 87 GFLOP/s), so a
    recipe's `dtype: bfloat16` must not mean autocast there; on a CPU with AVX512-BF16 / AMX it does."""
    from specforge_core.cpu_kernels import onednn_bf16_available
    from specforge_core.events import Events
    from specforge_core.training.config import TrainConfig
    from specforge_core.training.trainer import train

    data = write_conversations(tmp_path / "train.jsonl", 4)
    ev = Events(None, echo=False)
    train(TrainConfig(**base_args(tiny_target, data, tmp_path / "run", tmp_path / "cache", dtype="bfloat16",
                                  epochs=1)), ev)
    start = next(r for r in ev.records if r["event"] == "train_start")
    warned = [r for r in ev.records if r["event"] == "warning" and "no native bf16" in r["message"]]
    native = onednn_bf16_available()
    assert start["bf16"] is native and bool(warned) is (not native)


@pytest.mark.unit
def test_train_refuses_existing_run_without_resume(tmp_path, tiny_target):
    from specforge_core.training.config import TrainConfig
    from specforge_core.training.trainer import train

    data = write_conversations(tmp_path / "train.jsonl", 8)
    args = base_args(tiny_target, data, tmp_path / "run", tmp_path / "cache", max_steps=2, epochs=1)
    train(TrainConfig(**args), null_events())
    with pytest.raises(ValueError, match="--resume"):
        train(TrainConfig(**args), null_events())


def _run_cli(args: dict, extra_env: dict | None = None, wait: bool = True, launcher: list[str] | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    cmd = (launcher or [sys.executable, "-m", "specforge_core"]) + ["train", "--quiet", *to_argv(args)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return out


@pytest.mark.unit
@pytest.mark.slow
def test_sigkill_and_resume_reproduces_the_uninterrupted_curve(tmp_path, tiny_target):
    data = write_conversations(tmp_path / "train.jsonl", 24)
    ref = base_args(tiny_target, data, tmp_path / "ref", tmp_path / "cache", save_every=3, keep_last=2)
    _run_cli(ref)
    ref_rows = train_rows(tmp_path / "ref")
    assert len(ref_rows) == 24

    run = {**ref, "output_dir": str(tmp_path / "run")}
    p = _run_cli(run, wait=False)
    # SIGKILL as soon as a checkpoint past step 6 exists (mid-epoch 1 or later)
    ck = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        done = [d for d in ck.glob("step_*") if (d / "COMPLETE").exists()] if ck.exists() else []
        if any(int(d.name.split("_")[1]) >= 6 for d in done):
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = len(train_rows(tmp_path / "run"))
    assert 6 <= killed_at < 24
    _run_cli({**run, "resume": True})
    rows = train_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 25))
    for a, b in zip(rows, ref_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])
        assert a["acc_0"] == pytest.approx(b["acc_0"], abs=1e-6)


@pytest.mark.unit
@pytest.mark.slow
def test_torchrun_two_processes_on_gloo(tmp_path, tiny_target):
    data = write_conversations(tmp_path / "train.jsonl", 16)
    args = base_args(tiny_target, data, tmp_path / "run", tmp_path / "cache", epochs=1, batch_size=2)
    # build the cache first so both ranks only load it (rank 0 builds, others wait at a barrier anyway)
    _run_cli(args, launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(29500 + os.getpid() % 1000), "-m", "specforge_core"])
    rows = train_rows(tmp_path / "run")
    # 16 samples / 2 ranks / batch 2 = 4 steps, each logged once (rank 0), with counts pooled over ranks
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["world_size"] == 2
    assert (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_short_online_run_learns(tmp_path, default_model_dir):
    from specforge_core.training.config import TrainConfig
    from specforge_core.training.trainer import train

    data = write_conversations(tmp_path / "train.jsonl", 64)
    cfg = TrainConfig(target_model="default", train_data=[str(data)], chat_template="chatml", max_length=96,
                      draft_vocab_size=2048, ttt_length=3, lr=2e-3, batch_size=2, epochs=4, max_steps=30,
                      warmup_ratio=0.05, output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                      num_proc=1, device="cpu")
    train(cfg, null_events())
    rows = train_rows(tmp_path / "run")
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    acc_first = sum(r["acc_0"] for r in rows[:3]) / 3
    acc_last = sum(r["acc_0"] for r in rows[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert acc_last > acc_first + 0.2, (acc_first, acc_last)


@pytest.mark.unit
def test_a_resumed_jobs_rate_counts_from_where_it_resumed():
    import time

    from specforge_core.events import Events

    ev = Events(None, echo=False, progress_interval=0)
    ev.progress_from("steps", 600)     # what the trainer says when it resumes at step 600
    time.sleep(0.2)
    rec = ev.progress(610, 1000, what="steps")
    assert rec["rate"] < 100           # 10 steps in ~0.2 s, not 610
    assert rec["eta_s"] > 4


@pytest.mark.unit
def test_grouped_batches_cut_padding_keep_every_sample_and_resume():
    import datasets
    import numpy as np

    from specforge_core.training.batches import EpochBatches

    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(20, 500, size=203)]
    ds = datasets.Dataset.from_dict({"input_ids": [[7] * n for n in lengths], "loss_mask": [[1] * n for n in lengths],
                                     "length": lengths})

    def padded(b: EpochBatches, epoch: int) -> tuple[list[int], int]:
        seen, pad = [], 0
        for _, batch in b.iter_epoch(epoch):
            seen += batch.indices
            pad += batch.input_ids.numel()
        return seen, pad

    plain = EpochBatches(ds, 8, seed=3)
    grouped = EpochBatches(ds, 8, seed=3, group_by_length=64)
    for epoch in (0, 1):
        a, pad_plain = padded(plain, epoch)
        b, pad_grouped = padded(grouped, epoch)
        assert sorted(a) == sorted(b) == list(range(len(ds)))        # every sample once per epoch
        assert pad_grouped < 0.85 * pad_plain                         # far less padding
        # within a group of 64, longest first
        assert all(lengths[x] >= lengths[y] for x, y in zip(b[:63], b[1:64]))
    assert padded(grouped, 0)[0] != padded(grouped, 1)[0]             # a new order each epoch
    # Resuming at (epoch, micro-batch) yields exactly the rest of the epoch.
    full = [batch.indices for _, batch in grouped.iter_epoch(1)]
    assert [batch.indices for _, batch in grouped.iter_epoch(1, start=5)] == full[5:]
    # Two ranks split the same global order: step b of the pair covers the same samples as at world size 1.
    r0, r1 = (EpochBatches(ds, 4, seed=3, rank=r, world_size=2, group_by_length=64) for r in (0, 1))
    one = [i for _, batch in EpochBatches(ds, 8, seed=3, group_by_length=64).iter_epoch(0) for i in batch.indices]
    pair = [i for (_, x), (_, y) in zip(r0.iter_epoch(0), r1.iter_epoch(0)) for i in x.indices + y.indices]
    assert sorted(pair[:48]) == sorted(one[:48])
