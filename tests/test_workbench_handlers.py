"""Workbench without a browser: the Loss-mask tab's handlers as plain functions, the app and the demo
building without launching, and the security policy (bind rules, workspace path jail).

Unit tests use a tiny ChatML byte-level BPE tokenizer trained on the spot and saved *inside the
workspace*, so they also exercise the "local tokenizer directory" path; integration tests use the
real SmolLM2 and Llama-3 tokenizers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from workbench.security import (PathOutsideWorkspace, SecurityError, check_bind_policy, is_loopback, parse_auth,
                                resolve_in_workspace)
from workbench.tabs import mask_tab as mt

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONV = {
    "id": "t1",
    "conversations": [
        {"role": "system", "content": "You answer about zebras."},
        {"role": "user", "content": "Where do zebras live?"},
        {"role": "assistant", "content": "Zebras live on the savanna."},
        {"role": "user", "content": "What do they eat?"},
        {"role": "assistant", "content": "They eat grass mostly."},
    ],
}


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
class _TokParser(HTMLParser):
    """Collect (text, state, title) for every <span class="tok ..."> inside the token view."""

    def __init__(self):
        super().__init__()
        self.tokens: list[dict] = []
        self._stack: list[dict | None] = []
        self._in_view = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and "tok-view" in (a.get("class") or ""):
            self._in_view = True
        if tag == "span" and self._in_view and (a.get("class") or "").startswith("tok "):
            rec = {"text": "", "state": a["class"].split()[1], "title": a.get("title", ""), "id": a.get("data-id")}
            self.tokens.append(rec)
            self._stack.append(rec)
        elif tag == "span":
            self._stack.append(None)

    def handle_endtag(self, tag):
        if tag == "span" and self._stack:
            self._stack.pop()

    def handle_data(self, data):
        for rec in reversed(self._stack):
            if rec is not None:
                rec["text"] += data
                break


def parse_tokens(html_text: str) -> list[dict]:
    p = _TokParser()
    p.feed(html_text)
    return p.tokens


def text_of(tokens: list[dict], state: str) -> str:
    return "".join(t["text"] for t in tokens if t["state"] == state)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A workspace holding a tiny ChatML tokenizer (tok/) and a data file (data/rows.jsonl)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    ws = tmp_path_factory.mktemp("ws")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [t["content"] for t in CONV["conversations"]] * 5 + ["system user assistant hello world"]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(ws / "tok")
    (ws / "data").mkdir()
    rows = ['{"id": "r0", "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}',
            "",  # blank lines are not rows
            "{not json",  # a bad row is skipped, not counted
            json.dumps(CONV)]
    (ws / "data" / "rows.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return ws


def run(ws: Path, pasted=None, template="auto", tokenizer="tok", max_length=2048, last=False,
        source=mt.SOURCE_PASTE, file_path="", index=0, **kw):
    return mt.run_mask(source, json.dumps(CONV) if pasted is None else pasted, file_path, index, tokenizer, template,
                       max_length, last, workspace=ws, **kw)


# ------------------------------------------------------------------------------------------------
# Security
# ------------------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("host,expected", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.com", False),
])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


@pytest.mark.unit
def test_bind_policy():
    assert check_bind_policy("127.0.0.1") is None
    with pytest.raises(SecurityError, match="--auth"):
        check_bind_policy("0.0.0.0")
    with pytest.raises(SecurityError, match="gradio.live"):
        check_bind_policy("127.0.0.1", share=True)
    assert check_bind_policy("0.0.0.0", auth="ann:s3cr:et") == ("ann", "s3cr:et")
    assert check_bind_policy("0.0.0.0", allow_unauthenticated_remote=True) is None
    for bad in ("nopassword", ":pw", "user:"):
        with pytest.raises(SecurityError, match="user:password"):
            parse_auth(bad)


@pytest.mark.unit
def test_main_refuses_remote_without_auth(capsys):
    from workbench.__main__ import main

    assert main(["--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "refusing to start" in err and "--auth" in err and "--allow-unauthenticated-remote" in err


@pytest.mark.unit
def test_resolve_in_workspace(tmp_path):
    root = tmp_path / "ws"
    (root / "data").mkdir(parents=True)
    (root / "data" / "a.jsonl").write_text("{}\n")
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    assert resolve_in_workspace(root, "data/a.jsonl") == (root / "data" / "a.jsonl").resolve()
    assert resolve_in_workspace(root, str(root / "data" / "a.jsonl")) == (root / "data" / "a.jsonl").resolve()
    assert resolve_in_workspace(root, "data/new.jsonl").parent == (root / "data").resolve()  # need not exist
    assert resolve_in_workspace(root, "data/../data/a.jsonl") == (root / "data" / "a.jsonl").resolve()
    for bad in ("../secret.txt", "data/../../secret.txt", str(outside), "/etc/passwd", "~/x", ""):
        with pytest.raises(PathOutsideWorkspace):
            resolve_in_workspace(root, bad)
    # A symlink inside the workspace that points out is refused; one that stays inside is fine.
    (root / "escape").symlink_to(tmp_path)
    (root / "link.jsonl").symlink_to(root / "data" / "a.jsonl")
    with pytest.raises(PathOutsideWorkspace, match="outside the workspace"):
        resolve_in_workspace(root, "escape/secret.txt")
    assert resolve_in_workspace(root, "link.jsonl") == (root / "data" / "a.jsonl").resolve()
    # A prefix-sharing sibling directory ("ws-evil" next to "ws") is outside too.
    (tmp_path / "ws-evil").mkdir()
    with pytest.raises(PathOutsideWorkspace):
        resolve_in_workspace(root, str(tmp_path / "ws-evil"))


# ------------------------------------------------------------------------------------------------
# Input parsing
# ------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_parse_pasted_forms():
    turns = CONV["conversations"]
    assert mt.parse_pasted(json.dumps(CONV))["conversations"] == turns
    assert mt.parse_pasted(json.dumps(turns))["conversations"] == turns
    sharegpt = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]
    assert mt.parse_pasted(json.dumps(sharegpt))["conversations"] == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert mt.parse_pasted(json.dumps({"messages": turns}))["conversations"] == turns
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert mt.parse_pasted(text) == {"id": "pasted", "text": text}
    assert mt.parse_pasted(json.dumps({"id": "x", "text": text})) == {"id": "x", "text": text}


@pytest.mark.unit
@pytest.mark.parametrize("bad,msg", [
    ('{"id": "x", "conversations": [', "not valid JSON: line 1"),
    ('[{"role": "user", "content": "only a question"}]', "no assistant turn"),
    ('[{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]', "unknown role"),
    ("   ", "nothing to show"),
    ("42", None),  # plain text that happens to be a number is a text row, not an error
])
def test_parse_pasted_errors(bad, msg):
    if msg is None:
        assert mt.parse_pasted(bad)["text"] == "42"
        return
    with pytest.raises(mt.MaskInputError, match=msg):
        mt.parse_pasted(bad)


@pytest.mark.unit
def test_read_row(workspace, tmp_path):
    f = workspace / "data" / "rows.jsonl"
    assert mt.read_row(f, 0)["id"] == "r0"
    assert mt.read_row(f, 1)["id"] == "t1"  # the blank and the bad line are not rows
    with pytest.raises(mt.MaskInputError, match=r"no row at index 2 .*2 valid rows.*line 3"):
        mt.read_row(f, 2)
    with pytest.raises(mt.MaskInputError, match="no such file"):
        mt.read_row(workspace / "data" / "missing.jsonl", 0)
    j = tmp_path / "rows.json"
    j.write_text(json.dumps([CONV, {**CONV, "id": "second"}]))
    assert mt.read_row(j, 1)["id"] == "second"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": "p0", "text": "a"}, {"id": "p1", "text": "b"}]),
                   tmp_path / "rows.parquet", row_group_size=1)
    assert mt.read_row(tmp_path / "rows.parquet", 1) == {"id": "p1", "text": "b"}


# ------------------------------------------------------------------------------------------------
# The mask view (tiny tokenizer in the workspace)
# ------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_run_mask_colours_assistant_green_and_rest_red(workspace):
    status, html_text, highlights = run(workspace)
    assert "mask-error" not in status, status
    tokens = parse_tokens(html_text)
    assert tokens, html_text[:500]
    trained, masked = text_of(tokens, "trained"), text_of(tokens, "masked")
    # Exactly the assistant contents plus their end-of-turn tokens are trained.
    assert trained == "Zebras live on the savanna.<|im_end|>They eat grass mostly.<|im_end|>"
    for part in ("You answer about zebras.", "Where do zebras live?", "What do they eat?", "<|im_start|>assistant"):
        assert part in masked.replace("↵", "\n").replace("\n", "\n"), part
    # Counts in the status agree with the token view.
    n_tr = sum(t["state"] == "trained" for t in tokens)
    assert f'<b class="c-trained">{n_tr}</b> trained' in status
    assert f"<b>{len(tokens)}</b> tokens" in status
    assert "mask-warning" not in status
    # Hover titles carry the token ids; newlines are visible.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workspace / "tok")
    ids = tok(tok.apply_chat_template(CONV["conversations"], tokenize=False), add_special_tokens=False)["input_ids"]
    assert [int(t["id"]) for t in tokens] == ids
    assert all(re.fullmatch(r"#\d+ · id \d+ · (trained|masked)", t["title"]) for t in tokens)
    assert "↵</span><br>" in html_text
    # The HighlightedText value is the same tokens, labelled.
    assert "".join(t for t, _ in highlights if _ == "trained") == trained


@pytest.mark.unit
def test_run_mask_options_and_warnings(workspace):
    status, html_text, _ = run(workspace, last=True)
    assert text_of(parse_tokens(html_text), "trained") == "They eat grass mostly.<|im_end|>"
    # Truncation is announced.
    status, html_text, _ = run(workspace, max_length=20)
    assert len(parse_tokens(html_text)) == 20
    assert "TRUNCATED" in status and "mask-warning" in status
    # A text row whose template markers are absent: all-zero mask, loudly.
    status, html_text, _ = run(workspace, pasted="just some words with no chat markup at all", template="chatml")
    assert "ALL-ZERO MASK" in status and "mask-warning" in status and "mask-error" not in status
    assert text_of(parse_tokens(html_text), "trained") == "" and parse_tokens(html_text)
    # A named template that does not fit the text row: llama3 markers in a ChatML text.
    chat_text = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nworld<|im_end|>\n"
    status, html_text, _ = run(workspace, pasted=chat_text, template="chatml")
    assert text_of(parse_tokens(html_text), "trained") == "world<|im_end|>", status
    status, _, _ = run(workspace, pasted=chat_text, template="llama3")
    assert "ALL-ZERO MASK" in status and '<b class="c-trained">0</b> trained' in status


@pytest.mark.unit
def test_run_mask_from_workspace_file(workspace):
    status, html_text, _ = run(workspace, source=mt.SOURCE_FILE, file_path="data/rows.jsonl", index=0)
    assert text_of(parse_tokens(html_text), "trained") == "hello<|im_end|>", status
    status, html_text, hl = run(workspace, source=mt.SOURCE_FILE, file_path="../../etc/passwd", index=0)
    assert "mask-error" in status and "outside the workspace" in status and html_text == "" and hl == []
    status, *_ = run(workspace, source=mt.SOURCE_FILE, file_path="", index=0)
    assert "give a file path" in status


@pytest.mark.unit
@pytest.mark.parametrize("kw,needle", [
    ({"pasted": "{broken"}, "not valid JSON"),
    ({"template": "no-such-template"}, "unknown chat template"),
    ({"tokenizer": "./missing-dir"}, "no such tokenizer directory"),
    ({"tokenizer": "/etc"}, "outside the workspace"),
    ({"tokenizer": "someorg/not-cached-model-xyz"}, "local Hugging Face cache"),
    ({"max_length": 3}, "max_length must be between"),
    ({"max_length": "abc"}, "whole number"),
])
def test_run_mask_errors_are_readable(workspace, kw, needle):
    status, html_text, hl = run(workspace, **kw)
    assert status.startswith('<div class="mask-error">'), status
    assert needle in status.replace("&#x27;", "'")
    assert "Traceback" not in status and html_text == "" and hl == []


@pytest.mark.unit
def test_run_compare(workspace):
    verdict_args = dict(source=mt.SOURCE_PASTE, pasted=json.dumps(CONV), file_path="", index=0, tokenizer_name="tok",
                        max_length=2048, train_only_last_turn=False, workspace=workspace)
    sa, ha, sb, hb, verdict = mt.run_compare(template_a="auto", template_b="chatml", **verdict_args)
    assert "mask-error" not in sa + sb
    assert parse_tokens(ha) == parse_tokens(hb) and verdict.startswith("Identical")
    sa, ha, sb, hb, verdict = mt.run_compare(template_a="chatml", template_b="llama3", **verdict_args)
    assert "different token sequences" in verdict
    sa, ha, sb, hb, verdict = mt.run_compare(template_a="chatml", template_b="bogus", **verdict_args)
    assert "mask-error" not in sa and "mask-error" in sb and "bogus" in sb and "failed" in verdict


@pytest.mark.unit
def test_demo_allow_list_is_enforced_server_side(workspace):
    allowed = mt.DEFAULT_ALLOWED_TOKENIZERS
    for name in (str(workspace / "tok"), "tok", "gpt2", "../../etc"):
        status, html_text, _ = mt.run_mask(mt.SOURCE_PASTE, json.dumps(CONV), "", 0, name, "auto", 2048, False,
                                           workspace=None, allowed_tokenizers=allowed)
        assert "is not offered here" in status and html_text == ""
    # Without a workspace, files cannot be read even if the hidden source is forged.
    status, *_ = mt.run_mask(mt.SOURCE_FILE, "", "data/rows.jsonl", 0, "llama3", "auto", 2048, False,
                             workspace=None, allowed_tokenizers=allowed)
    assert "files are not available here" in status


@pytest.mark.unit
def test_render_helpers_escape_and_show_whitespace():
    out = mt.render_tokens_html([{"i": 0, "id": 7, "token": "<b>&\t", "trained": True},
                                 {"i": 1, "id": 8, "token": "", "trained": False}])
    assert "&lt;b&gt;&amp;" in out and "<b>&" not in out and "→" in out and "∅" in out
    toks = parse_tokens(out)
    assert [t["state"] for t in toks] == ["trained", "masked"] and toks[0]["title"] == "#0 · id 7 · trained"
    assert "&lt;script&gt;" in mt.render_error("<script>alert(1)</script>")


# ------------------------------------------------------------------------------------------------
# App and demo build without launching
# ------------------------------------------------------------------------------------------------
def _elem_ids(blocks) -> set:
    return {c.get("props", {}).get("elem_id") for c in blocks.get_config_file()["components"]}


@pytest.mark.unit
def test_build_app_and_demo(tmp_path):
    import gradio as gr

    from workbench.app import build_app, launch_options
    from workbench.mask_demo import build_demo

    app = build_app(tmp_path / "new-ws")
    assert isinstance(app, gr.Blocks) and (tmp_path / "new-ws").is_dir()
    cfg = app.get_config_file()
    labels = [c["props"].get("label") for c in cfg["components"] if c.get("type") == "tabitem"]
    assert "Loss mask" in labels
    assert {"mask-input", "mask-file", "mask-index", "mask-tokenizer", "mask-template", "mask-run",
            "mask-tokens", "mask-status", "mask-highlighted", "mask-template-a", "mask-template-b"} <= _elem_ids(app)
    apis = {d.get("api_name") for d in cfg["dependencies"]}
    assert {"mask", "compare_templates"} <= apis
    assert cfg["analytics_enabled"] is False
    template_dd = next(c for c in cfg["components"] if c.get("props", {}).get("elem_id") == "mask-template")
    from specforge_core.data.templates import list_templates

    assert {str(ch[0]) for ch in template_dd["props"]["choices"]} == set(list_templates())
    opts = launch_options()
    assert ".tok.trained" in opts["css"] and opts["ssr_mode"] is False

    demo = build_demo()
    ids = _elem_ids(demo)
    assert "mask-run" in ids and "mask-tokens" in ids
    assert not ({"mask-file", "mask-index", "mask-source"} & ids)  # no file access in the public demo
    tok_dd = next(c for c in demo.get_config_file()["components"]
                  if c.get("props", {}).get("elem_id") == "mask-tokenizer")
    assert [str(ch[0]) for ch in tok_dd["props"]["choices"]] == list(mt.DEFAULT_ALLOWED_TOKENIZERS)
    assert tok_dd["props"]["allow_custom_value"] is False


@pytest.mark.unit
def test_engine_never_imports_gradio():
    root = Path(__file__).resolve().parent.parent / "specforge_core"
    offenders = [str(p) for p in root.rglob("*.py")
                 if re.search(r"^\s*(import gradio|from gradio)", p.read_text(encoding="utf-8"), re.M)]
    assert offenders == []
    code = ("import sys, specforge_core.cli, specforge_core.data.mask, specforge_core.data.inspect;"
            "assert 'gradio' not in sys.modules, 'gradio imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})


# ------------------------------------------------------------------------------------------------
# Real tokenizers
# ------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_default_example_on_smollm2(smol_tokenizer):
    status, html_text, _ = mt.run_mask(mt.SOURCE_PASTE, mt.EXAMPLE_TEXT, "", 0, "default", "auto", 2048, False,
                                       workspace=None)
    assert "mask-error" not in status and "mask-warning" not in status, status
    tokens = parse_tokens(html_text)
    trained = text_of(tokens, "trained")
    answers = [t["content"] for t in mt.EXAMPLE_CONVERSATION["conversations"] if t["role"] == "assistant"]
    assert trained == "".join(a + "<|im_end|>" for a in answers).replace("\n", "↵")
    assert "chain keeps slipping" in text_of(tokens, "masked")
    eot = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained_ids = [int(t["id"]) for t in tokens if t["state"] == "trained"]
    assert trained_ids.count(eot) == 2


@pytest.mark.integration
def test_llama3_named_template_and_demo_allow_list(llama3_tokenizer):
    status, html_text, _ = mt.run_mask(mt.SOURCE_PASTE, json.dumps(CONV), "", 0, "llama3 (Meta Llama-3)", "llama3",
                                       2048, False, workspace=None, allowed_tokenizers=mt.DEFAULT_ALLOWED_TOKENIZERS)
    assert "mask-error" not in status, status
    tokens = parse_tokens(html_text)
    assert int(tokens[0]["id"]) == 128000 and tokens[0]["state"] == "masked"
    trained = [t for t in tokens if t["state"] == "trained"]
    assert [int(t["id"]) for t in trained].count(128009) == 2  # each answer's <|eot_id|> is trained
    assert text_of(tokens, "trained") == "Zebras live on the savanna.<|eot_id|>They eat grass mostly.<|eot_id|>"
    # ChatML on a Llama-3 tokenizer renders, but it is a different token sequence than llama3's template.
    *_, verdict = mt.run_compare(mt.SOURCE_PASTE, json.dumps(CONV), "", 0, "llama3", "llama3", "chatml", 2048, False)
    assert "different token sequences" in verdict
