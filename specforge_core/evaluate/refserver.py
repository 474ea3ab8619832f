"""`specforge-wb serve-reference`: a small HTTP server that speaks SGLang's API, for tests and notebooks.

Production serving is SGLang (or vLLM): this server exists so that the `bench` client, the
notebooks and the embedded default (SmolLM2 on a laptop CPU) have something real to talk to without
a GPU. It answers the endpoints the bench client uses, with the shapes SGLang uses (field names
from sglang's `tokenizer_manager.py` / `http_server.py`):

- `POST /generate` `{"text" | "input_ids", "sampling_params": {"max_new_tokens", "temperature",
  "stop_token_ids"}, "rid"}` (one request or a batch list) -> `{"text", "output_ids", "meta_info":
  {"id", "finish_reason": {"type": "length", "length": n} | {"type": "stop", "matched": id},
  "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "weight_version",
  "e2e_latency", "spec_verify_ct", ...}}`. With a draft, also `spec_accept_length`,
  `spec_accept_rate`, `spec_num_correct_drafts`, `spec_num_proposed_drafts` and
  `spec_correct_drafts_histogram`, computed as SGLang computes them.
- `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /health_generate`,
  `GET /get_server_info` (and `/server_info`), `GET|POST /flush_cache`.

Decoding is pluggable (`Decoder`: `generate(prompt_ids, max_new_tokens, temperature) ->
(output_ids, verify_steps, accepted_lengths)`, where `accepted_lengths[i]` is the number of draft
tokens accepted at verify step i). Without a draft it is plain HF decoding: one target forward per
token, so `spec_verify_ct == completion_tokens` and the acceptance length is 1.0. With `--draft`
it is the in-process EAGLE3 decoder of `evaluate.spec_decode`. Requests are decoded one at a
time (a lock): the numbers are right, the throughput is a CPU's.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any, Optional, Protocol, Sequence

from aiohttp import web

from ..asyncutil import ServerThread, serve_app
from ..events import Events
from .config import ServeReferenceConfig

try:
    import orjson

    def _dumps(o: Any) -> bytes:
        return orjson.dumps(o)

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    import json

    def _dumps(o: Any) -> bytes:
        return json.dumps(o).encode()

    _loads = json.loads

REFERENCE_VERSION = "specforge-reference-1"


class Decoder(Protocol):
    """What the server needs from a decoder (decodes one prompt; greedy at temperature 0)."""

    def generate(self, prompt_ids: list[int], max_new_tokens: int,
                 temperature: float) -> tuple[list[int], int, list[int]]:
        ...


class HFDecoder:
    """Plain decoding with an HF causal LM: one target forward per token, no draft."""

    speculative = False

    def __init__(self, model, eos_ids: Sequence[int], pad_id: Optional[int] = None, seed: int = 0):
        self.model = model.eval()
        self.eos_ids = sorted(set(int(e) for e in eos_ids))
        self.pad_id = pad_id if pad_id is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.seed = seed

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float):
        import torch

        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.model.device)
        kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
                                  eos_token_id=self.eos_ids or None, attention_mask=torch.ones_like(ids))
        if temperature > 0:
            torch.manual_seed(self.seed)
            kw.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, **kw)
        new = out[0, ids.shape[1]:].tolist()
        for k, t in enumerate(new):
            if t in self.eos_ids:
                new = new[:k + 1]  # SGLang counts the matched stop token in completion_tokens
                break
        return new, len(new), [0] * len(new)


class SpecDecoderAdapter:
    """An in-process speculative decoder (`SpecDecoder`, `MedusaDecoder`) behind the `Decoder` protocol."""

    speculative = True

    def __init__(self, spec_decoder, eos_ids: Sequence[int], seed: int = 0, algorithm: str = "EAGLE3"):
        self.dec = spec_decoder
        self.algorithm = algorithm   # what /get_server_info reports as speculative_algorithm
        self.eos_ids = sorted(set(int(e) for e in eos_ids))
        self.seed = seed

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float):
        import torch

        self.dec.temperature = float(temperature)
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=self.dec.dev).manual_seed(self.seed)
        res = self.dec.generate(prompt_ids, max_new_tokens, eos_ids=self.eos_ids, generator=gen)
        return list(res.tokens), int(res.verify_steps), list(res.accepted)


def load_decoder(cfg: ServeReferenceConfig):
    """(decoder, tokenizer) for a config: HF decoding, or the draft family's decoder when a draft is given."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..targets import load_tokenizer, resolve_model

    tok = load_tokenizer(cfg.target)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    eos = _eos_ids(tok, None)
    if cfg.draft:
        # The in-process evaluator's loaders and decoders: the target captures the layers the draft was
        # trained on, the draft's family (EAGLE3 or Medusa) picks the decoder.
        from .inprocess import load_target_and_draft, make_decoder

        target, draft, _src, fam = load_target_and_draft(cfg.target, cfg.draft, device)
        dec = make_decoder(fam, target, draft, cfg.steps, cfg.topk, cfg.draft_tokens)
        return SpecDecoderAdapter(dec, _eos_ids(tok, target.model) or eos, algorithm=fam.upper()), tok
    model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.target), dtype=torch.float32).to(device)
    return HFDecoder(model, _eos_ids(tok, model) or eos, pad_id=tok.pad_token_id), tok


