"""Chat templates: how a conversation becomes text, and where in that text the assistant speaks.

A named template is a handful of strings (begin-of-text, per-role formats, the assistant header
and the end-of-turn marker that closes an assistant turn). Rendering is plain string
concatenation, so masking a million conversations costs little more than tokenising them, and
every character of the result is known to belong to a header, a prompt or an assistant span.

`auto` is not here as strings: it renders with the tokenizer's own Jinja chat template prefix by
prefix (see `mask.py`), which works for any HF template; `markers_from_tokenizer` derives the
header / end-of-turn strings from that template for pre-formatted `text` rows.

Registering a new template takes a few lines:

    register_template(ChatTemplate(
        name="my-template", user="<u>{content}</u>", system="<s>{content}</s>",
        assistant_header="<a>", assistant_end="</a>"))
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional


class TemplateError(ValueError):
    """Unknown template, or a template that cannot render this conversation."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    user: str                                  # "{content}" is replaced by the (stripped?) turn text
    assistant_header: str                      # masked: the text that opens an assistant turn
    assistant_end: str                         # trained: closes an assistant turn (the end-of-turn token)
    system: Optional[str] = None               # None: the system text is merged into the first user turn
    system_merge: str = "{system}\n\n{content}"  # how a merged system prompt joins the first user turn
    bos: str = ""                              # begin-of-text, rendered at the very start (masked)
    after_assistant: str = ""                  # masked separator after the end-of-turn (e.g. "\n")
    last_assistant_end: Optional[str] = None   # a different closer for the final assistant turn (harmony)
    default_system: Optional[str] = None       # inserted when the conversation has none
    strip_content: bool = False                # the HF template trims turn content (Llama-3 does)
    reasoning: Optional[str] = None            # how `reasoning_content` prefixes the answer: "{reasoning}" / "{content}"
    empty_reasoning: Optional[str] = None      # what an assistant turn without reasoning renders as, if not plain content
    text_header: Optional[tuple[str, ...]] = None  # markers that open a trained span in pre-formatted text (default: header)
    text_ends: tuple[str, ...] = ()            # markers that close it (default: assistant_end[, last_assistant_end])
    aliases: tuple[str, ...] = field(default=())
    description: str = ""

    # -- rendering ---------------------------------------------------------------------------------
    def _content(self, text: str) -> str:
        return text.strip() if self.strip_content else text

    def assistant_body(self, turn: dict) -> str:
        content = self._content(turn["content"])
        rc = turn.get("reasoning_content")
        if self.reasoning and rc:
            return self.reasoning.format(reasoning=rc.strip(), content=content)
        if self.empty_reasoning:
            return self.empty_reasoning.format(content=content)
        return content

    def render(self, conversation: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Text of the whole conversation, and the character spans of each assistant turn
        (body + end-of-turn marker, header and trailing separator excluded)."""
        parts: list[str] = [self.bos]
        pos = len(self.bos)
        spans: list[tuple[int, int]] = []
        turns = conversation
        pending_system: Optional[str] = None
        if turns and turns[0]["role"] == "system":
            sys_text, turns = self._content(turns[0]["content"]), turns[1:]
        else:
            sys_text = self.default_system
        if sys_text is not None:
            if self.system is not None:
                s = self.system.format(content=sys_text)
                parts.append(s)
                pos += len(s)
            else:
                pending_system = sys_text
        last_asst = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=-1)
        for i, t in enumerate(turns):
            role = t["role"]
            if role == "assistant":
                end = self.last_assistant_end if (i == last_asst and self.last_assistant_end) else self.assistant_end
                body = self.assistant_body(t)
                parts.append(self.assistant_header)
                pos += len(self.assistant_header)
                seg = body + end
                parts.append(seg)
                spans.append((pos, pos + len(seg)))
                pos += len(seg)
                if self.after_assistant:
                    parts.append(self.after_assistant)
                    pos += len(self.after_assistant)
                continue
            content = self._content(t["content"])
            if role == "user":
                if pending_system is not None:
                    content = self.system_merge.format(system=pending_system, content=content)
                    pending_system = None
                s = self.user.format(content=content)
            elif role == "system":  # a system turn in the middle of a conversation
                s = (self.system or self.user).format(content=content)
            else:
                raise TemplateError(f"template {self.name!r}: unknown role {role!r}")
            parts.append(s)
            pos += len(s)
        return "".join(parts), spans

    # -- pre-formatted text -----------------------------------------------------------------------
    def markers(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        header = self.text_header if self.text_header is not None else (self.assistant_header,)
        ends = self.text_ends or tuple(x for x in (self.assistant_end, self.last_assistant_end) if x)
        return header, ends


def spans_from_markers(text: str, header, ends: tuple[str, ...]) -> list[tuple[int, int]]:
    """Trained spans of pre-formatted text: after each assistant header, up to and including the
    first end-of-turn marker (or to the end of the text for a turn cut off mid-way).

    `header` may be several alternatives (the longest wins where they overlap). A header that starts
    exactly where the previous span ended continues the same generation (harmony's analysis ->
    final channels), so it is trained with it."""
    headers = (header,) if isinstance(header, str) else tuple(header)
    headers = tuple(h for h in headers if h)
    if not headers:
        raise TemplateError("this template has no assistant header marker to find spans in text")
    head_re = re.compile("|".join(re.escape(h) for h in sorted(headers, key=len, reverse=True)))
    end_re = re.compile("|".join(re.escape(e) for e in ends)) if ends else None
    spans: list[tuple[int, int]] = []
    m = head_re.search(text)
    while m:
        s = m.end()
        em = end_re.search(text, s) if end_re else None
        e = em.end() if em else len(text)
        nxt = head_re.search(text, s)
        if nxt and nxt.start() < e:  # the closer was missing: the turn stops at the next header
            e = nxt.start()
        if spans and spans[-1][1] == m.start():
            spans[-1] = (spans[-1][0], e)
        elif e > s:
            spans.append((s, e))
        m = head_re.search(text, e)
    return spans


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
TEMPLATES: dict[str, ChatTemplate] = {}
_ALIASES: dict[str, str] = {}
AUTO = "auto"


def register_template(t: ChatTemplate, overwrite: bool = False) -> ChatTemplate:
    key = t.name.lower()
    if key == AUTO:
        raise TemplateError("'auto' is reserved for the template-agnostic method")
    if key in TEMPLATES and not overwrite:
        raise TemplateError(f"template {t.name!r} is already registered")
    TEMPLATES[key] = t
    for a in t.aliases:
        _ALIASES[a.lower()] = key
    return t


def list_templates() -> list[str]:
    return [AUTO, *sorted(TEMPLATES)]


def get_template(name: str) -> ChatTemplate:
    key = (name or "").strip().lower()
    key = _ALIASES.get(key, key)
    if key in TEMPLATES:
        return TEMPLATES[key]
    raise TemplateError(f"unknown chat template {name!r}; known: {', '.join(list_templates())}")


def canonical_name(name: str) -> str:
    key = (name or "").strip().lower()
    if key == AUTO:
        return AUTO
    return get_template(key).name


_CHATML = ChatTemplate(
    name="chatml", system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_header="<|im_start|>assistant\n", assistant_end="<|im_end|>", after_assistant="\n",
    aliases=("smollm2",), description="ChatML (SmolLM2, Hermes, ...); no default system prompt")

for _t in [
    ChatTemplate(
        name="llama3", bos="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant_end="<|eot_id|>",
        strip_content=True, aliases=("llama-3", "llama3.1", "llama-3.1", "llama3.2", "llama3.3"),
        description="Llama 3.x (content trimmed, as Meta's template does)"),
    _CHATML,
    replace(_CHATML, name="qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            aliases=("qwen2", "qwen2.5"), description="Qwen2 / Qwen2.5: ChatML with Qwen's default system prompt"),
    replace(_CHATML, name="qwen3-instruct", aliases=("qwen3-2507-instruct",),
            description="Qwen3 instruct (no thinking): ChatML"),
    replace(_CHATML, name="qwen3-thinking", reasoning="<think>\n{reasoning}\n</think>\n\n{content}",
            empty_reasoning="<think>\n\n</think>\n\n{content}", aliases=("qwen3",),
            description="Qwen3 with thinking: each assistant turn is <think>reasoning</think> + answer, all trained"),
    ChatTemplate(
        name="deepseek-v3", bos="<｜begin▁of▁sentence｜>", system="{content}", user="<｜User｜>{content}",
        assistant_header="<｜Assistant｜>", assistant_end="<｜end▁of▁sentence｜>", aliases=("deepseek", "deepseek-v3.1"),
        description="DeepSeek V3"),
    ChatTemplate(
        name="deepseek-r1-distill", bos="<｜begin▁of▁sentence｜>", system="{content}", user="<｜User｜>{content}",
        assistant_header="<｜Assistant｜><think>\n", assistant_end="<｜end▁of▁sentence｜>",
        reasoning="{reasoning}\n</think>\n\n{content}", empty_reasoning="\n</think>\n\n{content}",
        text_header=("<｜Assistant｜><think>\n", "<｜Assistant｜>"), aliases=("deepseek-r1",),
        description="DeepSeek-R1 distills: the server opens each answer with <think>\\n (masked)"),
    ChatTemplate(
        name="gemma", bos="<bos>", system=None, user="<start_of_turn>user\n{content}<end_of_turn>\n",
        assistant_header="<start_of_turn>model\n", assistant_end="<end_of_turn>", after_assistant="\n",
        strip_content=True, aliases=("gemma2", "gemma3"),
        description="Gemma 2/3: the system prompt joins the first user turn"),
    ChatTemplate(
        name="phi3", system="<|system|>\n{content}<|end|>\n", user="<|user|>\n{content}<|end|>\n",
        assistant_header="<|assistant|>\n", assistant_end="<|end|>", after_assistant="\n",
        aliases=("phi-3", "phi3.5"), description="Phi-3 / Phi-3.5"),
    ChatTemplate(
        name="phi4", system="<|im_start|>system<|im_sep|>{content}<|im_end|>",
        user="<|im_start|>user<|im_sep|>{content}<|im_end|>",
        assistant_header="<|im_start|>assistant<|im_sep|>", assistant_end="<|im_end|>", aliases=("phi-4",),
        description="Phi-4"),
    ChatTemplate(
        name="mistral", bos="<s>", system=None, user="[INST] {content} [/INST]", assistant_header="",
        assistant_end="</s>", text_header=("[/INST]",), strip_content=True, aliases=("mistral-instruct",),
        description="Mistral instruct ([INST] ... [/INST] answer</s>); system joins the first user turn"),
    ChatTemplate(
        name="gpt-oss", system="<|start|>developer<|message|># Instructions\n\n{content}<|end|>",
        user="<|start|>user<|message|>{content}<|end|>",
        assistant_header="<|start|>assistant", assistant_end="<|end|>", last_assistant_end="<|return|>",
        reasoning="<|channel|>analysis<|message|>{reasoning}<|end|><|start|>assistant<|channel|>final<|message|>{content}",
        empty_reasoning="<|channel|>final<|message|>{content}", aliases=("harmony", "gpt-oss-harmony"),
        description="gpt-oss (harmony): channels are produced by the model, so they are trained"),
]:
    register_template(_t)


# ------------------------------------------------------------------------------------------------
# Markers of a tokenizer's own template (for `auto` on pre-formatted text)
# ------------------------------------------------------------------------------------------------
_PROBE_U, _PROBE_A = "PROBE_USER_7f3a", "PROBE_ASSISTANT_9c1e"


def markers_from_tokenizer(render) -> tuple[str, tuple[str, ...]]:
    """Derive (assistant header, end markers) from a chat template renderer
    `render(messages, add_generation_prompt) -> str` by rendering a probe conversation."""
    user = [{"role": "user", "content": _PROBE_U}]
    base = render(user, False)
    with_gen = render(user, True)
    if not with_gen.startswith(base):
        raise TemplateError("the tokenizer's chat template is not prefix-stable for the generation prompt")
    header = with_gen[len(base):]
    full = render(user + [{"role": "assistant", "content": _PROBE_A}], False)
    i = full.find(_PROBE_A)
    if i < 0:
        raise TemplateError("the tokenizer's chat template drops assistant content")
    end = full[i + len(_PROBE_A):].rstrip()
    if not header.strip():
        raise TemplateError("the tokenizer's chat template has no assistant header to find spans in text")
    return header, ((end,) if end else ())
