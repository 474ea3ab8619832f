"""TTT metrics: per-step loss and accuracy summed over batches, then one `metrics.jsonl` row.

`TTTMetrics` is what the trainer's train log and its eval pass share, and what any other evaluation
of a draft can use: plain Python over `TTTOutput`s (no torch, no process group). Sums are weighted
by counted positions, so a batch with little to count weighs little, and a sum pooled over ranks
(`reduced`) gives the same mean as one process seeing every batch.
"""

from __future__ import annotations

from typing import Callable


def simulated_acceptance_length(acc: list[float]) -> float:
    """Expected tokens per verify step for a chain of drafts if steps failed independently:
    1 + sum_j prod_{i<=j} acc_i (acc_i over the positions step i counts)."""
    total, run = 1.0, 1.0
    for a in acc:
        run *= float(a)
        total += run
    return total


def chain_acceptance_length(chain: list[float]) -> float:
    """Expected tokens per verify step from chain_j, the share of anchors whose drafts 0..j were all
    right (a token outside the draft vocab a miss): 1 + sum_j chain_j. What a greedy chain decoder
    with len(chain) drafts accepts on average, anchored at every trained position."""
    return 1.0 + sum(float(c) for c in chain)


class TTTMetrics:
    """Count-weighted sums of per-step loss and accuracy over the `TTTOutput`s added."""

    def __init__(self, ttt_length: int, sums: list[float] | None = None):
        self.ttt_length = ttt_length
        # [ploss_k * count_k] * K + [acc_k * count_k] * K + [count_k] * K + [chain_k] * K + [anchors]:
        # one flat list, one all-reduce.
        self.sums = list(sums) if sums is not None else [0.0] * (4 * ttt_length + 1)

    def add(self, out) -> None:
        K = self.ttt_length
        for k in range(K):
            self.sums[k] += out.ploss[k] * out.counts[k]
            self.sums[K + k] += out.acc[k] * out.counts[k]
            self.sums[2 * K + k] += out.counts[k]
        if out.chain:
            for k in range(K):
                self.sums[3 * K + k] += out.chain[k]
            self.sums[4 * K] += out.anchors

    def reduced(self, all_reduce_sum: Callable[[list[float]], list[float]]) -> "TTTMetrics":
        """The same metrics summed over every rank (`all_reduce_sum` does the pooling)."""
        return TTTMetrics(self.ttt_length, all_reduce_sum(self.sums))

    @property
    def counts(self) -> list[float]:
        return self.sums[2 * self.ttt_length:3 * self.ttt_length]

    def row(self, decay: float) -> dict:
        """loss (sum_k decay**k * ploss_k, as the TTT weighs it), ploss_k, acc_k, chain_k, and
        sim_accept_len: from the chains where anchors were seen (`chain_acceptance_length`), else from
        acc_k as if independent (kept as sim_accept_len_indep)."""
        K = self.ttt_length
        counts = self.counts
        acc = [self.sums[K + k] / max(counts[k], 1) for k in range(K)]
        ploss = [self.sums[k] / max(counts[k], 1) for k in range(K)]
        anchors = self.sums[4 * K]
        chain = [self.sums[3 * K + k] / anchors for k in range(K)] if anchors > 0 else []
        indep = simulated_acceptance_length(acc)
        return {"loss": sum(decay ** k * ploss[k] for k in range(K)),
                **{f"ploss_{k}": ploss[k] for k in range(K)}, **{f"acc_{k}": acc[k] for k in range(K)},
                **{f"chain_{k}": c for k, c in enumerate(chain)},
                "sim_accept_len": chain_acceptance_length(chain) if chain else indep,
                "sim_accept_len_indep": indep}
