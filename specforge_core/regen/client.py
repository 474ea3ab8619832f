"""Asyncio client for OpenAI-compatible chat servers (SGLang, vLLM): one request, classified outcome.

One `ChatClient` holds one aiohttp session for the whole run (keep-alive connections, no per-request
session cost) and turns every way a request can go wrong into one of two exceptions the scheduler
acts on: `RetryableError` (5xx, 429, reset or dropped connection, timeout, malformed JSON: try
again, maybe elsewhere) and `RequestError` (4xx such as a prompt longer than the context: retrying
cannot help). `connection_failed` marks errors that say the server itself may be gone.

Replies are streamed (`stream: true`, server-sent `data:` lines up to `data: [DONE]`, usage asked
for with `stream_options.include_usage`) so that a hung request is told from a long answer: the
whole-request timeout (`timeout_s`, minutes, for long generations) stays, and an **idle timeout**
(`idle_timeout_s`, no byte for that long) ends a request that stopped talking. The idle clock runs
while waiting for the response headers (real servers send them at once; a server that accepted the
request and never answers sends nothing) and between stream chunks once the first one came; it does
not run between the headers and the first chunk, where a healthy server may keep a request queued
behind others for minutes. A server that ignores `stream` and answers one JSON body is read as such.

The conversation logic also lives here, because it is the same for every backend:
`plan_turns` keeps system and user turns and drops the old assistant turns, `split_reasoning`
separates `<think>` blocks from an answer.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp

from .store import JSONDecodeError, loads

try:
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover
    import json

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")


class RequestError(Exception):
    """A request that failed for good (retrying cannot help)."""

    retryable = False
    connection_failed = False

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RetryableError(RequestError):
    """A request that may succeed if sent again (possibly to another server)."""

    retryable = True

    def __init__(self, message: str, status: int | None = None, connection_failed: bool = False):
        super().__init__(message, status)
        self.connection_failed = connection_failed


@dataclass
class ChatReply:
    content: str
    reasoning: Optional[str]
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class SamplingParams:
    model: Optional[str] = None
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 2048
    stop: Optional[list[str]] = None
    disable_thinking: bool = False
    extra: dict = field(default_factory=dict)

    def payload(self, messages: list[dict]) -> dict:
        body: dict[str, Any] = {"messages": messages, "temperature": self.temperature, "top_p": self.top_p,
                                "max_tokens": self.max_tokens, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        if self.stop:
            body["stop"] = list(self.stop)
        if self.disable_thinking:
            # SGLang and vLLM pass this to the chat template (Qwen3, DeepSeek-R1 distills, ...).
            body["chat_template_kwargs"] = {"enable_thinking": False}
        body.update(self.extra)
        return body


def parse_chat_response(data: Any) -> ChatReply:
    """The first choice of a /v1/chat/completions body. Raises RetryableError on a malformed body."""
    try:
        choice = data["choices"][0]
        msg = choice.get("message") or {}
        content = msg.get("content")
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")  # SGLang / vLLM (old, new)
        finish = choice.get("finish_reason") or "stop"
        usage = data.get("usage") or {}
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise RetryableError(f"malformed response: {type(e).__name__}: {e}") from None
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise RetryableError(f"malformed response: content is a {type(content).__name__}")
    return ChatReply(content=content, reasoning=reasoning if isinstance(reasoning, str) else None,
                     finish_reason=str(finish), prompt_tokens=int(usage.get("prompt_tokens") or 0),
                     completion_tokens=int(usage.get("completion_tokens") or 0))


class StreamAccumulator:
    """Folds the chunks of a streamed chat completion into the `ChatReply` the non-streaming body gives:
    content and reasoning deltas concatenated, the last non-null finish_reason, the usage chunk."""

    __slots__ = ("content", "reasoning", "finish", "usage", "done")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.finish: Optional[str] = None
        self.usage: dict = {}
        self.done = False

    def feed_line(self, line: bytes) -> None:
        """One line of the SSE stream (blank lines, comments and other fields are ignored)."""
        line = line.strip()
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        try:
            chunk = loads(data)
        except JSONDecodeError as e:
            raise RetryableError(f"malformed JSON in stream chunk ({len(data)} bytes): {e}") from None
        self.feed(chunk)

    def feed(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            raise RetryableError(f"malformed stream chunk: a {type(chunk).__name__}")
        if chunk.get("error") is not None or chunk.get("object") == "error":
            # SGLang and vLLM report a failure after the headers as a data line with an error object.
            err = chunk.get("error", chunk)
            msg = err.get("message", err) if isinstance(err, dict) else err
            code = err.get("code") if isinstance(err, dict) else None
            status = code if isinstance(code, int) else None
            text = f"error in stream{f' (HTTP {status})' if status else ''}: {str(msg)[:300]}"
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                raise RequestError(text, status=status)
            raise RetryableError(text, status=status)
        if chunk.get("usage"):
            if not isinstance(chunk["usage"], dict):
                raise RetryableError("malformed stream chunk: usage is not an object")
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        if not choices:
            return
        try:
            choice = choices[0]
            delta = choice.get("delta") or {}
            piece = delta.get("content")
            thought = delta.get("reasoning_content") or delta.get("reasoning")  # SGLang / vLLM (old, new)
            finish = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise RetryableError(f"malformed stream chunk: {type(e).__name__}: {e}") from None
        if piece is not None:
            if not isinstance(piece, str):
                raise RetryableError(f"malformed stream chunk: content is a {type(piece).__name__}")
            self.content.append(piece)
        if isinstance(thought, str):
            self.reasoning.append(thought)
        if finish:
            self.finish = str(finish)

    def reply(self) -> ChatReply:
        if not self.done and self.finish is None:
            raise RetryableError("stream ended before the answer finished (no finish_reason, no [DONE])",
                                 connection_failed=True)
        usage = self.usage
        return ChatReply(content="".join(self.content), reasoning="".join(self.reasoning) or None,
                         finish_reason=self.finish or "stop", prompt_tokens=int(usage.get("prompt_tokens") or 0),
                         completion_tokens=int(usage.get("completion_tokens") or 0))


class _IdleWatch:
    """Cancels the request's task once no byte has come for `limit` seconds while armed.

    One timer per idle period (not per chunk): reading a chunk only stamps `last`.
    """

    __slots__ = ("loop", "task", "limit", "last", "armed", "handle", "fired")

    def __init__(self, limit: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.limit = limit
        self.last = self.loop.time()
        self.armed = True
        self.fired = False
        self.handle: Optional[asyncio.TimerHandle] = self.loop.call_at(self.last + limit, self._check)

    def touch(self) -> None:
        self.last = self.loop.time()

    def disarm(self) -> None:
        self.armed = False

    def arm(self) -> None:
        self.armed = True
        self.last = self.loop.time()
        if self.handle is None:
            self.handle = self.loop.call_at(self.last + self.limit, self._check)

    def _check(self) -> None:
        self.handle = None
        if not self.armed:
            return
        due = self.last + self.limit
        if self.loop.time() >= due - 1e-3:
            self.fired = True
            if self.task is not None:
                self.task.cancel()
            return
        self.handle = self.loop.call_at(due, self._check)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class ChatClient:
    """One aiohttp session for all servers of a run. Use as `async with ChatClient(...) as c`.

    `idle_timeout_s`: end a request that sent no byte for this long (see the module doc); 0 = off.
    """

    def __init__(self, api_key: str | None = None, timeout_s: float = 600.0, connect_timeout_s: float = 10.0,
                 max_connections: int = 0, idle_timeout_s: float = 0.0):
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self.probe_timeout = aiohttp.ClientTimeout(total=connect_timeout_s)
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "ChatClient":
        # limit 0 = unbounded: the pool's per-server concurrency is the only limit that should bind.
        conn = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0, ttl_dns_cache=300,
                                    force_close=False, enable_cleanup_closed=False)
        self.session = aiohttp.ClientSession(connector=conn, headers=self.headers, timeout=self.timeout,
                                             skip_auto_headers=("User-Agent",), auto_decompress=False)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def chat(self, base_url: str, body: dict) -> ChatReply:
        assert self.session is not None, "use ChatClient as an async context manager"
        url = base_url + "/v1/chat/completions"
        watch = _IdleWatch(self.idle_timeout_s) if self.idle_timeout_s > 0 else None
        acc: Optional[StreamAccumulator] = None
        try:
            async with self.session.post(url, data=_dumps(body)) as resp:
                status = resp.status
                ctype = resp.headers.get("Content-Type", "")
                if status != 200 or not ctype.startswith("text/event-stream"):
                    if watch is not None:
                        watch.disarm()  # the headers came; a JSON body follows at once
                    raw = await resp.read()
                else:
                    if watch is not None:
                        watch.disarm()  # queued or prefilling: no idle clock until the first chunk
                    acc = StreamAccumulator()
                    await _read_stream(resp.content, acc, watch)
        except asyncio.CancelledError:
            if watch is None or not watch.fired or _uncancel():
                raise
            if acc is not None and acc.done:
                return acc.reply()  # [DONE] came, only the end of the body did not: the answer is whole
            raise RetryableError(f"idle timeout: no byte from the server for {self.idle_timeout_s:g} s",
                                 connection_failed=True) from None
        except asyncio.TimeoutError:
            raise RetryableError(f"timed out after {self.timeout.total:g} s", connection_failed=True) from None
        except aiohttp.ClientConnectorError as e:
            raise RetryableError(f"cannot connect: {e.os_error or e}", connection_failed=True) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError,
                ConnectionResetError) as e:
            raise RetryableError(f"connection dropped: {type(e).__name__}: {e}", connection_failed=True) from None
        except aiohttp.ClientError as e:
            raise RetryableError(f"{type(e).__name__}: {e}", connection_failed=True) from None
        finally:
            if watch is not None:
                watch.stop()
        if acc is not None:
            return acc.reply()
        if status != 200:
            detail = _error_detail(raw)
            if status >= 500 or status in (408, 429):
                raise RetryableError(f"HTTP {status}: {detail}", status=status)
            raise RequestError(f"HTTP {status}: {detail}", status=status)
        try:
            data = loads(raw)
        except JSONDecodeError as e:
            raise RetryableError(f"malformed JSON in response ({len(raw)} bytes): {e}", status=status) from None
        return parse_chat_response(data)

    async def get_json(self, url: str) -> tuple[int, Any]:
        """GET with the short probe timeout; (status, parsed JSON or None). Raises aiohttp / timeout errors."""
        assert self.session is not None
        async with self.session.get(url, timeout=self.probe_timeout) as resp:
            raw = await resp.read()
            try:
                return resp.status, loads(raw) if raw else None
            except JSONDecodeError:
                return resp.status, None


async def _read_stream(content: aiohttp.StreamReader, acc: StreamAccumulator, watch: Optional[_IdleWatch]) -> None:
    """Feed every SSE line of the body to `acc`, reading to the end of the body (so the connection is
    reused). Reads whatever arrived rather than line by line: no line-length limit, few awaits."""
    pending: list[bytes] = []
    first = True
    while True:
        data = await content.readany()
        if not data:
            break
        if watch is not None:
            if first:
                watch.arm()
                first = False
            else:
                watch.touch()
        if b"\n" not in data:
            pending.append(data)
            continue
        if pending:
            pending.append(data)
            data = b"".join(pending)
            pending = []
        *lines, rest = data.split(b"\n")
        for line in lines:
            acc.feed_line(line)
        if rest:
            pending.append(rest)
    if pending:
        acc.feed_line(b"".join(pending))


def _uncancel() -> bool:
    """Take back the cancel the idle watch sent; True when another cancel (a stopping job) is pending
    too, so the caller re-raises. Python 3.10 does not count cancels: nothing to take back there."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        return task.uncancel() > 0
    return False


