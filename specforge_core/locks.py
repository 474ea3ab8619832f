"""One writer per output: an exclusive OS lock held for the life of a run.

Why: a second run on the same output (a GUI job and a `--resume` in a terminal, a double click)
appends beside the first and breaks "every id exactly once". `output_lock(path, what)` takes
`fcntl.flock(LOCK_EX | LOCK_NB)` on a lock file beside the output (`<path>.lock`, or the name the
caller gives) and writes the holder into it: pid, host, what, command line, job id, start time. A
second run is refused at once with `OutputBusy`, whose message names the pid and how to stop it.

The lock belongs to the OS, not to the file: when the holder exits, however it dies (SIGKILL, OOM),
the kernel drops it, so a leftover lock file never blocks anyone; it is not deleted on release
(deleting it would let a third run lock a new file while a second still holds the old one).
flock is per open file description, so a second lock from the same process is refused too.
Over NFS flock is emulated with byte-range locks (Linux >= 2.6.12) and still excludes across hosts.

Ground floor: this module imports nothing else from the engine, so every package can use it
(regeneration outputs now; training run dirs and hidden-state stores next).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs are not guarded there
    fcntl = None  # type: ignore[assignment]


class OutputBusy(RuntimeError):
    """Another live process holds the lock of this output."""

    def __init__(self, message: str, path: Path, holder: dict):
        super().__init__(message)
        self.path = path
        self.holder = holder

    @property
    def pid(self) -> Optional[int]:
        pid = self.holder.get("pid")
        return pid if isinstance(pid, int) else None


def lock_path_for(path: str | Path) -> Path:
    """`out.jsonl` -> `out.jsonl.lock`; `runs/abc` (a directory) -> `runs/abc.lock` beside it."""
    p = Path(path)
    return p.with_name(p.name + ".lock")


def _read_holder(fd: int, wait_s: float = 0.5) -> dict:
    """The holder's record. The holder writes it right after locking, so an empty file is retried briefly."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            raw = os.pread(fd, 1 << 16, 0)
            if raw.strip():
                data = json.loads(raw)
                if isinstance(data, dict):
                    return data
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.02)


def _busy_message(path: Path, lock: Path, what: str, holder: dict) -> str:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return (f"{path} is being written by another {what} (its lock {lock} is held, by a process that did "
                "not say who it is); wait for it to finish or stop it")
    here = socket.gethostname()
    host = holder.get("host")
    on = f" on host {host}" if host and host != here else ""
    desc = f"pid {pid}{on}"
    if holder.get("what") and holder.get("what") != what:
        desc += f" ({holder['what']})"
    since = holder.get("started")
    if isinstance(since, (int, float)):
        desc += f", running since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
    if holder.get("argv"):
        desc += f": {holder['argv']}"
    stop = [f"`kill {pid}`" + (f" on {host}" if on else "")]
    job = holder.get("job_id")
    if job:
        stop.insert(0, f"`specforge-wb jobs cancel {job}` (it is a background job)")
    else:
        stop.append("`specforge-wb jobs cancel JOB_ID` if it is a GUI job")
    return (f"{path} is already being written by another {what}: {desc}. Two runs on one output would both "
            f"append to it. Wait for that run to finish, or stop it with {' or '.join(stop)}, then "
            "rerun (with --resume to continue what it wrote).")


@contextmanager
def output_lock(path: str | Path, what: str = "run", lock_file: str | Path | None = None,
                error: type[Exception] | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of `path` for the `with` block; yields the lock file's path.

    Raises `OutputBusy` at once (no waiting) when another process holds it, or `error(message)` when
    given (jobs pass their ConfigError, which the CLI reports as a refused start). `what` names the
    kind of run in the message ("regeneration", "training run"); `lock_file` overrides `<path>.lock`.
    """
    target = Path(path)
    lock = Path(lock_file) if lock_file is not None else lock_path_for(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                message = _busy_message(target, lock, what, holder)
                if error is not None:
                    raise error(message) from None
                raise OutputBusy(message, target, holder) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "path": str(target),
                  "started": round(time.time(), 3), "argv": shlex.join(sys.argv) if sys.argv else None,
                  "job_id": os.environ.get("SPECFORGE_JOB_ID")}
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        try:
            yield lock
        finally:
            try:
                os.ftruncate(fd, 0)  # released: no stale holder for the next reader
            except OSError:
                pass
    finally:
        os.close(fd)  # closing the descriptor drops the flock
