"""Prompts the target writes itself (Magpie-style): sample from its chat template's user header.

Why: a draft learns the target's answers to the prompts it is trained on; a small fixed set (GSM8K is
all maths) leaves whole kinds of request unseen. Rendering the template up to where a user's words
would start and letting the target continue gives user requests in the target's own idiom, as many
as wanted, with no dataset download (Xu et al., "Magpie", 2024).

Written in batches to an append-only JSONL (`{"id", "conversations": [{"role": "user", ...}]}`); a
killed run continues after the last whole batch (each batch has its own seed, so a continued run
writes what an uninterrupted one would have).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..events import Events, JobCancelled

_SENTINEL = "\u2063SELFINSTRUCT\u2063"


def user_header_ids(tokenizer) -> list[int]:
    """Token ids of the chat template rendered up to the first user turn's content."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                         add_generation_prompt=False)
    if _SENTINEL not in text:
        raise ValueError("the chat template does not place the user's words verbatim; cannot find its user header")
    return tokenizer(text.split(_SENTINEL)[0], add_special_tokens=False)["input_ids"]


def _clean(text: str, min_chars: int) -> str | None:
    """The sampled request, or None when it is no request: too short, under three words (when long enough
    to have them), or mostly not text (code dumps, symbol runs)."""
    t = text.strip()
    if len(t) < min_chars or _SENTINEL in t:
        return None
    if len(t) >= 12 and len(t.split()) < 3:
        return None
    if sum(ch.isalpha() or ch.isspace() for ch in t) < 0.6 * len(t):
        return None
    return t


def self_instruct(generator, out: str | Path, count: int, events: Events, temperature: float = 1.0,
                  top_p: float = 0.95, max_tokens: int = 96, min_chars: int = 12, batch_size: int = 32,
                  seed: int = 0) -> dict:
    """Append user prompts written by `generator` (a `regen.local.LocalGenerator`) to `out` until it holds
    `count` batches' worth (`ceil(count / batch_size)` batches; empty or too short ones are dropped)."""
    import torch

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = user_header_ids(generator.tokenizer)
    batches = -(-count // batch_size)
    done = 0
    if out.exists():
        with open(out, "rb+") as f:  # a torn last line (killed mid-write) is cut off
            data = f.read()
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
        done = {json.loads(line)["batch"] for line in data[:keep].decode("utf-8").splitlines() if line.strip()}
        done = max(done) + 1 if done else 0
    kept = 0
    for b in range(done, batches):
        if events.cancelled:
            raise JobCancelled(f"self-instruct stopped after {b} of {batches} batches; run again to continue")
        # Each batch its own seed: a continued run writes what an uninterrupted one would have.
        torch.manual_seed(seed * 1_000_003 + b)
        if getattr(generator, "rng", None) is not None:
            generator.rng.manual_seed(seed * 1_000_003 + b)
        replies = generator.generate_ids([header] * batch_size, max_tokens=max_tokens, temperature=temperature,
                                         top_p=top_p)
        lines = []
        for i, r in enumerate(replies):
            text = _clean(r.content, min_chars) if r is not None and r.finish_reason == "stop" else None
            if text:
                lines.append(json.dumps({"id": f"self-{seed}-{b}-{i}", "batch": b,
                                         "conversations": [{"role": "user", "content": text}]}, ensure_ascii=False))
        # One write per batch, the batch number on every line: a whole batch or nothing counts as done.
        if not lines:
            lines.append(json.dumps({"id": f"self-{seed}-{b}-none", "batch": b, "conversations": []}))
        with open(out, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        kept += sum(1 for x in lines if '"conversations": []' not in x)
        events.progress(b + 1, batches, what="self-instruct batches")
    return {"output": str(out), "batches": batches, "new_prompts": kept}
