"""Dataset presets: public chat datasets, where they live on the hub, and how their rows become ours.

A `Preset` is a hub id, a split and a converter `source row -> row` (our schema, or close enough for
`schema.normalize_row`, which runs after it). They sit in `PRESETS`; a new one is a few lines:

    register(Preset("mydata", "org/mydata", "train", convert=lambda r: {...},
                    detect=lambda r: "my_field" in r))

`detect` lets `--input` files in a preset's *source* schema be recognised row by row
(`auto_convert`), so a user can pass a downloaded Daring-Anteater file without naming the preset.

Reading a preset's source (local files, the HF cache, the hub) is `data/sources.py`; this module only
knows rows, so the readers can apply `auto_convert` without an import loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .schema import CONVERSATION_KEYS, RowError, row_id


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str
    split: str
    convert: Callable[[dict], dict]
    detect: Callable[[dict], bool] = field(default=lambda r: False)
    hub_config: Optional[str] = None
    description: str = ""


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> Preset:
    key = name.strip().lower().replace("_", "-")
    if key not in PRESETS:
        raise ValueError(f"unknown dataset preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[key]


# ------------------------------------------------------------------------------------------------
# Converters (defensive: a row that does not fit raises RowError, counted and skipped)
# ------------------------------------------------------------------------------------------------
def _turns(row: dict, *keys: str) -> list:
    for k in keys:
        if k in row:
            v = row[k]
            if not isinstance(v, list):
                raise RowError("bad_turn", f"'{k}' is a {type(v).__name__}, expected a list of turns")
            return v
    raise RowError("missing_field", f"row has none of {list(keys)}; its fields are {sorted(row)[:8]}")


def _role(t: Any) -> str:
    if isinstance(t, dict):
        r = t.get("role", t.get("from"))
        if isinstance(r, str):
            return r.strip().lower()
    return ""


def _with_id(row: dict, rid: Any, conv: list) -> dict:
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        rid = row_id(row)  # content hash: stable, so dedup and the eval split stay put across runs
    return {"id": rid, "conversations": conv}


def convert_ultrachat(row: dict) -> dict:
    """HuggingFaceH4/ultrachat_200k: `prompt`, `prompt_id`, `messages` [{role, content}]."""
    return _with_id(row, row.get("prompt_id", row.get("id")), _turns(row, "messages", "conversations"))


def convert_sharegpt(row: dict) -> dict:
    """ShareGPT (Vicuna-unfiltered style): `id`, `conversations` [{from: human|gpt|system, value}].
    Leading assistant turns (the scrape often starts mid-chat with a `gpt` turn) are dropped: with no
    prompt before them they teach the draft nothing about answering one."""
    conv = list(_turns(row, "conversations", "messages"))
    start = 1 if conv and _role(conv[0]) == "system" else 0
    while len(conv) > start and _role(conv[start]) in ("gpt", "assistant", "chatgpt", "bard", "bing", "model"):
        del conv[start]
    return _with_id(row, row.get("id"), conv)


def convert_perfectblend(row: dict) -> dict:
    """mlabonne/open-perfectblend: `conversations` [{from, value}], `source`; no id (content hash)."""
    return _with_id(row, row.get("id"), _turns(row, "conversations"))


def convert_daring_anteater(row: dict) -> dict:
    """nvidia/Daring-Anteater: `system` string, `mask`, `conversations` [{from: User|Assistant, value}].
    The top-level `system` becomes a system turn; `mask` (which side to train on) is not needed:
    our loss mask always trains on assistant turns."""
    conv = list(_turns(row, "conversations"))
    system = row.get("system")
    if isinstance(system, str) and system.strip() and not (conv and _role(conv[0]) == "system"):
        conv.insert(0, {"role": "system", "content": system})
    return _with_id(row, row.get("id"), conv)


def convert_magpie(row: dict) -> dict:
    """Magpie-Align (e.g. Magpie-Llama-3.1-Pro-300K-Filtered): `uuid`, `conversations` [{from: human|gpt,
    value}]; some variants carry one `instruction` / `response` pair instead."""
    rid = row.get("uuid", row.get("id"))
    if any(k in row for k in CONVERSATION_KEYS):
        return _with_id(row, rid, _turns(row, *CONVERSATION_KEYS))
    if "instruction" in row and "response" in row:
        return _with_id(row, rid, [{"role": "user", "content": row["instruction"]},
                                   {"role": "assistant", "content": row["response"]}])
    raise RowError("missing_field", f"magpie row has neither 'conversations' nor 'instruction'/'response'; "
                   f"its fields are {sorted(row)[:8]}")


def convert_gsm8k(row: dict) -> dict:
    """openai/gsm8k: `question`, `answer` (worked solution ending in `#### N`); no id (content hash)."""
    q, a = row.get("question"), row.get("answer")
    if not isinstance(q, str) or not isinstance(a, str):
        raise RowError("missing_field", f"gsm8k row needs string 'question' and 'answer'; its fields are "
                       f"{sorted(row)[:8]}")
    return _with_id(row, row.get("id"), [{"role": "user", "content": q}, {"role": "assistant", "content": a}])


def _has_conv(r: dict) -> bool:
    return isinstance(r.get("conversations"), list)


register(Preset(
    "ultrachat", "HuggingFaceH4/ultrachat_200k", "train_sft", convert_ultrachat,
    detect=lambda r: "prompt_id" in r and "messages" in r,
    description="UltraChat 200k (SFT split): multi-turn chats generated by ChatGPT"))
register(Preset(
    "sharegpt", "Aeala/ShareGPT_Vicuna_unfiltered", "train", convert_sharegpt,
    detect=lambda r: _has_conv(r) and "id" in r and "source" not in r and "uuid" not in r,
    description="ShareGPT conversations (Vicuna unfiltered)"))
register(Preset(
    "perfectblend", "mlabonne/open-perfectblend", "train", convert_perfectblend,
    detect=lambda r: _has_conv(r) and "source" in r and "system" not in r,
    description="Open-PerfectBlend: a 1.4 M-row mix of chat, math, code and instruction data"))
register(Preset(
    "daring-anteater", "nvidia/Daring-Anteater", "train", convert_daring_anteater,
    detect=lambda r: _has_conv(r) and isinstance(r.get("system"), str),
    description="NVIDIA Daring-Anteater: instruction data with a per-row system prompt"))
register(Preset(
    "magpie", "Magpie-Align/Magpie-Llama-3.1-Pro-300K-Filtered", "train", convert_magpie,
    detect=lambda r: "uuid" in r or ("instruction" in r and "response" in r and not _has_conv(r)),
    description="Magpie Llama-3.1 Pro 300K (filtered): self-synthesised instructions and answers"))

register(Preset(
    "gsm8k", "openai/gsm8k", "train", convert_gsm8k, hub_config="main",
    detect=lambda r: isinstance(r.get("question"), str) and isinstance(r.get("answer"), str) and not _has_conv(r),
    description="GSM8K (train split): grade-school maths word problems with worked answers (MIT)"))

# Which preset's converter to try first when a row's schema is guessed: the most specific signals first.
_DETECT_ORDER = ("daring-anteater", "magpie", "ultrachat", "perfectblend", "gsm8k", "sharegpt")


def detect_preset(row: Any) -> Optional[Preset]:
    """The preset whose source schema `row` looks like, or None (our own schema, or unknown)."""
    if not isinstance(row, dict):
        return None
    if _has_conv(row) and row["conversations"] and all(
            isinstance(t, dict) and "role" in t for t in row["conversations"]) and "system" not in row:
        return None  # already our schema
    for name in _DETECT_ORDER:
        p = PRESETS.get(name)
        if p is not None and p.detect(row):
            return p
    for p in PRESETS.values():  # presets registered later
        if p.name not in _DETECT_ORDER and p.detect(row):
            return p
    return None


def auto_convert(row: dict) -> dict:
    """Convert a row from whichever preset source schema it matches; rows in our schema pass through.
    Only conversions that change meaning are applied (a top-level system prompt, Magpie's uuid and
    instruction/response); ShareGPT `from`/`value` turns are left to `normalize_row`."""
    p = detect_preset(row)
    if p is None or p.name == "sharegpt":
        # Dropping leading assistant turns is right for a ShareGPT scrape, not for a user's own file.
        return row
    return p.convert(row)
