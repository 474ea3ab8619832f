"""Deterministic, resumable batching over a tokenised cache split.

The order of epoch e is a permutation seeded by (seed, e); rank r of W takes every W-th sample of
it (trimmed to a multiple of W so ranks step together). A position is (epoch, micro-batch index):
resuming at a position yields exactly the batches an uninterrupted run would have seen next, which
is what lets a SIGKILLed run reproduce the uninterrupted loss curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
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


class EpochBatches:
    """Micro-batches of one split for one rank, resumable at (epoch, index)."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, pad_id: int = 0):
        self.ds = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.pad_id = pad_id
        if len(dataset) < world_size:
            raise ValueError(f"{len(dataset)} samples cannot be shared by {world_size} processes")

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.ds)
        idx = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        idx = idx[: n - n % self.world_size]
        return idx[self.rank::self.world_size]

    def batches_per_epoch(self) -> int:
        per_rank = len(self.ds) // self.world_size
        return (per_rank + self.batch_size - 1) // self.batch_size

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
        idx = self.order(epoch)
        for b in range(start, self.batches_per_epoch()):
            sel = [int(i) for i in idx[b * self.batch_size:(b + 1) * self.batch_size]]
            rows = self.ds.select(sel) if len(sel) > 1 else [self.ds[sel[0]]]
            yield b, collate(list(rows), sel, self.pad_id)
