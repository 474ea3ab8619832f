"""Loss masks, token by token, for every named template and for `auto`, on real tokenizers.

Expectations are written by hand: the exact rendered text of one conversation per template and
the exact text of each trained span (assistant content + the end-of-turn marker that closes it).
"""

from __future__ import annotations

import copy

import pytest

from specforge_core.data.inspect import token_view
from specforge_core.data.mask import ALL_ZERO, NOT_PREFIX_STABLE, MaskError, mask, mask_rows
from specforge_core.data.templates import (ChatTemplate, TemplateError, get_template, list_templates,
                                           register_template, TEMPLATES)

pytestmark = pytest.mark.unit

SYS, U1, A1, U2, A2, R1 = "Be brief.", "Hi there", "Hello! How can I help?", "2+2?", "4", "Greet."


def conv(system=True, reasoning=False):
    turns = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1},
             {"role": "user", "content": U2}, {"role": "assistant", "content": A2}]
    if reasoning:
        turns[1]["reasoning_content"] = R1
    if system:
        turns.insert(0, {"role": "system", "content": SYS})
    return {"id": "c1", "conversations": turns}


# (template, conversation kwargs, expected text, expected trained spans)
CASES = [
    ("llama3", {}, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
     ["Hello! How can I help?<|eot_id|>", "4<|eot_id|>"]),
    ("chatml", {}, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
     "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
     "<|im_start|>assistant\n4<|im_end|>\n",
     ["Hello! How can I help?<|im_end|>", "4<|im_end|>"]),
    ("qwen", {"system": False}, "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
     "assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?"
     "<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
     ["Hello! How can I help?<|im_end|>", "4<|im_end|>"]),
    ("qwen3-instruct", {"system": False}, "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
     "Hello! How can I help?<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
     ["Hello! How can I help?<|im_end|>", "4<|im_end|>"]),
    ("qwen3-thinking", {"reasoning": True}, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there"
     "<|im_end|>\n<|im_start|>assistant\n<think>\nGreet.\n</think>\n\nHello! How can I help?<|im_end|>\n"
     "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n",
     ["<think>\nGreet.\n</think>\n\nHello! How can I help?<|im_end|>", "<think>\n\n</think>\n\n4<|im_end|>"]),
    ("deepseek-v3", {}, "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi there<｜Assistant｜>Hello! How can I help?"
     "<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>4<｜end▁of▁sentence｜>",
     ["Hello! How can I help?<｜end▁of▁sentence｜>", "4<｜end▁of▁sentence｜>"]),
    ("deepseek-r1-distill", {"reasoning": True}, "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi there"
     "<｜Assistant｜><think>\nGreet.\n</think>\n\nHello! How can I help?<｜end▁of▁sentence｜><｜User｜>2+2?"
     "<｜Assistant｜><think>\n\n</think>\n\n4<｜end▁of▁sentence｜>",
     ["Greet.\n</think>\n\nHello! How can I help?<｜end▁of▁sentence｜>", "\n</think>\n\n4<｜end▁of▁sentence｜>"]),
    ("gemma", {}, "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"
     "Hello! How can I help?<end_of_turn>\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"
     "4<end_of_turn>\n",
     ["Hello! How can I help?<end_of_turn>", "4<end_of_turn>"]),
    ("phi3", {}, "<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello! How can I help?"
     "<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n",
     ["Hello! How can I help?<|end|>", "4<|end|>"]),
    ("phi4", {}, "<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hi there<|im_end|>"
     "<|im_start|>assistant<|im_sep|>Hello! How can I help?<|im_end|><|im_start|>user<|im_sep|>2+2?<|im_end|>"
     "<|im_start|>assistant<|im_sep|>4<|im_end|>",
     ["Hello! How can I help?<|im_end|>", "4<|im_end|>"]),
    ("mistral", {}, "<s>[INST] Be brief.\n\nHi there [/INST]Hello! How can I help?</s>[INST] 2+2? [/INST]4</s>",
     ["Hello! How can I help?</s>", "4</s>"]),
    ("gpt-oss", {"reasoning": True}, "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>"
     "<|start|>user<|message|>Hi there<|end|><|start|>assistant<|channel|>analysis<|message|>Greet.<|end|>"
     "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?<|end|><|start|>user<|message|>2+2?<|end|>"
     "<|start|>assistant<|channel|>final<|message|>4<|return|>",
     ["<|channel|>analysis<|message|>Greet.<|end|><|start|>assistant<|channel|>final<|message|>Hello! How can I "
      "help?<|end|>", "<|channel|>final<|message|>4<|return|>"]),
]


NATIVE = {("smol_tokenizer", n) for n in ("chatml", "qwen", "qwen3-instruct", "qwen3-thinking")} | {
    ("llama3_tokenizer", "llama3")}