def _eos_ids(tokenizer, model) -> list[int]:
    eos = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        eos.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        eos.update(int(x) for x in gen_eos)
    return sorted(eos)


class _BadRequest(Exception):
    pass


class ReferenceServer:
    """The aiohttp app. `decoder` follows `Decoder`; `spec` = (steps, topk, draft_tokens) or None."""

    def __init__(self, decoder, tokenizer, model_name: str = "default", model_path: Optional[str] = None,
                 draft_path: Optional[str] = None, spec: Optional[tuple[int, int, int]] = None,
                 max_new_tokens_limit: int = 4096):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_path = model_path or model_name
        self.draft_path = draft_path
        self.spec = spec
        self.max_new_tokens_limit = max_new_tokens_limit
        self._lock = threading.Lock()
        self.totals = {"completion_tokens": 0, "verify_ct": 0, "requests": 0}
        self.flushes = 0
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        r = self.app.router
        for path in ("/generate",):
            r.add_post(path, self.generate)
            r.add_put(path, self.generate)
        r.add_post("/v1/chat/completions", self.chat)
        r.add_get("/v1/models", self.models)
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health_generate)
        r.add_get("/get_server_info", self.server_info)
        r.add_get("/server_info", self.server_info)
        r.add_get("/flush_cache", self.flush_cache)
        r.add_post("/flush_cache", self.flush_cache)
        self.runner: Optional[web.AppRunner] = None
        self.port: Optional[int] = None

    # -- decoding ------------------------------------------------------------------------------
    def _decode(self, prompt_ids: list[int], max_new: int, temperature: float, stop_ids: set[int]) -> dict:
        t0 = time.perf_counter()
        with self._lock:
            out, verify, accepted = self.decoder.generate(prompt_ids, max_new, temperature)
        eos = set(getattr(self.decoder, "eos_ids", [])) | stop_ids
        finish: dict[str, Any] = {"type": "length", "length": max_new}
        for k, t in enumerate(out):
            if t in eos:
                out, finish = out[:k + 1], {"type": "stop", "matched": int(t)}
                break
        out = out[:max_new]
        text_ids = out[:-1] if finish["type"] == "stop" else out
        meta: dict[str, Any] = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(out),
                                "cached_tokens": 0, "reasoning_tokens": 0, "weight_version": "default",
                                "finish_reason": finish}
        if self.spec is None:
            verify = len(out)  # no speculation: one target forward per token
            meta["spec_verify_ct"] = verify
        else:
            steps, topk, n = self.spec
            meta["spec_verify_ct"] = verify
            if verify > 0:
                proposed = verify * (n - 1)
                correct = sum(accepted)
                meta["spec_accept_rate"] = correct / proposed if proposed else 0.0
                meta["spec_accept_length"] = len(out) / verify
                meta["spec_num_correct_drafts"] = correct
                meta["spec_num_proposed_drafts"] = proposed
                hist = [0] * max(n, (max(accepted) + 1) if accepted else 1)
                for a in accepted:
                    hist[a] += 1
                meta["spec_correct_drafts_histogram"] = hist
        with self._lock:
            self.totals["completion_tokens"] += len(out)
            self.totals["verify_ct"] += meta["spec_verify_ct"]
            self.totals["requests"] += 1
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        meta["e2e_latency"] = time.perf_counter() - t0
        return {"text": text, "output_ids": out, "meta_info": meta}

    def _prompt_ids(self, text: Any, input_ids: Any) -> list[int]:
        if input_ids is not None:
            if not isinstance(input_ids, list) or not input_ids or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in input_ids):
                raise _BadRequest("input_ids must be a non-empty list of integers")
            if max(input_ids) >= len(self.tokenizer) or min(input_ids) < 0:
                raise _BadRequest(f"input_ids hold an id outside the vocabulary (0..{len(self.tokenizer) - 1})")
            return list(input_ids)
        if not isinstance(text, str) or not text:
            raise _BadRequest("text must be a non-empty string")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _sampling(self, sp: Any) -> tuple[int, float, set[int]]:
        sp = sp or {}
        if not isinstance(sp, dict):
            raise _BadRequest("sampling_params must be an object")
        unsupported = [k for k in ("ignore_eos", "regex", "json_schema", "ebnf", "n") if sp.get(k)]
        if unsupported:
            raise _BadRequest(f"sampling_params {unsupported} are not supported by the reference server "
                              "(use SGLang)")
        try:
            max_new = int(sp.get("max_new_tokens", 128))  # SGLang's defaults: 128 tokens, temperature 1.0
            temperature = float(sp.get("temperature", 1.0))
            stop_ids = {int(x) for x in (sp.get("stop_token_ids") or [])}
        except (TypeError, ValueError) as e:
            raise _BadRequest(f"bad sampling_params: {e}") from None
        if max_new < 0 or max_new > self.max_new_tokens_limit:
            raise _BadRequest(f"max_new_tokens {max_new} outside 0..{self.max_new_tokens_limit}")
        if temperature < 0:
            raise _BadRequest("temperature must be >= 0")
        return max_new, temperature, stop_ids

    # -- handlers ------------------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.Response:
        try:
            body = _loads(await request.read())
            if not isinstance(body, dict):
                raise _BadRequest("body must be a JSON object")
            if body.get("stream"):
                raise _BadRequest("stream=true is not supported by the reference server")
            text, input_ids = body.get("text"), body.get("input_ids")
            if (text is None) == (input_ids is None):
                raise _BadRequest("Either text or input_ids should be provided.")
            batch = isinstance(text, list) or (isinstance(input_ids, list) and input_ids
                                               and isinstance(input_ids[0], list))
            prompts = text if isinstance(text, list) else input_ids if batch else [text if input_ids is None
                                                                                  else input_ids]
            as_ids = input_ids is not None
            params = body.get("sampling_params")
            plist = params if isinstance(params, list) else [params] * len(prompts)
            if len(plist) != len(prompts):
                raise _BadRequest("sampling_params list and prompts differ in length")
            jobs = [(self._prompt_ids(None if as_ids else p, p if as_ids else None), *self._sampling(sp))
                    for p, sp in zip(prompts, plist)]
            rids = body.get("rid")
        except _BadRequest as e:
            return _error(400, str(e))
        except ValueError as e:
            return _error(400, f"body is not JSON: {e}")
        loop = asyncio.get_running_loop()
        outs = []
        for i, (ids, max_new, temp, stop_ids) in enumerate(jobs):
            res = await loop.run_in_executor(None, self._decode, ids, max_new, temp, stop_ids)
            rid = rids[i] if isinstance(rids, list) and i < len(rids) else rids if isinstance(rids, str) \
                else uuid.uuid4().hex
            res["meta_info"] = {"id": rid, **res["meta_info"]}
            outs.append(res)
        return _json(outs if batch else outs[0])

    async def chat(self, request: web.Request) -> web.Response:
        try:
            body = _loads(await request.read())
            messages = body.get("messages") if isinstance(body, dict) else None
            if not isinstance(messages, list) or not messages:
                raise _BadRequest("messages must be a non-empty list")
            if body.get("stream"):
                raise _BadRequest("stream=true is not supported by the reference server")
            model = body.get("model")
            if model not in (None, self.model_name):
                return _error(404, f"The model `{model}` does not exist.")
            from .sglang_client import render_chat

            try:
                ids = render_chat(self.tokenizer, messages)
            except Exception as e:  # noqa: BLE001 - a template error is the caller's bad input
                raise _BadRequest(f"cannot apply the chat template: {e}") from None
            max_new, temp, stop_ids = self._sampling({"max_new_tokens": body.get("max_completion_tokens")
                                                      or body.get("max_tokens") or 128,
                                                      "temperature": body.get("temperature", 1.0)})
        except _BadRequest as e:
            return _error(400, str(e))
        except ValueError as e:
            return _error(400, f"body is not JSON: {e}")
        res = await asyncio.get_running_loop().run_in_executor(None, self._decode, ids, max_new, temp, stop_ids)
        m = res["meta_info"]
        out = {"id": uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
               "model": self.model_name,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": res["text"]},
                            "finish_reason": m["finish_reason"]["type"], "matched_stop": m["finish_reason"].get("matched")}],
               "usage": {"prompt_tokens": m["prompt_tokens"], "completion_tokens": m["completion_tokens"],
                         "total_tokens": m["prompt_tokens"] + m["completion_tokens"]}}
        return _json(out)

    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                  "created": int(time.time()), "owned_by": "sglang",
                                                  "root": self.model_name}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def health_generate(self, request: web.Request) -> web.Response:
        eos = getattr(self.decoder, "eos_ids", [])
        ids = [0] if not eos else [eos[0]]
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._decode, ids, 1, 0.0, set())
        except Exception:  # noqa: BLE001 - an unhealthy decoder is what this endpoint reports
            return web.Response(status=503)
        return web.Response(status=200)

    async def server_info(self, request: web.Request) -> web.Response:
        steps, topk, n = self.spec or (None, None, None)
        t = self.totals
        info = {"model_path": self.model_path, "tokenizer_path": self.model_path,
                "served_model_name": self.model_name,
                "speculative_algorithm": getattr(self.decoder, "algorithm", "EAGLE3") if self.spec else None,
                "speculative_draft_model_path": self.draft_path, "speculative_num_steps": steps,
                "speculative_eagle_topk": topk, "speculative_num_draft_tokens": n,
                "tp_size": 1, "version": REFERENCE_VERSION, "frontend": "specforge-reference",
                "internal_states": [{"avg_spec_accept_length": (t["completion_tokens"] / t["verify_ct"])
                                     if t["verify_ct"] else None}]}
        return _json(info)

    async def flush_cache(self, request: web.Request) -> web.Response:
        self.flushes += 1  # no prefix cache here; counted so tests can see the client flushes
        return web.Response(text="Cache flushed.\nPlease check backend logs for more details. (When there are "
                            "running or waiting requests, the operation will not be performed.)\n")

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.runner, _, self.port = await serve_app(self.app, host, port)
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_dumps(obj), content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    # SGLang's error body (`_create_error_response`): {"error": {"message", "type", "code"}}.
    return _json({"error": {"message": message, "type": "BadRequestError" if status == 400 else "Error",
                            "code": status}}, status)


