"""`inspect-mask` on the command line: coloured text, JSON for scripts, clear errors."""

from __future__ import annotations

import json

import pytest

from specforge_core.cli import main
from specforge_core.data.inspect import GREEN, RED, mask_summary, render_ansi, token_view
from specforge_core.data.mask import mask

pytestmark = pytest.mark.unit

ROWS = [
    {"id": "a", "conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "It is 4."}]},
    {"id": "b", "conversations": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello."}]},
]


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n{broken\n", encoding="utf-8")
    return p


def test_cli_text_colours(data, capsys, smol_tokenizer):
    assert main(["inspect-mask", "--input", str(data), "--chat-template", "chatml", "--index", "0", "1",
                 "--color", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{GREEN}It{chr(27)}" in out and f"{GREEN} is{chr(27)}" in out   # assistant words trained
    assert f"{RED}What{chr(27)}" in out                                       # user words masked
    assert "row 1 (id b)" in out and "trained" in out


def test_cli_json(data, capsys, llama3_tokenizer):
    assert main(["inspect-mask", "--input", str(data), "--tokenizer", "llama3", "--chat-template", "llama3",
                 "--format", "json", "--index", "1", "--quiet"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    obj = lines[0]
    assert obj["id"] == "b" and obj["input_ids"][0] == 128000
    assert len(obj["input_ids"]) == len(obj["loss_mask"]) == len(obj["tokens"])
    trained = "".join(t for t, m in zip(obj["tokens"], obj["loss_mask"]) if m)
    assert trained == "Hello.<|eot_id|>"


def test_cli_errors(data, capsys):
    assert main(["inspect-mask", "--input", str(data), "--index", "5", "--quiet"]) == 1
    assert "no row at index [5]" in capsys.readouterr().err
    assert main(["inspect-mask", "--input", str(data), "--chat-template", "nope", "--quiet"]) == 1
    assert "unknown chat template 'nope'" in capsys.readouterr().err
    assert main(["inspect-mask", "--input", str(data.parent / "missing.jsonl"), "--quiet"]) == 1
    assert "missing.jsonl" in capsys.readouterr().err


def test_views(smol_tokenizer):
    ms = mask(ROWS[1] | {"conversations": [{"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "Hello."}]}, smol_tokenizer, "chatml")
    view = token_view(ms)
    assert "".join(v["token"] for v in view) == ms.text
    s = mask_summary(ms)
    assert s["tokens"] == len(view) and s["trained"] == sum(v["trained"] for v in view) == 3
    plain = render_ansi(ms, color=False)
    assert "[Hello][.][<|im_end|>]" in plain
