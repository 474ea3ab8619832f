"""The jobs registry: one SQLite file (`WORKSPACE/jobs/jobs.db`) that lists every background job.

It records what was asked (kind, config, argv, process count), where the job lives (job dir, output
paths, working directory), which process runs it (wrapper pid, its process group, and the pid's
start time so a reused pid is never mistaken for our job) and what came of it (status, times, exit
code). The runner writes a row when it spawns a job and settles the final status once it derives
one from the process and the files the job leaves behind; the store itself never looks at processes.

Several processes use the same file at once (the GUI, a CLI `jobs` listing, a notebook), so the
database is in WAL mode, every write is one short `BEGIN IMMEDIATE` transaction, and connections
wait on a busy lock instead of failing. The schema carries a version in `PRAGMA user_version`;
a newer file than this code understands is refused rather than misread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

SCHEMA_VERSION = 1

# Statuses. `starting` and `running` are live; the others are final and never change again.
LIVE = ("starting", "running")
FINAL = ("finished", "failed", "cancelled", "lost")

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS jobs (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    config          TEXT NOT NULL,
    argv            TEXT NOT NULL,
    pid             INTEGER,
    pgid            INTEGER,
    pid_start       TEXT,
    status          TEXT NOT NULL,
    created         REAL NOT NULL,
    started         REAL,
    finished        REAL,
    exit_code       INTEGER,
    job_dir         TEXT NOT NULL,
    paths           TEXT NOT NULL DEFAULT '{}',
    nproc           INTEGER NOT NULL DEFAULT 1,
    cwd             TEXT,
    resumed_from    TEXT,
    cancel_requested REAL,
    message         TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
"""

_JSON_COLUMNS = ("config", "argv", "paths")


@dataclass
class Job:
    """One row of the registry. `config` is the job config as JSON data, `paths` its named outputs."""

    id: str
    kind: str
    config: dict
    argv: list
    job_dir: str
    status: str = "starting"
    created: float = field(default_factory=time.time)
    pid: Optional[int] = None
    pgid: Optional[int] = None
    pid_start: Optional[str] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    exit_code: Optional[int] = None
    paths: dict = field(default_factory=dict)
    nproc: int = 1
    cwd: Optional[str] = None
    resumed_from: Optional[str] = None
    cancel_requested: Optional[float] = None
    message: Optional[str] = None

    @property
    def is_live(self) -> bool:
        return self.status in LIVE

    @property
    def duration_s(self) -> Optional[float]:
        if self.started is None:
            return None
        return round((self.finished or time.time()) - self.started, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["duration_s"] = self.duration_s
        return d


class StoreError(RuntimeError):
    """The jobs database cannot be used (newer schema, corrupt file); the message names the file."""


class JobStore:
    """The registry at `path` (created with its parent). Cheap to construct: one per caller is fine."""

    def __init__(self, path: str | Path, timeout: float = 30.0):
        self.path = Path(path)
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._init_schema()

    # -- connections ---------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN ourselves, so a write takes the lock up front
        # (IMMEDIATE) instead of upgrading mid-transaction, which is where SQLITE_BUSY deadlocks come from.
        con = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        return con

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        try:
            yield con
        finally:
            con.close()

    def _init_schema(self) -> None:
        try:
            con = self._connect()
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot open the jobs database: {e}") from None
        try:
            # WAL lets readers (a GUI polling every second) run beside a writer; it is a property of
            # the file, so setting it once is enough, but setting it again is harmless.
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("BEGIN IMMEDIATE")
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                con.execute("ROLLBACK")
                raise StoreError(f"{self.path}: jobs database schema version {version} is newer than this "
                                 f"specforge-wb understands ({SCHEMA_VERSION}); upgrade it or use another workspace")
            if version < 1:
                # One statement at a time: executescript would commit the open transaction first.
                for stmt in _SCHEMA_V1.split(";"):
                    if stmt.strip():
                        con.execute(stmt)
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            con.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a usable jobs database: {e}") from None
        finally:
            con.close()

    @property
    def schema_version(self) -> int:
        with self._read() as con:
            return int(con.execute("PRAGMA user_version").fetchone()[0])

    # -- rows ----------------------------------------------------------------------------------
    @staticmethod
    def _to_row(job: Job) -> dict:
        d = asdict(job)
        for c in _JSON_COLUMNS:
            d[c] = json.dumps(d[c], ensure_ascii=False, default=str)
        return d

    @staticmethod
    def _from_row(row: sqlite3.Row) -> Job:
        d = dict(row)
        for c in _JSON_COLUMNS:
            try:
                d[c] = json.loads(d[c]) if d[c] is not None else ({} if c != "argv" else [])
            except json.JSONDecodeError:
                d[c] = {} if c != "argv" else []
        return Job(**d)

    def add(self, job: Job) -> Job:
        row = self._to_row(job)
        cols = ", ".join(row)
        marks = ", ".join(":" + k for k in row)
        try:
            with self._write() as con:
                con.execute(f"INSERT INTO jobs ({cols}) VALUES ({marks})", row)
        except sqlite3.IntegrityError:
            raise StoreError(f"{self.path}: a job with id {job.id!r} already exists") from None
        return job

    def get(self, job_id: str) -> Job:
        with self._read() as con:
            row = con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id!r} in {self.path}")
        return self._from_row(row)

    def list(self, status: str | None = None, kind: str | None = None, limit: int | None = None) -> list[Job]:
        """Newest first."""
        q, args = "SELECT * FROM jobs", []
        where = []
        if status:
            where.append("status = ?")
            args.append(status)
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if where:
            q += " WHERE " + " AND ".join(where)
        q += " ORDER BY created DESC, id DESC"
        if limit:
            q += " LIMIT ?"
            args.append(int(limit))
        with self._read() as con:
            return [self._from_row(r) for r in con.execute(q, args).fetchall()]

    def update(self, job_id: str, only_if_status: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Set `fields` on a job; with `only_if_status`, only while its status is one of those (so two
        processes settling the same job cannot overwrite a final status). True when a row changed."""
        if not fields:
            return False
        bad = set(fields) - set(Job.__dataclass_fields__)
        if bad:
            raise ValueError(f"unknown job fields: {sorted(bad)}")
        for c in _JSON_COLUMNS:
            if c in fields:
                fields[c] = json.dumps(fields[c], ensure_ascii=False, default=str)
        sets = ", ".join(f"{k} = :{k}" for k in fields)
        q = f"UPDATE jobs SET {sets} WHERE id = :_id"
        params = {**fields, "_id": job_id}
        if only_if_status:
            marks = ", ".join(f":_s{i}" for i in range(len(only_if_status)))
            q += f" AND status IN ({marks})"
            params.update({f"_s{i}": s for i, s in enumerate(only_if_status)})
        with self._write() as con:
            return con.execute(q, params).rowcount > 0

    def delete(self, job_id: str) -> bool:
        with self._write() as con:
            return con.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0
