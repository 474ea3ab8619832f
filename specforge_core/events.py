"""Structured events: what a job reports, as JSON lines, instead of prints.

Every long job takes an `Events` and calls `emit` (facts: a summary, a warning, a metric row) and
`progress` (done / total, rate limited). The CLI echoes events to stderr in a readable form; the
GUI's job runner reads the same `events.jsonl` from the job directory. `Events.cancelled` turns
SIGTERM into a flag the job polls between units of work, so a cancel never tears a file.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        return v.item()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class Events:
    """A sink for a job's structured events.

    path:  append events as JSON lines there (created with its parents); None keeps them in memory.
    echo:  also print a one-line human form to `stream` (stderr by default).
    """

    def __init__(self, path: str | Path | None = None, echo: bool = True, stream: TextIO | None = None,
                 progress_interval: float = 1.0):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self.stream = stream or sys.stderr
        self.progress_interval = progress_interval
        self.records: list[dict] = []
        self._lock = threading.Lock()
        self._last_progress: dict[str, float] = {}
        self._progress_start: dict[str, tuple[float, float]] = {}
        self._cancelled = threading.Event()
        self._t0 = time.time()

    # -- writing -------------------------------------------------------------------------------
    def emit(self, event: str, **fields: Any) -> dict:
        rec = {"time": round(time.time(), 3), "event": event, **_jsonable(fields)}
        with self._lock:
            self.records.append(rec)
            if self.path:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if self.echo:
                self.stream.write(self.format(rec) + "\n")
                self.stream.flush()
        return rec

    def warning(self, message: str, **fields: Any) -> dict:
        return self.emit("warning", message=message, **fields)

    def progress_from(self, what: str, done: int) -> None:
        """Work on `what` starts now at `done` (a resumed job): its rate and ETA count from here, not
        from zero at the sink's creation."""
        self._progress_start[what] = (time.time(), done)

    def progress(self, done: int, total: int | None, what: str = "items", force: bool = False,
                 **fields: Any) -> dict | None:
        """Report progress; rate limited to one record per `progress_interval` unless forced."""
        now = time.time()
        # a first report can already be the last one: measure its rate from when the sink was made
        start = self._progress_start.setdefault(what, (self._t0, 0) if done else (now, done))
        if not force and now - self._last_progress.get(what, 0.0) < self.progress_interval \
                and (total is None or done < total):
            return None
        self._last_progress[what] = now
        elapsed = max(now - start[0], 1e-9)
        rate = (done - start[1]) / elapsed
        eta = (total - done) / rate if total and rate > 0 else None
        return self.emit("progress", what=what, done=done, total=total, rate=round(rate, 2),
                         eta_s=None if eta is None else round(eta, 1), **fields)

    @staticmethod
    def format(rec: dict) -> str:
        ev = rec.get("event")
        rest = {k: v for k, v in rec.items() if k not in ("time", "event")}
        if ev == "progress":
            total = rest.get("total")
            pct = f" {100 * rest['done'] / total:5.1f}%" if total else ""
            eta = f" eta {rest['eta_s']:.0f}s" if rest.get("eta_s") is not None else ""
            extra = " ".join(f"{k}={v}" for k, v in rest.items()
                             if k not in ("what", "done", "total", "rate", "eta_s"))
            return f"[progress] {rest.get('what')}: {rest['done']}/{total or '?'}{pct} " \
                   f"({rest.get('rate', 0):.1f}/s){eta}" + (f" {extra}" if extra else "")
        if ev == "warning":
            msg = rest.pop("message", "")
            extra = " ".join(f"{k}={v}" for k, v in rest.items())
            return f"[warning] {msg}" + (f" ({extra})" if extra else "")
        return f"[{ev}] " + " ".join(f"{k}={json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v}"
                                     for k, v in rest.items())

    # -- cancellation --------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT set the cancel flag (main thread only); the job stops at its next check."""
        if threading.current_thread() is not threading.main_thread():
            return

        def _handler(signum, _frame):
            self._cancelled.set()
            self.emit("cancel_requested", signal=signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class JobCancelled(Exception):
    """Raised by a job that saw `events.cancelled` after leaving its outputs consistent."""


def read_events(path: str | Path) -> list[dict]:
    """Read an events / metrics JSONL file, skipping a torn last line."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def null_events() -> Events:
    return Events(None, echo=False)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
