"""Issue 16 item 4: streamed replies, the idle timeout (hung and stalled requests are retried within
seconds while long answers keep the whole-request timeout) and retired servers rejoining the pool.
Every server is the loopback test server; every test is bounded to seconds."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from specforge_core.events import null_events
from specforge_core.regen.client import (ChatClient, RequestError, RetryableError, SamplingParams,
                                         StreamAccumulator)
from specforge_core.regen.config import RegenConfig
from specforge_core.regen.job import regenerate
from specforge_core.regen.testserver import Faults, ServerThread, scripted_reply

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _rows(path: Path, n: int, turns: int = 1) -> list[str]:
    with open(path, "w") as f:
        for i in range(n):
            conv = []
            for t in range(turns):
                conv += [{"role": "user", "content": f"q{i}.{t}"}, {"role": "assistant", "content": "old"}]
            f.write(json.dumps({"id": f"r{i}", "conversations": conv}) + "\n")
    return [f"r{i}" for i in range(n)]


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _cfg(tmp_path: Path, servers: list, **kw) -> RegenConfig:
    base = dict(input=[str(tmp_path / "in.jsonl")], output=str(tmp_path / "out.jsonl"),
                server_address=[s if isinstance(s, str) else s.address for s in servers], concurrency=4,
                retry_backoff_s=0.0, timeout_s=30.0, connect_timeout_s=2.0, max_tokens=64)
    base.update(kw)
    return RegenConfig(**base)


def _ask(address: str, body: dict, idle: float = 0.0):
    async def go():
        async with ChatClient(timeout_s=10, idle_timeout_s=idle) as c:
            return await c.chat("http://" + address, body)
    return asyncio.run(go())


@pytest.mark.parametrize("reasoning", ["off", "field", "inline"])
@pytest.mark.parametrize("max_tokens", [64, 2])
def test_stream_gives_the_same_reply_as_one_body(reasoning, max_tokens):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there you"}]
    body = SamplingParams(max_tokens=max_tokens).payload(msgs)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    with ServerThread(reasoning=reasoning) as srv:
        streamed = _ask(srv.address, body)
        plain = _ask(srv.address, {**body, "stream": False})
    assert streamed == plain
    assert streamed.prompt_tokens > 0 and streamed.completion_tokens > 0
    assert streamed.finish_reason == ("length" if max_tokens == 2 else "stop")
    if reasoning == "field":
        assert streamed.reasoning == "thinking about turn 1"
    if reasoning == "inline":
        assert streamed.content.startswith("<think>")


def test_stream_accumulator_lines_errors_and_early_end():
    acc = StreamAccumulator()
    for line in [b": keep-alive", b"", b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}',
                 b'data: {"choices":[{"delta":{"reasoning":"hm"}}]}',
                 b'data: {"choices":[{"delta":{"content":"a"}}]}',
                 b'data: {"choices":[{"delta":{"content":" b"},"finish_reason":"length"}]}',
                 b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}', b"data: [DONE]"]:
        acc.feed_line(line)
    r = acc.reply()
    assert (r.content, r.reasoning, r.finish_reason, r.prompt_tokens, r.completion_tokens) == ("a b", "hm", "length", 3, 2)
    cut = StreamAccumulator()
    cut.feed_line(b'data: {"choices":[{"delta":{"content":"a"}}]}')
    with pytest.raises(RetryableError, match="ended before"):
        cut.reply()
    with pytest.raises(RetryableError, match="malformed"):
        StreamAccumulator().feed_line(b'data: {"choices": [')
    with pytest.raises(RequestError) as e:
        StreamAccumulator().feed_line(b'data: {"error": {"message": "prompt too long", "code": 400}}')
    assert not e.value.retryable and "prompt too long" in str(e.value)
    with pytest.raises(RetryableError, match="overloaded"):
        StreamAccumulator().feed_line(b'data: {"object": "error", "message": "overloaded", "code": 503}')


def test_hung_requests_are_retried_after_the_idle_timeout(tmp_path):
    """A server that accepts some requests and never answers them: with a 30 s request timeout the old
    client waited 30 s per hung request; the idle timeout retries them in 0.3 s."""
    ids = _rows(tmp_path / "in.jsonl", 40)
    with ServerThread(faults=Faults(hang_rate=0.2, seed=3)) as srv:
        t0 = time.monotonic()
        res = regenerate(_cfg(tmp_path, [srv], idle_timeout_s=0.3, max_retries=10, retire_after=100),
                         null_events())
        wall = time.monotonic() - t0
        hung = srv.server.stats.by_kind.get("hung", 0)
    rows = _read(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(ids) and res["failed"] == 0
    assert hung >= 3 and res["retries"] == hung
    assert wall < 10, f"hung requests held the run for {wall:.1f} s"
    for r in rows:
        conv = r["conversations"]
        assert all(t["content"] == scripted_reply(conv[:i]) for i, t in enumerate(conv) if t["role"] == "assistant")


def test_stalled_stream_is_retried_and_the_error_names_the_idle_timeout(tmp_path):
    _rows(tmp_path / "in.jsonl", 4)
    with ServerThread(faults=Faults(stall_rate=1.0)) as srv:
        t0 = time.monotonic()
        res = regenerate(_cfg(tmp_path, [srv], idle_timeout_s=0.2, max_retries=1, retire_after=100), null_events())
        assert time.monotonic() - t0 < 5
    errs = _read(tmp_path / "out.errors.jsonl")
    assert res["failed"] == 4 and all("idle timeout" in e["error"] and e["attempts"] == 2 for e in errs)


def test_a_queued_request_is_not_an_idle_one(tmp_path):
    """Between the headers and the first chunk a real server queues and prefills; no idle clock there."""
    _rows(tmp_path / "in.jsonl", 4)
    with ServerThread(faults=Faults(delay_s=0.6)) as srv:
        res = regenerate(_cfg(tmp_path, [srv], idle_timeout_s=0.2, max_retries=0), null_events())
    assert res["ok"] == 4 and res["retries"] == 0


def test_a_restarted_server_rejoins_the_pool(tmp_path):
    ids = _rows(tmp_path / "in.jsonl", 120)
    ev = null_events()
    a = ServerThread(faults=Faults(die_after=6, delay_s=0.01)).start()
    port = a.port
    b = ServerThread(faults=Faults(delay_s=0.03)).start()
    box: dict = {}

    def restart():
        while not a.server.dead:
            time.sleep(0.01)
        a.stop()
        box["a2"] = ServerThread(port=port, faults=Faults(delay_s=0.01)).start()

    t = threading.Thread(target=restart, daemon=True)
    t.start()
    try:
        res = regenerate(_cfg(tmp_path, [a, b], concurrency=2, max_retries=5, retire_after=1, reprobe_s=0.1), ev)
        t.join(10)
        a2_requests = box["a2"].server.stats.requests
    finally:
        b.stop()
        if "a2" in box:
            box["a2"].stop()
    rows = _read(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(ids) and res["failed"] == 0
    st = {s["address"]: s for s in res["servers"]}
    assert st[a.url]["alive"] is True and st[a.url]["rejoined"] >= 1
    assert a2_requests > 10, "the restarted server got no work"
    assert any(r["event"] == "server_rejoined" and r["server"] == a.url for r in ev.records)
    assert any(r["event"] == "warning" and "retired" in r["message"] for r in ev.records)
