"""Peak host memory of one TTT forward+backward: the fast `ttt_forward` backends vs `ttt_reference`.

Each measurement runs in a fresh subprocess (torch allocations are invisible to tracemalloc, and
ru_maxrss only grows), reporting peak RSS minus the RSS after the model and inputs were built.

    .venv/bin/python bench/ttt_memory.py [--T 1024] [--K 7] [--modes sdpa,eager,reference]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _one(mode: str, T: int, K: int, hidden: int, device: str) -> dict:
    import torch
    from transformers import LlamaConfig

    from specforge_core.models.eagle3 import build_draft_config
    from specforge_core.models.registry import build_draft
    from specforge_core.models.ttt import ttt_forward

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the reference is test code
    from ttt_reference import ttt_reference

    torch.manual_seed(0)
    V, VD = 4096, 2048
    tcfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4 * T)
    draft = build_draft(build_draft_config(tcfg, VD, [1, 1, 2])).to(device)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[:VD] = True
    draft.set_vocab_mapping(torch.zeros(VD, dtype=torch.long), t2d)
    ids = torch.randint(0, V, (1, T), device=device)
    aux = torch.randn(1, T, 3 * hidden, device=device)
    logits = torch.randn(1, T, V, device=device)
    lm = torch.ones(1, T, dtype=torch.long, device=device)
    am = torch.ones(1, T, dtype=torch.long, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    base_rss = _rss_mib()
    t0 = time.time()
    if mode == "reference":
        out = ttt_reference(draft, ids, aux, logits, lm, am, ttt_length=K)
    else:
        out = ttt_forward(draft, ids, aux, logits, lm, am, ttt_length=K, attention_backend=mode)
    out.loss.backward()
    secs = time.time() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    row = {"mode": mode, "T": T, "K": K, "hidden": hidden, "device": device, "seconds": round(secs, 2),
           "loss": round(float(out.loss.detach()), 5), "peak_rss_over_base_mib": round(peak_rss - base_rss, 1)}
    if device == "cuda":
        row["peak_cuda_over_base_mib"] = round(torch.cuda.max_memory_allocated() / 2**20 - base, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--K", type=int, default=7)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--modes", default="sdpa,eager,reference")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(_one(a.one, a.T, a.K, a.hidden, a.device)))
        return
    for mode in a.modes.split(","):
        r = subprocess.run([sys.executable, __file__, "--one", mode, "--T", str(a.T), "--K", str(a.K),
                            "--hidden", str(a.hidden), "--device", a.device], capture_output=True, text=True)
        print(r.stdout.strip() or f'{{"mode": "{mode}", "error": {json.dumps(r.stderr[-500:])}}}', flush=True)


if __name__ == "__main__":
    main()
