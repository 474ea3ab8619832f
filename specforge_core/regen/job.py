"""The regeneration job: `regenerate(cfg, events)`, the one engine function behind CLI, GUI and notebooks.

Every input row (or each of its `num_samples` samples, ids `<id>#k`) becomes exactly one line:
either a regenerated row in `out.jsonl`

    {"id", "conversations", "status": "ok"|"truncated", "finish_reasons": [...], "server", "model", "usage"}

or a failure in `out.errors.jsonl` `{"id", "server", "error", "attempts"}`. System and user turns
are kept; the old assistant turns are dropped and regenerated in order, each new answer fed back as
context for the next. Rows are written as they finish (completion order, not input order).
Resume (`--resume`) repairs a torn last line and skips every id already in either file, so after a
SIGKILL at any moment the union of both files ends up holding every input id exactly once.
Two guards keep it so: the run holds an exclusive lock on `out.lock` for its whole life (a second
run on the same output is refused at once, naming the pid that writes), and `out.run.json` records
the config, so a resume that would make rows differently (another model, sampling, num_samples,
input) is refused unless `--force` (see `runinfo.py`).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from ..config import ConfigError
from ..events import Events, JobCancelled
from ..locks import output_lock
from . import runinfo
from .client import (ChatClient, SamplingParams, answer_turn, assemble, build_messages, plan_turns)
from .config import RegenConfig
from .servers import AllServersDown, SampleFailed, ServerPool
from .store import AppendWriter, done_ids, remove_ids, repair_tail
from ..asyncutil import run_sync


@dataclass
class Unit:
    """One sample to regenerate: output id, source row, sample index, where the row came from."""

    id: str
    row: dict
    sample: int
    file: str
    line: int


@dataclass
class RunStats:
    rows_read: int = 0
    already_done: int = 0
    ok: int = 0
    truncated: int = 0
    failed: int = 0
    unusable: int = 0
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fatal: Optional[str] = None
    model: Optional[str] = None
    servers: list = field(default_factory=list)

    @property
    def finished(self) -> int:
        return self.ok + self.truncated + self.failed + self.unusable


# ------------------------------------------------------------------------------------------------
# Files and input
# ------------------------------------------------------------------------------------------------
class _Record:
    """The run's `out.run.json`: the earlier run's record (on resume), checked and then rewritten."""

    def __init__(self, cfg: RegenConfig, events: Events):
        self.cfg, self.events = cfg, events
        self.path = cfg.run_json_path
        self.old: Optional[dict] = None
        self.forced: list = []

    def load(self, has_rows: bool) -> None:
        """On resume of an output that holds rows: refuse a config that would make them differently."""
        self.old = runinfo.read(self.path)
        if self.old is None:
            if has_rows:
                self.events.warning(f"{self.path} is missing (output of an older version?): cannot check that "
                                    "this resume uses the same model and sampling as the rows already written")
            return
        self.forced = runinfo.check(self.path, self.old, self.cfg, self.cfg.model)

    def commit(self, model: Optional[str]) -> None:
        """Once the served model is known: check it against the earlier run's, then write the record."""
        forced = self.forced
        if self.old is not None:
            forced = runinfo.check(self.path, self.old, self.cfg, model)
        if forced:
            self.events.warning("--force: resuming with other output-changing settings than the earlier run: "
                                + ", ".join(f"{n} {o!r} -> {v!r}" for n, o, v in forced), forced=[n for n, _, _ in forced])
        runinfo.write(self.path, runinfo.record(self.cfg, model, self.old, forced))