def _error_detail(raw: bytes) -> str:
    try:
        data = loads(raw)
        if isinstance(data, dict):
            err = data.get("error", data.get("detail", data.get("message")))
            if isinstance(err, dict):
                err = err.get("message", err)
            if err is not None:
                return str(err)[:300]
    except JSONDecodeError:
        pass
    return raw[:300].decode("utf-8", "replace") or "(empty body)"


# ------------------------------------------------------------------------------------------------
# Conversation logic shared by every backend
# ------------------------------------------------------------------------------------------------
_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)


def split_reasoning(content: str, reasoning: str | None) -> tuple[str, str | None]:
    """(answer, reasoning): the server's separate field wins; else a leading <think>...</think> block
    is split off the content (servers started without a reasoning parser leave it inline)."""
    if reasoning:
        return content.lstrip(), reasoning
    m = _THINK.match(content)
    if m:
        return content[m.end():], m.group(1).strip()
    # A template that opens <think> itself makes the model emit only the closing tag.
    if "</think>" in content and "<think>" not in content:
        head, _, tail = content.partition("</think>")
        return tail.lstrip(), head.strip()
    return content, None


def plan_turns(conversations: list[dict], system_prompt: str | None = None) -> tuple[list[dict], list[int]]:
    """Keep system and user turns, drop the assistant turns; return (kept turns, slots) where each slot
    is the number of kept turns that precede an answer to regenerate. A conversation ending with a
    user turn gets an answer there too; assistant turns before the first user turn are dropped."""
    kept: list[dict] = []
    slots: list[int] = []
    if system_prompt:
        kept.append({"role": "system", "content": system_prompt})
    seen_user = False
    pending_user = False
    for t in conversations:
        role = t["role"]
        if role == "system":
            if system_prompt:
                continue  # the override replaces it
            kept.append({"role": "system", "content": t["content"]})
        elif role == "user":
            kept.append({"role": "user", "content": t["content"]})
            seen_user = pending_user = True
        elif role == "assistant":
            if seen_user and pending_user:
                slots.append(len(kept))
                pending_user = False
    if pending_user:
        slots.append(len(kept))
    return kept, slots


