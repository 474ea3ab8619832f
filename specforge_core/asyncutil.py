"""Running the engine's asyncio clients from any caller, including one already inside an event loop.

Jobs are plain functions; the regeneration and benchmark clients are asyncio inside. `asyncio.run`
refuses to start under a running loop (Jupyter, a Gradio handler), so `run_sync` runs the coroutine
on a fresh loop in a worker thread there, and propagates its result or exception.

Also the address spelling that the regeneration and benchmark clients share (`normalize_address`),
and `ServerThread`, which runs the project's loopback servers for tests, notebooks and benches.
"""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any, Coroutine


def run_sync(coro: Coroutine) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def worker():
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=worker, name="specforge-async", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def normalize_address(addr: str) -> str:
    """`host:port`, `http://host:port/` or `host:port/v1` -> `http://host:port` (no trailing /v1)."""
    a = addr.strip().rstrip("/")
    if not a:
        raise ValueError("empty server address")
    if not re.match(r"^https?://", a):
        a = "http://" + a
    if a.endswith("/v1"):
        a = a[:-3]
    return a


async def serve_app(app, host: str = "127.0.0.1", port: int = 0, backlog: int = 128):
    """Start an aiohttp `app` on host:port (0 = a free port); returns (runner, site, bound port). The
    socket is bound here, not by aiohttp, so the caller learns the port before anything connects."""
    import socket

    from aiohttp import web

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=backlog)
    await site.start()
    return runner, site, sock.getsockname()[1]


class ServerThread:
    """An asyncio server (anything with `async start(host, port) -> port` and `async stop()`) on its own
    event loop in a daemon thread: how tests, notebooks and benches run the project's loopback servers."""

    what = "server"

    def __init__(self, server: Any, host: str = "127.0.0.1", port: int = 0):
        self.server = server
        self.host, self._port = host, port
        self.port: int | None = None
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.port = self.loop.run_until_complete(self.server.start(self.host, self._port))
        except BaseException as e:  # noqa: BLE001 - reported to the starting thread
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.stop())
        self.loop.close()

    def start(self):
        self._thread.start()
        if not self._ready.wait(30) or self._error:
            raise RuntimeError(f"{self.what} did not start: {self._error}")
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
