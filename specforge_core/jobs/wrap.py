"""The tiny parent of every background job: `python -m specforge_core.jobs.wrap JOBDIR -- ARGV...`.

The process that launched a job (the GUI) may exit or restart while the job runs, and then nobody
could `waitpid` the job to learn how it ended. This wrapper is the job's parent instead: it runs
ARGV (stdout/stderr are inherited: the runner points them at JOBDIR/log.txt), forwards SIGTERM /
SIGINT / SIGHUP to it (and notes the cancel in JOBDIR/cancel_requested), and when it ends writes
JOBDIR/exit_code atomically as JSON: `{"exit_code": N, "finished": T, "cancel_requested": bool}`
(N < 0: killed by signal -N). It imports nothing heavy, so it costs milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EXIT_CODE_FILE = "exit_code"
CANCEL_FILE = "cancel_requested"
CHILD_PID_FILE = "child.pid"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_cancel_note(job_dir: Path) -> dict | None:
    try:
        note = json.loads((job_dir / CANCEL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else {}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m specforge_core.jobs.wrap JOBDIR -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    job_dir, cmd = Path(argv[0]), argv[2:]
    job_dir.mkdir(parents=True, exist_ok=True)
    state = {"cancel": False}
    child: subprocess.Popen | None = None

    def _forward(signum, _frame):
        # A runner's cancel signals the whole group (and says so in CANCEL_FILE first): the child
        # has the signal already, and a second one would cut short torchrun's graceful shutdown.
        # Anything else (`kill WRAPPER_PID`, a hang-up) is passed on to the child once.
        if state["cancel"]:
            return
        state["cancel"] = True
        note = _read_cancel_note(job_dir)
        if note is None:
            try:
                write_atomic(job_dir / CANCEL_FILE, json.dumps({"time": time.time(),
                                                                "signal": signal.Signals(signum).name}))
            except OSError:
                pass
        elif note.get("group"):
            return
        if child is not None and child.poll() is None:
            try:
                child.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, _forward)

    try:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    except OSError as e:
        print(f"specforge-wb jobs: cannot start {cmd[0]!r}: {e}", file=sys.stderr, flush=True)
        write_atomic(job_dir / EXIT_CODE_FILE, json.dumps({"exit_code": 127, "finished": time.time(),
                                                            "cancel_requested": state["cancel"],
                                                            "error": str(e)}))
        return 127
    try:
        write_atomic(job_dir / CHILD_PID_FILE, str(child.pid))
    except OSError:
        pass
    if state["cancel"]:  # a cancel that arrived while the child was being spawned: it missed it
        child.send_signal(signal.SIGTERM)
    rc = child.wait()  # PEP 475: signals interrupt nothing here, the handler runs and wait resumes
    write_atomic(job_dir / EXIT_CODE_FILE, json.dumps({"exit_code": rc, "finished": time.time(),
                                                        "cancel_requested": state["cancel"]}))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
