"""The offline hidden-state store against SpecForge's layout, side by side in one run.

For each store format (bfloat16, float16, float32, fp8_e4m3) and for the naive baseline (one
`torch.save` file per sample holding the three aux states and the last hidden state in bf16 plus ids
and mask, as SpecForge does), on the same synthetic samples:
  - bytes per token on disk (and the formula: SpecForge's 8H + 16 beside ours),
  - write throughput (tokens/s, fsync'd shards for the store; plain torch.save for the baseline),
  - read throughput (tokens/s) of padded training batches in a shuffled order,
  - the fp8 quantisation error of the aux states (relative rms), the only lossy part of fp8.
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


def bench_store(samples, H: int, fmt: str, root: Path, batch: int) -> dict:
    d = root / f"store-{fmt}"
    (d).mkdir(parents=True)
    json.dump({"kind": "hidden-states", "format_version": 1, "config": {}, "store_format": 1, "format": fmt,
               "hidden_size": H, "layer_ids": [1, 2, 3]}, open(d / "run.json", "w"))
    tokens = sum(s[0].numel() for s in samples)
    t0 = time.perf_counter()
    w = StoreWriter(d, fmt, 3, shard_bytes=64 << 20)
    for i, (ids, lm, aux, last) in enumerate(samples):
        pos = teacher_positions(lm)
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
    return {"format": fmt, "bytes_per_token": size / tokens,
            "bytes_per_token_formula": bytes_per_token(H, fmt, frac),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--formats", default="bfloat16,float16,float32,fp8_e4m3")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir, removed after)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "offline_store.json"))
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    samples = make_samples(a.samples, a.hidden)
    tokens = sum(s[0].numel() for s in samples)
    root = Path(tempfile.mkdtemp(prefix="offline_store_bench_", dir=a.workdir))
    try:
        rows = [bench_naive(samples, a.hidden, root, a.batch)]
        for fmt in a.formats.split(","):
            rows.append(bench_store(samples, a.hidden, fmt, root, a.batch))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res = {"hidden_size": a.hidden, "samples": a.samples, "tokens": tokens, "batch": a.batch,
           "specforge_bytes_per_token_formula": specforge_bytes_per_token(a.hidden),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
           "note": "synthetic states; store writes are fsync'd per shard, the baseline's are not", "rows": rows}
    print(f"H={a.hidden}, {a.samples} samples, {tokens} tokens; SpecForge formula 8H+16 = "
          f"{specforge_bytes_per_token(a.hidden)} B/token")
    print(f"{'format':42s} {'B/token':>9s} {'vs SF':>6s} {'write tok/s':>12s} {'read tok/s':>12s} {'fp8 err':>8s}")
    for r in rows:
        e = f"{r['aux_rel_rms_error']:.4f}" if r["aux_rel_rms_error"] is not None else "-"
        print(f"{r['format']:42s} {r['bytes_per_token']:9.1f} {r['vs_specforge']:6.2f} "
              f"{r['write_tokens_per_s']:12.0f} {r['read_tokens_per_s']:12.0f} {e:>8s}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
