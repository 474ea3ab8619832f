"""Deterministic, resumable batching over a tokenised cache split.

The order of epoch e is a permutation seeded by (seed, e); rank r of W takes every W-th sample of
it (trimmed to a multiple of W so ranks step together). A position is (epoch, micro-batch index):
resuming at a position yields exactly the batches an uninterrupted run would have seen next, which
is what lets a SIGKILLed run reproduce the uninterrupted loss curve.

`group_by_length=N` sorts each run of N consecutive samples of the shuffled order by length (longest
first), so a micro-batch holds samples of similar length: on the SmolLM2 recipe's data (lengths 30-550,
batch 8) random batches were 27% padding, grouped ones 2%. The order stays a function of (seed, epoch)
alone, the same at any world size.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..data.batches import Batch, collate


class EpochBatches:
    """Micro-batches of one split for one rank, resumable at (epoch, index)."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, pad_id: int = 0, group_by_length: int = 0):
        self.ds = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.pad_id = pad_id
        self.group = group_by_length
        self._lengths = None
        if len(dataset) < world_size:
            raise ValueError(f"{len(dataset)} samples cannot be shared by {world_size} processes")

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.ds)
        idx = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        if self.group > 1:
            if self._lengths is None:
                self._lengths = np.asarray(self.ds["length"])
            idx = np.concatenate([c[np.argsort(-self._lengths[c], kind="stable")]
                                  for c in np.split(idx, range(self.group, n, self.group))])
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
