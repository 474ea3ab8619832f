"""An offline training step with a top-k teacher, two ways in one process: the [B, T, V] logits rebuilt from
the stored top-k (what training did before) vs the k ids read straight into the draft vocab (`TopKLogits`).

    .venv/bin/python bench/offline_teacher.py                     # the smollm2-cpu recipe's shapes
    .venv/bin/python bench/offline_teacher.py --length 512 --steps 4 --dtype float32

The draft is the recipe's (SmolLM2-135M's config, draft vocab 8192, TTT 5, batch 8 x 768 tokens, top-64),
with random states: speed does not depend on the values. Each measured step is a whole optimizer step
(teacher, TTT forward and backward, AdamW), the two ways alternating so that a busy machine slows both alike;
the teacher alone (what differs) is timed too. Both ways must give the same loss, bit for bit.
Saves bench/results/offline_teacher.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_step import PRESETS  # noqa: E402 - bench/ is the script's own directory: SmolLM2's config


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=768)
    ap.add_argument("--draft-vocab-size", type=int, default=8192)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--ttt-length", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per way (after one warm-up each)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="the teacher's dtype and the step's autocast, as the recipe's `train.dtype`")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "offline_teacher.json"))
    args = ap.parse_args(argv)

    import torch
    from transformers import LlamaConfig

    from specforge_core.models.eagle3 import build_draft_config
    from specforge_core.models.registry import build_draft
    from specforge_core.models.target import default_layer_ids
    from specforge_core.offline.store import TopKLogits
    from specforge_core.models.ttt import draft_teacher, ttt_forward

    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    B, T, VD, K = args.batch, args.length, args.draft_vocab_size, args.topk
    tcfg = LlamaConfig(**PRESETS["smollm2"])
    V = tcfg.vocab_size
    draft = build_draft(build_draft_config(tcfg, VD, layer_ids=default_layer_ids(tcfg.num_hidden_layers)))
    draft.load_embedding(torch.randn(V, tcfg.hidden_size) * 0.02)
    in_draft = torch.randperm(V)[:VD].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[in_draft] = True
    draft.set_vocab_mapping(in_draft - torch.arange(VD), t2d)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-4)

    ids = torch.randint(0, V, (B, T))
    am = torch.ones(B, T, dtype=torch.long)
    lm = torch.ones(B, T, dtype=torch.long)
    lm[:, : T // 4] = 0                                   # a prompt, as in chat data
    aux = torch.randn(B, T, 3 * tcfg.hidden_size).to(dtype)
    # Top-k rows as a dump stores them: descending fp16 logits relative to the top one; distinct ids, the top
    # half in the draft vocab and the rest outside it.
    vals = -torch.rand(B, T, K).mul(12).sort(-1).values
    vals[..., 0] = 0.0
    out_draft = (~t2d).nonzero().squeeze(1)
    step_ids = torch.arange(K // 2) * 97                  # 97 * K/2 < both vocab sizes: distinct in a row
    top_ids = torch.cat([in_draft[(torch.randint(0, VD, (B, T, 1)) + step_ids) % VD],
                         out_draft[(torch.randint(0, len(out_draft), (B, T, 1)) + step_ids) % len(out_draft)]], -1)
    vals, top_ids = vals.to(torch.float16).to(dtype), top_ids.long()

    def teacher(way: str):
        sparse = TopKLogits(vals, top_ids, V, dtype)
        return sparse if way == "draft-vocab" else sparse.dense()

    def step(way: str) -> tuple[float, float, float]:
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        tl = teacher(way)
        with torch.no_grad():
            draft_teacher(tl, draft.t2d)                  # what the TTT does with it first, timed alone here
        t1 = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
        with ctx:
            out = ttt_forward(draft, ids, aux, tl, lm, am, ttt_length=args.ttt_length)
        out.loss.backward()
        opt.step()
        return time.perf_counter() - t0, t1 - t0, float(out.loss.detach())

    ways = ("dense-rebuild", "draft-vocab")
    times = {w: [] for w in ways}
    teach = {w: [] for w in ways}
    # Same weights for both ways at each round: the loss must agree bit for bit.
    state = {k: v.clone() for k, v in draft.state_dict().items()}
    for r in range(args.steps + 1):
        losses = {}
        for w in ways:
            draft.load_state_dict(state)
            opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-4)
            total, tt, loss = step(w)
            losses[w] = loss
            if r > 0:
                times[w].append(total)
                teach[w].append(tt)
            print(f"round {r} {w:14s} step {total:6.2f} s  teacher {tt:5.2f} s  loss {loss:.6f}", flush=True)
        if losses["dense-rebuild"] != losses["draft-vocab"]:
            raise SystemExit(f"the two ways disagree: {losses}")
        state = {k: v.clone() for k, v in draft.state_dict().items()}
    res = {"bench": "offline_teacher", "batch": B, "length": T, "vocab": V, "draft_vocab": VD, "topk": K,
           "ttt_length": args.ttt_length, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
           "ways": {w: {"step_s_median": statistics.median(times[w]), "teacher_s_median": statistics.median(teach[w]),
                        "steps": times[w]} for w in ways}}
    a, b = res["ways"]["dense-rebuild"], res["ways"]["draft-vocab"]
    res["step_speedup"] = a["step_s_median"] / b["step_s_median"]
    print(f"\n{'way':15s} {'step s':>8s} {'teacher s':>10s}")
    for w in ways:
        print(f"{w:15s} {res['ways'][w]['step_s_median']:8.2f} {res['ways'][w]['teacher_s_median']:10.3f}")
    print(f"step speedup {res['step_speedup']:.2f}x (same loss bit for bit each round)")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"saved {out}")
    return res


if __name__ == "__main__":
    main()
