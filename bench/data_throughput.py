"""Data throughput: conversations/s for render + tokenise + mask (named template and `auto`), beside
the raw `tokenizer(texts)` batch-encode rate of the same texts, measured side by side in one run.

    .venv/bin/python bench/data_throughput.py [--data ../shared/data/sharegpt_sample.json]
        [--tokenizer default] [--template chatml] [--repeat 10] [--batch 1000]

Targets on the 2-core dev machine: named >= 5,000 conv/s and >= 0.5 x raw encode; auto >= 1,000 conv/s.
Prints a table and saves bench/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specforge_core.data.mask import mask_rows  # noqa: E402
from specforge_core.data.schema import RowError, normalize_row  # noqa: E402
from specforge_core.data.templates import get_template  # noqa: E402
from specforge_core.targets import load_tokenizer  # noqa: E402


def load_rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for obj in data:
        try:
            rows.append(normalize_row(obj))
        except RowError:
            pass
    return rows


def best_rate(fn, n_items: int, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_items / best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sharegpt_sample.json"))
    ap.add_argument("--tokenizer", default="default")
    ap.add_argument("--template", default="chatml")
    ap.add_argument("--repeat", type=int, default=10, help="repeat the file this many times (more conversations)")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_throughput.json"))
    args = ap.parse_args()

    tok = load_tokenizer(args.tokenizer)
    rows = load_rows(Path(args.data)) * args.repeat
    n = len(rows)
    tmpl = get_template(args.template)
    texts = [tmpl.render(r["conversations"])[0] for r in rows]
    batches = [rows[i:i + args.batch] for i in range(0, n, args.batch)]
    text_batches = [texts[i:i + args.batch] for i in range(0, n, args.batch)]

    def raw():
        for b in text_batches:
            tok(b)

    def named():
        for b in batches:
            mask_rows(b, tok, args.template)

    def auto():
        for b in batches:
            mask_rows(b, tok, "auto")

    # warm up (template compilation, tokenizer caches)
    mask_rows(rows[:50], tok, "auto")
    mask_rows(rows[:50], tok, args.template)
    tok(texts[:50])
    n_tokens = sum(len(x) for x in tok(texts[:2000])["input_ids"]) / min(n, 2000)
    r_raw = best_rate(raw, n)
    r_named = best_rate(named, n)
    r_auto = best_rate(auto, n, reps=2)
    res = {
        "data": args.data, "conversations": n, "mean_tokens": round(n_tokens, 1), "tokenizer": args.tokenizer,
        "template": args.template, "batch": args.batch, "cpus": os.cpu_count(), "python": platform.python_version(),
        "raw_encode_conv_per_s": round(r_raw), "named_conv_per_s": round(r_named), "auto_conv_per_s": round(r_auto),
        "named_over_raw": round(r_named / r_raw, 3),
        "targets": {"named_conv_per_s>=5000": r_named >= 5000, "named_over_raw>=0.5": r_named / r_raw >= 0.5,
                    "auto_conv_per_s>=1000": r_auto >= 1000},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(f"{n} conversations, {n_tokens:.0f} tokens each on average, tokenizer {args.tokenizer}")
    print(f"  raw tokenizer(texts) batch encode : {r_raw:10.0f} conv/s")
    print(f"  named template ({args.template:>8}) mask  : {r_named:10.0f} conv/s  ({r_named / r_raw:.2f} x raw)")
    print(f"  auto (prefix diff) mask           : {r_auto:10.0f} conv/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
