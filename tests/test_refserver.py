"""The SGLang-API reference server (real HTTP on loopback, a tiny random Llama with the real SmolLM2
tokenizer), and the bench client against it end to end."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import tiny_llama_config
from specforge_core.evaluate.bench import bench
from specforge_core.evaluate.config import BenchConfig, ServeReferenceConfig
from specforge_core.evaluate.refserver import HFDecoder, ReferenceServer, ReferenceServerThread, serve_reference
from specforge_core.events import null_events

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import torch
    from transformers import LlamaForCausalLM

    from specforge_core.targets import load_tokenizer

    d = tmp_path_factory.mktemp("tiny_target")
    torch.manual_seed(0)
    tok = load_tokenizer("default")
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2)).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model_and_tok(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from specforge_core.targets import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return model, load_tokenizer(str(tiny_dir))


@pytest.fixture(scope="module")
def plain_server(tiny_dir, model_and_tok):
    model, tok = model_and_tok
    srv = ReferenceServer(HFDecoder(model, [tok.eos_token_id]), tok, model_name="tiny", model_path=str(tiny_dir))
    with ReferenceServerThread(srv) as t:
        yield t


def _post(url, body, timeout=30):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url, timeout=30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body = r.read()
        return r.status, (json.loads(body) if body[:1] in (b"{", b"[") else body.decode())


def _hf_greedy(model, ids, n):
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_generate_matches_hf_greedy_and_fills_meta_info(plain_server, model_and_tok):
    model, tok = model_and_tok
    ids = tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    status, out = _post(plain_server.url + "/generate",
                        {"input_ids": ids, "sampling_params": {"max_new_tokens": 6, "temperature": 0}, "rid": "r1"})
    assert status == 200
    ref = _hf_greedy(model, ids, 6)
    eos = tok.eos_token_id
    expect = ref[:ref.index(eos) + 1] if eos in ref else ref
    assert out["output_ids"] == expect
    m = out["meta_info"]
    assert m["id"] == "r1" and m["prompt_tokens"] == len(ids)
    assert m["completion_tokens"] == len(expect) == m["spec_verify_ct"]  # no draft: one forward per token
    assert m["cached_tokens"] == 0 and m["e2e_latency"] > 0
    assert m["finish_reason"] == ({"type": "length", "length": 6} if eos not in ref
                                  else {"type": "stop", "matched": eos})
    assert "spec_accept_length" not in m
    # text input gives the same tokens as the same ids
    status, out2 = _post(plain_server.url + "/generate",
                         {"text": "The quick brown fox", "sampling_params": {"max_new_tokens": 6, "temperature": 0}})
    assert out2["output_ids"] == expect and out2["text"] == tok.decode(
        expect[:-1] if out2["meta_info"]["finish_reason"]["type"] == "stop" else expect, skip_special_tokens=True)


def test_batch_and_bad_requests(plain_server):
    status, outs = _post(plain_server.url + "/generate",
                         {"text": ["a b", "c d e"], "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
    assert status == 200 and len(outs) == 2 and [o["meta_info"]["prompt_tokens"] for o in outs][0] >= 1
    status, err = _post(plain_server.url + "/generate", {"sampling_params": {}})
    assert status == 400 and "Either text or input_ids" in err["error"]["message"]
    status, err = _post(plain_server.url + "/generate", {"text": "x", "stream": True})
    assert status == 400 and "stream" in err["error"]["message"]
    status, err = _post(plain_server.url + "/generate", {"input_ids": [1, 10 ** 9]})
    assert status == 400 and "vocabulary" in err["error"]["message"]
    status, err = _post(plain_server.url + "/generate", {"text": "x", "sampling_params": {"ignore_eos": True}})
    assert status == 400 and "ignore_eos" in err["error"]["message"]


def test_other_endpoints(plain_server, tiny_dir):
    assert _get(plain_server.url + "/health")[0] == 200
    assert _get(plain_server.url + "/health_generate")[0] == 200
    status, info = _get(plain_server.url + "/get_server_info")
    assert info["speculative_algorithm"] is None and info["model_path"] == str(tiny_dir)
    status, models = _get(plain_server.url + "/v1/models")
    assert models["data"][0]["id"] == "tiny"
    before = plain_server.server.flushes
    status, text = _get(plain_server.url + "/flush_cache")
    assert status == 200 and text.startswith("Cache flushed") and plain_server.server.flushes == before + 1
    status, chat = _post(plain_server.url + "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0})
    assert status == 200 and chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] <= 3 and chat["choices"][0]["finish_reason"] in ("length", "stop")
    status, err = _post(plain_server.url + "/v1/chat/completions", {"messages": []})
    assert status == 400


def test_bench_end_to_end_against_reference_server(plain_server, tiny_dir, tmp_path):
    q = tmp_path / "mt.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": "x", "turns": [f"Tell me about {w}.", "Shorter."]})
                         + "\n" for i, w in enumerate(["cats", "dogs", "owls"])), encoding="utf-8")
    out = tmp_path / "res" / "bench.json"
    cfg = BenchConfig(server=plain_server.url, tokenizer=str(tiny_dir), benchmark=[f"mtbench:2={q}"],
                      config_list=["1,0,0,0", "2,0,0,0"], max_new_tokens=5, output=str(out),
                      system_prompt="You are terse.")
    flushes = plain_server.server.flushes
    res = bench(cfg, null_events())
    assert res["exit_code"] == 0, res
    data = json.loads(out.read_text())
    assert data["status"] == "done"
    runs = {r["config"]: r for r in data["runs"]}
    for r in runs.values():
        assert r["status"] == "ok" and r["requests"] == 4  # 2 items x 2 turns
        assert r["acceptance_length_pooled"] == 1.0
        assert r["output_tokens_per_s"] > 0 and r["latency_p90_s"] >= r["latency_p50_s"]
    assert runs["1,0,0,0"]["speedup"] == 1.0
    assert runs["2,0,0,0"]["speedup_baseline"] == "2,0,0,0"
    assert plain_server.server.flushes >= flushes + 2
    reqs = [json.loads(x) for x in (tmp_path / "res" / "bench.requests.jsonl").read_text().splitlines()]
    # the second turn's prompt holds the system prompt, turn 1 and the server's answer to it: longer
    t0 = [r for r in reqs if r["turn"] == 0 and r["config"] == "1,0,0,0"]
    t1 = [r for r in reqs if r["turn"] == 1 and r["config"] == "1,0,0,0"]
    assert all(b["prompt_tokens"] > a["prompt_tokens"] + 3 for a, b in zip(t0, t1))


class ScriptedSpecDecoder:
    """A `Decoder` with scripted acceptance: every verify step accepts `accept` drafts (of steps=3)."""

    eos_ids = [0]

    def __init__(self, accept: int):
        self.accept = accept

    def generate(self, prompt_ids, max_new_tokens, temperature):
        out, verify, accepted = [], 0, []
        while len(out) < max_new_tokens:
            out += [5] * (self.accept + 1)
            verify += 1
            accepted.append(self.accept)
        return out[:max_new_tokens], verify, accepted


def test_speculative_meta_info_and_bench_pooling(model_and_tok, tmp_path):
    _, tok = model_and_tok
    srv = ReferenceServer(ScriptedSpecDecoder(accept=2), tok, model_name="tiny", draft_path="/d", spec=(3, 1, 4))
    with ReferenceServerThread(srv) as t:
        status, out = _post(t.url + "/generate", {"input_ids": [7, 8], "sampling_params": {"max_new_tokens": 12,
                                                                                            "temperature": 0}})
        m = out["meta_info"]
        assert (m["completion_tokens"], m["spec_verify_ct"]) == (12, 4)
        assert m["spec_accept_length"] == 3.0
        assert m["spec_num_correct_drafts"] == 8 and m["spec_num_proposed_drafts"] == 12  # 4 steps x (4-1)
        assert m["spec_accept_rate"] == pytest.approx(8 / 12)
        assert m["spec_correct_drafts_histogram"] == [0, 0, 4, 0]
        info = _get(t.url + "/get_server_info")[1]
        assert info["speculative_algorithm"] == "EAGLE3" and info["speculative_num_draft_tokens"] == 4

        p = tmp_path / "p.jsonl"
        p.write_text('{"prompt": "a"}\n{"prompt": "b"}\n', encoding="utf-8")
        res = bench(BenchConfig(server=t.url, benchmark=[f"prompts={p}"], config_list=["1,3,1,4"],
                                prompt_format="raw", max_new_tokens=12, output=str(tmp_path / "r.json")), null_events())
    run = json.loads(Path(res["output"]).read_text())["runs"][0]
    assert run["acceptance_length_pooled"] == 3.0 and run["accept_rate_pooled"] == pytest.approx(0.6667, abs=1e-4)
    assert run["histogram"] == [0, 0, 8, 0]


def test_serve_reference_job_runs_until_cancelled(tiny_dir):
    ev = null_events()
    result: dict = {}
    cfg = ServeReferenceConfig(target=str(tiny_dir), port=0)
    th = threading.Thread(target=lambda: result.update(serve_reference(cfg, ev)), daemon=True)
    th.start()
    deadline = time.time() + 60
    while time.time() < deadline and not any(r["event"] == "serving" for r in ev.records):
        time.sleep(0.1)
    url = next(r["url"] for r in ev.records if r["event"] == "serving")
    status, out = _post(url + "/generate", {"text": "hello", "sampling_params": {"max_new_tokens": 3,
                                                                                 "temperature": 0}})
    assert status == 200 and out["meta_info"]["completion_tokens"] <= 3
    ev.cancel()
    th.join(10)
    assert not th.is_alive() and result["requests"] == 1
