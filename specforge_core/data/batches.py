"""Padded tensor batches of tokenised cache rows: the `Batch` every consumer of the cache shares.

The trainer's epoch batching (`training.batches`) and the offline dump (`offline.dump`) both turn
cache rows into a `Batch`; it lives here, on the ground floor, so neither has to import the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor        # [B, T] int64, right-padded
    loss_mask: torch.Tensor        # [B, T] int64 0/1
    attention_mask: torch.Tensor   # [B, T] int64 0/1 (padding)
    indices: list[int]             # rows of the split, for offline lookups

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.loss_mask.to(device), self.attention_mask.to(device),
                     self.indices)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(rows: list[dict], indices: list[int], pad_id: int = 0) -> Batch:
    """Right-pad cache rows (`input_ids`, `loss_mask`) to the longest one; `indices` name them in their split."""
    T = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    lm = torch.zeros((B, T), dtype=torch.long)
    am = torch.zeros((B, T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        lm[i, :n] = torch.as_tensor(r["loss_mask"], dtype=torch.long)
        am[i, :n] = 1
    return Batch(ids, lm, am, list(indices))
