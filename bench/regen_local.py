"""Benchmark: in-process regeneration speed (`regenerate --backend local`) against the target's forward rate.

The local backend is only useful for building a training corpus on a CPU if it decodes at a good
fraction of the rate at which the target can run a plain forward pass. Both are measured in the same
process, interleaved (forward, old, forward, new, forward), because the machine is shared and absolute
timings drift by 2x within minutes; compare the ratios.

  forward  - tokens/s of one full-sequence forward over batch 8 x 256 random tokens (median of the runs);
  old      - HF `generate` in left-padded batches (decoder="hf", the previous implementation);
  new      - the continuous-batching decoder (decoder="fast"), once per `--kernels` entry: native (fp32
             F.linear), onednn-bf16 or onednn-fp32 (prepacked oneDNN matmuls, the kernels `evaluate` uses); each
             kernel's run reports how many of its replies equal the native run's.

Prompts are GSM8K train questions (user turn, the model's chat template, greedy). For each decoder it
reports generated tokens/s and processed tokens/s (prompt + generated: what the model actually ran),
each also as a fraction of the forward rate, and whether old and new produced the same tokens on the
prompts both ran. `--profile` adds a torch-profiler breakdown of the new decoder (prefill vs decode,
and within decode: projections/MLP, attention over the cache, lm_head, the rest).

    .venv/bin/python bench/regen_local.py [--old-prompts 16] [--new-prompts 128] [--max-tokens 256]
        [--old-batch 8] [--new-batch 64] [--threads N] [--kernels native onednn-bf16] [--profile]

Writes bench/results/regen_local.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("SPECFORGE_DATA", "/work/shared/data"))


def gsm8k_prompts(n: int) -> list[list[dict]]:
    path = DATA / "gsm8k_train.jsonl"
    if path.exists():
        with open(path) as f:
            qs = [json.loads(line)["question"] for _, line in zip(range(n), f)]
    else:  # no data set on this machine: synthetic word problems of similar length
        qs = [f"A shop sells {i + 3} apples on Monday and twice as many on Tuesday. Each apple costs "
              f"${i % 7 + 1}. How much money did the shop make over the two days?" for i in range(n)]
    return [[{"role": "user", "content": q}] for q in qs]


def forward_rate(model, batch: int = 8, length: int = 256) -> float:
    import torch

    x = torch.randint(100, model.config.vocab_size - 100, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(x[:, :16])
        t = time.perf_counter()
        model(x)
        return batch * length / (time.perf_counter() - t)


def run_decoder(gen, prompts: list[list[int]], max_tokens: int) -> dict:
    t = time.perf_counter()
    replies = gen.generate_ids(prompts, max_tokens=max_tokens, temperature=0.0)
    dt = time.perf_counter() - t
    gen_tokens = sum(r.completion_tokens for r in replies)
    prompt_tokens = sum(len(p) for p in prompts)
    return {"prompts": len(prompts), "seconds": round(dt, 2), "generated_tokens": gen_tokens,
            "prompt_tokens": prompt_tokens, "gen_tok_s": gen_tokens / dt,
            "processed_tok_s": (gen_tokens + prompt_tokens) / dt,
            "stop": sum(r.finish_reason == "stop" for r in replies), "_replies": replies}


def profile_fast(gen, prompts: list[list[int]], max_tokens: int) -> dict:
    """Op-level breakdown of the fast decoder, grouped by the decoder's own pieces."""
    from torch.profiler import ProfilerActivity, profile, record_function

    fd = gen._fast
    wrapped = {}
    for name in ("prefill", "decode", "_attend", "_logits", "_mlp"):
        f = getattr(fd, name)

        def w(*a, _f=f, _n=name):
            with record_function("sf::" + _n):
                return _f(*a)
        wrapped[name] = w
        setattr(fd, name, w)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            gen.generate_ids(prompts, max_tokens=max_tokens, temperature=0.0)
            wall = time.perf_counter() - t
    finally:
        for name in wrapped:
            delattr(fd, name)
    ev = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key.startswith("sf::")}
    # Nested ranges: prefill and decode both contain _logits/_mlp; _attend is decode-only.
    decode = ev.get("sf::decode", 0.0)
    prefill = ev.get("sf::prefill", 0.0)
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return {"wall_s": round(wall, 2), "prefill_s": round(prefill, 2), "decode_s": round(decode, 2),
            "scheduling_and_sampling_s": round(wall - prefill - decode, 2),
            "mlp_s (prefill+decode)": round(ev.get("sf::_mlp", 0.0), 2),
            "decode_attention_s": round(ev.get("sf::_attend", 0.0), 2),
            "lm_head_s (prefill+decode)": round(ev.get("sf::_logits", 0.0), 2),
            "top_ops": [(e.key, round(e.self_cpu_time_total / 1e6, 2)) for e in top if not e.key.startswith("sf::")]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--old-prompts", type=int, default=16)
    ap.add_argument("--new-prompts", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--old-batch", type=int, default=8)
    ap.add_argument("--new-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument("--kernels", nargs="+", default=["native"], choices=["native", "onednn-bf16", "onednn-fp32"],
                    help="linear kernels of the new decoder, each run in turn on the same prompts")
    ap.add_argument("--profile", action="store_true", help="add a profiler breakdown of the new decoder")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "regen_local.json"))
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from specforge_core.regen.local import LocalGenerator, _FastDecoder

    new = LocalGenerator(args.model, device="cpu", batch_size=args.new_batch, decoder="fast",
                         linear_kernel=args.kernels[0])
    old = LocalGenerator.__new__(LocalGenerator)  # same weights, HF generate path
    old.__dict__.update(new.__dict__)
    old.batch_size, old.decoder, old._fast = args.old_batch, "hf", None
    convs = gsm8k_prompts(max(args.new_prompts, args.old_prompts))
    prompts = [new.render(c) for c in convs]

    fw = [forward_rate(new.model)]
    res: dict = {"model": args.model, "threads": torch.get_num_threads(), "max_tokens": args.max_tokens,
                 "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "load_avg_start": os.getloadavg()}
    if not args.skip_old:
        res["old"] = run_decoder(old, prompts[:args.old_prompts], args.max_tokens)
        res["old"]["batch"] = args.old_batch
        fw.append(forward_rate(new.model))
    runs = []
    for kernel in args.kernels:
        if kernel != new.linear_kernel:   # same model, the decoder rebuilt over it with the other kernel
            new._fast = _FastDecoder(new.model, linear_kernel=kernel)
            new.linear_kernel = kernel
        key = "new" if kernel == args.kernels[0] else f"new_{kernel}"
        res[key] = run_decoder(new, prompts[:args.new_prompts], args.max_tokens)
        res[key].update(batch=args.new_batch, linear_kernel=kernel)
        runs.append(key)
        fw.append(forward_rate(new.model))
    res["forward_tok_s_runs"] = [round(x, 1) for x in fw]
    res["forward_tok_s"] = statistics.median(fw)
    for k in ["old"] + runs:
        if k in res:
            r = res[k]
            r["gen_vs_forward"] = round(r["gen_tok_s"] / res["forward_tok_s"], 3)
            r["processed_vs_forward"] = round(r["processed_tok_s"] / res["forward_tok_s"], 3)
            r["gen_tok_s"], r["processed_tok_s"] = round(r["gen_tok_s"], 1), round(r["processed_tok_s"], 1)
    if "old" in res:
        a = res["old"].pop("_replies")
        b = res["new"]["_replies"][:len(a)]
        res["same_tokens_as_old"] = sum(x.content == y.content for x, y in zip(a, b))
        res["compared"] = len(a)
    for k in runs[1:]:
        ref = res["new"]["_replies"]
        res[k]["same_replies_as_first_kernel"] = sum(x.content == y.content for x, y in zip(ref, res[k]["_replies"]))
        res[k]["speed_vs_first_kernel"] = round(res[k]["gen_tok_s"] / res["new"]["gen_tok_s"], 2)
    for k in runs:
        res[k].pop("_replies")
    if args.profile:
        res["profile_new"] = profile_fast(new, prompts[:min(args.new_prompts, 2 * args.new_batch)], args.max_tokens)
    res["load_avg_end"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