def _prepare_outputs(cfg: RegenConfig, events: Events, rec: _Record) -> dict[str, str]:
    out, err = Path(cfg.output), cfg.errors_path
    existing = [p for p in (out, err) if p.exists() and p.stat().st_size > 0]
    if existing and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"{existing[0]} already exists: pass --resume to continue that run "
                          "or --overwrite to start over")
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite:
        for p in (out, err, rec.path):
            if p.exists():
                p.unlink()
        return {}
    if not cfg.resume:
        return {}
    rec.load(has_rows=bool(existing))
    for p in (out, err):
        cut = repair_tail(p)
        if cut:
            events.warning(f"{p}: cut a torn last line ({cut} bytes) left by an interrupted run", file=str(p))
    bad: list[str] = []
    done = done_ids(out, err, bad_lines=bad)
    if bad:
        events.warning(f"{len(bad)} line(s) of earlier output are not valid rows and are ignored "
                       f"(first: {bad[0]}); their ids will be regenerated", count=len(bad))
    if cfg.retry_errors:
        failed = {i for i, p in done.items() if p == str(err)}
        if failed:
            n = remove_ids(err, failed)
            for i in failed:
                done.pop(i, None)
            events.emit("retry_errors", count=n)
    return done


def _estimate_rows(cfg: RegenConfig) -> Optional[int]:
    """Rows in the input, counted as lines for plain JSONL (fast); None when it cannot be known cheaply."""
    from ..data.readers import expand_paths

    n = 0
    for p in expand_paths(cfg.input):
        if p.name.endswith((".jsonl", ".ndjson")):
            with open(p, "rb") as f:
                last = b"\n"
                while chunk := f.read(1 << 22):
                    n += chunk.count(b"\n")
                    last = chunk[-1:]
                n += last != b"\n"
        else:
            return None
    return min(n, cfg.max_rows) if cfg.max_rows else n


def _units(cfg: RegenConfig, report, done: dict[str, str], st: RunStats) -> Iterator[Unit]:
    from ..data.readers import iter_rows

    seen: set[str] = set()
    # Prompt-only rows (no assistant turn yet) are valid input: regeneration writes the answers.
    for file, line, row in iter_rows(cfg.input, cfg.max_row_bytes, report, require_assistant=False,
                                     with_location=True):
        if cfg.max_rows and st.rows_read >= cfg.max_rows:
            return
        st.rows_read += 1
        rid = row["id"]
        if rid in seen:
            report.add(file, line, "duplicate_id", f"id {rid!r} appeared earlier; only its first row is used")
            continue
        seen.add(rid)
        for k in range(cfg.num_samples):
            sid = rid if cfg.num_samples == 1 else f"{rid}#{k}"
            if sid in done:
                st.already_done += 1
                continue
            yield Unit(sid, row, k, file, line)


class _Sink:
    """The two output files plus the accounting of what went into them."""

    def __init__(self, cfg: RegenConfig, st: RunStats, events: Events, total: Optional[int]):
        self.out = AppendWriter(cfg.output)
        self.err = AppendWriter(cfg.errors_path)
        self.cfg, self.st, self.events, self.total = cfg, st, events, total

    def progress(self, force: bool = False) -> None:
        st = self.st
        total = self.total if self.total is None else max(self.total, st.finished)
        self.events.progress(st.finished, total, what="samples", force=force, ok=st.ok, truncated=st.truncated,
                             failed=st.failed + st.unusable, requests=st.requests)

    def ok(self, u: Unit, conv: list[dict], finishes: list[str], server: str, model: Optional[str],
           ptok: int, ctok: int) -> None:
        truncated = "length" in finishes
        row: dict[str, Any] = {"id": u.id, "conversations": conv, "status": "truncated" if truncated else "ok",
                               "finish_reasons": finishes, "server": server, "model": model,
                               "usage": {"prompt_tokens": ptok, "completion_tokens": ctok}}
        if self.cfg.num_samples > 1:
            row["source_id"], row["sample"] = u.row["id"], u.sample
        self.out.write(row)
        if truncated:
            self.st.truncated += 1
        else:
            self.st.ok += 1
        self.st.prompt_tokens += ptok
        self.st.completion_tokens += ctok
        self.progress()

    def fail(self, u: Unit, error: str, server: Optional[str], attempts: int, unusable: bool = False) -> None:
        self.err.write({"id": u.id, "server": server, "error": error, "attempts": attempts,
                        "file": u.file, "line": u.line})
        if unusable:
            self.st.unusable += 1
        else:
            self.st.failed += 1
        self.progress()

    def close(self) -> None:
        self.out.close()
        self.err.close()


