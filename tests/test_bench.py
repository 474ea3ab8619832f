"""Tests for the SGLang benchmark side: benchmark sets, the bench client against scripted fake SGLang
servers (exact pooled acceptance, dropped fields, HTTP 500, hangs), the launcher and serve commands."""

from __future__ import annotations

import asyncio
import gzip
import json
import shlex
import sys
import threading
from pathlib import Path

import pytest
from aiohttp import web

from specforge_core.config import ConfigError
from specforge_core.evaluate import launcher
from specforge_core.evaluate.bench import bench, parse_config_list, summarize
from specforge_core.evaluate.benchsets import BenchmarkSetError, load_benchmark, parse_spec
from specforge_core.evaluate.config import BenchConfig
from specforge_core.evaluate.launcher import (LaunchedServer, SGLangNotInstalled, ServerStartError, serve_command,
                                              sglang_argv)
from specforge_core.evaluate.sglang_client import GenerateResult
from specforge_core.events import null_events

pytestmark = pytest.mark.unit


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# Benchmark sets
# ------------------------------------------------------------------------------------------------
def test_parse_spec_forms():
    s = parse_spec("mtbench:80=/x/q.jsonl")
    assert (s.name, s.count, s.path) == ("mtbench", 80, "/x/q.jsonl")
    s = parse_spec("GSM8K:5")
    assert (s.name, s.count, s.path) == ("gsm8k", 5, None)
    s = parse_spec("myset=p.jsonl")
    assert (s.name, s.count, s.path) == ("myset", None, "p.jsonl")
    with pytest.raises(BenchmarkSetError, match="not an integer"):
        parse_spec("gsm8k:ten")
    with pytest.raises(BenchmarkSetError, match="unknown set 'nosuch'"):
        parse_spec("nosuch:3")
    with pytest.raises(BenchmarkSetError, match="at least 1"):
        parse_spec("gsm8k:0")


def test_mtbench_two_turns_and_count(tmp_path):
    f = _jsonl(tmp_path / "q.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorten it."]},
        {"question_id": 82, "category": "math", "turns": ["2+2?", "times 3?"]},
        {"question_id": 83, "category": "math", "turns": ["1+1?", "and 2+2?"]},
    ])
    bs = load_benchmark(f"mtbench:2={f}")
    assert [i.id for i in bs.items] == ["mtbench-81", "mtbench-82"]
    assert bs.items[0].turns == ["Write a poem.", "Now shorten it."]
    assert bs.items[1].category == "math"
    assert bs.num_requests == 4


def test_gsm8k_humaneval_math500_formats(tmp_path):
    g = _jsonl(tmp_path / "gsm.jsonl", [{"question": "Tom has 3 apples.", "answer": "#### 3"}])
    item = load_benchmark(f"gsm8k={g}").items[0]
    assert item.turns[0].startswith("Tom has 3 apples.") and "step by step" in item.turns[0]

    h = tmp_path / "he.jsonl.gz"
    with gzip.open(h, "wt", encoding="utf-8") as fh:
        for k in range(3):
            fh.write(json.dumps({"task_id": f"HumanEval/{k}", "prompt": f"def f{k}():\n", "test": "..."}) + "\n")
    hs = load_benchmark(f"humaneval:2={h}")
    assert [i.id for i in hs.items] == ["HumanEval/0", "HumanEval/1"]
    assert hs.items[1].turns[0].endswith("def f1():\n")

    m = _jsonl(tmp_path / "m.jsonl", [{"problem": "Solve x+1=2.", "answer": "1", "subject": "Algebra",
                                       "unique_id": "test/algebra/1.json"}])
    mi = load_benchmark(f"math500={m}").items[0]
    assert mi.id == "test/algebra/1.json" and mi.turns[0].startswith("Solve x+1=2.")


def test_prompt_files_accept_prompt_and_conversation_rows(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "Hello?"},
        {"id": "b", "conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                                      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"id": "d", "text": "<|im_start|>user\nraw<|im_end|>\n"},
    ])
    items = load_benchmark(f"prompts={f}").items
    assert items[0].turns == ["Hello?"]
    assert items[1].turns == ["Q1", "Q2"] and items[1].system == "Be brief."
    assert items[2].turns == ["hi"]
    assert items[3].text.startswith("<|im_start|>") and items[3].turns == []
    # any other name with =path is a prompt file too
    assert len(load_benchmark(f"mine:2={f}").items) == 2


