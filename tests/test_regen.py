"""Regeneration: store, conversation planning, the client and pool against the real loopback test
server (scripted replies, fault injection, dying servers), and the in-process backend."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from specforge_core.config import ConfigError
from specforge_core.events import JobCancelled, null_events
from specforge_core.regen.client import assemble, build_messages, plan_turns, split_reasoning
from specforge_core.regen.config import RegenConfig, errors_path_for
from specforge_core.regen.job import regenerate
from specforge_core.regen.store import AppendWriter, done_ids, remove_ids, repair_tail
from specforge_core.regen.testserver import Faults, ServerThread, scripted_reply

pytestmark = pytest.mark.unit


def _write_rows(path: Path, n: int, turns: int = 1, extra: list | None = None) -> list[str]:
    ids = []
    with open(path, "w") as f:
        for i in range(n):
            conv = [{"role": "system", "content": "be brief"}]
            for t in range(turns):
                conv += [{"role": "user", "content": f"q{i}.{t}"}, {"role": "assistant", "content": f"old {i}.{t}"}]
            f.write(json.dumps({"id": f"row{i}", "conversations": conv}) + "\n")
            ids.append(f"row{i}")
        for line in extra or []:
            f.write(line + "\n")
    return ids


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _cfg(tmp_path: Path, servers: list, **kw) -> RegenConfig:
    base = dict(input=[str(tmp_path / "in.jsonl")], output=str(tmp_path / "out.jsonl"),
                server_address=[s if isinstance(s, str) else s.address for s in servers],
                concurrency=4, retry_backoff_s=0.0, timeout_s=5.0, connect_timeout_s=2.0, max_tokens=64)
    base.update(kw)
    return RegenConfig(**base)


# ------------------------------------------------------------------------------------------------
# store
# ------------------------------------------------------------------------------------------------
def test_store_append_repair_and_done_ids(tmp_path):
    out = tmp_path / "o.jsonl"
    with AppendWriter(out) as w:
        w.write({"id": "a", "x": "é"})
        w.write({"id": "b"})
    with open(out, "ab") as f:
        f.write(b'{"id": "c", "trunc')  # a torn tail, as a crash mid-write would leave
    assert set(done_ids(out)) == {"a", "b"}  # the torn line does not count as done
    cut = repair_tail(out)
    assert cut == len(b'{"id": "c", "trunc')
    assert out.read_bytes().endswith(b"\n") and repair_tail(out) == 0
    err = tmp_path / "o.errors.jsonl"
    err.write_text('{"id": "d", "error": "x"}\nnot json\n{"no_id": 1}\n')
    bad: list[str] = []
    d = done_ids(out, err, bad_lines=bad)
    assert set(d) == {"a", "b", "d"} and d["d"] == str(err)
    assert bad == [f"{err}:2", f"{err}:3"]
    assert remove_ids(err, {"d"}) == 1
    assert "d" not in done_ids(err)
    assert errors_path_for("x/out.jsonl") == Path("x/out.errors.jsonl")
    assert errors_path_for("x/out.json") == Path("x/out.json.errors.jsonl")


def test_repair_tail_whole_file_torn(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_bytes(b'{"id": "x"' * 10000)  # no newline at all, longer than one read block
    assert repair_tail(p) == 100000 and p.read_bytes() == b""


# ------------------------------------------------------------------------------------------------
# conversation planning
# ------------------------------------------------------------------------------------------------
def test_plan_turns_multi_turn_and_override():
    conv = [{"role": "assistant", "content": "lead-in"}, {"role": "system", "content": "S"},
            {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"}, {"role": "user", "content": "u2b"},
            {"role": "assistant", "content": "a2"}, {"role": "user", "content": "u3"}]
    kept, slots = plan_turns(conv)
    assert [t["content"] for t in kept] == ["S", "u1", "u2", "u2b", "u3"]
    assert slots == [2, 4, 5]  # after u1, after u2b, and an answer for the trailing u3
    answers = [{"role": "assistant", "content": f"n{i}"} for i in range(3)]
    assert [m["content"] for m in build_messages(kept, slots, answers, 1)] == ["S", "u1", "n0", "u2", "u2b"]
    full = assemble(kept, slots, answers)
    assert [t["content"] for t in full] == ["S", "u1", "n0", "u2", "u2b", "n1", "u3", "n2"]
    kept2, _ = plan_turns(conv, system_prompt="NEW")
    assert [t["content"] for t in kept2 if t["role"] == "system"] == ["NEW"]


def test_split_reasoning():
    assert split_reasoning("<think>hmm\n</think>\n\nAnswer", None) == ("Answer", "hmm")
    assert split_reasoning("hmm</think>Answer", None) == ("Answer", "hmm")
    assert split_reasoning("\n\nAnswer", "thought") == ("Answer", "thought")
    assert split_reasoning("plain", None) == ("plain", None)


# ------------------------------------------------------------------------------------------------
# against the loopback server
# ------------------------------------------------------------------------------------------------
def test_multi_turn_context_fed_back_and_options(tmp_path):
    ids = _write_rows(tmp_path / "in.jsonl", 12, turns=3,
                      extra=[json.dumps({"id": "txt", "text": "preformatted"}), "{broken",
                             json.dumps({"id": "row0", "conversations": [{"role": "user", "content": "dup"}]}),
                             json.dumps({"id": "prompt-only", "conversations": [{"role": "user", "content": "hi"}]})])
    with ServerThread() as srv:
        ev = null_events()
        res = regenerate(_cfg(tmp_path, [srv], system_prompt="SYS", num_samples=2, stop=["NEVER"]), ev)
    rows = _read(tmp_path / "out.jsonl")
    errs = _read(tmp_path / "out.errors.jsonl")
    assert res["ok"] == 26 and res["failed"] == 0 and res["unusable"] == 2 and res["exit_code"] == 0
    assert res["skipped_by_reason"] == {"bad_json": 1, "duplicate_id": 1}
    assert sorted(r["id"] for r in rows) == sorted([f"{i}#{k}" for i in ids + ["prompt-only"] for k in (0, 1)])
    assert {e["id"] for e in errs} == {"txt#0", "txt#1"}
    for r in rows:
        conv = r["conversations"]
        assert conv[0] == {"role": "system", "content": "SYS"}
        # Every new answer is exactly what the server says for the context before it, so each turn was
        # given the regenerated (not the old) earlier answers.
        for i, t in enumerate(conv):
            if t["role"] == "assistant":
                assert t["content"] == scripted_reply(conv[:i])
                assert "old" not in t["content"]
        assert r["status"] == "ok" and set(r["finish_reasons"]) == {"stop"}
        assert r["model"] == "test-model" and r["source_id"] == r["id"].split("#")[0]
    assert res["requests"] == 12 * 3 * 2 + 2
    assert res["completion_tokens"] > 0
    prog = [r for r in ev.records if r["event"] == "progress"]
    assert prog and prog[-1]["done"] == 28 and prog[-1]["total"] == 28 and "rate" in prog[-1] and "eta_s" in prog[-1]
    assert [r for r in ev.records if r["event"] == "summary"][0]["ok"] == 26


def test_truncation_reasoning_and_model_errors(tmp_path):
    _write_rows(tmp_path / "in.jsonl", 4)
    with ServerThread(reasoning="field") as srv:
        res = regenerate(_cfg(tmp_path, [srv], max_tokens=2, reasoning="save"), null_events())
        rows = _read(tmp_path / "out.jsonl")
        assert res["truncated"] == 4 and all(r["status"] == "truncated" for r in rows)
        assert all(r["finish_reasons"] == ["length"] for r in rows)
        assert all(r["conversations"][-1]["reasoning_content"] == "thinking about turn 1" for r in rows)

        res = regenerate(_cfg(tmp_path, [srv], reasoning="disable", overwrite=True), null_events())
        rows = _read(tmp_path / "out.jsonl")
        assert res["ok"] == 4 and not any("reasoning_content" in t for r in rows for t in r["conversations"])

        # A model the server does not have is a 4xx: reported, not retried.
        res = regenerate(_cfg(tmp_path, [srv], model="nope", overwrite=True, max_retries=5), null_events())
        errs = _read(tmp_path / "out.errors.jsonl")
        assert res["failed"] == 4 and all(e["attempts"] == 1 and "404" in e["error"] for e in errs)
    with ServerThread(reasoning="inline") as srv:
        regenerate(_cfg(tmp_path, [srv], reasoning="save", overwrite=True), null_events())
        last = [r["conversations"][-1] for r in _read(tmp_path / "out.jsonl")]
        assert all(t["reasoning_content"] == "thinking about turn 1" and "<think>" not in t["content"] for t in last)
        regenerate(_cfg(tmp_path, [srv], reasoning="none", overwrite=True), null_events())
        last = [r["conversations"][-1] for r in _read(tmp_path / "out.jsonl")]
        assert all(t["content"].startswith("<think>") and "reasoning_content" not in t for t in last)


def test_faults_are_retried_and_counted(tmp_path):
    ids = _write_rows(tmp_path / "in.jsonl", 60, turns=2)
    faults = Faults(fail_rate=0.15, drop_rate=0.1, malformed_rate=0.1, delay_jitter_s=0.01, seed=1)
    with ServerThread(faults=faults) as srv:
        res = regenerate(_cfg(tmp_path, [srv], max_retries=8, retire_after=50), null_events())
        by_kind = dict(srv.server.stats.by_kind)
    rows = _read(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(ids) and res["failed"] == 0
    assert by_kind.get("500", 0) > 0 and by_kind.get("dropped", 0) > 0 and by_kind.get("malformed", 0) > 0
    assert res["retries"] == by_kind["500"] + by_kind["dropped"] + by_kind["malformed"]
    for r in rows:  # retried turns still got the right context
        conv = r["conversations"]
        assert all(t["content"] == scripted_reply(conv[:i]) for i, t in enumerate(conv) if t["role"] == "assistant")


def test_failures_go_to_errors_file_with_attempts(tmp_path):
    ids = _write_rows(tmp_path / "in.jsonl", 5)
    with ServerThread(faults=Faults(fail_rate=1.0)) as srv:
        res = regenerate(_cfg(tmp_path, [srv], max_retries=2), null_events())
    errs = _read(tmp_path / "out.errors.jsonl")
    assert res["failed"] == 5 and sorted(e["id"] for e in errs) == sorted(ids)
    assert all(e["attempts"] == 3 and "HTTP 500" in e["error"] and e["server"] == srv.url for e in errs)
    # The server answered its health probe, so it was not retired for being overloaded.
    assert res["servers"][0]["alive"] is True


def test_timeouts(tmp_path):
    _write_rows(tmp_path / "in.jsonl", 3)
    with ServerThread(faults=Faults(delay_s=1.0)) as srv:
        t0 = time.monotonic()
        res = regenerate(_cfg(tmp_path, [srv], timeout_s=0.2, max_retries=1, retire_after=100), null_events())
        assert time.monotonic() - t0 < 3.0
    errs = _read(tmp_path / "out.errors.jsonl")
    assert res["failed"] == 3 and all("timed out" in e["error"] and e["attempts"] == 2 for e in errs)


def test_dead_server_retired_and_work_moves(tmp_path):
    ids = _write_rows(tmp_path / "in.jsonl", 80, turns=2)
    ev = null_events()
    with ServerThread(faults=Faults(die_after=15, delay_jitter_s=0.005)) as a, \
            ServerThread(faults=Faults(delay_jitter_s=0.005)) as b:
        res = regenerate(_cfg(tmp_path, [a, b, "127.0.0.1:1"], max_retries=4), ev)
    rows = _read(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(ids) and res["failed"] == 0
    st = {s["address"]: s for s in res["servers"]}
    assert st[a.url]["alive"] is False and "probe failed" in st[a.url]["retired_reason"]
    assert st["http://127.0.0.1:1"]["alive"] is False and "at start" in st["http://127.0.0.1:1"]["retired_reason"]
    assert st[b.url]["alive"] is True and st[b.url]["ok"] >= 160 - 15
    warnings = [r["message"] for r in ev.records if r["event"] == "warning"]
    assert any(a.url in w and "retired" in w for w in warnings)


def test_all_servers_gone_then_resume(tmp_path):
    ids = _write_rows(tmp_path / "in.jsonl", 40)
    with ServerThread(faults=Faults(die_after=10)) as a:
        res = regenerate(_cfg(tmp_path, [a], max_retries=2, concurrency=2), null_events())
    assert res["exit_code"] == 3 and a.url in res["error"] and "every server is gone" in res["error"]
    first = _read(tmp_path / "out.jsonl") + _read(tmp_path / "out.errors.jsonl")
    assert 0 < len(first) < 40
    with pytest.raises(ConfigError, match="--resume"):
        regenerate(_cfg(tmp_path, ["127.0.0.1:1"]), null_events())
    nothing = regenerate(_cfg(tmp_path, ["127.0.0.1:1"], resume=True), null_events())
    assert nothing["exit_code"] == 3 and "health probe" in nothing["error"]
    with ServerThread() as b:
        res2 = regenerate(_cfg(tmp_path, [b], resume=True, retry_errors=True), null_events())
    rows, errs = _read(tmp_path / "out.jsonl"), _read(tmp_path / "out.errors.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(ids) and errs == []
    first_ok = len([r for r in first if "conversations" in r])
    assert res2["already_done"] == first_ok and res2["ok"] == 40 - first_ok


def test_api_key(tmp_path):
    _write_rows(tmp_path / "in.jsonl", 3)
    with ServerThread(api_key="sekret") as srv:
        res = regenerate(_cfg(tmp_path, [srv], api_key="wrong"), null_events())
        assert res["exit_code"] == 3 and "API key" in res["error"]
        res = regenerate(_cfg(tmp_path, [srv], api_key="sekret", overwrite=True), null_events())
        assert res["ok"] == 3


def test_cancel_leaves_consistent_output_then_resume(tmp_path):
    ids = _write_rows(tmp_path / "in.jsonl", 200)
    ev = null_events()
    with ServerThread(faults=Faults(delay_s=0.02)) as srv:
        def cancel_soon():
            while not (tmp_path / "out.jsonl").exists() or len(_read(tmp_path / "out.jsonl")) < 10:
                time.sleep(0.01)
            ev.cancel()

        t = threading.Thread(target=cancel_soon, daemon=True)
        t.start()
        with pytest.raises(JobCancelled):
            regenerate(_cfg(tmp_path, [srv], concurrency=4), ev)
        part = _read(tmp_path / "out.jsonl")
        assert 10 <= len(part) < 200
        res = regenerate(_cfg(tmp_path, [srv], concurrency=16, resume=True), null_events())
    rows = _read(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert res["already_done"] == len(part) and res["ok"] == 200 - len(part)


@pytest.mark.timeout(60)
def test_input_error_mid_run_stops_instead_of_hanging(tmp_path, monkeypatch):
    import specforge_core.regen.job as job

    _write_rows(tmp_path / "in.jsonl", 10)
    real = job._units

    def broken(*a, **kw):
        for i, u in enumerate(real(*a, **kw)):
            if i == 5:
                raise ValueError("in.jsonl: disk went away")
            yield u

    monkeypatch.setattr(job, "_units", broken)
    with ServerThread() as srv, pytest.raises(ValueError, match="disk went away"):
        regenerate(_cfg(tmp_path, [srv]), null_events())
    assert len(_read(tmp_path / "out.jsonl")) <= 5


def test_config_validation():
    with pytest.raises(ValueError, match="server-address"):
        RegenConfig(input=["x"], output="o.jsonl")
    with pytest.raises(ValueError, match="contradict"):
        RegenConfig(input=["x"], output="o.jsonl", backend="local", resume=True, overwrite=True)
    with pytest.raises(ValueError):
        RegenConfig(input=["x"], output="o.jsonl", backend="local", reasoning="maybe")


def test_cli_entry(tmp_path):
    from specforge_core.cli import main

    _write_rows(tmp_path / "in.jsonl", 3)
    with ServerThread() as srv:
        rc = main(["regenerate", "--quiet", "--json", "--input", str(tmp_path / "in.jsonl"), "--output",
                   str(tmp_path / "out.jsonl"), "--server-address", srv.address, "--concurrency", "2"])
    assert rc == 0 and len(_read(tmp_path / "out.jsonl")) == 3


# ------------------------------------------------------------------------------------------------
# in-process backend
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_model_dir(tmp_path, smol_tokenizer):
    import torch
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab_size=len(smol_tokenizer), hidden_size=32, num_hidden_layers=2,
                            eos_token_id=smol_tokenizer.eos_token_id, bos_token_id=smol_tokenizer.bos_token_id)
    d = tmp_path / "tiny"
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


def test_local_backend_tiny_llama(tmp_path, tiny_model_dir):
    ids = _write_rows(tmp_path / "in.jsonl", 7, turns=2)
    cfg = RegenConfig(input=[str(tmp_path / "in.jsonl")], output=str(tmp_path / "out.jsonl"), backend="local",
                      local_model=str(tiny_model_dir), local_batch_size=3, max_tokens=6, temperature=0.0)
    res = regenerate(cfg, null_events())
    rows = _read(tmp_path / "out.jsonl")
    errs = _read(tmp_path / "out.errors.jsonl")
    assert sorted(r["id"] for r in rows + errs) == sorted(ids)
    assert res["ok"] + res["truncated"] + res["failed"] == 7 and res["requests"] >= 7
    for r in rows:
        assert r["server"] == "local" and len(r["finish_reasons"]) == 2
        assert [t["role"] for t in r["conversations"]] == ["system", "user", "assistant", "user", "assistant"]
        assert not any(t["content"].startswith("old") for t in r["conversations"])
    # Greedy batched generation equals one-at-a-time generation: padding does not leak into answers.
    from specforge_core.regen.local import LocalGenerator

    gen = LocalGenerator(str(tiny_model_dir), batch_size=1)
    r0 = next((r for r in rows if r["id"] == "row3"), None)
    if r0 is not None:
        single = gen.generate([r0["conversations"][:2]], max_tokens=6)[0]
        assert single.content == r0["conversations"][2]["content"]


@pytest.mark.integration
def test_local_backend_smollm2(tmp_path, default_model_dir):
    ids = _write_rows(tmp_path / "in.jsonl", 2)
    cfg = RegenConfig(input=[str(tmp_path / "in.jsonl")], output=str(tmp_path / "out.jsonl"), backend="local",
                      local_model="default", max_tokens=12, temperature=0.0, local_batch_size=2)
    res = regenerate(cfg, null_events())
    rows = _read(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(ids) and res["ok"] + res["truncated"] == 2
    assert all(len(r["conversations"][-1]["content"]) > 0 for r in rows)