def _plan(u: Unit, cfg: RegenConfig, sink: _Sink) -> Optional[tuple[list[dict], list[int]]]:
    if "conversations" not in u.row:
        sink.fail(u, "pre-formatted text row: nothing to regenerate (give conversations)", None, 0, unusable=True)
        return None
    kept, slots = plan_turns(u.row["conversations"], cfg.system_prompt)
    if not slots:
        sink.fail(u, "no user turn to answer", None, 0, unusable=True)
        return None
    return kept, slots


# ------------------------------------------------------------------------------------------------
# Server backend
# ------------------------------------------------------------------------------------------------
async def _run_server(cfg: RegenConfig, events: Events, units: Iterator[Unit], sink: _Sink, rec: _Record) -> None:
    st = sink.st
    rng = random.Random(cfg.seed)
    async with ChatClient(cfg.api_key, cfg.timeout_s, cfg.connect_timeout_s,
                          idle_timeout_s=cfg.idle_timeout_s) as client:
        pool = ServerPool(client, cfg.server_address or [], cfg.concurrency, cfg.retire_after, events,
                          reprobe_s=cfg.reprobe_s)
        try:
            alive = await pool.probe_all()
            model = cfg.model
            listed = [m for s in alive for m in s.models]
            if model is None and listed:
                model = listed[0]
            elif model is not None and listed and model not in listed:
                events.warning(f"model {model!r} is not among those the servers list ({sorted(set(listed))})")
            st.model = pool.model = model
            rec.commit(model)  # before any request: a resume against another model stops here
            events.emit("servers", alive=[s.address for s in alive], model=model,
                        retired=[s.address for s in pool.servers if not s.alive])
            params = SamplingParams(model=model, temperature=cfg.temperature, top_p=cfg.top_p,
                                    max_tokens=cfg.max_tokens, stop=cfg.stop,
                                    disable_thinking=cfg.reasoning == "disable")
            n_workers = sum(s.capacity for s in alive)
            queue: asyncio.Queue = asyncio.Queue(maxsize=2 * n_workers)
            stopping = asyncio.Event()

            async def produce() -> None:
                for i, u in enumerate(units):
                    if stopping.is_set():
                        break
                    await queue.put(u)
                    if i % 256 == 255:
                        await asyncio.sleep(0)  # let workers run while a fast reader fills the queue
                for _ in range(n_workers):
                    await queue.put(None)

            async def work() -> None:
                while not stopping.is_set():
                    u = await queue.get()
                    if u is None:
                        return
                    try:
                        await _one_sample(u, cfg, pool, params, model, sink, rng)
                    except AllServersDown as e:
                        st.fatal = str(e)
                        stopping.set()
                        return

            async def watch_cancel() -> None:
                while not stopping.is_set():
                    if events.cancelled:
                        stopping.set()
                        return
                    await asyncio.sleep(0.1)

            producer = asyncio.create_task(produce())
            workers = [asyncio.create_task(work()) for _ in range(n_workers)]
            watcher = asyncio.create_task(watch_cancel())
            stop_wait = asyncio.create_task(stopping.wait())
            all_work = asyncio.gather(*workers, return_exceptions=True)
            waiting = {all_work, stop_wait, producer}
            producer_error: BaseException | None = None
            while not (all_work.done() or stop_wait.done()):
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if producer in done:
                    waiting.discard(producer)
                    if not producer.cancelled() and producer.exception() is not None:
                        # The input failed mid-read: stop instead of leaving workers waiting for rows.
                        producer_error = producer.exception()
                        break
            # Stopping (cancel or no server left): in-flight requests are abandoned; each write is one
            # synchronous call, so no line can be half-written by this cancellation.
            for t in [producer, watcher, stop_wait, *workers]:
                t.cancel()
            results = await all_work
            await asyncio.gather(producer, watcher, stop_wait, return_exceptions=True)
            if producer_error is not None:
                raise producer_error
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                    raise r
        except AllServersDown as e:
            st.fatal = str(e)
        finally:
            st.servers = [s.stats() for s in pool.servers]
            await pool.close()


