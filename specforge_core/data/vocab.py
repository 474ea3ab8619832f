"""The draft vocabulary: which target token ids the EAGLE3 draft's lm_head predicts.

The draft predicts over a reduced vocabulary (e.g. 32000 of Llama-3's 128256 ids). It is built from
the training set: count the target ids that sit under the loss mask (the tokens the draft is
trained to produce), keep the `draft_vocab_size` most frequent (ties: smaller id first, so the
result is deterministic), pad with unseen ids (lowest first) when fewer were seen, and sort the
kept ids ascending. SGLang / vLLM load it as two tensors:

    d2t[i] = target_id(i) - i      int64 offsets, [draft_vocab]   (draft index -> target id)
    t2d[j] = j is in the draft     bool,          [target_vocab]

The mapping is saved beside the tokenised cache (`vocab_mapping.safetensors` + `vocab.json`) with
the cache key it was built from; `load_vocab_mapping` refuses a mapping built from another key,
tokenizer vocab size or draft size instead of reusing it silently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

VOCAB_FORMAT = 1
MAPPING_FILE = "vocab_mapping.safetensors"
META_FILE = "vocab.json"


class VocabMismatchError(ValueError):
    """A saved draft vocab that does not belong to the data / tokenizer / draft size it is asked for."""


@dataclass
class VocabMapping:
    d2t: torch.Tensor          # int64 [draft_vocab]: target_id(i) - i
    t2d: torch.Tensor          # bool  [target_vocab]
    draft_vocab_size: int
    target_vocab_size: int
    coverage: float            # fraction of masked (trained) tokens whose id is in the draft vocab

    @property
    def target_ids(self) -> torch.Tensor:
        return draft_to_target_ids(self.d2t)

    def to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Target ids -> draft indices (-1 where the id is not in the draft vocab)."""
        index = target_to_draft_index(self.t2d)
        return index[torch.as_tensor(target_ids, dtype=torch.long)]

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft indices -> target ids."""
        return self.target_ids[torch.as_tensor(draft_ids, dtype=torch.long)]


# ------------------------------------------------------------------------------------------------
# Counting and building
# ------------------------------------------------------------------------------------------------
def count_tokens(input_ids_list: Iterable[Sequence[int]], loss_mask_list: Iterable[Sequence[int]],
                 vocab_size: int, out: np.ndarray | None = None) -> torch.Tensor:
    """Count target ids under the loss mask. Returns int64 counts [vocab_size].

    `out` (an int64 numpy array) accumulates across calls, so a large split can be counted in chunks
    without holding it in memory; the returned tensor shares its memory.
    """
    counts = np.zeros(vocab_size, dtype=np.int64) if out is None else out
    if counts.shape != (vocab_size,):
        raise ValueError(f"count_tokens: accumulator has shape {counts.shape}, expected ({vocab_size},)")
    for n, (ids, lm) in enumerate(zip(input_ids_list, loss_mask_list, strict=True)):
        ids = np.asarray(ids, dtype=np.int64)
        lm = np.asarray(lm)
        if ids.shape != lm.shape:
            raise ValueError(f"count_tokens: sample {n} has {ids.size} ids but a loss mask of {lm.size}")
        sel = ids[lm.astype(bool)]
        if sel.size == 0:
            continue
        lo, hi = int(sel.min()), int(sel.max())
        if lo < 0 or hi >= vocab_size:
            # An id past the vocab means the cache and the tokenizer disagree: never clip silently.
            raise ValueError(f"count_tokens: sample {n} has token id {hi if hi >= vocab_size else lo} "
                             f"outside the target vocab [0, {vocab_size})")
        counts += np.bincount(sel, minlength=vocab_size)
    return torch.from_numpy(counts)


def build_vocab_mapping(counts, draft_vocab_size: int) -> VocabMapping:
    """The `draft_vocab_size` most frequent ids (ties -> smaller id; padded with unseen ids, lowest
    first), sorted ascending, as d2t offsets and a t2d mask."""
    c = counts.numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    c = c.astype(np.int64, copy=False)
    if c.ndim != 1:
        raise ValueError(f"build_vocab_mapping: counts must be 1-D over the target vocab, got shape {c.shape}")
    target_vocab = int(c.shape[0])
    if draft_vocab_size < 1:
        raise ValueError(f"draft_vocab_size must be >= 1, got {draft_vocab_size}")
    if draft_vocab_size > target_vocab:
        raise ValueError(f"draft_vocab_size {draft_vocab_size} is larger than the target vocabulary "
                         f"({target_vocab} ids); use at most {target_vocab}")
    if (c < 0).any():
        raise ValueError("build_vocab_mapping: negative counts")
    # A stable sort on -count keeps ids ascending within equal counts, so ties go to the smaller id
    # and the zero-count tail (the padding) comes lowest id first.
    order = np.argsort(-c, kind="stable")
    kept = np.sort(order[:draft_vocab_size])
    total = int(c.sum())
    coverage = float(c[kept].sum()) / total if total else 0.0
    kept_t = torch.from_numpy(kept.astype(np.int64))
    d2t = kept_t - torch.arange(draft_vocab_size, dtype=torch.int64)
    t2d = torch.zeros(target_vocab, dtype=torch.bool)
    t2d[kept_t] = True
    return VocabMapping(d2t=d2t, t2d=t2d, draft_vocab_size=draft_vocab_size, target_vocab_size=target_vocab,
                        coverage=coverage)


def draft_to_target_ids(d2t) -> torch.Tensor:
    """d2t offsets -> the target id of each draft index."""
    d2t = torch.as_tensor(d2t, dtype=torch.int64)
    return d2t + torch.arange(d2t.shape[0], dtype=torch.int64)


def target_to_draft_index(t2d) -> torch.Tensor:
    """t2d mask -> int64 [target_vocab]: the draft index of each target id, -1 where absent."""
    t2d = torch.as_tensor(t2d, dtype=torch.bool)
    index = torch.cumsum(t2d.to(torch.int64), 0) - 1
    return torch.where(t2d, index, torch.full_like(index, -1))


def _check_consistent(m: VocabMapping, where: str) -> None:
    if m.d2t.shape != (m.draft_vocab_size,) or m.t2d.shape != (m.target_vocab_size,):
        raise VocabMismatchError(f"{where}: tensor shapes d2t {tuple(m.d2t.shape)} / t2d {tuple(m.t2d.shape)} "
                                 f"do not match draft {m.draft_vocab_size} / target {m.target_vocab_size}")
    ids = draft_to_target_ids(m.d2t)
    if int(m.t2d.sum()) != m.draft_vocab_size or not torch.equal(torch.nonzero(m.t2d).flatten(), ids):
        raise VocabMismatchError(f"{where}: d2t and t2d disagree (corrupt vocab mapping)")


# ------------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------------
def save_vocab_mapping(m: VocabMapping, directory: str | Path, key: str, **extra) -> Path:
    """Write `vocab_mapping.safetensors` + `vocab.json` (with the cache key) into `directory`."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (MAPPING_FILE + ".tmp")
    save_file({"d2t": m.d2t.contiguous(), "t2d": m.t2d.contiguous()}, str(tmp),
              metadata={"key": key, "format": str(VOCAB_FORMAT)})
    os.replace(tmp, d / MAPPING_FILE)
    meta = {"format": VOCAB_FORMAT, "key": key, "draft_vocab_size": m.draft_vocab_size,
            "target_vocab_size": m.target_vocab_size, "coverage": m.coverage, **extra}
    tmpj = d / (META_FILE + ".tmp")
    tmpj.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmpj, d / META_FILE)
    return d / MAPPING_FILE


