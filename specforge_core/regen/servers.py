"""A pool of OpenAI-compatible servers: health probe, least-loaded dispatch, retirement, retries.

Why: users point one run at several SGLang / vLLM servers for hours. A server that dies must not
stall or fail the run: its requests move to the others. Each server has its own concurrency cap;
a request goes to the server with the lowest load (in flight / cap), preferring the one the sample
used for its previous turn (its prefix is in that server's radix / prefix cache). After
`retire_after` consecutive retryable failures a server is taken out of dispatch and health-probed;
if the probe fails it is retired, else it comes back (a server that answers 500s but whose /health
is fine is overloaded, not dead). Retired servers (those dead at start included) are probed again
every `reprobe_s`: one that answers (restarted, done loading its weights) rejoins the pool, unless
it now serves another model than the run's. When every server is retired at once, `AllServersDown`
says which died of what and the run stops (its rows are kept for `--resume`).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp

from ..asyncutil import normalize_address
from .client import ChatClient, ChatReply, RequestError


class AllServersDown(RuntimeError):
    """Every server of the pool is retired; nothing can be sent any more."""


class SampleFailed(Exception):
    """A request that failed for good after its retries; carries what the errors file needs."""

    def __init__(self, error: str, server: str | None, attempts: int):
        super().__init__(error)
        self.error = error
        self.server = server
        self.attempts = attempts


@dataclass
class Server:
    address: str
    capacity: int
    inflight: int = 0
    alive: bool = True
    suspect: bool = False
    consecutive_failures: int = 0
    requests: int = 0
    ok: int = 0
    failures: int = 0
    retired_reason: Optional[str] = None
    rejoined: int = 0
    models: list[str] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return self.alive and not self.suspect

    def stats(self) -> dict:
        return {"address": self.address, "alive": self.alive, "requests": self.requests, "ok": self.ok,
                "failures": self.failures, "retired_reason": self.retired_reason, "rejoined": self.rejoined}


class ServerPool:
    def __init__(self, client: ChatClient, addresses: list[str], concurrency: int, retire_after: int = 3,
                 events: Any = None, reprobe_s: float = 0.0):
        seen: dict[str, Server] = {}
        for a in addresses:
            addr = normalize_address(a)
            seen.setdefault(addr, Server(addr, concurrency))
        self.servers = list(seen.values())
        self.client = client
        self.retire_after = retire_after
        self.events = events
        self.reprobe_s = reprobe_s
        self.model: Optional[str] = None  # the run's model, once known: a rejoining server must serve it
        self._waiters: deque[asyncio.Future] = deque()
        self._checks: set[asyncio.Task] = set()
        self._reprober: Optional[asyncio.Task] = None

    # -- health --------------------------------------------------------------------------------
    async def probe(self, server: Server) -> tuple[bool, str]:
        """(alive, detail). /v1/models first (it also names the model), /health as the fallback."""
        errors = []
        for path in ("/v1/models", "/health"):
            try:
                status, data = await self.client.get_json(server.address + path)
            except asyncio.TimeoutError:
                errors.append(f"{path}: timed out")
                continue
            except (aiohttp.ClientError, OSError) as e:
                errors.append(f"{path}: {type(e).__name__}: {e}")
                # A refused connection fails the same way on every path.
                if isinstance(e, aiohttp.ClientConnectorError):
                    break
                continue
            if status in (401, 403):
                return False, f"{path}: HTTP {status}: the API key was rejected (--api-key / $OPENAI_API_KEY)"
            if status == 200:
                if path == "/v1/models" and isinstance(data, dict):
                    server.models = [m.get("id") for m in data.get("data", []) if isinstance(m, dict) and m.get("id")]
                return True, "ok"
            errors.append(f"{path}: HTTP {status}")
        return False, "; ".join(errors)

    async def probe_all(self) -> list[Server]:
        """Probe every server once at start; retire the dead; raise AllServersDown if none answers."""
        results = await asyncio.gather(*(self.probe(s) for s in self.servers))
        for s, (ok, detail) in zip(self.servers, results):
            if not ok:
                self.retire(s, f"health probe failed at start: {detail}")
        alive = [s for s in self.servers if s.alive]
        if not alive:
            raise AllServersDown(self.describe_dead("no server answered the health probe"))
        if self.reprobe_s > 0 and self._reprober is None:
            self._reprober = asyncio.get_running_loop().create_task(self._reprobe_loop())
        return alive

    async def _reprobe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reprobe_s)
            retired = [s for s in self.servers if not s.alive]
            if retired:
                await asyncio.gather(*(self._reprobe(s) for s in retired))

    async def _reprobe(self, server: Server) -> None:
        ok, _ = await self.probe(server)
        if not ok or server.alive:
            return
        if self.model and server.models and self.model not in server.models:
            server.retired_reason = (f"came back serving {server.models}, not the run's model {self.model!r}; "
                                     "kept out")
            return
        was = server.retired_reason
        server.alive, server.suspect, server.consecutive_failures = True, False, 0
        server.retired_reason = None
        server.rejoined += 1
        if self.events is not None:
            self.events.emit("server_rejoined", server=server.address, was=was,
                             servers_alive=sum(s.alive for s in self.servers))
        self._wake(all_=True)

    def retire(self, server: Server, reason: str) -> None:
        if not server.alive:
            return
        server.alive = False
        server.suspect = False
        server.retired_reason = reason
        if self.events is not None:
            left = sum(s.alive for s in self.servers)
            self.events.warning(f"server {server.address} retired: {reason}", server=server.address,
                                servers_left=left)
        self._wake(all_=True)

    def describe_dead(self, head: str = "every server is gone") -> str:
        lines = [f"{head}:"] + [f"  {s.address}: {s.retired_reason}" for s in self.servers]
        return "\n".join(lines)

    @property
    def all_down(self) -> bool:
        return not any(s.alive for s in self.servers)

    # -- dispatch ------------------------------------------------------------------------------
    def _pick(self, prefer: Server | None, avoid: Server | None) -> Server | None:
        if prefer is not None and prefer is not avoid and prefer.available and prefer.inflight < prefer.capacity:
            return prefer
        best, best_load, fallback = None, 2.0, None
        for s in self.servers:
            if not s.available or s.inflight >= s.capacity:
                continue
            if s is avoid:
                fallback = s
                continue
            load = s.inflight / s.capacity
            if load < best_load:
                best, best_load = s, load
        return best or fallback

    async def acquire(self, prefer: Server | None = None, avoid: Server | None = None) -> Server:
        while True:
            if self.all_down:
                raise AllServersDown(self.describe_dead())
            s = self._pick(prefer, avoid)
            if s is not None:
                s.inflight += 1
                return s
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._wake()  # pass the wake-up we got on to someone still waiting
                raise

    def _wake(self, all_: bool = False) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                if not all_:
                    return

    def release(self, server: Server, error: RequestError | None = None) -> None:
        server.inflight -= 1
        server.requests += 1
        if error is None:
            server.ok += 1
            server.consecutive_failures = 0
        elif error.retryable:
            server.failures += 1
            server.consecutive_failures += 1
            if server.consecutive_failures >= self.retire_after and server.available:
                server.suspect = True
                task = asyncio.get_running_loop().create_task(self._check(server))
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)
        else:
            server.failures += 1
        self._wake()

    async def _check(self, server: Server) -> None:
        ok, detail = await self.probe(server)
        if ok:
            server.suspect = False
            server.consecutive_failures = 0
            self._wake(all_=True)
        else:
            self.retire(server, f"{server.consecutive_failures} failures in a row, then the health probe "
                                f"failed: {detail}")

    async def close(self) -> None:
        if self._reprober is not None:
            self._reprober.cancel()
            await asyncio.gather(self._reprober, return_exceptions=True)
            self._reprober = None
        for t in list(self._checks):
            t.cancel()
        if self._checks:
            await asyncio.gather(*self._checks, return_exceptions=True)

    # -- one request with retries --------------------------------------------------------------
    async def chat(self, body: dict, prefer: Server | None = None, max_retries: int = 3,
                   backoff_s: float = 1.0, rng: random.Random | None = None) -> tuple[ChatReply, Server, int]:
        """(reply, server, attempts). Raises SampleFailed after the retries, AllServersDown if none is left."""
        rng = rng or random
        attempts = 0
        last: Server | None = None
        while True:
            server = await self.acquire(prefer=prefer if last is None else None, avoid=last)
            attempts += 1
            try:
                reply = await self.client.chat(server.address, body)
            except RequestError as e:
                self.release(server, e)
                if not e.retryable or attempts > max_retries:
                    raise SampleFailed(str(e), server.address, attempts) from None
                last = server
                if backoff_s > 0:
                    delay = min(30.0, backoff_s * (2 ** (attempts - 1))) * (0.5 + rng.random())
                    await asyncio.sleep(delay)
                continue
            except BaseException:
                # Cancelled (job stopping) or a bug: give the slot back without counting an outcome.
                server.inflight -= 1
                self._wake()
                raise
            self.release(server, None)
            return reply, server, attempts