class ReferenceServerThread(ServerThread):
    """A `ReferenceServer` on a free loopback port in a daemon thread (tests, notebooks)."""

    what = "reference server"


def serve_reference(cfg: ServeReferenceConfig, events: Events) -> dict:
    """Load the decoder, serve until cancelled (SIGTERM / Ctrl-C), return request totals."""
    if cfg.draft and cfg.topk == 1 and cfg.draft_tokens not in (None, cfg.steps + 1):
        raise ValueError(f"with topk 1 (a chain) draft_tokens must be steps + 1 = {cfg.steps + 1}")
    decoder, tok = load_decoder(cfg)
    n = cfg.draft_tokens or (cfg.steps + 1 if cfg.topk == 1 else getattr(getattr(decoder, "dec", None),
                                                                         "num_draft_tokens", cfg.steps + 1))
    spec = (cfg.steps, cfg.topk, n) if cfg.draft else None
    srv = ReferenceServer(decoder, tok, model_name=cfg.served_model_name or cfg.target, model_path=cfg.target,
                          draft_path=cfg.draft, spec=spec, max_new_tokens_limit=cfg.max_new_tokens_limit)

    async def _serve() -> None:
        port = await srv.start(cfg.host, cfg.port)
        events.emit("serving", url=f"http://{cfg.host}:{port}", target=cfg.target, draft=cfg.draft,
                    note="reference server for tests and notebooks; production serving is SGLang")
        try:
            while not events.cancelled:
                await asyncio.sleep(0.25)
        finally:
            await srv.stop()

    asyncio.run(_serve())
    return {"requests": srv.totals["requests"], "completion_tokens": srv.totals["completion_tokens"],
            "verify_ct": srv.totals["verify_ct"]}
