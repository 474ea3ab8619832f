"""Loss masks: which tokens of a sample the draft is trained on.

Trained: assistant content and the end-of-turn token that closes it (the tokens the target
produced). Masked: begin-of-text, system, user turns and the assistant header. Two ways to find the
assistant spans, both as character spans of the rendered text, turned into a token mask through the
fast tokenizer's offsets (a token is trained when it lies inside a span):

- a named template (`templates.py`): rendered by string concatenation, spans known exactly;
- `auto`: the tokenizer's own Jinja chat template, rendered prefix by prefix. For assistant turn i,
  `render(turns[:i], add_generation_prompt=True)` ends where its answer starts and
  `render(turns[:i+1])` ends after its end-of-turn marker (trailing whitespace after the marker is
  not trained). Both must be prefixes of the whole rendering; templates that rewrite history
  (Qwen3 drops earlier `<think>` blocks) are caught here and reported, never silently mis-masked.

Pre-formatted `text` rows use the template's header / end-of-turn markers (for `auto`, markers
derived from the tokenizer's template with a probe conversation).

A sample whose mask is all zero carries `warning="all-zero mask ..."`; callers count and drop it.
"""

from __future__ import annotations

import functools
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from .templates import AUTO, TemplateError, get_template, markers_from_tokenizer, spans_from_markers


class MaskError(ValueError):
    """A sample (or a template / tokenizer) that cannot be masked; the message says why."""


ALL_ZERO = "all-zero mask"
NOT_PREFIX_STABLE = "template not prefix-stable"


@dataclass
class MaskedSample:
    id: str
    input_ids: list[int]
    loss_mask: list[int]
    text: str
    spans: list[tuple[int, int]]
    offsets: list[tuple[int, int]]
    truncated: bool = False
    warning: Optional[str] = None
    template: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def num_trained(self) -> int:
        return sum(self.loss_mask)

    def to_dict(self) -> dict:
        return {"id": self.id, "input_ids": self.input_ids, "loss_mask": self.loss_mask,
                "truncated": self.truncated, "warning": self.warning}


# ------------------------------------------------------------------------------------------------
# The tokenizer's own chat template (for `auto`)
# ------------------------------------------------------------------------------------------------
def _renderer_for(tokenizer) -> Callable[[list[dict], bool], str]:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # several named templates: the default one
        tpl = tpl.get("default") or next(iter(tpl.values()))
    if not tpl:
        raise MaskError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template: "
                        "`auto` needs one; choose a named template (--chat-template)")
    return _compiled_renderer(tpl, tuple(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()
                                                if isinstance(v, str))))


@functools.lru_cache(maxsize=16)
def _compiled_renderer(template: str, special_tokens: tuple) -> Callable[[list[dict], bool], str]:
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        compiled = _compile_jinja_template(template)
    except Exception as e:  # noqa: BLE001 - a broken template is the user's to fix: say so
        raise MaskError(f"the tokenizer's chat template does not compile: {e}") from None
    kwargs = dict(special_tokens)

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)

    return render


def _auto_messages(conversation: list[dict]) -> list[dict]:
    out = []
    for t in conversation:
        m = {"role": t["role"], "content": t["content"]}
        if t.get("reasoning_content"):
            m["reasoning_content"] = t["reasoning_content"]
        out.append(m)
    return out