def build_messages(kept: list[dict], slots: list[int], answers: list[dict], upto: int) -> list[dict]:
    """The context for answer number `upto`: kept turns up to its slot, with earlier new answers in place."""
    msgs: list[dict] = []
    j = 0
    for i in range(slots[upto] + 1):
        while j < upto and slots[j] == i:
            msgs.append({"role": "assistant", "content": answers[j]["content"]})
            j += 1
        if i < slots[upto]:
            msgs.append(kept[i])
    return msgs


def assemble(kept: list[dict], slots: list[int], answers: list[dict]) -> list[dict]:
    """The final conversation: kept turns with every regenerated answer in its slot."""
    out: list[dict] = []
    j = 0
    for i in range(len(kept) + 1):
        while j < len(answers) and slots[j] == i:
            out.append(answers[j])
            j += 1
        if i < len(kept):
            out.append(kept[i])
    return out


def answer_turn(reply: ChatReply, reasoning_mode: str) -> dict:
    """The assistant turn stored for a reply, honouring the reasoning mode."""
    if reasoning_mode == "save":
        content, reasoning = split_reasoning(reply.content, reply.reasoning)
        turn = {"role": "assistant", "content": content}
        if reasoning:
            turn["reasoning_content"] = reasoning
        return turn
    return {"role": "assistant", "content": reply.content}
