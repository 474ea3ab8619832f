"""Running the engine's asyncio clients from any caller, including one already inside an event loop.

Jobs are plain functions; the regeneration and benchmark clients are asyncio inside. `asyncio.run`
refuses to start under a running loop (Jupyter, a Gradio handler), so `run_sync` runs the coroutine
on a fresh loop in a worker thread there, and propagates its result or exception.
"""

from __future__ import annotations

import asyncio
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
