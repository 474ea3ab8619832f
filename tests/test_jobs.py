"""Background jobs with real processes and a real SQLite registry: a prepare-data job that finishes,
a failing one, a GUI restart that reattaches to a running regenerate job, a SIGKILLed job that
shows `lost`, a reused pid that is not mistaken for a job, torchrun's whole group cancelled, and a
training job cancelled (checkpoint 'cancelled', exit 130) and then resumed from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specforge_core.config import ConfigError, load_config_file
from specforge_core.data.config import PrepareDataConfig
from specforge_core.jobs.runner import JobRunner, cli_command, job_kinds, pid_alive, proc_start_time
from specforge_core.jobs.store import Job, JobStore, StoreError

from test_train import base_args, tiny_target, write_conversations  # noqa: F401  (tiny_target: fixture)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.unit


def _group_gone(pgid: int) -> bool:
    """No live (non-zombie) process left in the group, as `ps` sees it."""
    out = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True, check=True).stdout
    return not any(int(g) == pgid and not st.startswith("Z") for g, st in (ln.split()[:2] for ln in out.splitlines()))


def _wait_for(pred, timeout: float, what: str, poll: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _conversations(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "conversations": [
                {"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------
_WRITER = """
import sys, time
from specforge_core.jobs.store import Job, JobStore
s = JobStore(sys.argv[1])
for i in range(int(sys.argv[3])):
    jid = f"{sys.argv[2]}-{i}"
    s.add(Job(id=jid, kind="prepare-data", config={"i": i}, argv=["x"], job_dir="/tmp/none"))
    s.update(jid, only_if_status=("starting",), status="running", pid=i)
    s.update(jid, only_if_status=("running",), status="finished", exit_code=0)
