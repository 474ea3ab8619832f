"""Prompt files for the CPU recipe's training corpus (issue 13), for `regenerate --backend local`.

  base    - GSM8K train questions + ShareGPT user turns (multi-turn rows keep all their user turns;
            `regenerate` answers them turn by turn), deduplicated, shuffled with a fixed seed.
  magpie  - Magpie-style self-written user prompts: the target samples from its chat template's user
            header (`<|im_start|>user\\n` after the default system turn) at temperature ~1; the
            samples are deduplicated and filtered (empty, too short/long, not mostly text).

Every prompt is checked against the benchmark sets (MT-bench questions, HumanEval prompts): a prompt
whose normalised text contains, or is contained in, a benchmark prompt is dropped. Rows are our
conversation schema {"id", "conversations": [{"role", "content"}]}.

    .venv/bin/python bench/recipe_prompts.py base --out /work/recipe_data/prompts_base.jsonl --gsm8k 2850
    .venv/bin/python bench/recipe_prompts.py magpie --out /work/recipe_data/prompts_magpie.jsonl --n 2000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("SPECFORGE_DATA", "/work/shared/data"))
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", text.lower())).strip()


def benchmark_texts() -> list[str]:
    """Normalised MT-bench turns and HumanEval prompts: never training data."""
    out = []
    p = DATA / "mt_bench_questions.jsonl"
    if p.exists():
        with open(p) as f:
            out += [norm(t) for line in f for t in json.loads(line)["turns"]]
    p = DATA / "humaneval.jsonl.gz"
    if p.exists():
        with gzip.open(p, "rt") as f:
            out += [norm(json.loads(line)["prompt"]) for line in f]
    return [t for t in out if len(t) >= 20]


class Dedup:
    def __init__(self):
        self.seen: set[str] = set()
        self.bench = benchmark_texts()
        self.dropped = {"duplicate": 0, "benchmark": 0}

    def keep(self, user_turns: list[str]) -> bool:
        key = " || ".join(norm(t) for t in user_turns)
        if key in self.seen:
            self.dropped["duplicate"] += 1
            return False
        for t in user_turns:
            n = norm(t)
            if len(n) >= 20 and any(n in b or b in n for b in self.bench):
                self.dropped["benchmark"] += 1
                return False
        self.seen.add(key)
        return True


def base_rows(n_gsm8k: int, seed: int) -> tuple[list[dict], dict]:
    dd = Dedup()
    rows = []
    with open(DATA / "sharegpt_sample.json") as f:
        sharegpt = json.load(f)
    for c in sharegpt:
        conv = [{"role": ROLES[t["from"]], "content": t["value"]} for t in c["conversations"]
                if t["from"] in ROLES]
        users = [t["content"] for t in conv if t["role"] == "user"]
        if users and dd.keep(users):
            rows.append({"id": f"sharegpt-{c['id']}", "conversations": conv})
    n_share = len(rows)
    with open(DATA / "gsm8k_train.jsonl") as f:
        for i, line in enumerate(f):
            if len(rows) - n_share >= n_gsm8k:
                break
            q = json.loads(line)["question"]
            if dd.keep([q]):
                rows.append({"id": f"gsm8k-train-{i}", "conversations": [{"role": "user", "content": q}]})
    random.Random(seed).shuffle(rows)
    return rows, {"sharegpt": n_share, "gsm8k": len(rows) - n_share, **dd.dropped}


def magpie_rows(n: int, seed: int, batch: int, max_tokens: int, temperature: float, top_p: float,
                existing: list[str]) -> tuple[list[dict], dict]:
    from specforge_core.regen.local import LocalGenerator

    gen = LocalGenerator("default", device="cpu", batch_size=batch, seed=seed)
    tok = gen.tokenizer
    # The template with an empty user turn, cut right after the user header.
    text = tok.apply_chat_template([{"role": "user", "content": "XXX"}], tokenize=False)
    prefix = tok(text[:text.index("XXX")], add_special_tokens=False)["input_ids"]
    dd = Dedup()
    for t in existing:
        dd.seen.add(norm(t))
    rows, stats = [], {"sampled": 0, "empty_or_short": 0, "too_long": 0, "not_text": 0}
    t0 = time.time()
    while len(rows) < n:
        replies = gen.generate_ids([prefix] * batch * 4, max_tokens=max_tokens, temperature=temperature,
                                   top_p=top_p)
        for r in replies:
            stats["sampled"] += 1
            q = r.content.strip()
            if len(q) < 12 or len(q.split()) < 3:
                stats["empty_or_short"] += 1
                continue
            if r.finish_reason == "length":
                stats["too_long"] += 1
                continue
            if sum(ch.isalpha() or ch.isspace() for ch in q) < 0.6 * len(q):
                stats["not_text"] += 1
                continue
            if dd.keep([q]):
                rows.append({"id": f"magpie-{seed}-{len(rows)}", "conversations": [{"role": "user", "content": q}]})
        print(f"magpie: {min(len(rows), n)}/{n} kept ({len(rows)} so far) of {stats['sampled']} sampled, "
              f"{time.time() - t0:.0f}s", flush=True)
    return rows[:n], {**stats, **dd.dropped}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["base", "magpie"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--gsm8k", type=int, default=2850)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.99)
    ap.add_argument("--exclude", nargs="*", default=[], help="prompt files whose user turns must not repeat")
    args = ap.parse_args(argv)
    if args.kind == "base":
        rows, stats = base_rows(args.gsm8k, args.seed)
    else:
        existing = []
        for p in args.exclude:
            with open(p) as f:
                existing += [t["content"] for line in f for t in json.loads(line)["conversations"]
                             if t["role"] == "user"]
        rows, stats = magpie_rows(args.n, args.seed, args.batch, args.max_tokens, args.temperature, args.top_p,
                                  existing)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(json.dumps({"out": args.out, "rows": len(rows), **stats}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
