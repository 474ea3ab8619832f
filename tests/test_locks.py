"""`specforge_core.locks.output_lock`: one writer per output, across processes; a killed holder frees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specforge_core.locks import OutputBusy, output_lock

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from specforge_core.locks import output_lock
with output_lock(sys.argv[1], "training run"):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(target: Path, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_with_the_pid_and_a_killed_holder_frees_the_lock(tmp_path):
    target = tmp_path / "runs" / "abc"
    proc = _holder(target)
    try:
        t0 = time.monotonic()
        with pytest.raises(OutputBusy) as e:
            with output_lock(target, "training run"):
                pass
        assert time.monotonic() - t0 < 2, "refused at once, not after waiting"
        msg = str(e.value)
        assert e.value.pid == proc.pid and f"pid {proc.pid}" in msg and f"kill {proc.pid}" in msg
        assert "jobs cancel" in msg and str(target) in msg
        # Another process is refused too (not just another descriptor here).
        other = subprocess.run([sys.executable, "-c", HOLDER, str(target)], cwd=ROOT, capture_output=True,
                               text=True, timeout=30)
        assert other.returncode != 0 and f"pid {proc.pid}" in other.stderr
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert (tmp_path / "runs" / "abc.lock").exists()  # left behind by the kill ...
    with output_lock(target, "training run") as lock:  # ... and free all the same
        assert f'"pid": {os.getpid()}' in lock.read_text()
    assert lock.read_text() == ""  # released: no stale holder left in it


def test_background_job_holder_names_its_cancel_command(tmp_path):
    proc = _holder(tmp_path / "out.jsonl", env={"SPECFORGE_JOB_ID": "job-42"})
    try:
        with pytest.raises(OutputBusy, match="specforge-wb jobs cancel job-42"):
            with output_lock(tmp_path / "out.jsonl"):
                pass
    finally:
        proc.kill()
        proc.wait(10)


def test_one_process_cannot_take_it_twice_and_release_on_error(tmp_path):
    target = tmp_path / "out.jsonl"
    with output_lock(target, lock_file=tmp_path / "out.lock"):
        with pytest.raises(OutputBusy, match=f"pid {os.getpid()}"):
            with output_lock(target, lock_file=tmp_path / "out.lock"):
                pass
    with pytest.raises(ValueError):
        with output_lock(target, lock_file=tmp_path / "out.lock"):
            raise ValueError("boom")
    with output_lock(target, lock_file=tmp_path / "out.lock"):
        pass


@pytest.mark.unit
def test_training_and_dump_refuse_an_output_another_run_holds(tmp_path):
    # The run dir's lock and the store's lock are the same helper's: a held one stops the job at once,
    # before any model is loaded, naming the holder.
    from specforge_core.config import ConfigError
    from specforge_core.events import null_events
    from specforge_core.locks import output_lock
    from specforge_core.offline.config import DumpConfig
    from specforge_core.offline.dump import dump_hidden_states
    from specforge_core.training.config import TrainConfig
    from specforge_core.training.trainer import train

    run = tmp_path / "run"
    run.mkdir()
    with output_lock(run, "training", lock_file=run / "run.lock"):
        with pytest.raises(ConfigError, match=str(os.getpid())):
            train(TrainConfig(train_data=["x.jsonl"], output_dir=str(run)), null_events())
    store = tmp_path / "hs"
    with output_lock(store, "hidden-state dump"):
        with pytest.raises(ConfigError, match=str(os.getpid())):
            dump_hidden_states(DumpConfig(train_data=["x.jsonl"], output=str(store)), null_events())