"""


def test_store_is_versioned_wal_and_safe_for_several_processes(tmp_path):
    db = tmp_path / "jobs.db"
    store = JobStore(db)
    assert store.schema_version == 1
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(db), f"w{k}", "25"], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for k in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-2000:]
    jobs = store.list()
    assert len(jobs) == 75 and {j.status for j in jobs} == {"finished"}
    assert store.get("w1-7").config == {"i": 7} and store.get("w1-7").argv == ["x"]
    # a final status is never overwritten by a conditional update (two GUIs settling the same job)
    assert not store.update("w0-0", only_if_status=("starting", "running"), status="lost")
    assert store.get("w0-0").status == "finished"
    with pytest.raises(StoreError, match="already exists"):
        store.add(Job(id="w0-0", kind="x", config={}, argv=[], job_dir="/tmp"))
    with pytest.raises(KeyError, match="no job 'nope'"):
        store.get("nope")
    # a database written by a newer version is refused, naming the file
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match=r"jobs\.db.*schema version 99"):
        JobStore(db)


# ------------------------------------------------------------------------------------------------
# short jobs
# ------------------------------------------------------------------------------------------------
def test_prepare_data_job_finishes_with_outputs_log_and_progress(tmp_path):
    src = _conversations(tmp_path / "chats.jsonl", 40)
    r = JobRunner(tmp_path / "ws")
    cfg = PrepareDataConfig(input=[str(src)], output="data", split_eval=0.1)
    job = r.submit("prepare-data", cfg, cwd=tmp_path)
    assert job.status == "running" and job.pid and job.pgid == job.pid
    assert job.argv[:4] == [sys.executable, "-m", "specforge_core", "prepare-data"] and "--config" in job.argv
    job = r.wait(job.id, timeout=60)
    assert job.status == "finished", r.log_tail(job.id)
    assert job.exit_code == 0 and job.finished >= job.started
    out = tmp_path / "data"
    assert job.paths["output"] == str(out)
    train = (out / "chats_train.jsonl").read_text().splitlines()
    ev = (out / "chats_eval.jsonl").read_text().splitlines()
    assert len(train) + len(ev) == 40 and len(ev) >= 1
    # the job dir describes the job: its config reads back through the CLI's own loader
    assert load_config_file(Path(job.job_dir) / "config.json") == cfg.model_dump(mode="json")
    assert json.loads((Path(job.job_dir) / "exit_code").read_text())["exit_code"] == 0
    res = r.result(job.id)
    assert res["rows_read"] == 40 and res["written_train"] == len(train)
    assert json.loads(r.log_tail(job.id, 1)) == res  # --json: the summary is the log's last line
    prog = r.progress(job.id)
    assert prog["event"] == "progress" and prog["done"] == 40
    assert [j.id for j in r.list_jobs()] == [job.id] and r.list_jobs(status="failed") == []
    assert "prepare-data" in r.command_line(job.id)
    # the `jobs` CLI reads the same registry
    cli = subprocess.run([sys.executable, "-m", "specforge_core", "jobs", "list", "--workspace", str(tmp_path / "ws"),
                          "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    listed = json.loads(cli.stdout.strip().splitlines()[-1])["jobs"]
    assert [(j["id"], j["status"], j["exit_code"]) for j in listed] == [(job.id, "finished", 0)]
    assert cli_command("prepare-data", cfg)[:2] == ["specforge-wb", "prepare-data"]


def test_failing_job_is_failed_and_its_error_is_in_the_log(tmp_path):
    r = JobRunner(tmp_path / "ws")
    job = r.submit("prepare-data", {"input": [str(tmp_path / "missing.jsonl")], "output": str(tmp_path / "o")})
    job = r.wait(job.id, timeout=60)
    assert job.status == "failed" and job.exit_code == 1 and "exit code 1" in job.message
    assert "missing.jsonl" in r.log_tail(job.id, 5)
    with pytest.raises(ValueError, match="cannot resume"):
        r.resume(job.id)


def test_bad_submissions_are_refused_clearly(tmp_path):
    r = JobRunner(tmp_path / "ws")
    assert {"prepare-data", "build-cache", "train", "regenerate", "export"} <= set(job_kinds())
    with pytest.raises(ValueError, match="unknown job kind 'trian'.*train"):
        r.submit("trian", {})
    with pytest.raises(ConfigError, match="takes a TrainConfig"):
        r.submit("train", PrepareDataConfig(input=["x"]))
    with pytest.raises(ConfigError, match="split_eval"):
        r.submit("prepare-data", {"input": ["x"], "split_eval": 2})
    with pytest.raises(ValueError, match="torchrun"):
        r.submit("prepare-data", {"input": ["x"]}, nproc=2)
    assert r.list_jobs() == []  # nothing was registered for refused submissions


def test_a_reused_pid_is_not_mistaken_for_a_running_job(tmp_path):
    r = JobRunner(tmp_path / "ws")
    me = os.getpid()
    assert pid_alive(me, proc_start_time(me))
    # a row whose pid now belongs to another process (this one, started at another time)
    r.store.add(Job(id="old", kind="prepare-data", config={}, argv=[], job_dir=str(tmp_path / "old"),
                    status="running", pid=me, pgid=me, pid_start="1", started=time.time()))
    job = r.get("old")
    assert job.status == "lost" and "SIGKILL" in job.message


# ------------------------------------------------------------------------------------------------
# a GUI restart, a SIGKILL (regenerate against the slow loopback server)
# ------------------------------------------------------------------------------------------------
_GUI = """
import json, sys
from specforge_core.jobs.runner import JobRunner
job = JobRunner(sys.argv[1]).submit("regenerate", json.loads(sys.argv[2]))
print(job.id)
"""


def test_restarted_gui_reattaches_to_a_running_job_and_a_sigkilled_job_is_lost(tmp_path):
    from specforge_core.regen.testserver import Faults, ServerThread

    src = _conversations(tmp_path / "in.jsonl", 12)
    ws = tmp_path / "ws"
    with ServerThread(faults=Faults(delay_s=0.35)) as srv:
        cfg = {"input": [str(src)], "output": str(tmp_path / "out.jsonl"), "server_address": [srv.address],
               "model": "test-model", "concurrency": 1, "max_retries": 0, "temperature": 0.0}
        # The "GUI" is a separate process that submits the job and exits: the job must outlive it.
        gui = subprocess.run([sys.executable, "-c", _GUI, str(ws), json.dumps(cfg)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert gui.returncode == 0, gui.stderr[-2000:]
        job_id = gui.stdout.strip().splitlines()[-1]

        r = JobRunner(ws)  # a fresh runner: nothing in memory about the job
        assert [j.id for j in r.list_jobs()] == [job_id]
        job = r.get(job_id)
        assert job.status == "running" and pid_alive(job.pid, job.pid_start)
        prog = _wait_for(lambda: r.progress(job_id), 30, "a progress event while running")
        assert r.status(job_id) == "running" and prog["done"] < 12
        assert isinstance(r.log_tail(job_id), str)
        job = r.wait(job_id, timeout=60)
        assert job.status == "finished", r.log_tail(job_id)
        assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 12
        assert r.result(job_id)["ok"] == 12

        # now one that dies by SIGKILL of its whole group (the wrapper included): no exit status
        cfg2 = {**cfg, "output": str(tmp_path / "out2.jsonl")}
        job2 = r.submit("regenerate", cfg2)
        _wait_for(lambda: r.progress(job2.id), 30, "the second job to start working")
        os.killpg(job2.pgid, signal.SIGKILL)
        job2 = r.wait(job2.id, timeout=10)
        assert job2.status == "lost" and job2.exit_code is None and "SIGKILL" in job2.message
        assert not (Path(job2.job_dir) / "exit_code").exists()
        # the registry is the same for any runner: a third one sees both final statuses
        assert {j.id: j.status for j in JobRunner(ws).list_jobs()} == {job_id: "finished", job2.id: "lost"}


# ------------------------------------------------------------------------------------------------
# training: torchrun's group cancelled; cancel -> 'cancelled' checkpoint -> resume
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cancel_reaches_every_process_of_a_torchrun_job(tmp_path, tiny_target):  # noqa: F811
    data = write_conversations(tmp_path / "train.jsonl", 16)
    run = tmp_path / "run"
    r = JobRunner(tmp_path / "ws")
    job = r.submit("train", base_args(tiny_target, data, run, tmp_path / "cache", epochs=500),
                   nproc=2, env={"OMP_NUM_THREADS": "1"})
    assert "torch.distributed.run" in job.argv and job.argv[job.argv.index("--nproc_per_node") + 1] == "2"
    _wait_for(lambda: (p := r.progress(job.id, what="steps")) and p["done"] >= 2, 120,
              "two steps on two ranks", poll=0.1)
    # one SIGTERM to the group: both ranks stop at the same step, rank 0 writes the cancel
    # checkpoint, and torchrun's graceful shutdown waits for them (a second SIGTERM would cut it short)
    job = r.cancel(job.id, timeout=60)
    assert job.status == "cancelled", (job.to_dict(), r.log_tail(job.id))
    assert _group_gone(job.pgid)
    cks = sorted((run / "checkpoints").glob("step_*"))
    assert cks and (cks[-1] / "COMPLETE").exists()
    assert json.loads((cks[-1] / "trainer_state.json").read_text())["reason"] == "cancelled"


@pytest.mark.slow
def test_train_job_cancelled_checkpoints_and_resume_continues(tmp_path, tiny_target):  # noqa: F811
    data = write_conversations(tmp_path / "train.jsonl", 24)
    run = tmp_path / "run"
    r = JobRunner(tmp_path / "ws")
    args = base_args(tiny_target, data, run, tmp_path / "cache", epochs=300)  # far more steps than we wait for
    job = r.submit("train", args, env={"OMP_NUM_THREADS": "1"})
    assert job.paths["metrics"] == str(run / "metrics.jsonl")
    prog = _wait_for(lambda: (p := r.progress(job.id, what="steps")) and p["done"] >= 3 and p, 120,
                     "three training steps", poll=0.1)
    assert prog["what"] == "steps" and "loss" in prog and r.status(job.id) == "running"
    assert len(r.metrics(job.id, split="train")) >= 3  # live metrics while running

    job = r.cancel(job.id, timeout=60)
    assert job.status == "cancelled" and job.exit_code == 130, (job.to_dict(), r.log_tail(job.id))
    assert _group_gone(job.pgid)
    assert "cancelled" in r.log_tail(job.id, 5)
    steps = [m["step"] for m in r.metrics(job.id, split="train")]
    stopped = steps[-1]
    assert steps == list(range(1, stopped + 1)) and stopped < 300 * 12
    ck = run / "checkpoints" / f"step_{stopped:08d}"
    assert (ck / "COMPLETE").exists()
    assert json.loads((ck / "trainer_state.json").read_text())["reason"] == "cancelled"

    new = r.resume(job.id, overrides={"max_steps": stopped + 3})
    assert new.resumed_from == job.id and new.config["resume"] is True and new.id != job.id
    new = r.wait(new.id, timeout=120)
    assert new.status == "finished", r.log_tail(new.id, 30)
    resumed = [e for e in r.events(new.id) if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == stopped
    steps = [m["step"] for m in r.metrics(new.id, split="train")]
    assert steps == list(range(1, stopped + 4))  # one unbroken curve across cancel + resume
    assert r.result(new.id)["steps"] == stopped + 3
