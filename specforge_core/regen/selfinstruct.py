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

Written in batches to an append-only JSONL (`{"id", "topic", "conversations": [{"role": "user", ...}]}`);
a killed run continues after the last whole batch (each batch has its own seed and topic, so a continued
run writes what an uninterrupted one would have).
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
                  seed: int = 0, topics: dict[str, dict] | None = None) -> dict:
    """Append user prompts written by `generator` (a `regen.local.LocalGenerator`) to `out` until it holds
    `count` batches' worth (`ceil(count / batch_size)` batches; empty or too short ones are dropped).
    `topics`: name -> {"starts": [str], "system": str | None, "weight": int} (see the module docstring)."""
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
    for b in range(done, batches):
        if events.cancelled:
            raise JobCancelled(f"self-instruct stopped after {b} of {batches} batches; run again to continue")
        # Each batch its own seed: a continued run writes what an uninterrupted one would have.
        torch.manual_seed(seed * 1_000_003 + b)
        if getattr(generator, "rng", None) is not None:
            generator.rng.manual_seed(seed * 1_000_003 + b)
        topic = cycle[b % len(cycle)]
        rows = [heads[topic][i % len(heads[topic])] for i in range(batch_size)]   # (start, prompt ids)
        replies = generator.generate_ids([ids for _, ids in rows], max_tokens=max_tokens,
                                         temperature=temperature, top_p=top_p)
        lines = []
        tag = {"topic": topic} if topic else {}
        for i, r in enumerate(replies):
            text = None
            if r is not None and r.finish_reason == "stop" and r.content.strip():
                text = _clean(rows[i][0] + r.content, min_chars)
            if text:
                lines.append(json.dumps({"id": f"self-{seed}-{b}-{i}", "batch": b, **tag,
                                         "conversations": [{"role": "user", "content": text}]}, ensure_ascii=False))
        if topic:
            per_topic[topic] = per_topic.get(topic, 0) + len(lines)
        # One write per batch, the batch number on every line: a whole batch or nothing counts as done.
        if not lines:
            lines.append(json.dumps({"id": f"self-{seed}-{b}-none", "batch": b, **tag, "conversations": []}))
        with open(out, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        kept += sum(1 for x in lines if '"conversations": []' not in x)
        events.progress(b + 1, batches, what="self-instruct batches")
    res = {"output": str(out), "batches": batches, "new_prompts": kept}
    if topics:
        res["new_prompts_per_topic"] = per_topic
    return res
