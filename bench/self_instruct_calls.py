"""Benchmark: self-instruct prompts generated one batch per decoder call vs several batches per call.

The recipe's prompts stage asks the target to write user requests (`regen/selfinstruct.py`). Most
requests are short (SmolLM2: median 27 tokens), but a batch generated alone runs until its longest row
ends or reaches `max_tokens` (160 in the smollm2-cpu recipe), so nearly every batch costs the full 160
decode steps. With several batches in one call the continuous-batching decoder refills a slot as soon as
its request ends. Both settings run here on the same batches (same topics and starts as the recipe),
alternating, in one process, because the machine is shared and absolute timings drift; compare the
ratio. Reported per setting: wall seconds, requests kept, generated tokens, kept requests per second.

    .venv/bin/python bench/self_instruct_calls.py [--batches 8] [--per-call 8] [--rounds 1] [--threads 2]
        [--recipe smollm2-cpu] [--admit-min 1 8]

With `--admit-min A B` both settings run `--per-call` batches per call and differ in how many slots must be
free before the decoder admits waiting requests (`_FastDecoder.admit_min`; 1 refills a slot the step its
request ends, with a prefill call each time).

Writes bench/results/self_instruct_calls.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=8, help="batches per setting and round")
    ap.add_argument("--per-call", type=int, default=8, help="batches per call of the batched setting")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", default="smollm2-cpu", help="recipe whose self_instruct settings are used")
    ap.add_argument("--admit-min", type=int, nargs=2, default=None, metavar=("A", "B"),
                    help="compare these admission group sizes instead (both at --per-call batches per call)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from specforge_core.events import Events
    from specforge_core.recipes.run import load_recipe
    from specforge_core.regen.local import LocalGenerator
    from specforge_core.regen.selfinstruct import self_instruct

    si = load_recipe(args.recipe).prompts.self_instruct
    gen = LocalGenerator(load_recipe(args.recipe).target, batch_size=si.batch_size, seed=si.seed)
    count = args.batches * si.batch_size
    tokens = []
    real = gen.generate_ids

    def counting(prompts, *a, **k):   # generated tokens, whatever was kept
        replies = real(prompts, *a, **k)
        tokens.append(sum(r.completion_tokens for r in replies if r is not None))
        return replies
    gen.generate_ids = counting

    default_admit = gen._fast.admit_min
    settings = ([(1, default_admit), (args.per_call, default_admit)] if args.admit_min is None
                else [(args.per_call, a) for a in args.admit_min])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for si_idx, (per_call, admit) in enumerate(settings):
                gen._fast.admit_min = admit
                out = Path(tmp) / f"r{rnd}-s{si_idx}.jsonl"
                tokens.clear()
                t0 = time.perf_counter()
                res = self_instruct(gen, out, count, Events(echo=False), temperature=si.temperature, top_p=si.top_p,
                                    max_tokens=si.max_tokens, min_chars=si.min_chars, batch_size=si.batch_size,
                                    seed=si.seed + rnd, topics={k: t.model_dump() for k, t in si.topics.items()},
                                    batches_per_call=per_call)
                secs = time.perf_counter() - t0
                runs.append({"round": rnd, "setting": si_idx, "batches_per_call": per_call, "admit_min": admit,
                             "seconds": round(secs, 2),
                             "kept": res["new_prompts"], "generated_tokens": sum(tokens),
                             "kept_per_s": round(res["new_prompts"] / secs, 3),
                             "generated_tokens_per_s": round(sum(tokens) / secs, 1)})
                print(json.dumps(runs[-1]), flush=True)

    def total(i):
        rs = [r for r in runs if r["setting"] == i]
        return sum(r["seconds"] for r in rs), sum(r["kept"] for r in rs)
    (s1, k1), (sk, kk) = total(0), total(1)
    names = [f"{p} per call, admit {a}" for p, a in settings]
    summary = {"batches": args.batches, "batch_size": si.batch_size, "max_tokens": si.max_tokens,
               "rounds": args.rounds, "threads": args.threads, "machine": platform.processor() or platform.machine(),
               "kernel": getattr(gen, "linear_kernel", None), "runs": runs, "settings": names,
               "seconds": [round(s1, 2), round(sk, 2)], "kept": [k1, kk], "speedup_wall": round(s1 / sk, 3)}
    print(f"{args.batches} batches x {si.batch_size}, max {si.max_tokens} tokens: {names[0]} {s1:.1f} s "
          f"({k1} kept), {names[1]} {sk:.1f} s ({kk} kept): {s1 / sk:.2f}x")
    path = ROOT / "bench" / "results" / "self_instruct_calls.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
