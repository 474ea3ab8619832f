"""Scale-out on PyTorch's engines, in real processes (torchrun, gloo, CPU): an FSDP2-sharded target with a
DDP or FSDP2 draft trains the same curve as one process; checkpoints resume across world sizes; a killed
rank ends the job (no hang) and `--resume` continues the uninterrupted curve.

Equivalence: W ranks of batch 1 average their gradients, which is what one process does with batch 1 and
`--grad-accum W` (each micro-batch's loss is normalised by its own counted positions either way), and the
global micro-batch takes the same samples of the epoch's permutation (see `training/batches.py`). The
learning rate is held constant so that a run stopped by --max-steps and resumed continues the same schedule.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_llama_config
from specforge_core.data.toy import write_conversations
from specforge_core.events import read_events

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.unit, pytest.mark.slow]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random 8-layer Llama with SmolLM2's tokenizer, 16 conversations, and the uninterrupted reference:
    one process, batch 1, --grad-accum 2, two epochs (16 steps)."""
    import torch
    from transformers import LlamaForCausalLM

    from specforge_core.targets import load_tokenizer

    d = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab_size=49152, hidden_size=32, num_hidden_layers=8)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    LlamaForCausalLM(cfg).save_pretrained(d / "target")
    load_tokenizer("default").save_pretrained(d / "target")
    data = write_conversations(d / "train.jsonl", 16)
    # A draft vocabulary as big as the target's: a random target's argmax must lie in it for a position to count.
    base = ["--target-model", str(d / "target"), "--train-data", str(data), "--chat-template", "chatml",
            "--max-length", "128", "--draft-vocab-size", "49152", "--ttt-length", "3", "--lr", "1e-2",
            "--warmup-ratio", "0", "--min-lr-ratio", "1", "--batch-size", "1", "--seed", "3", "--device", "cpu",
            "--cache-dir", str(d / "cache"), "--num-proc", "1", "--dist-timeout", "60"]
    env = {"base": base, "dir": d}
    train(env, d / "ref", 1, "--grad-accum", "2", "--epochs", "2")
    ref = rows(d / "ref")
    assert [r["step"] for r in ref] == list(range(1, 17))
    assert min(r["counted_positions"] for r in ref) > 0, "nothing counted: the curves compare zeros"
    return {**env, "ref": ref}


def _cmd(env: dict, out: Path, nproc: int, *extra: str) -> list[str]:
    args = ["train", "--quiet", *env["base"], "--output-dir", str(out), *extra]
    if nproc == 1:
        return [sys.executable, "-m", "specforge_core", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(29500 + (os.getpid() + int(time.time())) % 2000), "-m", "specforge_core", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def train(env: dict, out: Path, nproc: int, *extra: str) -> str:
    p = subprocess.run(_cmd(env, out, nproc, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stderr


def rows(run_dir: Path) -> list[dict]:
    return [r for r in read_events(run_dir / "metrics.jsonl") if r.get("split") == "train"]


def same_curve(got: list[dict], ref: list[dict], n: int) -> None:
    assert [r["step"] for r in got] == list(range(1, n + 1))
    for a, b in zip(got, ref[:n]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["acc_0"] == pytest.approx(b["acc_0"], abs=1e-6)
        assert a["counted_positions"] == b["counted_positions"]


def test_fsdp_target_and_ddp_draft_match_one_process(setup, tmp_path):
    train(setup, tmp_path / "run", 2, "--target-parallel", "fsdp", "--draft-parallel", "ddp", "--epochs", "1")
    same_curve(rows(tmp_path / "run"), setup["ref"], 8)
    import json

    assert json.loads((tmp_path / "run" / "run.json").read_text())["world_size"] == 2


def test_resume_from_one_rank_at_two_and_back(setup, tmp_path):
    # world size 1 -> 2 (FSDP2 target, DDP draft)
    a = tmp_path / "a"
    train(setup, a, 1, "--grad-accum", "2", "--epochs", "1", "--max-steps", "4")
    train(setup, a, 2, "--target-parallel", "fsdp", "--epochs", "1", "--resume")
    same_curve(rows(a), setup["ref"], 8)
    # world size 2 (FSDP2 target and FSDP2 draft: the optimizer state is gathered into the same file) -> 1
    b = tmp_path / "b"
    train(setup, b, 2, "--target-parallel", "fsdp", "--draft-parallel", "fsdp", "--epochs", "1", "--max-steps", "4")
    train(setup, b, 1, "--grad-accum", "2", "--epochs", "1", "--resume")
    same_curve(rows(b), setup["ref"], 8)


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The worker of torchrun `launcher_pid` whose environment says RANK=rank."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            if f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                return int(d.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the rank's process through /proc")
def test_killed_rank_fails_the_job_and_resume_continues(setup, tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen(_cmd(setup, run, 2, "--target-parallel", "fsdp", "--epochs", "2", "--save-every", "2"),
                         cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ck = run / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if ck.exists() and any((d / "COMPLETE").exists() and int(d.name.split("_")[1]) >= 4 for d in ck.glob("step_*")):
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before a rank could be killed"
    pid = _rank_pid(p.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    _, err = p.communicate(timeout=180)   # no hang: the job ends well inside the collective timeout
    assert p.returncode != 0
    assert time.time() - t0 < 120
    assert "rank" in err and ("SIGKILL" in err or "died or stalled" in err), err[-3000:]
    done = len(rows(run))
    assert 4 <= done < 16
    train(setup, run, 2, "--target-parallel", "fsdp", "--epochs", "2", "--save-every", "2", "--resume")
    same_curve(rows(run), setup["ref"], 16)
