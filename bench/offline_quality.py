"""What each lossy store option costs in draft quality: simulated acceptance length against bf16 storage.

For each store option (aux format x teacher), on the embedded default target (SmolLM2-135M-Instruct,
target_model "default", fp32 forward on CPU): dump the hidden states of the SAME train and eval data,
train an EAGLE3 draft offline from that store with the SAME seed, steps and hyper-parameters, and
evaluate it on the eval split (teacher = that store's own eval split, so a lossy option is judged by
the draft it produces, evaluated as training sees it) and, for a fair comparison, also on the
bf16/hidden eval store (the exact teacher): `sim_accept_len` (1 + sum_j chain_j over the
`ttt_length` steps, training/metrics.py) and `acc_0`. float32/hidden is run as well: it is lossless against bf16 up to
rounding, so its difference from bf16 is the noise floor of this measurement (a different rounding
changes the training trajectory a little).

The data is small and regular chat (capitals, sums) that a draft learns in a few dozen steps; it is
generated here, not read from shared data. Results are printed and saved to
bench/results/offline_quality.json. A few minutes on 2 CPU cores:

    .venv/bin/python bench/offline_quality.py [--steps 80] [--train 96] [--eval 32]
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

from specforge_core.events import null_events, read_events  # noqa: E402
from specforge_core.offline.config import DumpConfig  # noqa: E402
from specforge_core.offline.dump import dump_hidden_states  # noqa: E402
from specforge_core.offline.store import bytes_per_token, specforge_bytes_per_token  # noqa: E402
from specforge_core.training.config import TrainConfig  # noqa: E402
from specforge_core.training.trainer import train  # noqa: E402
from specforge_core.data.toy import write_conversations  # noqa: E402


# (name, aux format, teacher, k); the first is the reference everything is compared with.
OPTIONS = [("bfloat16", "bfloat16", "hidden", None),
           ("fp8_e4m3+top64", "fp8_e4m3", "topk", 64),
           ("float32", "float32", "hidden", None),
           ("fp8_e4m3", "fp8_e4m3", "hidden", None),
           ("bfloat16+top64", "bfloat16", "topk", 64),
           ("fp8_e4m3+top32", "fp8_e4m3", "topk", 32),
           ("fp8_e4m3+top8", "fp8_e4m3", "topk", 8)]


def summarize(rows: list[dict], a, quiet: bool = False) -> None:
    base = rows[0]
    for r in rows:
        r["sim_accept_len_cost_pct"] = round(100 * (base["sim_accept_len"] - r["sim_accept_len"])
                                             / base["sim_accept_len"], 2)
        r["acc_0_cost_pct"] = round(100 * (base["acc_0"] - r["acc_0"]) / max(base["acc_0"], 1e-9), 2)
        r["size_vs_bf16"] = round(r["bytes_per_token"] / base["bytes_per_token"], 3)
    qualify = [r for r in rows if r["sim_accept_len_cost_pct"] < 2.0]
    best = min(qualify, key=lambda r: r["bytes_per_token"]) if qualify else base
    res = {"target": "default (SmolLM2-135M-Instruct, H=576, fp32 forward)", "train_samples": a.train,
           "eval_samples": a.eval, "steps": a.steps, "seed": a.seed, "ttt_length": a.ttt_length,
           "draft_vocab_size": 2048, "specforge_bytes_per_token_576": specforge_bytes_per_token(576),
           "specforge_bytes_per_token_4096": specforge_bytes_per_token(4096),
           "smallest_under_2pct": best["option"],
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
           "note": "sim_accept_len/acc_0: each draft evaluated on the eval split against the exact bf16 "
                   "last-hidden teacher; *_own_teacher: against its own store's eval teacher; "
                   "float32 vs bfloat16 is the noise floor", "rows": rows}
    if not quiet:
        print(f"\n{'option':18s} {'B/token':>8s} {'vs bf16':>8s} {'sim_acc_len':>11s} {'cost %':>7s} "
              f"{'acc_0':>7s} {'B/tok 8B':>9s}")
    for r in rows:
        if not quiet:
            print(f"{r['option']:18s} {r['bytes_per_token']:8.1f} {r['size_vs_bf16']:8.3f} "
                  f"{r['sim_accept_len']:11.4f} {r['sim_accept_len_cost_pct']:7.2f} {r['acc_0']:7.4f} "
                  f"{r['bytes_per_token_8b_f0.5']:9.0f}")
    if not quiet:
        print(f"smallest option costing < 2% simulated acceptance length: {best['option']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    if not quiet:
        print(f"saved {a.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--train", type=int, default=96)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ttt-length", type=int, default=3)
    ap.add_argument("--options", default=",".join(o[0] for o in OPTIONS))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "offline_quality.json"))
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    want = a.options.split(",")
    options = [o for o in OPTIONS if o[0] in want]
    if options[0][0] != "bfloat16":
        options = [OPTIONS[0]] + options
    root = Path(tempfile.mkdtemp(prefix="offline_quality_", dir=a.workdir))
    rows = []
    try:
        tr = write_conversations(root / "train.jsonl", a.train, seed=0)
        ev = write_conversations(root / "eval.jsonl", a.eval, seed=1)
        common = dict(target_model="default", train_data=[str(tr)], eval_data=[str(ev)], chat_template="chatml",
                      max_length=96, draft_vocab_size=2048, cache_dir=str(root / "cache"), num_proc=1,
                      device="cpu")
        ref_store = root / "hs-bfloat16"
        for name, fmt, teacher, k in options:
            store = root / f"hs-{name}"
            t0 = time.time()
            dres = dump_hidden_states(DumpConfig(**common, output=str(store), format=fmt, teacher=teacher,
                                                 topk=k or 64, target_dtype="float32"), null_events())
            t_dump = time.time() - t0
            run = root / f"run-{name}"
            tcfg = dict(target_model="default", chat_template="chatml", max_length=96, draft_vocab_size=2048,
                        cache_dir=str(root / "cache"), num_proc=1, device="cpu", train_hidden_states=str(store),
                        ttt_length=a.ttt_length, lr=2e-3, batch_size=2, epochs=100, max_steps=a.steps,
                        warmup_ratio=0.05, seed=a.seed, output_dir=str(run), eval_max_samples=a.eval)
            t0 = time.time()
            res = train(TrainConfig(**tcfg), null_events())
            t_train = time.time() - t0
            own = res["eval"]
            # the same draft, judged against the exact (bf16 last hidden state) eval teacher
            ref = own
            if name != "bfloat16":
                ref = train(TrainConfig(**{**tcfg, "resume": True, "eval_hidden_states": str(ref_store)}),
                            null_events())["eval"]
            last = [r for r in read_events(run / "metrics.jsonl") if r.get("split") == "train"][-1]
            H = 576
            row = {"option": name, "format": fmt, "teacher": teacher, "topk": k,
                   "bytes_per_token": dres["bytes_per_token"],
                   "bytes_per_token_formula_f0.5": bytes_per_token(H, fmt, 0.5, teacher=teacher, topk=k or 64),
                   "bytes_per_token_8b_f0.5": bytes_per_token(4096, fmt, 0.5, teacher=teacher, topk=k or 64),
                   "sim_accept_len": ref["sim_accept_len"], "acc_0": ref["acc_0"],
                   "sim_accept_len_own_teacher": own["sim_accept_len"], "acc_0_own_teacher": own["acc_0"],
                   "eval_loss": ref["loss"], "final_train_loss": last["loss"],
                   "dump_s": round(t_dump, 1), "train_s": round(t_train, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            summarize(rows, a, quiet=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summarize(rows, a)


if __name__ == "__main__":
    main()
