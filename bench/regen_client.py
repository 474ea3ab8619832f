"""Benchmark: requests/s the regeneration client sustains against a zero-latency local server.

The point is that the client must never be the bottleneck of a regeneration run (target: >= 2,000
req/s at concurrency 256 on a 2-core machine). The server is the project's loopback test server in
its own process (scripted replies, no model). Because client and server share the machine, the
achieved rate is bounded by whichever side is slower, so CPU time is measured on both sides:
`client_ceiling_rps` = requests / client CPU seconds and `server_ceiling_rps` = requests / server
CPU seconds say which side limits, and what the client could do against a faster server.

Two measurements:
  raw  - ChatClient + ServerPool (dispatch, retries machinery, response parsing), no files;
  job  - the whole `regenerate` job on single-turn rows (reading, planning, writing out.jsonl).

    .venv/bin/python bench/regen_client.py [--requests 20000] [--concurrency 256]

Writes bench/results/regen_client.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specforge_core.events import null_events  # noqa: E402
from specforge_core.regen.client import ChatClient, SamplingParams  # noqa: E402
from specforge_core.regen.config import RegenConfig  # noqa: E402
from specforge_core.regen.job import regenerate  # noqa: E402
from specforge_core.regen.servers import ServerPool  # noqa: E402


def start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    port_file = tmp / "port"
    proc = subprocess.Popen([sys.executable, "-m", "specforge_core.regen.testserver", "--port", "0",
                             "--port-file", str(port_file)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(400):
        if port_file.exists():
            return proc, f"127.0.0.1:{port_file.read_text().strip()}"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


async def server_cpu(client: ChatClient, url: str) -> tuple[float, int]:
    status, data = await client.get_json(url + "/stats")
    return float(data["cpu_s"]), int(data["requests"])


async def raw_bench(address: str, n: int, concurrency: int) -> dict:
    async with ChatClient(timeout_s=60) as client:
        pool = ServerPool(client, [address], concurrency)
        await pool.probe_all()
        url = pool.servers[0].address
        params = SamplingParams(model="test-model", max_tokens=64)
        body = params.payload([{"role": "system", "content": "You are brief."},
                               {"role": "user", "content": "Say something about speculative decoding."}])
        # Warm up connections and code paths.
        await asyncio.gather(*(pool.chat(body) for _ in range(concurrency)))
        s_cpu0, s_req0 = await server_cpu(client, url)
        c_cpu0, t0 = time.process_time(), time.perf_counter()
        remaining = n

        async def worker():
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await pool.chat(body, max_retries=0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, c_cpu = time.perf_counter() - t0, time.process_time() - c_cpu0
        s_cpu1, s_req1 = await server_cpu(client, url)
        await pool.close()
    done = n
    return {"requests": done, "wall_s": round(wall, 3), "requests_per_s": round(done / wall, 1),
            "client_cpu_s": round(c_cpu, 3), "client_cpu_us_per_request": round(1e6 * c_cpu / done, 1),
            "client_ceiling_rps": round(done / c_cpu, 1) if c_cpu > 0 else None,
            "server_cpu_s": round(s_cpu1 - s_cpu0, 3),
            "server_ceiling_rps": round(done / (s_cpu1 - s_cpu0), 1) if s_cpu1 > s_cpu0 else None}


def job_bench(address: str, n: int, concurrency: int, tmp: Path) -> dict:
    inp = tmp / "in.jsonl"
    with open(inp, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "conversations": [
                {"role": "user", "content": f"question number {i} about drafts"},
                {"role": "assistant", "content": "old answer"}]}) + "\n")
    cfg = RegenConfig(input=[str(inp)], output=str(tmp / "out.jsonl"), server_address=[address],
                      concurrency=concurrency, max_tokens=64, overwrite=True)
    c0, t0 = time.process_time(), time.perf_counter()
    res = regenerate(cfg, null_events())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert res["ok"] == n, res
    return {"rows": n, "wall_s": round(wall, 3), "requests_per_s": round(res["requests"] / wall, 1),
            "client_cpu_s": round(cpu, 3), "client_ceiling_rps": round(res["requests"] / cpu, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--job-rows", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "regen_client.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        proc, address = start_server(tmp)
        try:
            raw = asyncio.run(raw_bench(address, a.requests, a.concurrency))
            job = job_bench(address, a.job_rows, a.concurrency, tmp)
        finally:
            proc.kill()
            proc.wait(10)
    result = {"bench": "regen_client", "concurrency": a.concurrency, "target_rps": 2000,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "raw": raw, "job": job,
              "note": "client and server share the machine; *_ceiling_rps = requests / that side's CPU seconds"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = raw["requests_per_s"] >= 2000
    print(f"raw client: {raw['requests_per_s']:.0f} req/s at concurrency {a.concurrency} "
          f"({'meets' if ok else 'below'} the 2,000 req/s target); client ceiling {raw['client_ceiling_rps']} req/s, "
          f"server ceiling {raw['server_ceiling_rps']} req/s; full job {job['requests_per_s']:.0f} req/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
