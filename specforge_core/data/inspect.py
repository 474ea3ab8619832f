"""Looking at loss masks: per-token views, counts, ANSI colouring and the `inspect-mask` job.

A wrong chat template silently ruins a training run; this is where users catch it. The same
`token_view` feeds the terminal (green trained, red masked), the JSON output for scripts and the
workbench's coloured tokens.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

from ..events import Events
from .config import InspectMaskConfig
from .mask import MaskedSample, MaskError, mask

GREEN, RED, YELLOW, RESET, DIM = "\x1b[32m", "\x1b[31m", "\x1b[33m", "\x1b[0m", "\x1b[2m"


def token_view(ms: MaskedSample, tokenizer=None) -> list[dict]:
    """One entry per token: its index, id, exact text (from the character offsets) and whether it is trained."""
    out = []
    prev_end = 0
    for i, (tid, (s, e), m) in enumerate(zip(ms.input_ids, ms.offsets, ms.loss_mask)):
        # byte-level pieces of one multi-byte character share its offsets: show the character once
        piece = ms.text[max(s, prev_end):e]
        prev_end = max(prev_end, e)
        out.append({"i": i, "id": int(tid), "token": piece, "trained": bool(m)})
    return out


def mask_summary(ms: MaskedSample) -> dict:
    n = len(ms.input_ids)
    t = ms.num_trained
    return {"id": ms.id, "tokens": n, "trained": t, "masked": n - t,
            "trained_fraction": round(t / n, 4) if n else 0.0, "truncated": ms.truncated,
            "assistant_spans": len(ms.spans), "warning": ms.warning, "warnings": ms.warnings,
            "template": ms.template}


def visible(piece: str) -> str:
    """Whitespace made visible, so a mask boundary on a newline can be seen."""
    return piece.replace("\n", "↵\n").replace("\t", "→")


def render_ansi(ms: MaskedSample, tokenizer=None, color: bool = True, show_boundaries: bool = False) -> str:
    parts = []
    for tok in token_view(ms, tokenizer):
        piece = visible(tok["token"])
        if show_boundaries:
            piece = piece + "|"
        if color:  # colour each line separately so a newline never carries a colour across
            c = GREEN if tok["trained"] else RED
            parts.append("\n".join(c + x + RESET if x else x for x in piece.split("\n")))
        else:
            parts.append(f"[{piece}]" if tok["trained"] else piece)
    return "".join(parts)


def _summary_line(s: dict, color: bool) -> str:
    line = (f"{s['tokens']} tokens: {s['trained']} trained, {s['masked']} masked "
            f"({100 * s['trained_fraction']:.1f}% trained), {s['assistant_spans']} assistant span(s)")
    if s["truncated"]:
        line += ", truncated"
    for w in s["warnings"]:
        line += "\n" + ((YELLOW + "WARNING: " + w + RESET) if color else "WARNING: " + w)
    return line


def _pick_rows(path: str, indices: list[int]) -> tuple[dict[int, dict], int]:
    """Rows at the given positions (counting valid rows of the file), and how many bad rows were skipped."""
    from .readers import SkipReport, iter_rows

    want = set(indices)
    report = SkipReport()
    found: dict[int, dict] = {}
    for i, row in enumerate(iter_rows([path], report=report)):
        if i in want:
            found[i] = row
            if len(found) == len(want):
                break
    return found, report.total


def inspect_mask(cfg: InspectMaskConfig, events: Events) -> dict:
    from ..targets import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer)
    indices = cfg.index or [0]
    rows, skipped = _pick_rows(cfg.input, indices)
    missing = [i for i in indices if i not in rows]
    if missing:
        raise ValueError(f"{cfg.input}: no row at index {missing} (the file has fewer valid rows"
                         + (f"; {skipped} bad rows were skipped" if skipped else "") + ")")
    color = cfg.color if cfg.color is not None else sys.stdout.isatty()
    results = []
    all_zero = 0
    for i in indices:
        try:
            ms = mask(rows[i], tok, cfg.chat_template, cfg.max_length, cfg.train_only_last_turn)
        except MaskError as e:
            raise ValueError(f"{cfg.input}: row {i}: {e}") from None
        s = mask_summary(ms)
        s["index"] = i
        all_zero += int(s["trained"] == 0)
        if cfg.format == "json":
            view = token_view(ms, tok)
            print(json.dumps({"index": i, "id": ms.id, "input_ids": ms.input_ids, "loss_mask": ms.loss_mask,
                              "tokens": [v["token"] for v in view], "num_tokens": s["tokens"],
                              "trained": s["trained"], "truncated": s["truncated"], "warning": s["warning"]},
                             ensure_ascii=False))
        else:
            head = f"== row {i} (id {ms.id}) · template {ms.template} · tokenizer {cfg.tokenizer} =="
            print(head)
            print(render_ansi(ms, tok, color=color))
            print(_summary_line(s, color))
            print()
        if ms.warning:
            events.warning(f"row {i}: {ms.warning}", id=ms.id)
        results.append(s)
    sys.stdout.flush()
    return {"samples": len(results), "all_zero": all_zero,
            "trained_tokens": sum(r["trained"] for r in results),
            "tokens": sum(r["tokens"] for r in results), "exit_code": 0}


def compare_templates(sample: dict, tokenizer, template_a: str, template_b: str, max_length: int = 2048,
                      train_only_last_turn: bool = False) -> dict:
    """Masks of one sample under two templates, and whether they agree token by token."""
    a = mask(sample, tokenizer, template_a, max_length, train_only_last_turn)
    b = mask(sample, tokenizer, template_b, max_length, train_only_last_turn)
    return {"a": a, "b": b, "same_ids": a.input_ids == b.input_ids, "same_mask": a.loss_mask == b.loss_mask}


def first_difference(a: MaskedSample, b: MaskedSample) -> Optional[int]:
    for i, (x, y) in enumerate(zip(zip(a.input_ids, a.loss_mask), zip(b.input_ids, b.loss_mask))):
        if x != y:
            return i
    return None if len(a.input_ids) == len(b.input_ids) else min(len(a.input_ids), len(b.input_ids))
