"""The offline hidden-state store against SpecForge's layout, side by side in one run.

For each store option (aux format bfloat16, float16, float32, fp8_e4m3, with the last-hidden-state
teacher, and fp8_e4m3 / bfloat16 with the top-64-logits teacher) and for the naive baseline (one
`torch.save` file per sample holding the three aux states and the last hidden state in bf16 plus ids
and mask, as SpecForge does), on the same synthetic samples:
  - bytes per token on disk (and the formula: SpecForge's 8H + 16 beside ours),
  - write throughput (tokens/s, fsync'd shards for the store; plain torch.save for the baseline),
  - read throughput (tokens/s) of padded training batches in a shuffled order,
  - the fp8 quantisation error of the aux states (relative rms), the only lossy part of fp8.
Then the dump job itself against the bare target forward, in the same run (`--no-dump` skips it): a
SmolLM2-135M-config target (random weights by default; `--real-weights` uses the embedded default),
chat samples of 60..250 tokens, the same length-sorted batches; bare = collate + the capture
forward (aux states, final hidden state, logits), dump = the whole dump loop of `dump-hidden-states`
(forward, NaN check, top-k / gather, quantise, fsync'd shard writes). Target: the store costs < 20% on
top of the forward. The quality cost of the lossy options is bench/offline_quality.py.
The sample lengths and loss-mask fraction imitate chat data (lengths 64..2048, about half of the
positions followed by a trained token). Hidden sizes: SmolLM2-135M (576) by default; `--hidden 4096`
gives the Llama-3-8B numbers. Results are printed and saved to bench/results/offline_store.json.

    .venv/bin/python bench/offline_store.py [--hidden 576] [--samples 200] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specforge_core.offline.store import (HiddenStateStore, StoreWriter, bytes_per_token,  # noqa: E402
                                          specforge_bytes_per_token, teacher_positions)


TOPK = 64


def make_samples(n: int, H: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(64, 2048, (1,), generator=g))
        lm = torch.zeros(T, dtype=torch.long)
        start = int(T * 0.45)
        lm[start:] = 1  # a prompt then the assistant's answer: ~half of the positions are trained
        aux = torch.randn(T, 3 * H, generator=g) * 2.0
        last = torch.randn(T, H, generator=g)
        out.append((torch.randint(0, 32000, (T,), generator=g), lm, aux, last))
    return out


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def bench_store(samples, H: int, fmt: str, root: Path, batch: int, teacher: str = "hidden") -> dict:
    name = fmt if teacher == "hidden" else f"{fmt}+top{TOPK}"
    d = root / f"store-{name}"
    (d).mkdir(parents=True)
    json.dump({"kind": "hidden-states", "format_version": 1, "config": {}, "store_format": 2, "format": fmt,
               "hidden_size": H, "layer_ids": [1, 2, 3], "teacher": teacher, "topk": TOPK}, open(d / "run.json", "w"))
    tokens = sum(s[0].numel() for s in samples)
    g = torch.Generator().manual_seed(2)
    t0 = time.perf_counter()
    w = StoreWriter(d, fmt, 3, shard_bytes=64 << 20, teacher=teacher, topk=TOPK)
    for i, (ids, lm, aux, last) in enumerate(samples):
        pos = teacher_positions(lm)
        if teacher == "topk":
            # rows shaped like the dump's (k fp16 values, max 0, best first; int32 ids in a 49152 vocab)
            n = pos.numel()
            vals = -(torch.rand(n, TOPK, generator=g) * 12).sort(-1).values
            vals[:, 0] = 0
            rows = (vals.half(), torch.randint(0, 49152, (n, TOPK), generator=g, dtype=torch.int32))
            w.put("train", i, aux, pos, topk=rows)
        else:
            w.put("train", i, aux, pos, last[pos.long()])
    w.finish({"train": True})
    t_write = time.perf_counter() - t0
    size = dir_bytes(d / "shards")
    st = HiddenStateStore(d)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(1)).tolist()
    t0 = time.perf_counter()
    for b in range(0, len(order), batch):
        idx = order[b:b + batch]
        T = max(samples[i][0].numel() for i in idx)
        st.batch("train", idx, T)
    t_read = time.perf_counter() - t0
    err = None
    if fmt == "fp8_e4m3":
        num = den = 0.0
        for i in range(min(20, len(samples))):
            x = samples[i][2]
            y = st.get("train", i)["aux"]
            num += float(((x - y) ** 2).sum())
            den += float((x ** 2).sum())
        err = (num / den) ** 0.5
    frac = sum(int(s[1][1:].sum()) for s in samples) / tokens
    return {"format": name, "bytes_per_token": size / tokens,
            "bytes_per_token_formula": bytes_per_token(H, fmt, frac, teacher=teacher, topk=TOPK),
            "vs_specforge": size / tokens / specforge_bytes_per_token(H),
            "write_tokens_per_s": tokens / t_write, "read_tokens_per_s": tokens / t_read,
            "aux_rel_rms_error": err}


def bench_naive(samples, H: int, root: Path, batch: int) -> dict:
    d = root / "naive"
    d.mkdir()
    tokens = sum(s[0].numel() for s in samples)
    t0 = time.perf_counter()
    for i, (ids, lm, aux, last) in enumerate(samples):
        torch.save({"input_ids": ids, "loss_mask": lm, "aux_hidden_states": aux.to(torch.bfloat16),
                    "hidden_state": last.to(torch.bfloat16)}, d / f"data_{i}.ckpt")
    t_write = time.perf_counter() - t0
    size = dir_bytes(d)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(1)).tolist()
    t0 = time.perf_counter()
    for b in range(0, len(order), batch):
        idx = order[b:b + batch]
        T = max(samples[i][0].numel() for i in idx)
        aux = torch.zeros(len(idx), T, 3 * H)
        last = torch.zeros(len(idx), T, H)
        for j, i in enumerate(idx):
            x = torch.load(d / f"data_{i}.ckpt")
            n = x["input_ids"].numel()
            aux[j, :n] = x["aux_hidden_states"].float()
            last[j, :n] = x["hidden_state"].float()
    t_read = time.perf_counter() - t0
    return {"format": "naive torch.save per sample (SpecForge)", "bytes_per_token": size / tokens,
            "bytes_per_token_formula": specforge_bytes_per_token(H), "vs_specforge": size / tokens
            / specforge_bytes_per_token(H), "write_tokens_per_s": tokens / t_write,
            "read_tokens_per_s": tokens / t_read, "aux_rel_rms_error": None}


SENTENCES = ["The committee reviewed the quarterly figures and asked for a revised forecast.",
             "Rivers carry sediment from the mountains to the sea over thousands of years.",
             "A good unit test fails for exactly one reason and says which one.",
             "The recipe calls for two cups of flour, a pinch of salt and warm water.",
             "Light from the nearest star takes a little over four years to reach us."]


def write_chat(path: Path, n: int, seed: int = 0) -> Path:
    """Chat samples of roughly 60..250 tokens (a question, a multi-sentence answer)."""
    import random

    rnd = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            answer = " ".join(rnd.choice(SENTENCES) for _ in range(rnd.randint(2, 14)))
            turns = [{"role": "user", "content": f"Tell me something, item {i}."},
                     {"role": "assistant", "content": answer}]
            f.write(json.dumps({"id": f"r{i}", "conversations": turns}) + "\n")
    return path


def bench_dump(root: Path, samples: int, real_weights: bool, options: list[tuple[str, str]], repeats: int) -> dict:
    """Dump throughput beside the bare target forward over the very same batches, alternating runs."""
    from specforge_core.events import null_events
    from specforge_core.models.target import load_target
    from specforge_core.offline.config import DumpConfig
    from specforge_core.offline.dump import _split_stats, dump_hidden_states, length_batches
    from specforge_core.targets import load_tokenizer, resolve_model
    from specforge_core.data.batches import collate

    target_dir = "default"
    if not real_weights:
        from transformers import AutoConfig, LlamaForCausalLM

        conf = AutoConfig.from_pretrained(resolve_model("default"))
        torch.manual_seed(0)
        target_dir = str(root / "smollm2-random")
        LlamaForCausalLM(conf).save_pretrained(target_dir)
        load_tokenizer("default").save_pretrained(target_dir)
    data = write_chat(root / "chat.jsonl", samples)
    base = dict(target_model=target_dir, train_data=[str(data)], chat_template="chatml", max_length=512,
                draft_vocab_size=32000, cache_dir=str(root / "cache"), num_proc=1, device="cpu", splits=["train"],
                batch_tokens=4096, max_batch_size=16, target_dtype="float32")
    est = dump_hidden_states(DumpConfig(**base, output=str(root / "est"), estimate=True), null_events())
    from specforge_core.data.cache import load_cache

    cache = next(p for p in (root / "cache").iterdir() if (p / "done").exists())
    ds = load_cache(cache).train
    lengths, _ = _split_stats(ds)
    order = sorted(range(len(ds)), key=lambda i: (-lengths[i], i))
    groups = length_batches(order, lengths, base["batch_tokens"], base["max_batch_size"])
    target = load_target(target_dir, dtype=torch.float32, device="cpu")

    def bare() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for g in groups:
            rows = ds.select(g) if len(g) > 1 else [ds[g[0]]]
            b = collate(list(rows), g, target.pad_token_id)
            target.capture(b.input_ids, b.attention_mask)
        return time.perf_counter() - t0, time.process_time() - c0

    bare()  # warm-up (allocator, first-call costs)
    tokens = sum(lengths)
    res = {"target": "SmolLM2-135M config, " + ("real weights" if real_weights else "random weights"),
           "samples": len(ds), "tokens": tokens, "batches": len(groups), "estimate_tokens": est["tokens"],
           "bare_forward_s": [], "bare_forward_cpu_s": [], "rows": [],
           "note": "min over repeats; *_cpu: process CPU seconds (all threads), robust to other processes "
                   "sharing the CPU, but blind to time spent waiting on fsync"}
    per = {name: [] for name, _ in options}
    for r in range(repeats):
        w, c = bare()
        res["bare_forward_s"].append(w)
        res["bare_forward_cpu_s"].append(c)
        for name, spec in options:
            fmt, _, k = spec.partition("+top")
            out = root / f"dump-{name}-{r}"
            d = dump_hidden_states(DumpConfig(**base, output=str(out), format=fmt,
                                              teacher="topk" if k else "hidden", topk=int(k or 64)), null_events())
            per[name].append((d["loop_seconds"], d["loop_cpu_seconds"], d["bytes_per_token"]))
            shutil.rmtree(out, ignore_errors=True)
    t_bare, c_bare = min(res["bare_forward_s"]), min(res["bare_forward_cpu_s"])
    res["bare_forward_tokens_per_s"] = tokens / t_bare
    res["bare_forward_tokens_per_cpu_s"] = tokens / c_bare
    for name, _ in options:
        loop, cpu = min(x[0] for x in per[name]), min(x[1] for x in per[name])
        res["rows"].append({"option": name, "dump_tokens_per_s": tokens / loop,
                            "store_overhead_pct": round(100 * (loop / t_bare - 1), 1),
                            "dump_tokens_per_cpu_s": tokens / cpu,
                            "store_overhead_cpu_pct": round(100 * (cpu / c_bare - 1), 1),
                            "bytes_per_token": per[name][0][2], "dump_loop_s": [x[0] for x in per[name]],
                            "dump_loop_cpu_s": [x[1] for x in per[name]]})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--formats", default="bfloat16,float16,float32,fp8_e4m3,bfloat16+top64,fp8_e4m3+top64")
    ap.add_argument("--no-dump", action="store_true", help="skip the dump-vs-forward throughput part")
    ap.add_argument("--dump-samples", type=int, default=32)
    ap.add_argument("--dump-repeats", type=int, default=2)
    ap.add_argument("--dump-formats", default="bfloat16,fp8_e4m3+top64")
    ap.add_argument("--real-weights", action="store_true", help="dump with the embedded SmolLM2 weights")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir, removed after)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "offline_store.json"))
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    samples = make_samples(a.samples, a.hidden)
    tokens = sum(s[0].numel() for s in samples)
    root = Path(tempfile.mkdtemp(prefix="offline_store_bench_", dir=a.workdir))
    try:
        rows = [bench_naive(samples, a.hidden, root, a.batch)]
        for spec in a.formats.split(","):
            fmt, _, k = spec.partition("+top")
            rows.append(bench_store(samples, a.hidden, fmt, root, a.batch, "topk" if k else "hidden"))
        dump = None
        if not a.no_dump:
            dump = bench_dump(root, a.dump_samples, a.real_weights,
                              [(x, x) for x in a.dump_formats.split(",")], a.dump_repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res = {"hidden_size": a.hidden, "samples": a.samples, "tokens": tokens, "batch": a.batch,
           "specforge_bytes_per_token_formula": specforge_bytes_per_token(a.hidden),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
           "note": "synthetic states; store writes are fsync'd per shard, the baseline's are not; top-k rows "
                   f"are k={TOPK} over a 49152 vocab", "rows": rows, "dump_vs_forward": dump}
    print(f"H={a.hidden}, {a.samples} samples, {tokens} tokens; SpecForge formula 8H+16 = "
          f"{specforge_bytes_per_token(a.hidden)} B/token")
    print(f"{'format':42s} {'B/token':>9s} {'vs SF':>6s} {'write tok/s':>12s} {'read tok/s':>12s} {'fp8 err':>8s}")
    for r in rows:
        e = f"{r['aux_rel_rms_error']:.4f}" if r["aux_rel_rms_error"] is not None else "-"
        print(f"{r['format']:42s} {r['bytes_per_token']:9.1f} {r['vs_specforge']:6.2f} "
              f"{r['write_tokens_per_s']:12.0f} {r['read_tokens_per_s']:12.0f} {e:>8s}")
    if dump:
        print(f"\ndump vs bare forward ({dump['target']}, {dump['tokens']} tokens, {dump['batches']} batches, CPU fp32):"
              f" bare forward {dump['bare_forward_tokens_per_s']:.0f} tok/s wall, "
              f"{dump['bare_forward_tokens_per_cpu_s']:.0f} tok/CPU-s")
        for r in dump["rows"]:
            print(f"  {r['option']:18s} dump {r['dump_tokens_per_s']:8.0f} tok/s  store overhead "
                  f"{r['store_overhead_pct']:5.1f}% wall, {r['store_overhead_cpu_pct']:5.1f}% CPU time "
                  f"({r['bytes_per_token']:.0f} B/token)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
