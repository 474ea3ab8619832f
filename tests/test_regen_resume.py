"""Exactly-once resume: `specforge-wb regenerate` SIGKILLed at random moments, then `--resume`d.

After every kill the output files must hold only whole JSON lines (bar a torn tail, which resume
repairs), and at the end the union of out.jsonl and out.errors.jsonl must hold every input id
exactly once, with every row's answers matching the loopback server's scripted replies.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specforge_core.regen.testserver import scripted_reply

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 400


def _start_server(tmp: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port_file = tmp / f"port{len(list(tmp.glob('port*')))}"
    proc = subprocess.Popen([sys.executable, "-m", "specforge_core.regen.testserver", "--port", "0",
                             "--port-file", str(port_file), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        if port_file.exists():
            return proc, f"127.0.0.1:{port_file.read_text().strip()}"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("test server did not start")


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True) if path.exists() else []


def _check_whole_lines(path: Path) -> list[dict]:
    """Every complete line is JSON with an id; only the very last one may be torn."""
    lines = _lines(path)
    out = []
    for i, raw in enumerate(lines):
        if not raw.endswith(b"\n"):
            assert i == len(lines) - 1, f"{path}: a torn line in the middle (line {i + 1})"
            continue
        obj = json.loads(raw)
        assert isinstance(obj["id"], str)
        out.append(obj)
    return out


def test_sigkill_at_random_moments_then_resume_is_exactly_once(tmp_path):
    rng = random.Random(1234)
    inp = tmp_path / "in.jsonl"
    ids = []
    with open(inp, "w") as f:
        for i in range(N_ROWS):
            turns = 1 + i % 3
            conv = []
            for t in range(turns):
                conv += [{"role": "user", "content": f"q{i}.{t}"}, {"role": "assistant", "content": "old"}]
            f.write(json.dumps({"id": f"id-{i}", "conversations": conv}) + "\n")
            ids.append(f"id-{i}")
    out, err = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    # Two servers with latency and faults, so a run lasts long enough to be killed mid-flight and
    # both files are written; a few rows fail for good (max-retries 1 with 25 % failures).
    srv_a, addr_a = _start_server(tmp_path, "--delay", "0.01", "--delay-jitter", "0.03",
                                  "--fail-rate", "0.25", "--drop-rate", "0.03", "--seed", "1")
    srv_b, addr_b = _start_server(tmp_path, "--delay", "0.01", "--delay-jitter", "0.03",
                                  "--malformed-rate", "0.05", "--seed", "2")
    cmd = [sys.executable, "-m", "specforge_core", "regenerate", "--quiet", "--input", str(inp),
           "--output", str(out), "--server-address", addr_a, addr_b, "--concurrency", "8",
           "--max-retries", "1", "--retry-backoff-s", "0", "--retire-after", "1000", "--resume"]
    kills = 0
    try:
        for attempt in range(6):
            before = len(_check_whole_lines(out)) + len(_check_whole_lines(err))
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            # Kill once this run has written something (or after a seeded random delay).
            deadline = time.monotonic() + rng.uniform(0.2, 1.5) + 1.5  # CLI start-up is ~1.5 s
            target = before + rng.randint(5, 60)
            while proc.poll() is None and time.monotonic() < deadline:
                if len(_lines(out)) + len(_lines(err)) >= target:
                    break
                time.sleep(0.005)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait(30)
            _check_whole_lines(out)
            _check_whole_lines(err)
            if attempt == 2:
                # What a machine crash can leave: a torn last line. Resume must cut it off.
                with open(out, "ab") as f:
                    f.write(b'{"id": "id-0", "conversations": [{"role"')
        assert kills >= 3, "the run finished before it could be killed; make it slower"
        final = subprocess.run(cmd + ["--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stderr[-2000:]
        summary = json.loads(final.stdout.strip().splitlines()[-1])
        assert summary["exit_code"] == 0
    finally:
        for p in (srv_a, srv_b):
            p.kill()
            p.wait(10)

    rows, errs = _check_whole_lines(out), _check_whole_lines(err)
    assert out.read_bytes().endswith(b"\n")
    union = [r["id"] for r in rows] + [e["id"] for e in errs]
    assert len(union) == len(set(union)), "an id was written twice"
    assert sorted(union) == sorted(ids), "an id is missing"
    assert errs, "the fault rate should make some rows fail for good"
    assert all(e["attempts"] == 2 and e["server"] for e in errs)
    for r in rows:
        conv = r["conversations"]
        assert sum(t["role"] == "assistant" for t in conv) == 1 + int(r["id"].split("-")[1]) % 3
        for i, t in enumerate(conv):
            if t["role"] == "assistant":
                assert t["content"] == scripted_reply(conv[:i])
