"""Prompts the target writes itself (Magpie-style): sample from its chat template's user header.

Why: a draft learns the target's answers to the prompts it is trained on; a small fixed set (GSM8K is
all maths) leaves whole kinds of request unseen. Rendering the template up to where a user's words
would start and letting the target continue gives user requests in the target's own idiom, as many
as wanted, with no dataset download (Xu et al., "Magpie", 2024).

Left alone, a small target writes one kind of request over and over (advice and recipes: "Can you
help me plan ..."), while a chat benchmark also asks for stories, roleplay, extraction from a pasted
text, code and puzzles. `topics` steer it. A topic has `starts`, the first words of the user's turn
("Pretend you are", "Summarize the following", "Write a Python function"): the target continues the
request from there, and the start is part of the saved request. A 135M target barely follows a
Magpie-style system message ("The user asks for a poem"), but it follows a start: measured on SmolLM2,
a start gave a request of its kind almost every time. A topic may also have a `system` message, rendered
before the user header, for targets that do follow one. Batches cycle through the topics (a topic with
weight w takes w batches per cycle); row i of a batch uses start i mod len(starts). Only the user's words
are kept: the answers stage answers them under the template's ordinary system prompt.

Batches are generated `batches_per_call` at a time, in one call to the decoder: its slots refill as
requests end, so one request that runs to `max_tokens` holds up one slot, not a whole batch (requests
are mostly short, and a batch generated alone ran as long as its longest; measured in
`bench/self_instruct_calls.py`). Written per call to an append-only JSONL (`{"id", "batch", "topic",
"conversations": [{"role": "user", ...}]}`); a killed run continues after the last whole call (each call
is seeded by its first batch, so a continued run writes what an uninterrupted one would have, given the
same `batches_per_call`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..events import Events, JobCancelled

_SENTINEL = "\u2063SELFINSTRUCT\u2063"


def user_header_ids(tokenizer, system: str | None = None) -> list[int]:
    """Token ids of the chat template rendered up to the first user turn's content (after `system`, when
    given, as the system message)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
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
                  seed: int = 0, topics: dict[str, dict] | None = None, batches_per_call: int = 8) -> dict:
    """Append user prompts written by `generator` (a `regen.local.LocalGenerator`) to `out` until it holds
    `count` batches' worth (`ceil(count / batch_size)` batches; empty or too short ones are dropped).
    `topics`: name -> {"starts": [str], "system": str | None, "weight": int} (see the module docstring)."""
    if batches_per_call < 1:
        raise ValueError(f"batches_per_call must be >= 1, got {batches_per_call}")
    import torch

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = generator.tokenizer
    cycle: list[str | None] = [None]
    heads: dict[str | None, list[tuple[str, list[int]]]] = {None: [("", user_header_ids(tok))]}
    if topics:
        cycle = [name for name, t in topics.items() for _ in range(int(t.get("weight", 1)))]
        for name, t in topics.items():
            header = user_header_ids(tok, t.get("system"))
            heads[name] = [(st, header + tok(st, add_special_tokens=False)["input_ids"]) for st in t.get("starts") or [""]]
    per_topic: dict[str, int] = {}
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
    b0 = done
    while b0 < batches:
        if events.cancelled:
            raise JobCancelled(f"self-instruct stopped after {b0} of {batches} batches; run again to continue")
        # Calls start at multiples of batches_per_call (a continued run lines up with an uninterrupted one).
        call = list(range(b0, min(batches, (b0 // batches_per_call + 1) * batches_per_call)))
        torch.manual_seed(seed * 1_000_003 + b0)
        if getattr(generator, "rng", None) is not None:
            generator.rng.manual_seed(seed * 1_000_003 + b0)
        rows = []   # (batch, row in batch, start, prompt ids)
        for b in call:
            h = heads[cycle[b % len(cycle)]]
            rows += [(b, i, *h[i % len(h)]) for i in range(batch_size)]
        # A cancel stops the decoder within a step; the unfinished call is not written (resume redoes it).
        replies = generator.generate_ids([r[3] for r in rows], max_tokens=max_tokens, temperature=temperature,
                                         top_p=top_p, should_stop=lambda: events.cancelled)
        if events.cancelled:
            raise JobCancelled(f"self-instruct stopped after {b0} of {batches} batches; run again to continue")
        texts: dict[int, list[tuple[int, str]]] = {b: [] for b in call}
        for (b, i, start, _), r in zip(rows, replies):
            text = _clean(start + r.content, min_chars) if (r is not None and r.finish_reason == "stop"
                                                            and r.content.strip()) else None
            if text:
                texts[b].append((i, text))
        lines = []
        for b in call:
            topic = cycle[b % len(cycle)]
            tag = {"topic": topic} if topic else {}
            mine = [json.dumps({"id": f"self-{seed}-{b}-{i}", "batch": b, **tag,
                                "conversations": [{"role": "user", "content": text}]}, ensure_ascii=False)
                    for i, text in texts[b]]
            if topic:
                per_topic[topic] = per_topic.get(topic, 0) + len(mine)
            kept += len(mine)
            # A batch with nothing kept still leaves its number, so resume knows it was done.
            lines += mine or [json.dumps({"id": f"self-{seed}-{b}-none", "batch": b, **tag, "conversations": []})]
        # One write per call, the batch number on every line: a whole call or nothing counts as done.
        with open(out, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        b0 = call[-1] + 1
        events.progress(b0, batches, what="self-instruct batches")
    res = {"output": str(out), "batches": batches, "new_prompts": kept}
    if topics:
        res["new_prompts_per_topic"] = per_topic
    return res
