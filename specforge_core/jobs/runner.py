"""Run engine jobs in the background: spawn, track, cancel, resume, and read what they write.

A job is one CLI command (`prepare-data`, `train`, `regenerate`, ...) run as a child process:

    WORKSPACE/jobs/jobs.db           the registry (see `store.py`)
    WORKSPACE/jobs/<id>/config.json  the job's config, run.json-style (`--config` reads it back)
    WORKSPACE/jobs/<id>/events.jsonl structured events (`--events`): progress, warnings, summary
    WORKSPACE/jobs/<id>/log.txt      stdout + stderr
    WORKSPACE/jobs/<id>/exit_code    written by the wrapper when the job ends (see `wrap.py`)

The command runs under `python -m specforge_core.jobs.wrap`, in a new session (its own process
group), so the exit status is recorded even when the process that spawned it has gone, and a cancel
reaches every process of the job (torchrun's workers included). Status is never trusted from
memory: it is derived each time from the wrapper's pid (checked against its start time, since pids
are reused), the group, and the files, so a restarted GUI lists every job and reattaches to the
running ones. Final statuses are written back to the registry once known.

Statuses: starting, running, finished (exit 0), failed, cancelled (exit 130 by the CLI's convention,
or any non-zero exit after a cancel), lost (the processes are gone and no exit status was written:
SIGKILL from outside, a reboot).

`jobs_command` is the `specforge-wb jobs` command over the same registry (list, show, tail, cancel,
resume from a terminal).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from ..commands import COMMANDS, Command
from ..config import FORMAT_VERSION, ConfigError, JobConfig, build_config, config_to_argv
from ..events import Events, read_events
from .config import JobsConfig
from .store import FINAL, LIVE, Job, JobStore
from .wrap import CANCEL_FILE, CHILD_PID_FILE, EXIT_CODE_FILE, write_atomic

DB_NAME = "jobs.db"
CONFIG_FILE = "config.json"
EVENTS_FILE = "events.jsonl"
LOG_FILE = "log.txt"
CANCELLED_EXIT = 130          # specforge_core.cli.main: JobCancelled -> 130
TORCHRUN_KINDS = ("train",)   # commands that know how to run as N ranks
_NON_JOBS = ("jobs", "inspect-mask")  # instant commands: nothing to track in the background
# Config fields that name what a job writes; shown as the job's outputs.
_OUTPUT_FIELDS = ("output", "output_dir", "cache_dir")

# Popen objects of the wrappers this process spawned, so it can reap them (a zombie still answers
# kill(pid, 0)); shared by every runner in the process.
_CHILDREN: dict[int, subprocess.Popen] = {}
_CHILDREN_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------------
# Kinds: the command table (`specforge_core.commands`) is the one source of truth
# ------------------------------------------------------------------------------------------------
def job_kinds() -> list[str]:
    return [c.name for c in COMMANDS if c.name not in _NON_JOBS]


def resolve_kind(kind: str) -> Command:
    """The command-table row for `kind`; a clear error listing the known kinds otherwise."""
    for c in COMMANDS:
        if c.name == kind and kind not in _NON_JOBS:
            return c
    raise ValueError(f"unknown job kind {kind!r}; known: {', '.join(job_kinds())}")


def config_class(kind: str) -> type[JobConfig]:
    return resolve_kind(kind).config


def cli_command(kind: str, config: JobConfig) -> list[str]:
    """The `specforge-wb ...` argv that runs the same job by hand (the GUI's "show CLI command")."""
    resolve_kind(kind)
    return ["specforge-wb", kind, *config_to_argv(config)]


# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------
def _proc_stat(pid: int) -> Optional[list[str]]:
    """Fields 3.. of /proc/PID/stat (state first); None without /proc or when the pid is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or ')'.
    return raw[raw.rfind(")") + 2:].split()


def proc_start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    st = _proc_stat(pid)
    return st[19] if st and len(st) > 19 else None


def pid_alive(pid: Optional[int], start: Optional[str] = None) -> bool:
    """True while `pid` runs and is the same process that had start time `start` (not a reused pid).
    Zombies count as dead: they have exited and only wait to be reaped."""
    if not pid or pid <= 0:
        return False
    with _CHILDREN_LOCK:
        p = _CHILDREN.get(pid)
    if p is not None and p.poll() is not None:
        with _CHILDREN_LOCK:
            _CHILDREN.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists but belongs to someone else: the start-time check below decides
    st = _proc_stat(pid)
    if st is None:
        return not Path("/proc/self/stat").exists()  # no procfs: trust kill(pid, 0)
    if st[0] in ("Z", "X"):
        return False
    return start is None or (len(st) > 19 and st[19] == start)


def group_running(pgid: Optional[int], leader_start: Optional[str] = None) -> bool:
    """True while any process of group `pgid` is alive (zombies do not count). `leader_start`, the
    start time of the process that created the group, tells our group from a later one that a
    reused pid might have created under the same id."""
    if not pgid or pgid <= 0:
        return False
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    leader = _proc_stat(pgid)
    if leader is not None and leader_start is not None and len(leader) > 19 and leader[19] != leader_start:
        return False  # the id now belongs to another process: our group, if any, is gone with the leader's pid
    want = str(pgid)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False
    for name in entries:
        if not name.isdigit():
            continue
        st = _proc_stat(int(name))
        if st and len(st) > 2 and st[2] == want and st[0] not in ("Z", "X"):
            return True
    return False


def _signal_group(pgid: Optional[int], sig: int) -> bool:
    if not pgid or pgid <= 0:
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _tail_bytes(path: Path, max_bytes: int) -> tuple[bytes, bool]:
    """The last `max_bytes` of a file and whether that is all of it."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        start = max(0, size - max_bytes)
        f.seek(start)
        return f.read(), start == 0


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------
class JobRunner:
    """Spawns and tracks the jobs of one workspace. Any number of runners (in any number of
    processes) may share a workspace: all state is in the registry and the job directories."""

    def __init__(self, workspace: str | Path, python: str | None = None):
        self.workspace = Path(workspace).resolve()
        self.root = self.workspace / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.root / DB_NAME)
        self.python = python or sys.executable

    # -- spawning ------------------------------------------------------------------------------
    def submit(self, kind: str, config: JobConfig | dict, nproc: int = 1, cwd: str | Path | None = None,
               env: dict[str, str] | None = None, resumed_from: str | None = None) -> Job:
        """Start `kind` (a CLI command) on `config` in the background and return its registry row.

        cwd: the job's working directory (relative paths in the config are relative to it;
        default: this process's). nproc > 1 runs a training job under torchrun with N processes."""
        cmd = resolve_kind(kind)
        cls = config_class(kind)
        if isinstance(config, dict):
            cfg = build_config(cls, config, source=f"{kind} job config")
        elif isinstance(config, cls):
            # Re-validate: a config built with model_construct or edited field by field may be invalid.
            cfg = build_config(cls, config.model_dump(), source=f"{kind} job config")
        else:
            raise ConfigError(f"a {kind} job takes a {cls.__name__}, got {type(config).__name__}")
        nproc = int(nproc)
        if nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {nproc}")
        if nproc > 1 and kind not in TORCHRUN_KINDS:
            raise ValueError(f"{kind} jobs run as one process; nproc > 1 (torchrun) is for: "
                             f"{', '.join(TORCHRUN_KINDS)}")
        cwd = Path(cwd or os.getcwd()).resolve()

        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{secrets.token_hex(3)}"
        job_dir = self.root / job_id
        job_dir.mkdir(parents=True)
        cfg_json = cfg.model_dump(mode="json")
        from .. import __version__

        write_atomic(job_dir / CONFIG_FILE, json.dumps(
            {"kind": kind, "format_version": FORMAT_VERSION, "specforge_version": __version__,
             "config": cfg_json, "job_id": job_id, "nproc": nproc, "resumed_from": resumed_from},
            indent=2, ensure_ascii=False))

        if nproc > 1:
            launcher = [self.python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                        "--master_port", str(_free_port()), "-m", "specforge_core"]
        else:
            launcher = [self.python, "-m", "specforge_core"]
        argv = launcher + [kind]
        if cmd.config_flag:
            flag = cmd.config_flag if isinstance(cmd.config_flag, str) else "--config"
            argv += [flag, str(job_dir / CONFIG_FILE)]
        else:
            argv += config_to_argv(cfg)
        argv += ["--events", str(job_dir / EVENTS_FILE), "--quiet", "--json"]

        paths = {"job_dir": str(job_dir), "config": str(job_dir / CONFIG_FILE), "log": str(job_dir / LOG_FILE),
                 "events": str(job_dir / EVENTS_FILE)}
        for name in _OUTPUT_FIELDS:
            v = cfg_json.get(name)
            if isinstance(v, str) and v:
                paths[name] = str((cwd / v).resolve())
        if "output_dir" in paths:
            paths["metrics"] = str(Path(paths["output_dir"]) / "metrics.jsonl")

        job = Job(id=job_id, kind=kind, config=cfg_json, argv=argv, job_dir=str(job_dir), status="starting",
                  created=time.time(), paths=paths, nproc=nproc, cwd=str(cwd), resumed_from=resumed_from)
        self.store.add(job)

        child_env = {**os.environ, **(env or {})}
        # The package must be importable from the job's cwd even when it is not installed.
        pkg_parent = str(Path(__file__).resolve().parents[2])
        child_env["PYTHONPATH"] = os.pathsep.join(x for x in (pkg_parent, child_env.get("PYTHONPATH")) if x)
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
        child_env["SPECFORGE_JOB_ID"] = job_id
        child_env["SPECFORGE_JOB_DIR"] = str(job_dir)

        full = [self.python, "-m", "specforge_core.jobs.wrap", str(job_dir), "--", *argv]
        try:
            with open(job_dir / LOG_FILE, "ab") as log:
                p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=str(cwd), env=child_env, start_new_session=True, close_fds=True)
        except OSError as e:
            self.store.update(job_id, status="failed", finished=time.time(), exit_code=127,
                              message=f"could not start: {e}")
            raise RuntimeError(f"job {job_id}: could not start {self.python}: {e}") from None
        with _CHILDREN_LOCK:
            _CHILDREN[p.pid] = p
        # start_new_session: the wrapper leads its own session, so its pid is the group id.
        self.store.update(job_id, only_if_status=("starting",), pid=p.pid, pgid=p.pid,
                          pid_start=proc_start_time(p.pid), status="running", started=time.time())
        return self.store.get(job_id)

    # -- status --------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        """The job's registry row with its status freshly derived."""
        return self._refresh(self.store.get(job_id))

    def status(self, job_id: str) -> str:
        return self.get(job_id).status

    def list_jobs(self, status: str | None = None, kind: str | None = None, limit: int | None = None) -> list[Job]:
        """Every job, newest first, live ones refreshed (which also settles the ones that ended)."""
        jobs = [self._refresh(j) for j in self.store.list(kind=kind, limit=limit)]
        return [j for j in jobs if status is None or j.status == status]

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.2) -> Job:
        """Block until the job reaches a final status (or `timeout` seconds pass); return its row."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            job = self.get(job_id)
            if job.status in FINAL or (deadline is not None and time.time() >= deadline):
                return job
            time.sleep(poll)

    def _refresh(self, job: Job) -> Job:
        if job.status in FINAL:
            return job
        job_dir = Path(job.job_dir)
        # Asked first, always: for a wrapper this process spawned, it also reaps the zombie.
        wrapper_alive = pid_alive(job.pid, job.pid_start)
        done = _read_json(job_dir / EXIT_CODE_FILE)
        if done is None:
            if job.pid is None:
                # Registered but never spawned (the spawning process died between the two writes).
                if time.time() - job.created > 60:
                    return self._settle(job, "lost", None, "the job was registered but its process never started")
                return job
            if wrapper_alive:
                return job
            done = _read_json(job_dir / EXIT_CODE_FILE)  # it may have ended between the two looks
        # The job is over only when its whole group is: torchrun's workers may still be writing a
        # cancel checkpoint after torchrun itself exited, or the wrapper alone may have been killed.
        if group_running(job.pgid, job.pid_start):
            return job
        if done is None:
            if job.cancel_requested:
                return self._settle(job, "cancelled", None, "killed after the cancel timeout; outputs since "
                                    "the last checkpoint may be lost")
            return self._settle(job, "lost", None, "the job's processes ended without recording an exit status "
                                "(killed with SIGKILL, or the machine went down); its outputs may be incomplete")
        rc = done.get("exit_code")
        rc = int(rc) if isinstance(rc, (int, float)) else None
        cancel = bool(done.get("cancel_requested") or job.cancel_requested or (job_dir / CANCEL_FILE).exists())
        if rc == 0:
            status, msg = "finished", None
        elif rc == CANCELLED_EXIT or cancel:
            status, msg = "cancelled", "cancelled; outputs so far are kept" + (
                " and the job can resume" if "resume" in job.config else "")
        else:
            status = "failed"
            if rc is not None and rc < 0:
                try:
                    msg = f"killed by {signal.Signals(-rc).name}"
                except ValueError:
                    msg = f"killed by signal {-rc}"
            else:
                msg = f"exit code {rc}" + (f": {done['error']}" if done.get("error") else "")
        return self._settle(job, status, rc, msg, finished=done.get("finished"))

    def _settle(self, job: Job, status: str, rc: Optional[int], message: Optional[str],
                finished: float | None = None) -> Job:
        self.store.update(job.id, only_if_status=LIVE, status=status, exit_code=rc, message=message,
                          finished=float(finished) if finished else time.time())
        return self.store.get(job.id)

    # -- control -------------------------------------------------------------------------------
    def cancel(self, job_id: str, timeout: float = 30.0, kill_wait: float = 10.0) -> Job:
        """SIGTERM the job's process group (jobs checkpoint / close files and exit 130), then SIGKILL
        the group if it is still there after `timeout` seconds. Returns the settled row."""
        job = self.get(job_id)
        if job.status in FINAL:
            return job
        now = time.time()
        self.store.update(job_id, only_if_status=LIVE, cancel_requested=now)
        try:
            # Written before the signal: it tells the wrapper the whole group was signalled, so it
            # must not signal its child a second time (torchrun aborts its graceful shutdown on one).
            write_atomic(Path(job.job_dir) / CANCEL_FILE, json.dumps({"time": now, "by": "runner", "group": True}))
        except OSError:
            pass
        if job.pid is None:
            return self.get(job_id)
        if pid_alive(job.pid, job.pid_start) or group_running(job.pgid, job.pid_start):
            _signal_group(job.pgid, signal.SIGTERM)
        job = self.wait(job_id, timeout=timeout, poll=0.1)
        if job.status in FINAL:
            return job
        if group_running(job.pgid, job.pid_start):
            _signal_group(job.pgid, signal.SIGKILL)
        return self.wait(job_id, timeout=kill_wait, poll=0.1)

    def resume(self, job_id: str, overrides: dict[str, Any] | None = None, nproc: int | None = None) -> Job:
        """Start a new job that continues `job_id`: same kind and config with `resume=True` (jobs
        whose config has no `resume` field cannot resume). `overrides` change other fields."""
        job = self.get(job_id)
        if job.status in LIVE:
            raise ValueError(f"job {job_id} is still {job.status}; cancel it before resuming")
        cls = config_class(job.kind)
        if "resume" in cls.model_fields:
            data = {**job.config, "resume": True}
        elif getattr(cls, "_continues_itself", False):
            # Such a job picks up where its output stands whenever it runs (a recipe skips finished
            # stages); a restart the first run asked for must not be repeated.
            data = {k: v for k, v in job.config.items() if k not in getattr(cls, "_once_only", ())}
        else:
            raise ValueError(f"{job.kind} jobs cannot resume (their config has no `resume` field); "
                             "submit the job again instead")
        if "overwrite" in cls.model_fields:
            data["overwrite"] = False  # resuming and starting over contradict each other
        data.update(overrides or {})
        cfg = build_config(cls, data, source=f"resume of job {job_id}")
        return self.submit(job.kind, cfg, nproc=nproc or job.nproc, cwd=job.cwd, resumed_from=job.id)

    def remove(self, job_id: str, delete_files: bool = False) -> None:
        """Forget a finished job (and optionally its job directory; never its outputs)."""
        job = self.get(job_id)
        if job.status in LIVE:
            raise ValueError(f"job {job_id} is still {job.status}; cancel it first")
        self.store.delete(job_id)
        if delete_files:
            import shutil

            shutil.rmtree(job.job_dir, ignore_errors=True)

    # -- what the job wrote --------------------------------------------------------------------
    def log_tail(self, job_id: str, n: int = 50, max_bytes: int = 1 << 20) -> str:
        """The last `n` lines of the job's log (stdout + stderr), at most `max_bytes` read."""
        path = Path(self.store.get(job_id).job_dir) / LOG_FILE
        if not path.exists() or n <= 0:
            return ""
        data, _ = _tail_bytes(path, max_bytes)
        lines = data.decode("utf-8", errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def events(self, job_id: str) -> list[dict]:
        return read_events(Path(self.store.get(job_id).job_dir) / EVENTS_FILE)

    def progress(self, job_id: str, what: str | None = None) -> Optional[dict]:
        """The latest `progress` event (optionally of one `what`), or None before the first."""
        return self.last_event(job_id, "progress", **({"what": what} if what is not None else {}))

    def last_event(self, job_id: str, event: str, **match: Any) -> Optional[dict]:
        """The latest `event` record whose fields equal `match` (e.g. the newest `recipe_stage`), or None."""
        path = Path(self.store.get(job_id).job_dir) / EVENTS_FILE
        if not path.exists():
            return None

        def hit(rec: dict) -> bool:
            return rec.get("event") == event and all(rec.get(k) == v for k, v in match.items())

        # A long run writes many events; the latest one is nearly always in the last few KiB.
        data, whole = _tail_bytes(path, 256 * 1024)
        lines = data.decode("utf-8", errors="replace").splitlines()
        for line in reversed(lines if whole else lines[1:]):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if hit(rec):
                return rec
        if whole:
            return None
        recs = [r for r in read_events(path) if hit(r)]
        return recs[-1] if recs else None

    def result(self, job_id: str) -> Optional[dict]:
        """The job's JSON summary (the last stdout line of `--json`), once it finished."""
        job = self.get(job_id)
        if job.status != "finished":
            return None
        for line in reversed(self.log_tail(job_id, 200).splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue
        return None

    def metrics(self, job_id: str, split: str | None = None) -> list[dict]:
        """Rows of the run's metrics.jsonl (training jobs: `output_dir` of the config)."""
        job = self.store.get(job_id)
        path = job.paths.get("metrics")
        if not path:
            return []
        rows = read_events(path)
        return [r for r in rows if split is None or r.get("split") == split]

    def command_line(self, job_id: str) -> str:
        return shlex.join(self.store.get(job_id).argv)


# ------------------------------------------------------------------------------------------------
# One runner per workspace, per process (the GUI's tabs share it)
# ------------------------------------------------------------------------------------------------
_RUNNERS: dict[str, JobRunner] = {}


def runner(workspace: str | Path) -> JobRunner:
    key = str(Path(workspace).resolve())
    if key not in _RUNNERS:
        _RUNNERS[key] = JobRunner(key)
    return _RUNNERS[key]


# ------------------------------------------------------------------------------------------------
# The `jobs` command: the registry from a terminal (e.g. cancel a GUI-started job over ssh)
# ------------------------------------------------------------------------------------------------
def _row(job: Job) -> dict:
    return {"id": job.id, "kind": job.kind, "status": job.status, "exit_code": job.exit_code,
            "duration_s": job.duration_s, "nproc": job.nproc, "job_dir": job.job_dir, "message": job.message}


def jobs_command(cfg: JobsConfig, events: Events) -> dict:
    r = JobRunner(cfg.workspace)
    try:
        if cfg.action == "list":
            return {"jobs": [_row(j) for j in r.list_jobs(status=cfg.status, limit=cfg.limit)]}
        job = r.get(cfg.job_id)
    except KeyError as e:
        raise ValueError(str(e).strip("'\"")) from None
    if cfg.action == "show":
        return {**job.to_dict(), "progress": r.progress(job.id)}
    if cfg.action == "tail":
        return {"id": job.id, "status": job.status, "log": r.log_tail(job.id, cfg.lines)}
    if cfg.action == "cancel":
        events.emit("cancelling", id=job.id, timeout=cfg.timeout)
        return _row(r.cancel(job.id, timeout=cfg.timeout))
    new = r.resume(job.id)
    return {**_row(new), "resumed_from": job.id}


__all__ = ["JobRunner", "Job", "runner", "jobs_command", "job_kinds", "resolve_kind", "config_class", "cli_command",
           "pid_alive", "group_running", "proc_start_time", "CHILD_PID_FILE"]
