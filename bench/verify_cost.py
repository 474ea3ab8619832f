"""Benchmark: what a verify forward of n tokens costs the target, against a 1-token decode step, per kernel.

A speculative decoder's speedup is about acceptance_length / (verify cost in decode steps + draft cost),
so on a CPU the verify's width matters as much as the draft. For each linear kernel of
`evaluate --linear-kernel` (native fp32; oneDNN bf16 and fp32 prepacked, with row-wise attention) this loads the
target once, prefills a prompt of `--context` random tokens, and times forwards of 1, 4 and 8 new
tokens, interleaved round by round (this machine is shared and noisy: every kernel sees the same
spells), reporting medians. It also checks, per kernel, whether a 4-token verify gives bit-identical
logits to four 1-token steps (what makes greedy speculative decoding token-identical to plain decoding).

    OMP_NUM_THREADS=2 .venv/bin/python bench/verify_cost.py [--target default] [--rounds 30] [--context 300]

Writes bench/results/verify_cost.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from specforge_core.evaluate.spec_decode import TargetRunner  # noqa: E402
from specforge_core.cpu_kernels import PACKED_KERNELS, onednn_bf16_available, pack_linears, use_rowwise_attention  # noqa: E402,E501
from specforge_core.models.target import load_target  # noqa: E402

WIDTHS = (1, 4, 8)


def prefill(runner: TargetRunner, ids: torch.Tensor, P: int):
    cache = runner.new_cache()
    runner.forward(ids[:, :P], torch.arange(P)[None], cache, capture=False, last_only=True)
    return cache


def timed_step(runner: TargetRunner, cache, ids: torch.Tensor, P: int, n: int) -> float:
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)) if n > 1 else None
    t0 = time.perf_counter()
    runner.forward(ids[:, P:P + n], torch.arange(P, P + n)[None], cache, allowed=allowed, capture=n > 1)
    dt = time.perf_counter() - t0
    cache.crop(-n)
    return dt


def identical_to_steps(runner: TargetRunner, ids: torch.Tensor, P: int, n: int = 4) -> tuple[bool, float]:
    cache = prefill(runner, ids, P)
    steps = [runner.forward(ids[:, P + j:P + j + 1], torch.tensor([[P + j]]), cache, capture=False)[0][-1]
             for j in range(n)]
    cache = prefill(runner, ids, P)
    wide, _ = runner.forward(ids[:, P:P + n], torch.arange(P, P + n)[None], cache,
                             allowed=torch.tril(torch.ones(n, n, dtype=torch.bool)), capture=False)
    diff = float((torch.stack(steps) - wide).abs().max())
    return diff == 0.0, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="default")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "verify_cost.json"))
    args = ap.parse_args()

    base = load_target(args.target, dtype=torch.float32, device="cpu", aux=True)
    variants = {"native": base}
    for kernel in PACKED_KERNELS:
        if kernel == "onednn-bf16" and not onednn_bf16_available():
            print("oneDNN bf16 is not available on this CPU: not measured")
            continue
        packed = copy.deepcopy(base)
        pack_linears(packed.model, kernel)
        use_rowwise_attention(packed.model)
        variants[kernel] = packed
    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (1, args.context + max(WIDTHS)))
    runners = {k: TargetRunner(t) for k, t in variants.items()}
    caches = {k: prefill(r, ids, args.context) for k, r in runners.items()}
    times: dict[str, dict[int, list[float]]] = {k: {n: [] for n in WIDTHS} for k in runners}
    for rnd in range(args.rounds + 3):
        for k, r in runners.items():
            for n in WIDTHS:
                dt = timed_step(r, caches[k], ids, args.context, n)
                if rnd >= 3:   # the first rounds warm allocators and kernels
                    times[k][n].append(dt)
    out = {"target": args.target, "context": args.context, "rounds": args.rounds,
           "threads": torch.get_num_threads(), "kernels": {}}
    print(f"{'kernel':12s} " + " ".join(f"{f'{n} tok ms':>9s}" for n in WIDTHS)
          + "  4/1   8/1  verify==steps")
    for k, r in runners.items():
        ms = {n: 1000 * statistics.median(times[k][n]) for n in WIDTHS}
        same, diff = identical_to_steps(r, ids, args.context)
        out["kernels"][k] = {"ms": {str(n): round(v, 2) for n, v in ms.items()},
                             "ratio_4_over_1": round(ms[4] / ms[1], 3), "ratio_8_over_1": round(ms[8] / ms[1], 3),
                             "verify_bit_identical_to_steps": same, "max_abs_logit_diff": diff}
        print(f"{k:12s} " + " ".join(f"{ms[n]:9.1f}" for n in WIDTHS)
              + f"  {ms[4] / ms[1]:.2f}  {ms[8] / ms[1]:.2f}  {same} (max diff {diff:.2e})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
