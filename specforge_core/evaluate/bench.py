"""`specforge-wb bench`: acceptance length, throughput and speedup of a draft, measured by an SGLang server.

    specforge-wb bench --server http://127.0.0.1:30000 --target meta-llama/Llama-3.1-8B-Instruct \
        --benchmark mtbench:80=../shared/data/mt_bench_questions.jsonl gsm8k:200=... --config-list 1,3,1,4 4,3,1,4
    specforge-wb bench --launch --target T --draft DRAFT_DIR --benchmark mtbench:80=... \
        --config-list 1,0,0,0 1,3,1,4 1,5,4,8

A config is `batch,steps,topk,draft_tokens` (SGLang's tuple). `batch` is the client's concurrency;
the other three are *server* flags (`--speculative-num-steps/-eagle-topk/-num-draft-tokens`);
`1,0,0,0` is the no-speculation baseline. With topk 1, draft_tokens = steps + 1.

- `--launch` starts `python -m sglang.launch_server` once per distinct server config (cuda-graph
  batch size = the largest batch measured on it), measures every batch size and benchmark on it,
  and stops it. This is how a config *list* is swept.
- `--server URL` measures the server that is running: its flags cannot be changed from here, so
  only configs whose steps/topk/draft_tokens match what `/get_server_info` reports are accepted
  (batch sizes may vary); when the server does not say, the run is labelled `as running`. The
  baseline against a running speculative server needs a second server (or `--launch`).

Acceptance length is reported POOLED: `sum(completion_tokens) / sum(spec_verify_ct)` over all
requests of a run (what SGLang's own benchmarks print; the bonus token counts, so no speculation
is 1.0). The mean of per-request ratios, a different and usually larger number, is reported
beside it under its own name. Requests are sent at temperature 0 by default; each run starts
with `/flush_cache` so no run profits from the previous run's prefix cache.

Results are saved as they come: `--output results.json` is rewritten after every run (status
`running` until the end), `results.csv` beside it has one row per run, and `results.requests.jsonl`
gets one line per request, so a crash or a dead server loses nothing already measured.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import os
import shlex
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError
from ..events import Events, JobCancelled
from .benchsets import BenchItem, BenchSet, BenchmarkSetError, load_benchmarks
from .config import BenchConfig
from .launcher import (LaunchedServer, SGLangNotInstalled, ServerStartError, check_spec_params, require_sglang,
                       sglang_argv, sglang_refusal)
from .sglang_client import GenerateResult, SGLangClient, ServerError, render_chat
from ..asyncutil import run_sync

RESULTS_VERSION = 1


@dataclass(frozen=True)
class RunConfig:
    batch: int
    steps: int
    topk: int
    draft_tokens: int

    @property
    def label(self) -> str:
        return f"{self.batch},{self.steps},{self.topk},{self.draft_tokens}"

    @property
    def server_key(self) -> tuple[int, int, int]:
        return (self.steps, self.topk, self.draft_tokens)

    @property
    def speculative(self) -> bool:
        return self.steps > 0


def parse_config(s: str) -> RunConfig:
    parts = [p.strip() for p in s.split(",")]
    if len(parts) != 4:
        raise ConfigError(f"--config-list {s!r}: expected batch,steps,topk,draft_tokens (e.g. 1,3,1,4)")
    try:
        b, st, k, n = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--config-list {s!r}: all four values must be integers") from None
    if b < 1:
        raise ConfigError(f"--config-list {s!r}: batch must be at least 1")
    try:
        check_spec_params(st, k, n)
    except ValueError as e:
        raise ConfigError(f"--config-list {s!r}: {e}") from None
    return RunConfig(b, st, k, n)


def parse_config_list(items: list[str]) -> list[RunConfig]:
    out: list[RunConfig] = []
    for item in items:
        for s in item.split():  # "1,0,0,0 1,3,1,4" in one YAML string works too
            c = parse_config(s)
            if c in out:
                raise ConfigError(f"--config-list: {c.label} given twice")
            out.append(c)
    if not out:
        raise ConfigError("--config-list is empty")
    return out


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
def _percentile(xs: list[float], q: float) -> Optional[float]:
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(results: list[GenerateResult], wall_s: float, speculative: bool) -> dict[str, Any]:
    """Pooled and per-request acceptance, throughput and latency of one run's successful requests."""
    out: dict[str, Any] = {"requests": len(results)}
    ct = sum(r.completion_tokens for r in results)
    out["completion_tokens"] = ct
    have_v = [r for r in results if r.spec_verify_ct is not None]
    note = None
    if results and len(have_v) == len(results):
        vct = sum(r.spec_verify_ct for r in results)
    elif not speculative:
        # No speculation: every output token costs one target forward pass, by definition.
        vct = sum(r.spec_verify_ct if r.spec_verify_ct is not None else r.completion_tokens for r in results)
        if len(have_v) < len(results):
            note = "server sent no spec_verify_ct (no speculation): verify steps = completion tokens"
    else:
        vct = None
        if results:
            note = (f"{len(results) - len(have_v)} of {len(results)} replies lack meta_info.spec_verify_ct: "
                    "acceptance length unknown (speculative decoding off on the server, or an old server)")
    out["verify_ct"] = vct
    out["acceptance_length_pooled"] = round(ct / vct, 4) if vct else None
    ratios = []
    for r in results:
        v = r.spec_verify_ct if r.spec_verify_ct is not None else (None if speculative else r.completion_tokens)
        if v:
            ratios.append(r.completion_tokens / v)
    out["acceptance_length_mean_of_ratios"] = round(statistics.fmean(ratios), 4) if ratios and vct else None
    correct = [r.spec_num_correct_drafts for r in results if r.spec_num_correct_drafts is not None]
    proposed = [r.spec_num_proposed_drafts for r in results if r.spec_num_proposed_drafts is not None]
    out["accept_rate_pooled"] = (round(sum(correct) / sum(proposed), 4)
                                 if results and len(proposed) == len(results) and sum(proposed) else None)
    hists = [r.histogram for r in results if r.histogram]
    if hists:
        width = max(len(h) for h in hists)
        out["histogram"] = [sum(h[i] for h in hists if i < len(h)) for i in range(width)]
    lat = [r.latency_s for r in results]
    out["wall_s"] = round(wall_s, 4)
    out["output_tokens_per_s"] = round(ct / wall_s, 3) if wall_s > 0 and results else None
    out["latency_mean_s"] = round(statistics.fmean(lat), 4) if lat else None
    out["latency_p50_s"] = round(_percentile(lat, 0.5), 4) if lat else None
    out["latency_p90_s"] = round(_percentile(lat, 0.9), 4) if lat else None
    if note:
        out["acceptance_note"] = note
    return out