def load_vocab_mapping(directory: str | Path, expect_key: str | None = None,
                       expect_target_vocab: int | None = None,
                       expect_draft_vocab: int | None = None) -> VocabMapping:
    """Load a saved mapping; raise `VocabMismatchError` naming the file and what differs when it was
    built from another key, another tokenizer vocab size or another draft size."""
    from safetensors.torch import load_file

    d = Path(directory)
    meta_p, map_p = d / META_FILE, d / MAPPING_FILE
    if not meta_p.exists() or not map_p.exists():
        raise FileNotFoundError(f"{d}: no draft vocab here (expected {META_FILE} and {MAPPING_FILE})")
    try:
        meta = json.loads(meta_p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise VocabMismatchError(f"{meta_p}: corrupt vocab metadata: {e}") from None
    if meta.get("format", 0) > VOCAB_FORMAT:
        raise VocabMismatchError(f"{meta_p}: vocab format {meta.get('format')} is newer than this code "
                                 f"understands ({VOCAB_FORMAT})")
    diffs = []
    if expect_key is not None and meta.get("key") != expect_key:
        diffs.append(f"it was built from cache key {meta.get('key')!r}, expected {expect_key!r} "
                     "(different data, tokenizer, template or max_length)")
    if expect_target_vocab is not None and meta.get("target_vocab_size") != expect_target_vocab:
        diffs.append(f"target vocab size is {meta.get('target_vocab_size')}, expected {expect_target_vocab} "
                     "(a different tokenizer)")
    if expect_draft_vocab is not None and meta.get("draft_vocab_size") != expect_draft_vocab:
        diffs.append(f"draft vocab size is {meta.get('draft_vocab_size')}, expected {expect_draft_vocab}")
    if diffs:
        raise VocabMismatchError(f"{meta_p}: draft vocab does not match: " + "; ".join(diffs)
                                 + ". Rebuild it (build-cache --overwrite) rather than reuse it.")
    try:
        tensors = load_file(str(map_p))
    except Exception as e:  # noqa: BLE001 - any read error is one clear message naming the file
        raise VocabMismatchError(f"{map_p}: cannot read the vocab mapping: {e}") from None
    if "d2t" not in tensors or "t2d" not in tensors:
        raise VocabMismatchError(f"{map_p}: expected tensors 'd2t' and 't2d', found {sorted(tensors)}")
    m = VocabMapping(d2t=tensors["d2t"].to(torch.int64), t2d=tensors["t2d"].to(torch.bool),
                     draft_vocab_size=int(meta["draft_vocab_size"]),
                     target_vocab_size=int(meta["target_vocab_size"]), coverage=float(meta.get("coverage", 0.0)))
    _check_consistent(m, str(map_p))
    return m