def trained_runs(ms) -> list[str]:
    """Concatenated text of each contiguous run of trained tokens."""
    runs, cur = [], None
    for t in token_view(ms):
        if t["trained"]:
            cur = (cur or "") + t["token"]
        elif cur is not None:
            runs.append(cur)
            cur = None
    if cur is not None:
        runs.append(cur)
    return runs


@pytest.mark.parametrize("tok_name", ["smol_tokenizer", "llama3_tokenizer"])
@pytest.mark.parametrize("name,kw,text,spans", CASES, ids=[c[0] for c in CASES])
def test_named_template_masks(request, tok_name, name, kw, text, spans):
    tok = request.getfixturevalue(tok_name)
    ms = mask(conv(**kw), tok, name)
    assert ms.text == text
    assert [ms.text[s:e] for s, e in ms.spans] == spans
    # token by token: trained tokens spell exactly the assistant spans, masked ones everything else
    runs = trained_runs(ms)
    if (tok_name, name) in NATIVE:
        assert runs == spans
        masked = "".join(t["token"] for t in token_view(ms) if not t["trained"])
        rest = text
        for s in spans:
            rest = rest.replace(s, "", 1)
        assert masked == rest
    else:
        # A tokenizer without this template's special tokens may merge a marker's last character with the
        # text after it; that token is left out, and nothing outside the spans is ever trained.
        assert len(runs) == len(spans)
        for run, span in zip(runs, spans):
            assert run in span and len(span) - len(run) <= 3, (run, span)
    assert ms.warning is None
    # the token ids are the tokenizer's own encoding of the whole text
    assert ms.input_ids == tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name,kw,text,spans", CASES, ids=[c[0] for c in CASES])
def test_preformatted_text_uses_template_markers(llama3_tokenizer, name, kw, text, spans):
    from_conv = mask(conv(**kw), llama3_tokenizer, name)
    from_text = mask({"id": "t", "text": text}, llama3_tokenizer, name)
    assert from_text.input_ids == from_conv.input_ids
    assert from_text.loss_mask == from_conv.loss_mask