async def _one_sample(u: Unit, cfg: RegenConfig, pool: ServerPool, params: SamplingParams,
                      model: Optional[str], sink: _Sink, rng: random.Random) -> None:
    plan = _plan(u, cfg, sink)
    if plan is None:
        return
    kept, slots = plan
    answers: list[dict] = []
    finishes: list[str] = []
    server = None
    ptok = ctok = 0
    for j in range(len(slots)):
        body = params.payload(build_messages(kept, slots, answers, j))
        try:
            reply, server, attempts = await pool.chat(body, prefer=server, max_retries=cfg.max_retries,
                                                      backoff_s=cfg.retry_backoff_s, rng=rng)
        except SampleFailed as e:
            sink.st.requests += e.attempts
            sink.st.retries += e.attempts - 1
            where = f"turn {j + 1}/{len(slots)}: " if len(slots) > 1 else ""
            sink.fail(u, where + e.error, e.server, e.attempts)
            return
        sink.st.requests += attempts
        sink.st.retries += attempts - 1
        turn = answer_turn(reply, cfg.reasoning)
        if not turn["content"].strip():
            sink.fail(u, f"turn {j + 1}/{len(slots)}: empty answer (finish_reason {reply.finish_reason})",
                      server.address, attempts)
            return
        answers.append(turn)
        finishes.append(reply.finish_reason)
        ptok += reply.prompt_tokens
        ctok += reply.completion_tokens
    sink.ok(u, assemble(kept, slots, answers), finishes, server.address, model, ptok, ctok)


# ------------------------------------------------------------------------------------------------
# Local backend
# ------------------------------------------------------------------------------------------------
def _run_local(cfg: RegenConfig, events: Events, units: Iterator[Unit], sink: _Sink) -> str:
    from .local import LocalGenerator

    gen = LocalGenerator(cfg.local_model, cfg.local_device, cfg.local_batch_size, cfg.seed,
                         linear_kernel=cfg.local_linear_kernel)
    events.emit("local_generator", model=cfg.local_model, decoder=gen.decoder, linear_kernel=gen.linear_kernel)
    name = cfg.local_model
    # A window of samples advances turn by turn in lockstep, so each generate call sees many prompts
    # of similar length (the generator sorts them) and multi-turn rows still get their own answers back.
    window = cfg.local_batch_size * 8
    buf: list[Unit] = []
    for u in units:
        if events.cancelled:
            raise JobCancelled("cancelled between batches")
        buf.append(u)
        if len(buf) >= window:
            _local_window(buf, cfg, events, gen, sink, name)
            buf = []
    if buf:
        _local_window(buf, cfg, events, gen, sink, name)
    return name


def _local_window(units: list[Unit], cfg: RegenConfig, events: Events, gen, sink: _Sink, name: str) -> None:
    states = []
    for u in units:
        plan = _plan(u, cfg, sink)
        if plan is not None:
            states.append({"u": u, "kept": plan[0], "slots": plan[1], "answers": [], "finishes": [],
                           "ptok": 0, "ctok": 0, "alive": True})
    step = 0
    while True:
        active = [s for s in states if s["alive"] and len(s["slots"]) > step]
        if not active:
            return
        convs = [build_messages(s["kept"], s["slots"], s["answers"], step) for s in active]

        def take(i: int, r) -> None:
            # Each reply as it is done: a sample whose last turn this was is written at once, so progress
            # shows and a killed run loses only what was still decoding.
            s = active[i]
            sink.st.requests += 1
            turn = answer_turn(r, cfg.reasoning)
            if not turn["content"].strip():
                s["alive"] = False
                sink.fail(s["u"], f"turn {step + 1}/{len(s['slots'])}: empty answer (finish_reason "
                          f"{r.finish_reason})", "local", 1)
                return
            s["answers"].append(turn)
            s["finishes"].append(r.finish_reason)
            s["ptok"] += r.prompt_tokens
            s["ctok"] += r.completion_tokens
            if len(s["answers"]) == len(s["slots"]):
                sink.ok(s["u"], assemble(s["kept"], s["slots"], s["answers"]), s["finishes"], "local", name,
                        s["ptok"], s["ctok"])

        gen.generate(convs, max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                     stop=cfg.stop, disable_thinking=cfg.reasoning == "disable",
                     should_stop=lambda: events.cancelled, on_reply=take)
        if events.cancelled:
            raise JobCancelled("cancelled between batches")
        step += 1