def test_bad_rows_name_file_and_line(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text('{"question": "ok"}\n{"answer": "no question"}\n', encoding="utf-8")
    with pytest.raises(BenchmarkSetError, match=r"g\.jsonl:2: not a gsm8k row: missing field 'question'"):
        load_benchmark(f"gsm8k={f}")
    f2 = tmp_path / "m.jsonl"
    f2.write_text('{"turns": ["a"]}\nnot json\n', encoding="utf-8")
    with pytest.raises(BenchmarkSetError, match=r"m\.jsonl:2"):
        load_benchmark(f"mtbench={f2}")
    with pytest.raises(BenchmarkSetError, match="no such file"):
        load_benchmark(f"gsm8k={tmp_path / 'missing.jsonl'}")


def test_hub_unreachable_says_give_path(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(BenchmarkSetError, match=r"HuggingFaceH4/MATH-500.*math500:5=PATH"):
        load_benchmark("math500:5")


# ------------------------------------------------------------------------------------------------
# Config list and statistics
# ------------------------------------------------------------------------------------------------
def test_config_list_parsing():
    cs = parse_config_list(["1,0,0,0", "4,3,1,4", "1,5,4,8"])
    assert [c.label for c in cs] == ["1,0,0,0", "4,3,1,4", "1,5,4,8"]
    assert not cs[0].speculative and cs[1].speculative
    with pytest.raises(ConfigError, match="steps \\+ 1 = 4"):
        parse_config_list(["1,3,1,5"])
    with pytest.raises(ConfigError, match="batch,steps,topk,draft_tokens"):
        parse_config_list(["1,3,1"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_config_list(["1,3,1,4", "1,3,1,4"])


def _res(ct, v, lat=1.0):
    return GenerateResult(text="", output_ids=None, prompt_tokens=3, completion_tokens=ct, finish_reason=None,
                          latency_s=lat, spec_verify_ct=v)


def test_summarize_pooled_vs_mean_of_ratios():
    # (The pair 10/5, 30/5 would give 4.0 both ways: the verify counts must differ to tell them apart.)
    s = summarize([_res(20, 10, 1.0), _res(40, 5, 3.0)], wall_s=4.0, speculative=True)
    assert s["acceptance_length_pooled"] == 4.0          # 60 / 15
    assert s["acceptance_length_mean_of_ratios"] == 5.0  # (2 + 8) / 2
    assert s["output_tokens_per_s"] == 15.0
    assert s["latency_mean_s"] == 2.0 and s["latency_p50_s"] == 2.0
    # speculative run without spec_verify_ct: unknown, never a made-up 1.0
    s2 = summarize([_res(10, None)], wall_s=1.0, speculative=True)
    assert s2["acceptance_length_pooled"] is None and "spec_verify_ct" in s2["acceptance_note"]
    s3 = summarize([_res(10, None)], wall_s=1.0, speculative=False)
    assert s3["acceptance_length_pooled"] == 1.0


# ------------------------------------------------------------------------------------------------
# A scripted fake SGLang server
# ------------------------------------------------------------------------------------------------
class FakeSGLang:
    """Answers /generate from a script keyed by the prompt text: meta_info as given, or a fault."""

    def __init__(self, script: dict, info: dict | None = None):
        self.script = script
        self.info = info if info is not None else {"speculative_algorithm": "EAGLE3", "speculative_num_steps": 3,
                                                   "speculative_eagle_topk": 1, "speculative_num_draft_tokens": 4,
                                                   "model_path": "fake"}
        self.flushes = 0
        self.requests: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.port = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def generate(self, request):
        body = await request.json()
        self.requests.append(body)
        key = (body.get("text") or "").split("\n\n")[-1]  # the prompt, after any system prompt
        action = self.script.get(key, {"meta": {"completion_tokens": 1, "spec_verify_ct": 1}})
        if action.get("hang"):
            await asyncio.sleep(3)  # well past the client's 1 s timeout
        if action.get("status"):
            return web.json_response({"error": {"message": action.get("message", "boom")}}, status=action["status"])
        return web.json_response({"text": "out", "output_ids": [1], "meta_info": {"id": "x", **action["meta"]}})

    async def flush(self, request):
        self.flushes += 1
        return web.Response(text="Cache flushed.\n")

    async def info_(self, request):
        return web.json_response(self.info)

    async def health(self, request):
        return web.Response()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/flush_cache", self.flush)
        app.router.add_get("/get_server_info", self.info_)
        app.router.add_get("/health", self.health)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self):
        self.thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        async def _stop():
            await self.runner.cleanup()
            for t in asyncio.all_tasks():  # a handler still asleep in a "hang" script entry
                if t is not asyncio.current_task():
                    t.cancel()
        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


def _cfg(tmp_path, url, prompts, **kw):
    f = _jsonl(tmp_path / "p.jsonl", [{"id": p, "prompt": p} for p in prompts])
    base = dict(server=url, benchmark=[f"prompts={f}"], config_list=["1,3,1,4"], prompt_format="raw",
                output=str(tmp_path / "out" / "results.json"), warmup=0, max_new_tokens=16)
    base.update(kw)
    return BenchConfig(**base)


def test_pooled_acceptance_exact_against_fake_server(tmp_path):
    script = {"p1": {"meta": {"completion_tokens": 20, "spec_verify_ct": 10, "spec_accept_length": 2.0,
                              "spec_num_correct_drafts": 10, "spec_num_proposed_drafts": 30,
                              "spec_correct_drafts_histogram": [2, 6, 2, 0]}},
              "p2": {"meta": {"completion_tokens": 40, "spec_verify_ct": 5, "spec_accept_length": 8.0,
                              "spec_num_correct_drafts": 15, "spec_num_proposed_drafts": 15,
                              "spec_correct_drafts_histogram": [0, 0, 0, 5]}}}
    with FakeSGLang(script) as srv:
        cfg = _cfg(tmp_path, srv.url, ["p1", "p2"], config_list=["1,3,1,4", "2,3,1,4"],
                   system_prompt="SYS")
        out = bench(cfg, null_events())
        assert srv.flushes == 2  # one per run
        assert all(r["text"].startswith("SYS\n\n") for r in srv.requests)
    assert out["exit_code"] == 0 and out["status"] == "done"
    data = json.loads(Path(out["output"]).read_text())
    assert data["status"] == "done" and len(data["runs"]) == 2
    run = data["runs"][0]
    assert run["acceptance_length_pooled"] == 4.0          # 60 / 15, pooled
    assert run["acceptance_length_mean_of_ratios"] == 5.0  # (2 + 8) / 2
    assert run["accept_rate_pooled"] == round(25 / 45, 4)
    assert run["histogram"] == [2, 6, 2, 5]
    assert run["server_config"]["spec"] == "3,1,4"
    assert run["speedup"] is None  # no 1,0,0,0 baseline in this list
    rows = Path(out["csv"]).read_text().splitlines()
    assert rows[0].startswith("benchmark,config,") and len(rows) == 3
    reqs = [json.loads(x) for x in (tmp_path / "out" / "results.requests.jsonl").read_text().splitlines()]
    assert len(reqs) == 4 and {r["completion_tokens"] for r in reqs} == {20, 40}


def test_system_prompt_and_sampling_params_sent(tmp_path):
    with FakeSGLang({}) as srv:
        bench(_cfg(tmp_path, srv.url, ["q"], system_prompt="Be terse.", max_new_tokens=7), null_events())
        body = srv.requests[-1]
    assert body["text"] == "Be terse.\n\nq"
    assert body["sampling_params"] == {"max_new_tokens": 7, "temperature": 0.0}


def test_server_config_mismatch_is_refused(tmp_path):
    with FakeSGLang({}) as srv:
        with pytest.raises(ConfigError, match=r"runs steps,topk,draft_tokens = 3,1,4.*1,5,1,6.*--launch"):
            bench(_cfg(tmp_path, srv.url, ["q"], config_list=["1,5,1,6"]), null_events())
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["status"] == "failed" and "--launch" in data["error"]


def test_dropped_fields_errors_and_hangs_keep_partial_results(tmp_path):
    script = {"ok": {"meta": {"completion_tokens": 8, "spec_verify_ct": 4}},
              "nometa": {"meta": {"spec_verify_ct": 4}},            # completion_tokens dropped
              "err": {"status": 500, "message": "CUDA out of memory"},
              "hang": {"hang": True}}
    with FakeSGLang(script) as srv:
        cfg = _cfg(tmp_path, srv.url, ["ok", "nometa", "err", "hang"], timeout=1.0, max_errors=10)
        out = bench(cfg, null_events())
    assert out["exit_code"] == 1 and out["status"] == "done_with_errors"
    data = json.loads(Path(out["output"]).read_text())
    run = data["runs"][0]
    assert run["status"] == "partial" and run["requests"] == 1 and run["errors"] == 3
    msgs = " | ".join(e["message"] for e in run["error_examples"])
    assert "no integer completion_tokens" in msgs
    assert "HTTP 500: CUDA out of memory" in msgs
    assert "no reply within 1s" in msgs
    assert run["acceptance_length_pooled"] == 2.0  # the one good request survives


def test_speculative_run_without_verify_counts_warns(tmp_path):
    ev = null_events()
    with FakeSGLang({"q": {"meta": {"completion_tokens": 5}}}) as srv:
        out = bench(_cfg(tmp_path, srv.url, ["q"]), ev)
    run = json.loads(Path(out["output"]).read_text())["runs"][0]
    assert run["acceptance_length_pooled"] is None
    assert any(r["event"] == "warning" and "spec_verify_ct" in r["message"] for r in ev.records)


def test_dead_server_is_a_clear_failure(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    out = bench(_cfg(tmp_path, f"http://127.0.0.1:{port}", ["q"]), null_events())
    assert out["exit_code"] == 1 and "cannot connect" in out["error"]
    assert json.loads(Path(out["output"]).read_text())["status"] == "failed"


def test_server_or_launch_required(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of --server"):
        bench(BenchConfig(benchmark=["gsm8k=x"], output=str(tmp_path / "r.json")), null_events())


# ------------------------------------------------------------------------------------------------
# Launcher and serve commands
# ------------------------------------------------------------------------------------------------
def test_sglang_argv_speculative_and_baseline():
    argv = sglang_argv("meta/Llama", "/d", 3, 1, 4, port=31000, tp=2, cuda_graph_max_bs=8,
                       mem_fraction_static=0.7, extra_args=["--dtype", "bfloat16"], python="py",
                       graph_flag="--cuda-graph-max-bs")
    assert argv == ["py", "-m", "sglang.launch_server", "--model-path", "meta/Llama", "--host", "127.0.0.1",
                    "--port", "31000", "--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", "/d",
                    "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
                    "--speculative-num-draft-tokens", "4", "--tp-size", "2", "--cuda-graph-max-bs", "8",
                    "--mem-fraction-static", "0.7", "--dtype", "bfloat16"]
    base = sglang_argv("T", None, 0, 0, 0, python="py")
    assert "--speculative-algorithm" not in base
    with pytest.raises(ValueError, match="needs a draft"):
        sglang_argv("T", None, 3, 1, 4)
    with pytest.raises(ValueError, match="steps \\+ 1"):
        sglang_argv("T", "/d", 3, 1, 6)


def test_serve_command_strings():
    cmd = serve_command("meta-llama/Llama-3.1-8B-Instruct", "/runs/my draft", steps=3, topk=1, port=30000)
    assert cmd == ("python -m sglang.launch_server --model-path meta-llama/Llama-3.1-8B-Instruct --host 0.0.0.0 "
                   "--port 30000 --speculative-algorithm EAGLE3 --speculative-draft-model-path '/runs/my draft' "
                   "--speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4")
    v = serve_command("T", "/d", steps=5, engine="vllm")
    argv = shlex.split(v)
    assert argv[:3] == ["vllm", "serve", "T"]
    assert json.loads(argv[argv.index("--speculative-config") + 1]) == {
        "method": "eagle3", "model": "/d", "num_speculative_tokens": 5}
    with pytest.raises(ValueError, match="engine"):
        serve_command("T", "/d", engine="trt")


def test_not_installed_message(monkeypatch, tmp_path):
    monkeypatch.setattr(launcher.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SGLangNotInstalled, match="sglang is not installed.*--server URL"):
        launcher.require_sglang()
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}])
    with pytest.raises(ConfigError, match="sglang is not installed"):
        bench(BenchConfig(launch=True, target="T", draft="/d", benchmark=[f"prompts={f}"],
                          config_list=["1,3,1,4"], output=str(tmp_path / "r.json")), null_events())


def test_launched_server_dies_at_start_shows_log_tail(tmp_path):
    argv = [sys.executable, "-c", "import sys; print('ValueError: draft hidden size 4096 != 2048'); sys.exit(3)"]
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 3.*draft hidden size 4096"):
        with LaunchedServer(argv, "http://127.0.0.1:9", tmp_path / "s.log", start_timeout_s=20):
            pass


def test_launched_server_health_and_clean_stop(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    code = ("import http.server, sys\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        self.send_response(200 if self.path == '/health' else 404); self.end_headers()\n"
            "    def log_message(self, *a): pass\n"
            f"print('listening', flush=True)\n"
            f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    srv = LaunchedServer([sys.executable, "-c", code], f"http://127.0.0.1:{port}", tmp_path / "h.log",
                         start_timeout_s=20, stop_timeout_s=5)
    with srv:
        assert launcher._health_ok(srv.url)
    assert srv.proc.poll() is not None  # stopped by SIGTERM to its group
    assert "listening" in (tmp_path / "h.log").read_text()


FAKE_LAUNCH_SERVER = r'''#!{python}
# Stands in for `python -m sglang.launch_server ...`: serves /health, /flush_cache, /get_server_info and
# /generate on --port, reporting the speculative flags it was started with.
import http.server, json, sys
argv = sys.argv
def flag(name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default
steps = int(flag("--speculative-num-steps", 0))
with open(flag("--port") + ".argv", "a") as fh:
    fh.write(json.dumps(argv[1:]) + "\n")
class H(http.server.BaseHTTPRequestHandler):
    def _send(self, obj):
        b = json.dumps(obj).encode(); self.send_response(200); self.end_headers(); self.wfile.write(b)
    def do_GET(self):
        if self.path == "/get_server_info":
            return self._send({{"speculative_algorithm": flag("--speculative-algorithm"),
                               "speculative_num_steps": steps,
                               "speculative_eagle_topk": int(flag("--speculative-eagle-topk", 0)),
                               "speculative_num_draft_tokens": int(flag("--speculative-num-draft-tokens", 0))}})
        self.send_response(200); self.end_headers()
    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0)); self.rfile.read(n)
        if self.path == "/flush_cache":
            self.send_response(200); self.end_headers(); return
        meta = {{"completion_tokens": 12, "spec_verify_ct": 12 // (steps + 1) if steps else 12}}
        self._send({{"text": "x", "meta_info": meta}})
    def log_message(self, *a): pass
print("fake sglang up", flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", int(flag("--port"))), H).serve_forever()
'''


def test_launch_sweeps_server_configs(tmp_path, monkeypatch):
    import os
    import socket

    fake = tmp_path / "fakepython"
    fake.write_text(FAKE_LAUNCH_SERVER.format(python=sys.executable))
    fake.chmod(0o755)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.chdir(tmp_path)
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q1"}, {"prompt": "q2"}])
    cfg = BenchConfig(launch=True, target="T", draft="/d", python=str(fake), port=port, launch_timeout=30,
                      benchmark=[f"prompts={f}"], config_list=["1,3,1,4", "1,0,0,0", "2,3,1,4"],
                      prompt_format="raw", output=str(tmp_path / "out" / "r.json"), warmup=0)
    out = bench(cfg, null_events())
    assert out["exit_code"] == 0, out
    launches = [json.loads(x) for x in (tmp_path / f"{port}.argv").read_text().splitlines()]
    assert len(launches) == 2  # one server per distinct steps,topk,draft_tokens; the baseline first
    assert "--speculative-algorithm" not in launches[0]
    spec = launches[1]
    assert spec[spec.index("--speculative-num-draft-tokens") + 1] == "4"
    assert spec[spec.index(launcher.cuda_graph_flag()) + 1] == "2"  # the largest batch run on it
    runs = {r["config"]: r for r in json.loads(Path(out["output"]).read_text())["runs"]}
    assert runs["1,0,0,0"]["acceptance_length_pooled"] == 1.0
    assert runs["1,3,1,4"]["acceptance_length_pooled"] == 4.0
    assert runs["1,3,1,4"]["speedup"] is not None and runs["2,3,1,4"]["speedup_baseline"] == "1,0,0,0"
    assert (tmp_path / "out" / "sglang_3_1_4.log").read_text().count("fake sglang up") == 1
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]
