"""Issue 16 items 6 and 9: a resume with an output-changing config is refused (`out.run.json`), and a
second run on an output that another run is writing exits at once naming the writer's pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specforge_core.config import ConfigError
from specforge_core.events import null_events
from specforge_core.regen.config import RegenConfig
from specforge_core.regen.job import regenerate
from specforge_core.regen.testserver import Faults, ServerThread

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path, n: int) -> list[str]:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "conversations": [{"role": "user", "content": f"q{i}"}]}) + "\n")
    return [f"r{i}" for i in range(n)]


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _cfg(tmp_path: Path, servers: list, **kw) -> RegenConfig:
    base = dict(input=[str(tmp_path / "in.jsonl")], output=str(tmp_path / "out.jsonl"),
                server_address=[s if isinstance(s, str) else s.address for s in servers], concurrency=4,
                retry_backoff_s=0.0, timeout_s=10.0, connect_timeout_s=2.0, max_tokens=64)
    base.update(kw)
    return RegenConfig(**base)


# ------------------------------------------------------------------------------------------------
# item 6: the run's config beside its output
# ------------------------------------------------------------------------------------------------
def test_run_json_is_written_beside_the_output_keyed_by_its_name(tmp_path):
    _rows(tmp_path / "in.jsonl", 3)
    with ServerThread() as srv:
        regenerate(_cfg(tmp_path, [srv], api_key="sekret", temperature=0.3), null_events())
        regenerate(_cfg(tmp_path, [srv], output=str(tmp_path / "other.jsonl")), null_events())
    rec = json.loads((tmp_path / "out.run.json").read_text())
    assert rec["kind"] == "regenerate" and rec["format_version"] >= 1 and rec["model"] == "test-model"
    assert rec["config"]["temperature"] == 0.3 and rec["config"]["api_key"] is None
    assert rec["config"]["input"] == [str((tmp_path / "in.jsonl").resolve())]
    assert json.loads((tmp_path / "other.run.json").read_text())["config"]["temperature"] == 0.7
    # It reads back as a config (`--config out.run.json`) for a plain run.
    from specforge_core.config import load_config_file
    assert RegenConfig(**load_config_file(tmp_path / "out.run.json")).temperature == 0.3


@pytest.mark.parametrize("change,field", [
    ({"num_samples": 2}, "num_samples"),
    ({"temperature": 0.0}, "temperature"),
    ({"max_tokens": 8}, "max_tokens"),
    ({"system_prompt": "be verbose"}, "system_prompt"),
    ({"model": "other-model"}, "model"),
])
def test_resume_with_an_output_changing_field_is_refused_then_forced(tmp_path, change, field):
    ids = _rows(tmp_path / "in.jsonl", 6)
    with ServerThread() as srv:
        regenerate(_cfg(tmp_path, [srv], max_rows=3), null_events())
        before = (tmp_path / "out.jsonl").read_bytes()
        with pytest.raises(ConfigError) as e:
            regenerate(_cfg(tmp_path, [srv], resume=True, **change), null_events())
        msg = str(e.value)
        assert f"  {field}: " in msg and "--force" in msg and "out.run.json" in msg
        assert (tmp_path / "out.jsonl").read_bytes() == before, "nothing was written"
        if field != "model":  # the test server serves one model: forcing another one fails each request
            res = regenerate(_cfg(tmp_path, [srv], resume=True, force=True, **change), null_events())
            assert res["exit_code"] == 0
            rec = json.loads((tmp_path / "out.run.json").read_text())
            assert field in rec["forced"][0]["fields"]
            assert rec["config"][field] == change[field]
    if field == "num_samples":
        assert len(_read(tmp_path / "out.jsonl")) == 3 + 2 * len(ids)  # ids changed: the mix --force accepted


def test_served_model_change_is_refused_even_without_model_flag(tmp_path):
    _rows(tmp_path / "in.jsonl", 4)
    with ServerThread(model_name="model-a") as a:
        regenerate(_cfg(tmp_path, [a], max_rows=2), null_events())
    with ServerThread(model_name="model-b") as b:
        with pytest.raises(ConfigError, match=r"model: 'model-a' \(earlier run\) -> 'model-b' \(now\)"):
            regenerate(_cfg(tmp_path, [b], resume=True), null_events())
        assert b.server.stats.requests == 0, "refused before any request"
    assert len(_read(tmp_path / "out.jsonl")) == 2


def test_operational_fields_do_not_block_a_resume(tmp_path):
    ids = _rows(tmp_path / "in.jsonl", 8)
    with ServerThread() as a:
        regenerate(_cfg(tmp_path, [a], max_rows=4, concurrency=2, timeout_s=10, seed=1), null_events())
    with ServerThread() as b:  # another address, another concurrency, timeouts, retries, rows, seed
        res = regenerate(_cfg(tmp_path, [b], resume=True, concurrency=8, timeout_s=20, idle_timeout_s=5,
                              max_retries=1, retire_after=9, reprobe_s=0, seed=2, max_rows=8,
                              input=[os.path.relpath(tmp_path / "in.jsonl")]), null_events())
    assert res["already_done"] == 4 and res["ok"] == 4
    assert sorted(r["id"] for r in _read(tmp_path / "out.jsonl")) == sorted(ids)


def test_overwrite_replaces_the_record_and_old_outputs_warn(tmp_path):
    _rows(tmp_path / "in.jsonl", 3)
    with ServerThread() as srv:
        regenerate(_cfg(tmp_path, [srv]), null_events())
        res = regenerate(_cfg(tmp_path, [srv], overwrite=True, temperature=0.1), null_events())
        assert res["ok"] == 3 and json.loads((tmp_path / "out.run.json").read_text())["config"]["temperature"] == 0.1
        (tmp_path / "out.run.json").unlink()  # an output written before run records existed
        ev = null_events()
        regenerate(_cfg(tmp_path, [srv], resume=True, temperature=0.9), ev)
        assert any("cannot check" in r.get("message", "") for r in ev.records)
        assert (tmp_path / "out.run.json").exists()
    with pytest.raises(ValueError, match="--force only"):
        _cfg(tmp_path, [srv], force=True)


# ------------------------------------------------------------------------------------------------
# item 9: one writer per output
# ------------------------------------------------------------------------------------------------
RUNNER = """
import sys
from specforge_core.events import null_events
from specforge_core.regen.config import RegenConfig
from specforge_core.regen.job import regenerate
regenerate(RegenConfig(input=[sys.argv[1]], output=sys.argv[2], server_address=[sys.argv[3]], concurrency=1, max_tokens=64,
                       resume=True), null_events())
