"""Crash-safe JSONL outputs for regeneration: line-atomic appends and an exact resume set.

Why this shape: a run against several servers lasts hours and dies by SIGKILL, OOM or a lost node.
Every finished sample is written as one `write(2)` of one complete line to a file opened with
O_APPEND, so a line is either wholly in the file or (at worst, after a crash of the machine itself)
a torn tail, which `repair_tail` cuts off before the next run appends. Resume is keyed by the row
id found in `out.jsonl` and `out.errors.jsonl`, never by line counts, so the union of both files
holds every id exactly once however many times the run is killed and resumed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from ..data.readers import dumps_line  # noqa: F401 - one line format for every JSONL the project writes

try:  # orjson parses resume files several times faster than json
    import orjson

    def loads(data: bytes | str) -> Any:
        return orjson.loads(data)

    JSONDecodeError: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)
except ImportError:  # pragma: no cover - orjson is in the venv, but stay usable without it
    import json

    def loads(data: bytes | str) -> Any:
        return json.loads(data)

    JSONDecodeError = (json.JSONDecodeError, UnicodeDecodeError)


def repair_tail(path: str | Path) -> int:
    """Cut a torn last line (no trailing newline) off `path`. Returns the bytes removed (0 if none)."""
    p = Path(path)
    if not p.exists():
        return 0
    with open(p, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Walk back in blocks to the last newline; everything after it is the torn line.
        pos, block, keep = size, 1 << 16, 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def iter_records(path: str | Path) -> Iterator[tuple[int, Any | None, bytes]]:
    """(line number, parsed object or None when the line is not valid JSON, raw line) per non-empty line."""
    p = Path(path)
    if not p.exists():
        return
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            try:
                yield n, loads(line), raw
            except JSONDecodeError:
                yield n, None, raw


def done_ids(*paths: str | Path, bad_lines: list[str] | None = None) -> dict[str, str]:
    """Ids already written to any of `paths` -> the path that holds them. Lines that are not JSON
    objects with a string id are noted in `bad_lines` ("file:line") and do not count as done."""
    out: dict[str, str] = {}
    for p in paths:
        for n, obj, _ in iter_records(p):
            rid = obj.get("id") if isinstance(obj, dict) else None
            if not isinstance(rid, str):
                if bad_lines is not None:
                    bad_lines.append(f"{p}:{n}")
                continue
            out.setdefault(rid, str(p))
    return out


class AppendWriter:
    """One JSON object per line, each line one `write(2)` on an O_APPEND descriptor.

    `fsync_every`: fsync after this many lines (0 = only on close); the line atomicity does not
    depend on it, only what survives a power cut does.
    """

    def __init__(self, path: str | Path, fsync_every: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.fsync_every = fsync_every
        self.lines = 0

    def write(self, obj: Any) -> None:
        self.write_bytes(dumps_line(obj))

    def write_bytes(self, data: bytes) -> None:
        if self.fd is None:
            raise ValueError(f"{self.path}: writer is closed")
        view = memoryview(data)
        # A regular-file write is whole unless the disk is full; finish it rather than leave a torn line.
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.lines += 1
        if self.fsync_every and self.lines % self.fsync_every == 0:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> "AppendWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def remove_ids(path: str | Path, ids: set[str]) -> int:
    """Rewrite `path` without the lines whose id is in `ids` (atomically: temp file + rename)."""
    p = Path(path)
    if not p.exists() or not ids:
        return 0
    tmp = p.with_name(p.name + ".tmp")
    removed = 0
    with open(tmp, "wb") as f:
        for _, obj, raw in iter_records(p):
            if isinstance(obj, dict) and obj.get("id") in ids:
                removed += 1
                continue
            f.write(raw if raw.endswith(b"\n") else raw + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return removed