def test_chatml_smollm2_token_by_token(smol_tokenizer):
    ms = mask({"id": "x", "conversations": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello there!"}]},
              smol_tokenizer, "chatml")
    got = [(t["token"], t["trained"]) for t in token_view(ms)]
    assert got == [("<|im_start|>", False), ("user", False), ("\n", False), ("Hi", False), ("<|im_end|>", False),
                   ("\n", False), ("<|im_start|>", False), ("ass", False), ("istant", False), ("\n", False),
                   ("Hello", True), (" there", True), ("!", True), ("<|im_end|>", True), ("\n", False)]
    assert ms.input_ids[0] == 1 and ms.input_ids[-2] == 2  # <|im_start|>, <|im_end|> in SmolLM2's vocab


def test_llama3_token_by_token(llama3_tokenizer):
    ms = mask({"id": "x", "conversations": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello there!"}]},
              llama3_tokenizer, "llama3")
    got = [(t["token"], t["id"], t["trained"]) for t in token_view(ms)]
    assert got == [("<|begin_of_text|>", 128000, False), ("<|start_header_id|>", 128006, False),
                   ("user", 882, False), ("<|end_header_id|>", 128007, False), ("\n\n", 271, False),
                   ("Hi", 13347, False), ("<|eot_id|>", 128009, False), ("<|start_header_id|>", 128006, False),
                   ("assistant", 78191, False), ("<|end_header_id|>", 128007, False), ("\n\n", 271, False),
                   ("Hello", 9906, True), (" there", 1070, True), ("!", 0, True), ("<|eot_id|>", 128009, True)]


@pytest.mark.parametrize("tok_name,name", [("smol_tokenizer", "chatml"), ("llama3_tokenizer", "llama3")])
@pytest.mark.parametrize("kw", [{}, {"reasoning": False}])
def test_auto_agrees_with_named(request, tok_name, name, kw):
    tok = request.getfixturevalue(tok_name)
    rows = [conv(**kw),
            {"id": "long", "conversations": [{"role": "system", "content": "S"}] + [
                {"role": r, "content": f"{r} says {i}\n  with  spaces "} for i in range(3)
                for r in ("user", "assistant")]},
            {"id": "uni", "conversations": [{"role": "system", "content": "Réponds en français."},
                                            {"role": "user", "content": "Ça va ? 🙂"},
                                            {"role": "assistant", "content": "Très bien, merci ! 日本語も"}]}]
    for row in rows:
        a, b = mask(row, tok, "auto"), mask(row, tok, name)
        assert a.input_ids == b.input_ids, row["id"]
        assert a.loss_mask == b.loss_mask, row["id"]
        assert a.warning is None and sum(a.loss_mask) > 0


def test_auto_without_system_uses_template_default(smol_tokenizer):
    ms = mask(conv(system=False), smol_tokenizer, "auto")
    assert "You are a helpful AI assistant named SmolLM" in ms.text
    assert trained_runs(ms) == ["Hello! How can I help?<|im_end|>", "4<|im_end|>"]


def test_auto_detects_prefix_unstable_template(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    # Like Qwen3: earlier assistant turns lose their <think> block, the last one keeps it.
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' }}{% if loop.last and m.get('reasoning_content') %}"
        "{{ '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' }}{% endif %}{{ m['content'] + '<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    row = conv()
    row["conversations"][-1]["reasoning_content"] = "Add."
    row["conversations"][2]["reasoning_content"] = "Greet."
    ms = mask(row, tok, "auto")
    assert ms.warning and ms.warning.startswith(NOT_PREFIX_STABLE) and "[2]" in ms.warning
    # the first answer renders with its <think> block alone but without it in the whole: not trained;
    # the last one is stable and trained
    assert trained_runs(ms) == ["<think>\nAdd.\n</think>\n\n4<|im_end|>"]
    last = mask(row, tok, "auto", train_only_last_turn=True)
    assert last.warning is None and trained_runs(last) == ["<think>\nAdd.\n</think>\n\n4<|im_end|>"]


def test_train_only_last_turn(llama3_tokenizer):
    ms = mask(conv(), llama3_tokenizer, "llama3", train_only_last_turn=True)
    assert trained_runs(ms) == ["4<|eot_id|>"]
    ms = mask(conv(), llama3_tokenizer, "auto", train_only_last_turn=True)
    assert trained_runs(ms) == ["4<|eot_id|>"]


def test_all_zero_mask_is_reported(smol_tokenizer):
    ms = mask(conv(), smol_tokenizer, "chatml", max_length=10)
    assert ms.truncated and len(ms.input_ids) == 10
    assert sum(ms.loss_mask) == 0 and ms.warning.startswith(ALL_ZERO)
    # text with no assistant header under this template: nothing to train, and said so
    ms = mask({"id": "t", "text": "just some text"}, smol_tokenizer, "chatml")
    assert ms.warning.startswith(ALL_ZERO)
    # a llama3-formatted text under the chatml template matches nothing: the classic silent failure
    llama_text = mask(conv(), smol_tokenizer, "llama3").text
    assert mask({"id": "t", "text": llama_text}, smol_tokenizer, "chatml").warning.startswith(ALL_ZERO)


def test_truncation_keeps_partial_span(smol_tokenizer):
    full = mask(conv(), smol_tokenizer, "chatml")
    first_trained = full.loss_mask.index(1)
    ms = mask(conv(), smol_tokenizer, "chatml", max_length=first_trained + 3)
    assert ms.truncated and sum(ms.loss_mask) == 3 and ms.warning.startswith("truncated")


def test_text_turn_cut_off_is_trained_to_the_end(smol_tokenizer):
    ms = mask({"id": "t", "text": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello wor"},
              smol_tokenizer, "chatml")
    assert trained_runs(ms) == ["Hello wor"]


def test_mask_rows_batches_and_reports_errors(smol_tokenizer):
    rows = [conv(), {"id": "bad"}, conv(system=False)]
    out = mask_rows(rows, smol_tokenizer, "chatml")
    assert isinstance(out[1], MaskError) and "bad" in str(out[1])
    assert out[0].loss_mask == mask(conv(), smol_tokenizer, "chatml").loss_mask
    assert out[2].num_trained > 0


def test_registry():
    names = list_templates()
    for n in ("auto", "llama3", "chatml", "qwen", "qwen3-thinking", "qwen3-instruct", "deepseek-v3",
              "deepseek-r1-distill", "gemma", "phi3", "phi4", "mistral", "gpt-oss"):
        assert n in names
    assert get_template("harmony").name == "gpt-oss" and get_template("Llama-3.1").name == "llama3"
    with pytest.raises(TemplateError, match="unknown chat template 'nope'.*llama3"):
        get_template("nope")
    with pytest.raises(MaskError, match="unknown chat template"):
        mask(conv(), None, "nope")


def test_register_new_template_in_a_few_lines(smol_tokenizer):
    t = register_template(ChatTemplate(name="test-tags", user="<u>{content}</u>", system="<s>{content}</s>",
                                       assistant_header="<a>", assistant_end="</a>"))
    try:
        ms = mask(conv(), smol_tokenizer, "test-tags")
        assert ms.text == "<s>Be brief.</s><u>Hi there</u><a>Hello! How can I help?</a><u>2+2?</u><a>4</a>"
        assert [ms.text[s:e] for s, e in ms.spans] == ["Hello! How can I help?</a>", "4</a>"]
    finally:
        TEMPLATES.pop(t.name)


def test_auto_needs_a_chat_template(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    with pytest.raises(MaskError, match="no chat template"):
        mask(conv(), tok, "auto")
