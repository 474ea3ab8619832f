"""TTT metrics: per-step loss and accuracy summed over batches, then one `metrics.jsonl` row.

`TTTMetrics` is what the trainer's train log and its eval pass share, and what any other evaluation
of a draft can use: plain Python over `TTTOutput`s (no torch, no process group). Sums are weighted
by counted positions, so a batch with little to count weighs little, and a sum pooled over ranks
(`reduced`) gives the same mean as one process seeing every batch.
"""

from __future__ import annotations

from typing import Callable


def simulated_acceptance_length(acc: list[float]) -> float:
    """Expected tokens per verify step for a chain of drafts: 1 + sum_j prod_{i<=j} acc_i."""
    total, run = 1.0, 1.0
    for a in acc:
        run *= float(a)
        total += run
    return total


class TTTMetrics:
    """Count-weighted sums of per-step loss and accuracy over the `TTTOutput`s added."""

    def __init__(self, ttt_length: int, sums: list[float] | None = None):
        self.ttt_length = ttt_length
        # [ploss_k * count_k] * K + [acc_k * count_k] * K + [count_k] * K: one flat list, one all-reduce.
        self.sums = list(sums) if sums is not None else [0.0] * (3 * ttt_length)

    def add(self, out) -> None:
        K = self.ttt_length
        for k in range(K):
            self.sums[k] += out.ploss[k] * out.counts[k]
            self.sums[K + k] += out.acc[k] * out.counts[k]
            self.sums[2 * K + k] += out.counts[k]

    def reduced(self, all_reduce_sum: Callable[[list[float]], list[float]]) -> "TTTMetrics":
        """The same metrics summed over every rank (`all_reduce_sum` does the pooling)."""
        return TTTMetrics(self.ttt_length, all_reduce_sum(self.sums))

    @property
    def counts(self) -> list[float]:
        return self.sums[2 * self.ttt_length:]

    def row(self, decay: float) -> dict:
        """loss (sum_k decay**k * ploss_k, as the TTT weighs it), ploss_k, acc_k, sim_accept_len."""
        K = self.ttt_length
        counts = self.counts
        acc = [self.sums[K + k] / max(counts[k], 1) for k in range(K)]
        ploss = [self.sums[k] / max(counts[k], 1) for k in range(K)]
        return {"loss": sum(decay ** k * ploss[k] for k in range(K)),
                **{f"ploss_{k}": ploss[k] for k in range(K)}, **{f"acc_{k}": acc[k] for k in range(K)},
                "sim_accept_len": simulated_acceptance_length(acc)}