"""


def test_a_second_run_on_a_busy_output_exits_at_once_naming_the_pid(tmp_path):
    ids = _rows(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out.jsonl"
    with ServerThread(faults=Faults(delay_s=0.05)) as srv:
        # The first run: a process of its own (the CLI's start-up is too slow for a test of seconds).
        first = subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path / "in.jsonl"), str(out), srv.address],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while len(_read(out)) < 2 and time.monotonic() < deadline:  # it is writing
                time.sleep(0.02)
            assert first.poll() is None
            writing = len(_read(out))
            for kw in ({"resume": True}, {"overwrite": True}, {}):
                t0 = time.monotonic()
                with pytest.raises(ConfigError) as e:
                    regenerate(_cfg(tmp_path, [srv], **kw), null_events())
                assert time.monotonic() - t0 < 2, "refused at once"
                msg = str(e.value)
                assert f"pid {first.pid}" in msg and f"kill {first.pid}" in msg and "jobs cancel" in msg
            assert len(_read(out)) >= writing, "the refused runs truncated nothing"
            os.kill(first.pid, signal.SIGKILL)  # the lock dies with it
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait(10)
        res = regenerate(_cfg(tmp_path, [srv], resume=True, concurrency=16), null_events())
    rows = [r["id"] for r in _read(out)]
    assert len(rows) == len(set(rows)) and sorted(rows) == sorted(ids), "every id exactly once"
    assert res["already_done"] > 0