def add_speedups(runs: list[dict]) -> None:
    """speedup = tokens/s over the baseline's on the same benchmark: the `batch,0,0,0` run when there is
    one (same concurrency), else `1,0,0,0`."""
    base: dict[tuple[str, int], float] = {}
    for r in runs:
        if r.get("steps") == 0 and r.get("output_tokens_per_s"):
            base[(r["benchmark"], r["batch"])] = r["output_tokens_per_s"]
    for r in runs:
        tps = r.get("output_tokens_per_s")
        ref_batch = r["batch"] if (r["benchmark"], r["batch"]) in base else 1
        ref = base.get((r["benchmark"], ref_batch))
        r["speedup"] = round(tps / ref, 4) if tps and ref else None
        r["speedup_baseline"] = f"{ref_batch},0,0,0" if ref else None


# ------------------------------------------------------------------------------------------------
# Saving (incremental, atomic)
# ------------------------------------------------------------------------------------------------
CSV_FIELDS = ["benchmark", "config", "batch", "steps", "topk", "draft_tokens", "status", "requests", "errors",
              "acceptance_length_pooled", "acceptance_length_mean_of_ratios", "accept_rate_pooled",
              "output_tokens_per_s", "speedup", "speedup_baseline", "latency_mean_s", "latency_p50_s",
              "latency_p90_s", "completion_tokens", "verify_ct", "wall_s", "server", "server_config"]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ResultStore:
    def __init__(self, output: str | Path, cfg: BenchConfig):
        self.path = Path(output)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stem = self.path.name[:-5] if self.path.name.endswith(".json") else self.path.name
        self.csv_path = self.path.with_name(stem + ".csv")
        self.requests_path = self.path.with_name(stem + ".requests.jsonl")
        self.cfg = cfg
        self.runs: list[dict] = []
        self.status = "running"
        self.error: Optional[str] = None
        self.started = time.time()
        # A fresh benchmark: the per-request log of an earlier one under the same name would mix in.
        if self.requests_path.exists():
            self.requests_path.unlink()

    def log_request(self, rec: dict) -> None:
        with open(self.requests_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")

    def save(self) -> None:
        add_speedups(self.runs)
        payload = {"kind": "bench", "version": RESULTS_VERSION, "status": self.status, "error": self.error,
                   "started": round(self.started, 3), "updated": round(time.time(), 3),
                   "acceptance_length": "pooled = sum(completion_tokens) / sum(spec_verify_ct) over a run's "
                                        "requests (bonus token counted); acceptance_length_mean_of_ratios is the "
                                        "mean of per-request ratios, a different number",
                   "config": self.cfg.model_dump(mode="json"), "runs": self.runs}
        _atomic_write(self.path, json.dumps(payload, indent=2, ensure_ascii=False, default=str))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in self.runs:
            w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
        _atomic_write(self.csv_path, buf.getvalue())


# ------------------------------------------------------------------------------------------------
# One run: one config x one benchmark set against one server
# ------------------------------------------------------------------------------------------------
class _Fatal(Exception):
    """The server is gone (connection refused / dropped): no later request can succeed."""


class _Runner:
    def __init__(self, cfg: BenchConfig, client: SGLangClient, tokenizer, store: ResultStore, events: Events):
        self.cfg = cfg
        self.client = client
        self.tokenizer = tokenizer
        self.store = store
        self.events = events

    def _messages_system(self, item: BenchItem) -> Optional[str]:
        return self.cfg.system_prompt if self.cfg.system_prompt is not None else item.system

    async def _send(self, prompt: dict) -> GenerateResult:
        return await self.client.generate(**prompt, max_new_tokens=self.cfg.max_new_tokens,
                                          temperature=self.cfg.temperature)

    def _prompt(self, item: BenchItem, history: list[dict]) -> dict:
        if item.text is not None:
            return {"text": item.text}
        if self.cfg.prompt_format == "raw":
            parts = []
            system = self._messages_system(item)
            if system:
                parts.append(system)
            parts += [m["content"] for m in history if m["role"] != "system"]
            return {"text": "\n\n".join(parts)}
        return {"input_ids": render_chat(self.tokenizer, history)}

    async def run_item(self, item: BenchItem) -> list[GenerateResult]:
        """Send an item's turns in order, each with the server's earlier answers in its context."""
        if item.text is not None:
            return [await self._send(self._prompt(item, []))]
        history: list[dict] = []
        system = self._messages_system(item)
        if system:
            history.append({"role": "system", "content": system})
        out = []
        for turn in item.turns:
            history.append({"role": "user", "content": turn})
            res = await self._send(self._prompt(item, history))
            out.append(res)
            history.append({"role": "assistant", "content": res.text})
        return out

    async def run(self, rc: RunConfig, bset: BenchSet, server_label: dict) -> dict:
        cfg = self.cfg
        run: dict[str, Any] = {"benchmark": bset.spec, "benchmark_source": bset.source, "config": rc.label,
                               "batch": rc.batch, "steps": rc.steps, "topk": rc.topk,
                               "draft_tokens": rc.draft_tokens, "status": "running", "server": self.client.url,
                               "server_config": server_label, "errors": 0, "error_examples": []}
        self.store.runs.append(run)
        self.store.save()
        self.events.emit("bench_run_start", benchmark=bset.spec, config=rc.label, items=len(bset.items),
                         requests=bset.num_requests)
        await self.client.flush_cache()
        for item in bset.items[:cfg.warmup]:
            try:
                await self.run_item(item)
            except ServerError as e:
                if e.kind == "connection":
                    raise _Fatal(str(e)) from None
        if cfg.warmup:
            await self.client.flush_cache()

        results: list[GenerateResult] = []
        queue: asyncio.Queue = asyncio.Queue()
        for item in bset.items:
            queue.put_nowait(item)
        state = {"stop": None, "done": 0}
        total = len(bset.items)

        async def worker() -> None:
            while state["stop"] is None:
                if self.events.cancelled:
                    state["stop"] = "cancelled"
                    return
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    res = await self.run_item(item)
                except ServerError as e:
                    run["errors"] += 1
                    if len(run["error_examples"]) < 5:
                        run["error_examples"].append({"item": item.id, "kind": e.kind, "message": str(e)})
                    self.store.log_request({"benchmark": bset.spec, "config": rc.label, "item": item.id,
                                            "error": str(e), "kind": e.kind})
                    self.events.warning(f"request failed: {e}", item=item.id, config=rc.label)
                    if e.kind == "connection":
                        state["stop"] = "server_gone"
                    elif run["errors"] >= cfg.max_errors:
                        state["stop"] = "too_many_errors"
                    continue
                results.extend(res)
                for turn, r in enumerate(res):
                    self.store.log_request({"benchmark": bset.spec, "config": rc.label, "item": item.id, "turn": turn,
                                            "completion_tokens": r.completion_tokens,
                                            "spec_verify_ct": r.spec_verify_ct, "prompt_tokens": r.prompt_tokens,
                                            "latency_s": round(r.latency_s, 5), "finish_reason": r.finish_reason,
                                            "spec_accept_length": r.spec_accept_length})
                state["done"] += 1
                self.events.progress(state["done"], total, what=f"{bset.spec} @ {rc.label}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(rc.batch, max(1, total)))))
        wall = time.perf_counter() - t0
        run.update(summarize(results, wall, rc.speculative))
        stop = state["stop"]
        if stop == "cancelled":
            run["status"] = "cancelled"
        elif stop is not None or run["errors"]:
            run["status"] = "failed" if not results else "partial"
            run["stopped_because"] = stop
        else:
            run["status"] = "ok"
        if rc.speculative and run.get("acceptance_note"):
            self.events.warning(run["acceptance_note"], config=rc.label)
        self.store.save()
        self.events.emit("bench_run", **{k: run.get(k) for k in (
            "benchmark", "config", "status", "requests", "errors", "acceptance_length_pooled",
            "acceptance_length_mean_of_ratios", "output_tokens_per_s", "speedup", "latency_p50_s")})
        if stop == "server_gone":
            raise _Fatal(run["error_examples"][-1]["message"] if run["error_examples"] else "server gone")
        return run


# ------------------------------------------------------------------------------------------------
# Server configs
# ------------------------------------------------------------------------------------------------
def _server_spec_from_info(info: dict) -> Optional[tuple[int, int, int]]:
    """(steps, topk, draft_tokens) the running server uses, (0,0,0) without speculation, None if unknown."""
    if not info or "speculative_algorithm" not in info:
        return None
    if not info.get("speculative_algorithm"):
        return (0, 0, 0)
    try:
        return (int(info.get("speculative_num_steps") or 0), int(info.get("speculative_eagle_topk") or 0),
                int(info.get("speculative_num_draft_tokens") or 0))
    except (TypeError, ValueError):
        return None


def _load_tok(cfg: BenchConfig, info: dict, need: bool):
    if not need:
        return None
    from ..targets import ModelNotFoundError, load_tokenizer

    candidates = [c for c in (cfg.tokenizer, cfg.target) if c]
    if not candidates:
        candidates = [c for c in (info.get("tokenizer_path"), info.get("model_path")) if c]
    if not candidates:
        raise ConfigError("the chat template needs a tokenizer: give --tokenizer (or --target), or "
                          "--prompt-format raw")
    try:
        return load_tokenizer(candidates[0])
    except ModelNotFoundError as e:
        raise ConfigError(f"cannot load the tokenizer for the chat template: {e}; give --tokenizer") from None


def _groups(configs: list[RunConfig]) -> list[tuple[tuple[int, int, int], list[RunConfig]]]:
    """Configs grouped by server flags, baseline first, in the order given otherwise."""
    groups: dict[tuple[int, int, int], list[RunConfig]] = {}
    for c in configs:
        groups.setdefault(c.server_key, []).append(c)
    return sorted(groups.items(), key=lambda kv: kv[0] != (0, 0, 0))


async def _run_group(cfg: BenchConfig, url: str, group: list[RunConfig], sets: list[BenchSet], store: ResultStore,
                     events: Events, check_info: bool, tokenizer_box: list) -> None:
    async with SGLangClient(url, timeout_s=cfg.timeout) as client:
        info: dict = {}
        try:
            info = await client.server_info()
        except ServerError as e:
            if e.kind == "connection":
                raise _Fatal(str(e)) from None
            events.warning(f"cannot read the server's config: {e}")
        running = _server_spec_from_info(info)
        label: dict[str, Any] = {"model_path": info.get("model_path"),
                                 "speculative_algorithm": info.get("speculative_algorithm"),
                                 "speculative_draft_model_path": info.get("speculative_draft_model_path")}
        if running is None:
            label["spec"] = "as running (the server does not report its speculative flags)"
            if check_info:
                events.warning("the server does not report its speculative flags: each config is measured on the "
                               "server as it runs, and labelled so")
        else:
            label["spec"] = ",".join(str(x) for x in running)
            if check_info:
                wrong = [c.label for c in group if c.server_key != running]
                if wrong:
                    raise ConfigError(
                        f"--server {url} runs steps,topk,draft_tokens = {label['spec']}; configs "
                        f"{', '.join(wrong)} need other server flags, which a running server cannot change. "
                        "Start a server per config and bench each, or use --launch to sweep the list")
        if not tokenizer_box:
            need = cfg.prompt_format == "chat" and any(i.text is None for s in sets for i in s.items)
            tokenizer_box.append(_load_tok(cfg, info, need))
        runner = _Runner(cfg, client, tokenizer_box[0], store, events)
        for rc in sorted(group, key=lambda c: c.batch):
            for bset in sets:
                if events.cancelled:
                    raise JobCancelled("bench cancelled between runs")
                run = await runner.run(rc, bset, label)
                if run["status"] == "cancelled":
                    raise JobCancelled("bench cancelled during a run")


def bench(cfg: BenchConfig, events: Events) -> dict:
    """Run every config x benchmark set; see the module docstring. Returns a summary of the runs."""
    if bool(cfg.server) == bool(cfg.launch):
        raise ConfigError("give exactly one of --server URL (a running SGLang server) or --launch")
    configs = parse_config_list(cfg.config_list)
    try:
        sets = load_benchmarks(cfg.benchmark)
    except BenchmarkSetError as e:
        raise ConfigError(str(e)) from None
    if cfg.system_prompt and any(i.text is not None for s in sets for i in s.items):
        events.warning("--system-prompt does not apply to pre-formatted `text` prompts; they are sent as they are")
    extra_args = shlex.split(cfg.server_args) if cfg.server_args else []
    # A draft family SGLang has no algorithm for (Medusa) is refused before any server starts or any
    # request is sent: a running SGLang server cannot be serving it either.
    why = sglang_refusal(cfg.draft) if cfg.draft else None
    if why:
        raise ConfigError(why)
    if cfg.launch:
        if not cfg.target:
            raise ConfigError("--launch needs --target (the model the server loads)")
        if any(c.speculative for c in configs) and not cfg.draft:
            raise ConfigError("--launch with a speculative config needs --draft (the EAGLE3 draft directory)")
        try:
            require_sglang(cfg.python)
        except SGLangNotInstalled as e:
            raise ConfigError(str(e)) from None
    store = ResultStore(cfg.output, cfg)
    store.save()
    events.emit("bench_start", output=str(store.path), configs=[c.label for c in configs],
                benchmarks=[f"{s.spec} ({s.num_requests} requests)" for s in sets])
    tokenizer_box: list = []
    try:
        for key, group in _groups(configs):
            if cfg.launch:
                url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
                argv = sglang_argv(cfg.target, cfg.draft, *key, port=cfg.port, host=cfg.host, tp=cfg.tp,
                                   cuda_graph_max_bs=max(c.batch for c in group),
                                   mem_fraction_static=cfg.mem_fraction_static, extra_args=extra_args,
                                   python=cfg.python)
                log_dir = Path(cfg.log_dir) if cfg.log_dir else store.path.parent
                log = log_dir / f"sglang_{'_'.join(str(x) for x in key)}.log"
                events.emit("server_launch", argv=argv, log=str(log))
                with LaunchedServer(argv, url, log, start_timeout_s=cfg.launch_timeout,
                                    should_stop=lambda: events.cancelled):
                    run_sync(_run_group(cfg, url, group, sets, store, events, False, tokenizer_box))
            else:
                run_sync(_run_group(cfg, cfg.server, group, sets, store, events, True, tokenizer_box))
    except JobCancelled:
        store.status = "cancelled"
        store.save()
        raise
    except (_Fatal, ServerStartError, ServerError) as e:
        store.status = "failed"
        store.error = str(e)
        store.save()
        events.emit("bench_failed", error=str(e), output=str(store.path))
        return _summary(store, exit_code=1)
    except ConfigError as e:
        store.status = "failed"
        store.error = str(e)
        store.save()
        raise
    failed = any(r["status"] != "ok" for r in store.runs)
    store.status = "done_with_errors" if failed else "done"
    store.save()
    return _summary(store, exit_code=1 if failed else 0)


def _summary(store: ResultStore, exit_code: int) -> dict:
    return {"output": str(store.path), "csv": str(store.csv_path), "status": store.status,
            "error": store.error, "exit_code": exit_code,
            "runs": [{k: r.get(k) for k in ("benchmark", "config", "status", "acceptance_length_pooled",
                                            "acceptance_length_mean_of_ratios", "output_tokens_per_s",
                                            "speedup", "latency_p50_s", "errors")} for r in store.runs]}