# ------------------------------------------------------------------------------------------------
# The engine function
# ------------------------------------------------------------------------------------------------
def regenerate(cfg: RegenConfig, events: Events) -> dict:
    """Regenerate the assistant turns of `cfg.input` into `cfg.output`; returns the run summary.

    Holds the output's lock for the whole run; raises ConfigError at once if another run holds it."""
    from ..data.readers import expand_paths

    expand_paths(cfg.input)  # missing inputs fail before any output file is touched
    with output_lock(cfg.output, "regeneration", lock_file=cfg.lock_path, error=ConfigError):
        return _regenerate_locked(cfg, events)


def _regenerate_locked(cfg: RegenConfig, events: Events) -> dict:
    from ..data.readers import SkipReport

    rec = _Record(cfg, events)
    done = _prepare_outputs(cfg, events, rec)
    est = _estimate_rows(cfg)
    total = None if est is None else max(0, est * cfg.num_samples - len(done))
    st = RunStats()
    report = SkipReport()
    units = _units(cfg, report, done, st)
    sink = _Sink(cfg, st, events, total)
    t0 = time.monotonic()
    events.emit("regen_start", backend=cfg.backend, output=cfg.output, errors=str(cfg.errors_path),
                resume=cfg.resume, already_done=len(done), estimated_samples=total)
    model: Optional[str] = cfg.model
    cancelled = False
    try:
        if cfg.backend == "server":
            run_sync(_run_server(cfg, events, units, sink, rec))
            model = st.model
            cancelled = events.cancelled and st.fatal is None
        else:
            rec.commit(cfg.local_model)
            model = _run_local(cfg, events, units, sink)
        if not cancelled and st.fatal is None:
            sink.total = st.finished  # the estimate counted lines; now the real number is known
    except JobCancelled:
        cancelled = True
    finally:
        sink.progress(force=True)
        sink.close()
    elapsed = time.monotonic() - t0
    summary = {
        "output": cfg.output, "errors_file": str(cfg.errors_path), "backend": cfg.backend, "model": model,
        "rows_read": st.rows_read, "samples_written": st.finished, "ok": st.ok, "truncated": st.truncated,
        "failed": st.failed, "unusable": st.unusable, "already_done": st.already_done,
        "skipped": report.total, "skipped_by_reason": report.to_dict()["by_reason"],
        "requests": st.requests, "retries": st.retries,
        "prompt_tokens": st.prompt_tokens, "completion_tokens": st.completion_tokens,
        "elapsed_s": round(elapsed, 3), "requests_per_s": round(st.requests / elapsed, 2) if elapsed > 0 else None,
        "samples_per_s": round(st.finished / elapsed, 2) if elapsed > 0 else None,
        "servers": st.servers, "exit_code": 0,
    }
    if report.total:
        events.warning(report.summary(), examples=report.examples[:5])
    if cancelled:
        events.emit("regen_cancelled", **{k: summary[k] for k in ("samples_written", "ok", "failed")})
        raise JobCancelled(f"{st.finished} sample(s) written; rerun with --resume to finish")
    if st.fatal:
        summary["error"] = st.fatal + "\nrows not yet written are kept for `--resume`"
        summary["exit_code"] = 3
        events.emit("error", message=summary["error"])
    events.emit("summary", **summary)
    return summary

