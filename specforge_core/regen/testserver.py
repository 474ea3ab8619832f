"""The project's own OpenAI-chat-API server on loopback, for tests and benchmarks (never production).

It speaks enough of `/v1/chat/completions`, `/v1/models` and `/health` for the regeneration client,
answers either with scripted text (a deterministic function of the whole message list, so a test
can check exactly which context each turn was given) or with a small HF model, and injects faults:
slow replies, HTTP 500s, dropped connections, malformed JSON, hung requests (accepted, never
answered), streams that stall after their first chunk, and death after N requests (the process
exits, or in-thread the listener closes and every connection is cut).

`stream: true` is answered like SGLang and vLLM do: headers at once, then `data:` chunks (role,
reasoning, one per word of the answer, the finish_reason, the usage when `stream_options.
include_usage`) and `data: [DONE]`. In streaming mode the delay falls between the headers and the
first chunk, where a real server queues and prefills.

    python -m specforge_core.regen.testserver --port 30000 --fail-rate 0.1 --drop-rate 0.05

In tests, `ServerThread(...)` runs it in a background thread on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from aiohttp import web
from ..asyncutil import ServerThread as _LoopThread
from ..asyncutil import serve_app

try:
    import orjson

    _dumps = orjson.dumps
    _loads = orjson.loads
except ImportError:  # pragma: no cover
    import json

    def _dumps(o: Any) -> bytes:
        return json.dumps(o).encode()

    _loads = json.loads


@dataclass
class Faults:
    """Fault injection; rates are per request, drawn from a seeded RNG in this order."""

    delay_s: float = 0.0            # every reply waits this long ...
    delay_jitter_s: float = 0.0     # ... plus uniform(0, jitter)
    fail_rate: float = 0.0          # HTTP 500
    drop_rate: float = 0.0          # connection cut without a response
    malformed_rate: float = 0.0     # 200 with a body that is not JSON
    die_after: Optional[int] = None  # after this many chat requests the server dies
    hang_rate: float = 0.0          # request read, then never answered (no headers, socket kept open)
    stall_rate: float = 0.0         # streaming: the first chunk is sent, then nothing more
    seed: int = 0


@dataclass
class Stats:
    requests: int = 0
    by_kind: dict = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


def scripted_reply(messages: list[dict]) -> str:
    """The scripted answer: names the turn, hashes the full context, echoes the last user turn."""
    n = sum(1 for m in messages if m.get("role") == "assistant")
    h = hashlib.sha1(_dumps([[m.get("role"), m.get("content")] for m in messages])).hexdigest()[:8]
    last_user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    return f"r{n + 1} {h} {last_user}"


class OpenAITestServer:
    """The aiohttp app and its state. `reasoning`: off | field (reasoning_content) | inline (<think>)."""

    def __init__(self, model_name: str = "test-model", faults: Faults | None = None, reasoning: str = "off",
                 api_key: str | None = None, model_dir: str | None = None, exit_on_die: bool = False):
        self.model_name = model_name
        self.faults = faults or Faults()
        self.reasoning = reasoning
        self.api_key = api_key
        self.exit_on_die = exit_on_die
        self.rng = random.Random(self.faults.seed)
        self.stats = Stats()
        self.dead = False
        self._release: Optional[asyncio.Event] = None  # set on stop: hung handlers return
        self.generator = None
        self._gen_lock = threading.Lock()
        if model_dir:
            from .local import LocalGenerator

            self.generator = LocalGenerator(model_dir, batch_size=1)
        self.app = web.Application(middlewares=[self._guard])
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/stats", self.get_stats)
        self.runner: web.AppRunner | None = None
        self.site: web.SockSite | None = None
        self.port: int | None = None

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if self.dead:
            _abort(request)
            return web.Response(status=503)  # never reaches the client: the transport is gone
        if self.api_key and request.path != "/health":
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return _error(401, "invalid API key")
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, request: web.Request) -> web.Response:
        return web.Response(body=_dumps({"object": "list", "data": [{"id": self.model_name, "object": "model"}]}),
                            content_type="application/json")

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=_dumps({"requests": self.stats.requests, "by_kind": self.stats.by_kind,
                                         "cpu_s": time.process_time()}), content_type="application/json")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        f = self.faults
        self.stats.requests += 1
        if f.die_after is not None and self.stats.requests > f.die_after:
            self.stats.count("died")
            await self.die()
            _abort(request)
            return web.Response(status=503)
        raw = await request.read()
        if f.hang_rate and self.rng.random() < f.hang_rate:
            self.stats.count("hung")
            await self._hang()
            _abort(request)
            return web.Response(status=503)
        stall = bool(f.stall_rate) and self.rng.random() < f.stall_rate
        try:
            streaming = bool(_loads(raw).get("stream"))
        except Exception:  # noqa: BLE001 - a bad body is answered 400 below
            streaming = False
        delay = f.delay_s + self.rng.random() * f.delay_jitter_s if (f.delay_s or f.delay_jitter_s) else 0.0
        if delay and not streaming:
            await asyncio.sleep(delay)
        if f.drop_rate and self.rng.random() < f.drop_rate:
            self.stats.count("dropped")
            _abort(request)
            return web.Response(status=503)
        if f.fail_rate and self.rng.random() < f.fail_rate:
            self.stats.count("500")
            return _error(500, "injected failure")
        if f.malformed_rate and self.rng.random() < f.malformed_rate:
            self.stats.count("malformed")
            return web.Response(body=b'{"choices": [{"message": {"content": "trunc', content_type="application/json")
        try:
            body = _loads(raw)
            messages = body["messages"]
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a non-empty list")
        except Exception as e:  # noqa: BLE001 - any bad request is a 400, like the real servers
            return _error(400, f"bad request: {e}")
        model = body.get("model")
        if model not in (None, self.model_name):
            return _error(404, f"The model `{model}` does not exist.")
        max_tokens = int(body.get("max_tokens") or 16)
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        think = self.reasoning != "off" and (body.get("chat_template_kwargs") or {}).get("enable_thinking", True)

        if self.generator is not None:
            loop = asyncio.get_running_loop()
            text, finish, p_tok, c_tok = await loop.run_in_executor(None, self._generate, messages, max_tokens,
                                                                    body.get("temperature", 0.0),
                                                                    body.get("top_p", 1.0), stop)
        else:
            words = scripted_reply(messages).split(" ")
            finish = "stop"
            if len(words) > max_tokens:
                words, finish = words[:max_tokens], "length"
            text = " ".join(words)
            for s in stop:
                i = text.find(s)
                if i >= 0:
                    text, finish = text[:i], "stop"
            p_tok = sum(len(str(m.get("content", "")).split()) for m in messages)
            c_tok = len(words)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if think:
            thought = f"thinking about turn {sum(1 for m in messages if m.get('role') == 'assistant') + 1}"
            if self.reasoning == "field":
                message["reasoning_content"] = thought
            else:
                message["content"] = f"<think>{thought}</think>\n\n{text}"
        usage = {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok}
        if streaming:
            with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream(request, message, finish, usage if with_usage else None, delay, stall)
        self.stats.count("ok")
        out = {"id": f"chatcmpl-{self.stats.requests}", "object": "chat.completion", "created": int(time.time()),
               "model": self.model_name,
               "choices": [{"index": 0, "message": message, "finish_reason": finish}],
               "usage": usage}
        return web.Response(body=_dumps(out), content_type="application/json")

    async def _stream(self, request: web.Request, message: dict, finish: str, usage: Optional[dict],
                      delay: float, stall: bool) -> web.StreamResponse:
        """The reply as server-sent events, chunked the way SGLang and vLLM chunk it."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if delay:
            await asyncio.sleep(delay)
        head = {"id": f"chatcmpl-{self.stats.requests}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.model_name}

        def chunk(delta: dict, fin: Optional[str] = None) -> bytes:
            return b"data: " + _dumps({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": fin}]}) \
                + b"\n\n"

        parts = [chunk({"role": "assistant", "content": ""})]
        if message.get("reasoning_content"):
            parts.append(chunk({"reasoning_content": message["reasoning_content"]}))
        words = message["content"].split(" ")
        parts += [chunk({"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
        parts.append(chunk({}, finish))
        if usage is not None:
            parts.append(b"data: " + _dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
        parts.append(b"data: [DONE]\n\n")
        if stall:
            self.stats.count("stalled")
            await resp.write(parts[0])
            await self._hang()
            _abort(request)
            return resp
        self.stats.count("ok")
        # A few writes rather than one per chunk: the client must reassemble lines split anywhere.
        blob = b"".join(parts)
        cut = len(blob) // 2
        await resp.write(blob[:cut])
        await resp.write(blob[cut:])
        await resp.write_eof()
        return resp

    async def _hang(self) -> None:
        """Wait until the server stops (a hung request keeps its socket open and sends nothing)."""
        if self._release is None:
            self._release = asyncio.Event()
        await self._release.wait()

    def _generate(self, messages, max_tokens, temperature, top_p, stop):
        with self._gen_lock:
            r = self.generator.generate([messages], max_tokens=max_tokens, temperature=float(temperature or 0.0),
                                        top_p=float(top_p or 1.0), stop=stop)[0]
        return r.content, r.finish_reason, r.prompt_tokens, r.completion_tokens

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.runner, self.site, self.port = await serve_app(self.app, host, port, backlog=1024)
        return self.port

    async def die(self) -> None:
        """Stop answering at once: exit the process, or close the listener and cut every connection."""
        if self.exit_on_die:
            sys.stdout.flush()
            os._exit(17)
        if self.dead:
            return
        self.dead = True
        if self.site is not None:
            srv = getattr(self.site, "_server", None)
            if srv is not None:
                srv.close()  # new connections are refused from now on
        if self.runner is not None and self.runner.server is not None:
            for proto in list(getattr(self.runner.server, "connections", [])):
                tr = getattr(proto, "transport", None)
                if tr is not None:
                    tr.abort()

    async def stop(self) -> None:
        if self._release is not None:
            self._release.set()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def _abort(request: web.Request) -> None:
    tr = request.transport
    if tr is not None:
        tr.abort()


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=_dumps({"error": {"message": message, "code": status}}),
                        content_type="application/json")


class ServerThread(_LoopThread):
    """An `OpenAITestServer` on a free loopback port in a daemon thread (for tests).

    `with ServerThread(faults=Faults(fail_rate=0.2)) as s: s.address` -> "127.0.0.1:PORT".
    """

    what = "test server"

    def __init__(self, port: int = 0, **kw: Any):
        super().__init__(OpenAITestServer(**kw), port=port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """Die abruptly (listener closed, connections cut) but keep the thread for stats."""
        asyncio.run_coroutine_threadsafe(self.server.die(), self.loop).result(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="OpenAI-chat-API test server (scripted or tiny-model replies, "
                                 "with fault injection). For tests and benchmarks only.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = a free port (see --port-file)")
    ap.add_argument("--port-file", default=None, help="write the bound port here once listening")
    ap.add_argument("--model-name", default="test-model")
    ap.add_argument("--model-dir", default=None, help="answer with this HF model (greedy) instead of scripted text")
    ap.add_argument("--reasoning", choices=["off", "field", "inline"], default="off")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds added to every reply")
    ap.add_argument("--delay-jitter", type=float, default=0.0, help="plus uniform(0, this) seconds")
    ap.add_argument("--fail-rate", type=float, default=0.0, help="fraction of requests answered HTTP 500")
    ap.add_argument("--drop-rate", type=float, default=0.0, help="fraction of connections cut without a reply")
    ap.add_argument("--malformed-rate", type=float, default=0.0, help="fraction answered with broken JSON")
    ap.add_argument("--die-after", type=int, default=None, help="exit after this many chat requests")
    ap.add_argument("--hang-rate", type=float, default=0.0, help="fraction of requests accepted and never answered")
    ap.add_argument("--stall-rate", type=float, default=0.0, help="fraction of streams that stop after one chunk")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    faults = Faults(delay_s=a.delay, delay_jitter_s=a.delay_jitter, fail_rate=a.fail_rate, drop_rate=a.drop_rate,
                    malformed_rate=a.malformed_rate, die_after=a.die_after, hang_rate=a.hang_rate,
                    stall_rate=a.stall_rate, seed=a.seed)
    srv = OpenAITestServer(model_name=a.model_name, faults=faults, reasoning=a.reasoning, api_key=a.api_key,
                           model_dir=a.model_dir, exit_on_die=True)

    async def _serve() -> None:
        port = await srv.start(a.host, a.port)
        if a.port_file:
            tmp = a.port_file + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(str(port))
            os.replace(tmp, a.port_file)
        print(f"listening on http://{a.host}:{port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(_serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
