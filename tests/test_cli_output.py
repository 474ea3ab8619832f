"""Machine-readable output stays machine-readable (issue 16): with `--json`, or a job writing JSON lines
(`--format json`), every stdout line of every command parses as JSON; readable text goes to stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specforge_core.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.unit


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specforge_core", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def json_lines(out: str) -> list:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def write_chats(p: Path) -> Path:
    p.write_text(json.dumps({"id": "a", "conversations": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello there"}]}) + "\n")
    return p


def test_inspect_mask_format_json_prints_json_lines_only(tmp_path):
    r = run("inspect-mask", "--input", str(write_chats(tmp_path / "c.jsonl")), "--tokenizer", "default",
            "--chat-template", "chatml", "--format", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json_lines(r.stdout)                      # the old summary lines (`samples: 1`) made this raise
    assert len(rows) == 1 and rows[0]["id"] == "a"
    assert "samples" in r.stderr                     # the readable summary is still shown, on stderr


def test_inspect_mask_json_and_text_view(tmp_path):
    r = run("inspect-mask", "--input", str(write_chats(tmp_path / "c.jsonl")), "--tokenizer", "default",
            "--chat-template", "chatml", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (summary,) = json_lines(r.stdout)                # the coloured token view went to stderr
    assert summary["samples"] == 1


# One cheap invocation of every command with --json; failing ones included (their stdout must be empty).
CHEAP = {
    "prepare-data": lambda t: ["--input", str(write_chats(t / "c.jsonl")), "--output", str(t / "data")],
    "inspect-mask": lambda t: ["--input", str(write_chats(t / "c.jsonl")), "--tokenizer", "default",
                               "--chat-template", "chatml"],
    "build-cache": lambda t: ["--data", str(t / "missing.jsonl")],
    "train": lambda t: ["--train-data", str(t / "missing.jsonl"), "--output-dir", str(t / "run")],
    "export": lambda t: [str(t / "no-run"), "--output", str(t / "out")],
    "check-draft": lambda t: [str(t / "no-draft")],
    "regenerate": lambda t: ["--input", str(t / "missing.jsonl"), "--output", str(t / "o.jsonl"),
                             "--server-address", "127.0.0.1:9"],
    "dump-hidden-states": lambda t: ["--train-data", str(t / "missing.jsonl"), "--output", str(t / "hs")],
    "estimate-dump": lambda t: ["--train-data", str(t / "missing.jsonl"), "--output", str(t / "hs")],
    "evaluate": lambda t: ["--draft", str(t / "no-draft"), "--prompts", str(t / "missing.jsonl")],
    "bench": lambda t: ["--server", "http://127.0.0.1:9", "--benchmark", f"mtbench:2={t / 'missing.jsonl'}",
                        "--output", str(t / "b.json")],
    "serve-reference": lambda t: ["--draft", str(t / "no-draft"), "--port", "1"],
    "jobs": lambda t: ["list", "--workspace", str(t / "ws")],
    "recipe": lambda t: ["list"],
}


@pytest.mark.parametrize("name", [c.name for c in COMMANDS])
def test_every_command_json_stdout_parses(tmp_path, name):
    assert name in CHEAP, f"add a cheap invocation of {name!r} to this test"
    r = run(name, *CHEAP[name](tmp_path), "--json", cwd=tmp_path)
    json_lines(r.stdout)   # raises on any non-JSON line
    if r.returncode == 0:
        assert r.stdout.strip(), f"{name} --json succeeded but printed nothing on stdout"
