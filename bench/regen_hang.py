"""Benchmark: the tail a hung server puts on a regeneration, without and with the idle timeout.

A loopback test server (its own process) accepts every request but never answers a fraction of them
(`--hang-rate`), as a wedged server or a lost request does. The same N single-turn rows are run
through the regeneration client (ChatClient + ServerPool, the job's own dispatch and retries) twice:

  old - no idle timeout: a hung request waits for the whole-request timeout (`--timeout-s`; 600 s
        by default in a real run, scaled down here so the bench takes a minute), then is retried;
  new - idle timeout `--idle-timeout-s`: a request that sent no byte for that long is retried.

Per-row latency is the time from a row's first send to its reply, retries included. Printed side by
side and saved to bench/results/regen_hang.json, with the whole `regenerate` job's wall time in each
mode on the same rows.

    .venv/bin/python bench/regen_hang.py [--rows 300] [--hang-rate 0.03] [--timeout-s 10] [--idle-timeout-s 1]
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
from specforge_core.regen.servers import SampleFailed, ServerPool  # noqa: E402


def start_server(tmp: Path, tag: str, *args: str) -> tuple[subprocess.Popen, str]:
    port_file = tmp / f"port-{tag}"
    proc = subprocess.Popen([sys.executable, "-m", "specforge_core.regen.testserver", "--port", "0",
                             "--port-file", str(port_file), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        if port_file.exists():
            return proc, f"127.0.0.1:{port_file.read_text().strip()}"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("test server did not start")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def run_rows(address: str, rows: int, concurrency: int, timeout_s: float, idle_s: float,
                   max_retries: int) -> dict:
    async with ChatClient(timeout_s=timeout_s, idle_timeout_s=idle_s) as client:
        pool = ServerPool(client, [address], concurrency, retire_after=10 ** 6)
        await pool.probe_all()
        params = SamplingParams(model="test-model", max_tokens=64)
        lat: list[float] = []
        failed = attempts_total = 0
        todo = list(range(rows))
        t0 = time.perf_counter()

        async def worker():
            nonlocal failed, attempts_total
            while todo:
                i = todo.pop()
                body = params.payload([{"role": "user", "content": f"question {i} about drafts"}])
                s = time.perf_counter()
                try:
                    _, _, att = await pool.chat(body, max_retries=max_retries, backoff_s=0)
                    attempts_total += att
                except SampleFailed as e:
                    failed += 1
                    attempts_total += e.attempts
                lat.append(time.perf_counter() - s)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        await pool.close()
    return {"rows": rows, "wall_s": round(wall, 2), "p50_s": round(pct(lat, 50), 3), "p99_s": round(pct(lat, 99), 3),
            "max_s": round(max(lat), 3), "rows_over_1s": sum(x > 1.0 for x in lat), "failed": failed,
            "retries": attempts_total - rows}


def job_wall(address: str, tmp: Path, rows: int, concurrency: int, timeout_s: float, idle_s: float,
             max_retries: int, tag: str) -> dict:
    inp = tmp / "in.jsonl"
    if not inp.exists():
        with open(inp, "w") as f:
            for i in range(rows):
                f.write(json.dumps({"id": f"r{i}", "conversations": [{"role": "user", "content": f"q {i}"}]}) + "\n")
    cfg = RegenConfig(input=[str(inp)], output=str(tmp / f"out-{tag}.jsonl"), server_address=[address],
                      concurrency=concurrency, max_tokens=64, timeout_s=timeout_s, idle_timeout_s=idle_s,
                      max_retries=max_retries, retry_backoff_s=0, retire_after=10 ** 6)
    t0 = time.perf_counter()
    res = regenerate(cfg, null_events())
    return {"wall_s": round(time.perf_counter() - t0, 2), "ok": res["ok"], "failed": res["failed"],
            "retries": res["retries"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--hang-rate", type=float, default=0.03)
    ap.add_argument("--delay-s", type=float, default=0.02, help="server time per reply (plus jitter of the same)")
    ap.add_argument("--timeout-s", type=float, default=10.0, help="whole-request timeout (600 in a real run)")
    ap.add_argument("--idle-timeout-s", type=float, default=1.0, help="the new idle timeout (60 in a real run)")
    ap.add_argument("--max-retries", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "regen_hang.json"))
    a = ap.parse_args()
    srv_args = ["--hang-rate", str(a.hang_rate), "--delay", str(a.delay_s), "--delay-jitter", str(a.delay_s),
                "--seed", str(a.seed)]
    modes = {"old": 0.0, "new": a.idle_timeout_s}
    result: dict = {"bench": "regen_hang", "rows": a.rows, "concurrency": a.concurrency, "hang_rate": a.hang_rate,
                    "timeout_s": a.timeout_s, "idle_timeout_s": a.idle_timeout_s, "max_retries": a.max_retries,
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for mode, idle in modes.items():
            # A fresh server per measurement with the same seed: the same requests hang in both modes.
            proc, addr = start_server(tmp, f"{mode}-rows", *srv_args)
            try:
                rows = asyncio.run(run_rows(addr, a.rows, a.concurrency, a.timeout_s, idle, a.max_retries))
            finally:
                proc.kill()
                proc.wait(10)
            proc, addr = start_server(tmp, f"{mode}-job", *srv_args)
            try:
                job = job_wall(addr, tmp, a.rows, a.concurrency, a.timeout_s, idle, a.max_retries, mode)
            finally:
                proc.kill()
                proc.wait(10)
            result[mode] = {"idle_timeout_s": idle, "rows": rows, "job": job}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    o, n = result["old"], result["new"]
    print(f"{a.rows} rows, concurrency {a.concurrency}, hang rate {a.hang_rate:g}, request timeout {a.timeout_s:g} s")
    print(f"{'':24}{'old (no idle timeout)':>24}{f'new (idle {a.idle_timeout_s:g} s)':>24}")
    for label, key in [("client wall (s)", "wall_s"), ("p50 per row (s)", "p50_s"), ("p99 per row (s)", "p99_s"),
                       ("max per row (s)", "max_s"), ("rows over 1 s", "rows_over_1s"), ("retries", "retries"),
                       ("failed rows", "failed")]:
        print(f"{label:24}{o['rows'][key]:>24}{n['rows'][key]:>24}")
    print(f"{'regenerate job wall (s)':24}{o['job']['wall_s']:>24}{n['job']['wall_s']:>24}")
    print(f"saved {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
