"""Async client for SGLang's native HTTP API: `/generate` and the acceptance numbers in its `meta_info`.

Field names follow SGLang's own source (`managers/tokenizer_manager.py`, `entrypoints/http_server.py`,
checked against sglang 0.5.23):

- `POST /generate` takes `{"text": str}` or `{"input_ids": [int]}` plus `sampling_params`
  (`max_new_tokens`, `temperature`, ...) and answers `{"text", "output_ids", "meta_info"}`.
  `meta_info` always has `id`, `finish_reason` (`{"type": "length", "length": n}` or
  `{"type": "stop", "matched": ...}`), `prompt_tokens`, `completion_tokens`, `cached_tokens` and, once
  finished, `e2e_latency`. With speculative decoding on it adds `spec_verify_ct` (target verify
  forward passes), `spec_accept_length` (= completion_tokens / spec_verify_ct, bonus token counted),
  `spec_accept_rate`, `spec_num_correct_drafts`, `spec_num_proposed_drafts` and
  `spec_correct_drafts_histogram` (older servers: only `spec_verify_ct`; some call the histogram
  `spec_accept_histogram`).
- `GET|POST /flush_cache` empties the radix cache (200, or 400 while requests are running).
- `GET /health`, `GET /get_server_info` (newer: `/server_info`, the old name still answers).

Chat prompts are rendered client-side with the target's chat template (`render_chat`) and sent as
`input_ids`, so the server sees exactly the tokens the draft was trained on. `/v1/chat/completions`
is available too (`chat`), but its reply carries no `meta_info`, so benchmarks use `/generate`.

Every failure becomes one `ServerError` whose message names the URL and what went wrong (HTTP
status and body, timeout, refused connection, a reply that is not SGLang's shape).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import aiohttp

from ..asyncutil import normalize_address

# meta_info keys we read beyond the basics; absent ones stay None.
SPEC_FIELDS = ("spec_verify_ct", "spec_accept_length", "spec_accept_rate", "spec_num_correct_drafts",
               "spec_num_proposed_drafts")
HISTOGRAM_FIELDS = ("spec_correct_drafts_histogram", "spec_accept_histogram")


class ServerError(Exception):
    """A request to the server failed; `kind` is http | timeout | connection | malformed."""

    def __init__(self, message: str, kind: str = "http", status: Optional[int] = None):
        super().__init__(message)
        self.kind = kind
        self.status = status


@dataclass
class GenerateResult:
    text: str
    output_ids: Optional[list[int]]
    prompt_tokens: Optional[int]
    completion_tokens: int
    finish_reason: Any
    latency_s: float                        # measured here, request sent -> reply read
    e2e_latency: Optional[float] = None     # as the server measured it
    cached_tokens: Optional[int] = None
    spec_verify_ct: Optional[int] = None
    spec_accept_length: Optional[float] = None
    spec_accept_rate: Optional[float] = None
    spec_num_correct_drafts: Optional[int] = None
    spec_num_proposed_drafts: Optional[int] = None
    histogram: Optional[list[int]] = None
    request_id: Optional[str] = None
    missing: list[str] = field(default_factory=list)  # spec fields the server did not send

    def to_dict(self) -> dict:
        return asdict(self)


def parse_generate_response(data: Any, url: str, latency_s: float) -> GenerateResult:
    """One `/generate` reply -> GenerateResult. A reply without `meta_info.completion_tokens` is an
    error (it is not SGLang's `/generate`); missing speculative fields are listed in `missing`."""
    if isinstance(data, list):
        if len(data) != 1:
            raise ServerError(f"{url}: expected one result, got a list of {len(data)}", "malformed")
        data = data[0]
    if not isinstance(data, dict):
        raise ServerError(f"{url}: reply is a {type(data).__name__}, expected an object with meta_info",
                          "malformed")
    if "error" in data and "meta_info" not in data:
        raise ServerError(f"{url}: server error: {data['error']}", "http")
    meta = data.get("meta_info")
    if not isinstance(meta, dict):
        raise ServerError(f"{url}: reply has no meta_info (keys: {sorted(data)[:8]}); is this SGLang's native "
                          "/generate?", "malformed")
    ct = meta.get("completion_tokens")
    if not isinstance(ct, int) or isinstance(ct, bool):
        raise ServerError(f"{url}: meta_info has no integer completion_tokens (keys: {sorted(meta)[:12]})",
                          "malformed")
    fr = meta.get("finish_reason")
    if isinstance(fr, dict) and fr.get("type") == "abort":
        raise ServerError(f"{url}: request aborted by the server: {fr.get('message')}", "http", fr.get("status_code"))
    res = GenerateResult(text=data.get("text") or "", output_ids=data.get("output_ids"),
                         prompt_tokens=meta.get("prompt_tokens"), completion_tokens=ct, finish_reason=fr,
                         latency_s=latency_s, e2e_latency=meta.get("e2e_latency"),
                         cached_tokens=meta.get("cached_tokens"), request_id=meta.get("id"))
    for k in SPEC_FIELDS:
        v = meta.get(k)
        if v is None:
            res.missing.append(k)
        setattr(res, k, v)
    for k in HISTOGRAM_FIELDS:
        if isinstance(meta.get(k), list):
            res.histogram = [int(x) for x in meta[k]]
            break
    if res.spec_verify_ct is not None and (not isinstance(res.spec_verify_ct, int) or res.spec_verify_ct < 0):
        raise ServerError(f"{url}: meta_info.spec_verify_ct is {res.spec_verify_ct!r}, expected a count", "malformed")
    return res


def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template, with the assistant header open."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template; "
                         "use prompt_format=raw or a tokenizer with one")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already holds any BOS it wants; adding special tokens again would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class SGLangClient:
    """One aiohttp session to one server. Use as `async with SGLangClient(url) as c: ...`."""

    def __init__(self, url: str, timeout_s: float = 600.0, connect_timeout_s: float = 10.0,
                 api_key: Optional[str] = None):
        self.url = normalize_address(url)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: Optional[aiohttp.ClientSession] = None

    async def __aenter__(self) -> "SGLangClient":
        self._session = aiohttp.ClientSession(
            headers=self.headers,
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_timeout_s))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("SGLangClient used outside `async with`")
        return self._session

    async def _request(self, method: str, path: str, json_body: Any = None,
                       timeout_s: Optional[float] = None) -> tuple[int, bytes]:
        url = self.url + path
        kw: dict[str, Any] = {}
        if json_body is not None:
            kw["json"] = json_body
        if timeout_s is not None:
            kw["timeout"] = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.connect_timeout_s)
        t = timeout_s if timeout_s is not None else self.timeout_s
        try:
            async with self.session.request(method, url, **kw) as r:
                return r.status, await r.read()
        except asyncio.TimeoutError:
            raise ServerError(f"{url}: no reply within {t:g}s (server hung or overloaded; raise --timeout if "
                              "generations are long)", "timeout") from None
        except aiohttp.ClientConnectorError as e:
            raise ServerError(f"{url}: cannot connect ({e.os_error or e}); is the server running?",
                              "connection") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as e:
            raise ServerError(f"{url}: connection dropped ({type(e).__name__}: {e})", "connection") from None
        except aiohttp.ClientError as e:
            raise ServerError(f"{url}: request failed ({type(e).__name__}: {e})", "connection") from None

    @staticmethod
    def _http_error(url: str, status: int, body: bytes) -> ServerError:
        text = body.decode("utf-8", "replace").strip()
        try:
            j = json.loads(text)
            err = j.get("error", j) if isinstance(j, dict) else j
            if isinstance(err, dict):
                text = str(err.get("message", err))
            else:
                text = str(err)
        except ValueError:
            pass
        return ServerError(f"{url}: HTTP {status}: {text[:500] or '(empty body)'}", "http", status)

    # -- endpoints -----------------------------------------------------------------------------
    async def health(self, timeout_s: float = 5.0) -> bool:
        try:
            status, _ = await self._request("GET", "/health", timeout_s=timeout_s)
        except ServerError:
            return False
        return status == 200

    async def server_info(self) -> dict:
        """`/get_server_info` (the name every SGLang version answers); {} when the server lacks it."""
        for path in ("/get_server_info", "/server_info"):
            status, body = await self._request("GET", path, timeout_s=30.0)
            if status == 200:
                try:
                    data = json.loads(body)
                except ValueError:
                    return {}
                return data if isinstance(data, dict) else {}
            if status != 404:
                raise self._http_error(self.url + path, status, body)
        return {}

    async def flush_cache(self, retries: int = 10, wait_s: float = 0.5) -> None:
        """Empty the prefix cache, so each run starts cold (SGLang refuses while requests run: retry)."""
        url = self.url + "/flush_cache"
        for _ in range(retries):
            status, body = await self._request("POST", "/flush_cache", timeout_s=60.0)
            if status == 200:
                return
            if status == 404:
                raise ServerError(f"{url}: HTTP 404; this server has no /flush_cache (not SGLang?)", "http", 404)
            await asyncio.sleep(wait_s)
        raise self._http_error(url, status, body)

    async def generate(self, *, text: Optional[str] = None, input_ids: Optional[list[int]] = None,
                       max_new_tokens: int = 256, temperature: float = 0.0,
                       sampling_params: Optional[dict] = None, timeout_s: Optional[float] = None) -> GenerateResult:
        if (text is None) == (input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        sp = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature)}
        sp.update(sampling_params or {})
        body: dict[str, Any] = {"sampling_params": sp, "stream": False}
        if text is not None:
            body["text"] = text
        else:
            body["input_ids"] = list(input_ids)
        url = self.url + "/generate"
        t0 = time.perf_counter()
        status, raw = await self._request("POST", "/generate", body, timeout_s=timeout_s)
        latency = time.perf_counter() - t0
        if status != 200:
            raise self._http_error(url, status, raw)
        try:
            data = json.loads(raw)
        except ValueError:
            raise ServerError(f"{url}: reply is not JSON: {raw[:200]!r}", "malformed") from None
        return parse_generate_response(data, url, latency)

    async def chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0,
                   model: Optional[str] = None) -> dict:
        """`/v1/chat/completions` (OpenAI shape; no meta_info, so no acceptance numbers)."""
        body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if model:
            body["model"] = model
        url = self.url + "/v1/chat/completions"
        status, raw = await self._request("POST", "/v1/chat/completions", body)
        if status != 200:
            raise self._http_error(url, status, raw)
        try:
            return json.loads(raw)
        except ValueError:
            raise ServerError(f"{url}: reply is not JSON: {raw[:200]!r}", "malformed") from None

    async def wait_healthy(self, timeout_s: float, interval_s: float = 1.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.health(timeout_s=min(5.0, max(0.5, deadline - time.monotonic()))):
                return True
            await asyncio.sleep(interval_s)
        return False