def render_auto(conversation: list[dict], render: Callable[[list[dict], bool], str],
                train_only_last_turn: bool = False) -> tuple[str, list[tuple[int, int]], Optional[str]]:
    """Whole text, assistant spans and a warning (or None) by prefix differences."""
    msgs = _auto_messages(conversation)
    try:
        full = render(msgs, False)
    except Exception as e:  # noqa: BLE001
        raise MaskError(f"the tokenizer's chat template failed on this conversation: {e}") from None
    spans: list[tuple[int, int]] = []
    unstable: list[int] = []
    asst = [i for i, t in enumerate(msgs) if t["role"] == "assistant"]
    if train_only_last_turn:
        asst = asst[-1:]
    for i in asst:
        before = render(msgs[:i], True)
        after = render(msgs[:i + 1], False) if i + 1 < len(msgs) else full
        if not (full.startswith(before) and full.startswith(after) and len(after) >= len(before)):
            unstable.append(i)
            continue
        end = len(after.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    warning = None
    if unstable:
        warning = (f"{NOT_PREFIX_STABLE}: assistant turn(s) {unstable} render differently inside the whole "
                   "conversation (the template rewrites history); they are masked. Use a named template "
                   "or train_only_last_turn")
    return full, spans, warning


# ------------------------------------------------------------------------------------------------
# Rendering one sample
# ------------------------------------------------------------------------------------------------
def _only_last(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return spans[-1:] if spans else spans


# Markers of a template come from three probe renderings: once per compiled template, not per row.
_markers = functools.lru_cache(maxsize=16)(markers_from_tokenizer)


def render_sample(sample: Union[dict, str], tokenizer, template: str,
                  train_only_last_turn: bool = False) -> tuple[str, str, list[tuple[int, int]], Optional[str]]:
    """(id, text, trained character spans, warning) for a row in our schema or a raw text."""
    if isinstance(sample, str):
        sample = {"id": "text", "text": sample}
    sid = str(sample.get("id", ""))
    name = (template or AUTO).strip().lower()
    warning = None
    if "text" in sample and "conversations" not in sample:
        text = sample["text"]
        if name == AUTO:
            try:
                header, ends = _markers(_renderer_for(tokenizer))
            except TemplateError as e:
                raise MaskError(str(e)) from None
        else:
            header, ends = get_template(name).markers()
        try:
            spans = spans_from_markers(text, header, ends)
        except TemplateError as e:
            raise MaskError(str(e)) from None
    else:
        conv = sample.get("conversations")
        if not conv:
            raise MaskError(f"sample {sid!r} has neither 'conversations' nor 'text'")
        if name == AUTO:
            text, spans, warning = render_auto(conv, _renderer_for(tokenizer), train_only_last_turn)
        else:
            text, spans = get_template(name).render(conv)
    if train_only_last_turn:
        spans = _only_last(spans)
    return sid, text, spans, warning


def _token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for tokens lying wholly inside a trained span. A token that straddles a span edge (a foreign
    tokenizer merging `>` of an end marker with the next `\n`) belongs to the text around it."""
    n = len(offsets)
    mask = [0] * n
    if not spans:
        return mask
    starts = [o[0] for o in offsets]
    ends = [o[1] for o in offsets]
    for s, e in spans:
        i0 = bisect_left(starts, s)
        i1 = bisect_right(ends, e)
        if i1 > i0:
            mask[i0:i1] = [1] * (i1 - i0)
    return mask


def _finish(sid: str, text: str, spans, warning, ids: list[int], offsets: list[tuple[int, int]],
            max_length: int, template: str) -> MaskedSample:
    truncated = len(ids) > max_length
    if truncated:
        ids, offsets = ids[:max_length], offsets[:max_length]
    lm = _token_mask(offsets, spans)
    warnings = [warning] if warning else []
    if not any(lm):
        why = ("no assistant span found" if not spans else
               "every assistant span lies beyond max_length" if truncated else "assistant spans hold no tokens")
        warnings.append(f"{ALL_ZERO}: {why}")
    elif truncated:
        warnings.append(f"truncated to {max_length} tokens")
    # The headline warning is the one that must stop training on this sample, if any.
    head = next((w for w in warnings if w.startswith(ALL_ZERO)), warnings[0] if warnings else None)
    return MaskedSample(id=sid, input_ids=ids, loss_mask=lm, text=text, spans=list(spans), offsets=offsets,
                        truncated=truncated, warning=head, template=template, warnings=warnings)


def _backend(tokenizer):
    bk = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if bk is None:
        raise MaskError("loss masks need a fast (Rust) tokenizer with character offsets")
    return bk


def mask(sample: Union[dict, str], tokenizer, template: str = AUTO, max_length: int = 2048,
         train_only_last_turn: bool = False) -> MaskedSample:
    """Token ids, loss mask and trained character spans of one sample."""
    return _mask_many([sample], tokenizer, template, max_length, train_only_last_turn, raise_errors=True)[0]


def mask_rows(rows: list[Union[dict, str]], tokenizer, template: str = AUTO, max_length: int = 2048,
              train_only_last_turn: bool = False) -> list[Union[MaskedSample, MaskError]]:
    """Batched `mask`: renders all rows, tokenises them in one call; a failing row becomes its MaskError."""
    return _mask_many(rows, tokenizer, template, max_length, train_only_last_turn, raise_errors=False)


def _mask_many(rows, tokenizer, template, max_length, train_only_last_turn, raise_errors):
    name = (template or AUTO).strip().lower()
    if name != AUTO:
        try:
            name = get_template(name).name
        except TemplateError as e:
            raise MaskError(str(e)) from None
    rendered: list = []
    for r in rows:
        try:
            rendered.append(render_sample(r, tokenizer, name, train_only_last_turn))
        except (MaskError, TemplateError, KeyError, TypeError) as e:
            if raise_errors:
                raise MaskError(str(e)) from None
            rendered.append(MaskError(str(e)))
    texts = [x[1] for x in rendered if not isinstance(x, MaskError)]
    encs = _backend(tokenizer).encode_batch(texts, add_special_tokens=False) if texts else []
    out: list = []
    j = 0
    for x in rendered:
        if isinstance(x, MaskError):
            out.append(x)
            continue
        enc = encs[j]
        j += 1
        sid, text, spans, warning = x
        out.append(_finish(sid, text, spans, warning, enc.ids, enc.offsets, max_length, name))
    return out
