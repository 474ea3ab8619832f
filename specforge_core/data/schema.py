"""The one conversation schema, and the normaliser every reader and preset funnels rows through.

A row is either a conversation

    {"id": str, "conversations": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

or pre-formatted text `{"id": str, "text": str}` (already templated; the chat template still finds
the assistant spans). ShareGPT turns (`{"from": "human"|"gpt"|"system", "value": ...}`) and
`messages` instead of `conversations` are accepted and normalised. A turn may carry
`reasoning_content` (regeneration saves the target's thinking there).

Rows stay plain dicts: at a million rows, objects per turn cost more than they give.
`normalize_row` raises `RowError` with a short machine code (counted in reports) and a message.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
}
CONVERSATION_KEYS = ("conversations", "messages", "conversation")


class RowError(ValueError):
    """A row that cannot be used. `code` is a short reason counted in reports."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def row_id(obj: dict) -> str:
    """A stable id for a row that has none: a hash of its content (so dedup by id still works)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")
    return hashlib.sha1(blob).hexdigest()[:16]


def _normalize_turn(t: Any, i: int) -> dict:
    if not isinstance(t, dict):
        raise RowError("bad_turn", f"turn {i} is a {type(t).__name__}, expected an object")
    if "role" in t or "content" in t:
        role, content = t.get("role"), t.get("content")
        if "role" not in t:
            raise RowError("missing_field", f"turn {i} has no 'role'")
        if "content" not in t:
            raise RowError("missing_field", f"turn {i} has no 'content'")
    elif "from" in t or "value" in t:
        role, content = t.get("from"), t.get("value")
        if "from" not in t:
            raise RowError("missing_field", f"turn {i} has no 'from'")
        if "value" not in t:
            raise RowError("missing_field", f"turn {i} has no 'value'")
    else:
        raise RowError("missing_field", f"turn {i} has neither role/content nor from/value (keys: {sorted(t)})")
    if not isinstance(role, str):
        raise RowError("unknown_role", f"turn {i}: role {role!r} is not a string")
    norm = ROLE_ALIASES.get(role.strip().lower())
    if norm is None:
        raise RowError("unknown_role", f"turn {i}: unknown role {role!r} (expected system, user or assistant)")
    if not isinstance(content, str):
        raise RowError("non_string_content", f"turn {i} ({norm}): content is a {type(content).__name__}, "
                       "expected a string")
    if not content.strip():
        raise RowError("empty_turn", f"turn {i} ({norm}) is empty")
    out = {"role": norm, "content": content}
    rc = t.get("reasoning_content")
    if isinstance(rc, str) and rc:
        out["reasoning_content"] = rc
    return out


def normalize_row(obj: Any, require_assistant: bool = True) -> dict:
    """Validate one row and return it in our schema (a new dict). Raises `RowError`."""
    if not isinstance(obj, dict):
        raise RowError("not_an_object", f"row is a {type(obj).__name__}, expected a JSON object")
    rid = obj.get("id", obj.get("conversation_id", obj.get("prompt_id")))
    if rid is None:
        rid = row_id(obj)
    elif isinstance(rid, (int, float)) and not isinstance(rid, bool):
        rid = str(rid)
    elif not isinstance(rid, str) or not rid.strip():
        raise RowError("bad_id", f"id {rid!r} is not a non-empty string")

    if "text" in obj and not any(k in obj for k in CONVERSATION_KEYS):
        text = obj["text"]
        if not isinstance(text, str):
            raise RowError("non_string_content", f"'text' is a {type(text).__name__}, expected a string")
        if not text.strip():
            raise RowError("empty_turn", "'text' is empty")
        return {"id": rid, "text": text}

    key = next((k for k in CONVERSATION_KEYS if k in obj), None)
    if key is None:
        raise RowError("missing_field", f"row has no 'conversations' (or 'messages' / 'text'); "
                       f"its fields are {sorted(obj)[:8]}")
    turns = obj[key]
    if not isinstance(turns, list):
        raise RowError("bad_turn", f"'{key}' is a {type(turns).__name__}, expected a list of turns")
    if not turns:
        raise RowError("empty_conversation", f"'{key}' is empty")
    conv = [_normalize_turn(t, i) for i, t in enumerate(turns)]
    if require_assistant and not any(t["role"] == "assistant" for t in conv):
        raise RowError("no_assistant_turn", "conversation has no assistant turn (nothing to train on)")
    return {"id": rid, "conversations": conv}


def has_system(row: dict) -> bool:
    conv = row.get("conversations")
    return bool(conv) and conv[0]["role"] == "system"


def add_system_prompt(row: dict, system_prompt: str | None) -> dict:
    """Prepend a system turn to a conversation that has none (text rows are left as they are)."""
    if not system_prompt or "conversations" not in row or has_system(row):
        return row
    return {**row, "conversations": [{"role": "system", "content": system_prompt}, *row["conversations"]]}
