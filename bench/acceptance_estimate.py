"""A draft's acceptance length on a benchmark in minutes, per category: the target answers every prompt greedily in
batches (the local decoder `regenerate --backend local` uses), then `evaluate`'s teacher-forced pass scores the
draft on those answers (one target forward per prompt). No speculative decoding runs, so there is no speedup
here; what it buys is the acceptance length of a whole benchmark at a tenth of `evaluate`'s cost, which the
teacher-forced pass predicts exactly where `evaluate` replays it (agreement 1.0 for the shipped draft).

The batched answers can differ from one-at-a-time greedy ones where float noise flips a near-tie, so the figure is
for this text, which is what `evaluate --teacher-forced` would report on its own baseline's text.

    python bench/acceptance_estimate.py                       # the shipped draft, 80 MT-bench first turns, 256 tokens
    python bench/acceptance_estimate.py --draft workspace/recipes/r1/draft --max-prompts 16

Prints the time of each half and the table; saves bench/results/acceptance_estimate.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from specforge_core.evaluate.benchsets import prompt_source  # noqa: E402
from specforge_core.evaluate.inprocess import load_target_and_draft, read_prompts, render_prompt  # noqa: E402
from specforge_core.evaluate.spec_decode import GenerationResult, SpecConfig  # noqa: E402
from specforge_core.evaluate.teacher_forced import teacher_forced  # noqa: E402
from specforge_core.regen.local import LocalGenerator  # noqa: E402
from specforge_core.targets import load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="default")
    ap.add_argument("--draft", default="default")
    ap.add_argument("--prompts", default="mtbench", help="a shipped set (mtbench, gsm8k, humaneval) or a prompts file")
    ap.add_argument("--max-prompts", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--chat-template", default="chatml")
    ap.add_argument("--configs", nargs="+", default=["1,3,1,4", "1,5,1,6"], help="greedy chains batch,steps,1,steps+1")
    ap.add_argument("--batch-size", type=int, default=40)
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "acceptance_estimate.json"))
    args = ap.parse_args()

    specs = [SpecConfig.parse(c, where="--configs") for c in args.configs]
    if any(s.topk != 1 or not s.speculative for s in specs):
        ap.error("--configs: greedy chains only (topk 1): a tree has no single chain to score")
    items = read_prompts(prompt_source(args.prompts), args.max_prompts)
    tok = load_tokenizer(args.target)
    prompts = [render_prompt(it, tok, args.chat_template) for it in items]

    t0 = time.time()
    gen = LocalGenerator(args.target, batch_size=args.batch_size)
    replies = gen.generate_ids(prompts, args.max_new_tokens)
    answers = [r.token_ids for r in replies]
    answer_s = time.time() - t0
    n_tok = sum(len(a) for a in answers)
    print(f"answers: {len(answers)} prompts, {n_tok} tokens in {answer_s:.0f} s ({n_tok / answer_s:.1f} tokens/s, "
          f"linear kernel {gen.linear_kernel})", flush=True)
    del gen

    t0 = time.time()
    target, draft, src, family = load_target_and_draft(args.target, args.draft, torch.device("cpu"), torch.float32)
    if family != "eagle3":
        sys.exit(f"{src.path}: a {family} draft; the teacher-forced pass scores EAGLE3 drafts")
    base = [GenerationResult(tokens=a) for a in answers]
    tf = teacher_forced(target, draft, prompts, base, specs, categories=[it.get("category") for it in items])
    score_s = time.time() - t0
    print(f"teacher-forced pass: {score_s:.0f} s")

    for label, row in tf.items():
        print(f"\n{label}: acceptance length {row['acceptance_length']:.3f} over {row['anchors']} answer positions")
        for cat, r in (row.get("by_category") or {}).items():
            print(f"  {cat:12s} {r['acceptance_length']:.3f}  ({r['anchors']} positions)")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"draft": str(src.path), "target": args.target, "prompts": args.prompts,
                               "n_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                               "answer_tokens": n_tok, "answer_s": answer_s, "score_s": score_s,
                               "teacher_forced": {k: {kk: vv for kk, vv in v.items()
                                                      if kk not in ("agreement", "replayed_steps")}
                                                  for k, v in tf.items()}}, indent=2), encoding="utf-8")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
