"""Benchmark: training step time with random micro-batches vs batches grouped by length.

Random batches of samples whose lengths range from tens to hundreds of tokens are padded to their
longest one; `--group-by-length N` sorts each N consecutive samples of the epoch's shuffled order by
length. This runs the real trainer (the same data, draft and settings as an existing run's `run.json`,
typically a recipe's offline run) for `--steps` optimizer steps once per setting, alternating settings
in rounds (the machine is shared: compare the ratio), and reports seconds per step (median over the
steps after the first of each run), padded and real tokens per step, and real (unpadded) tokens per
second, the figure to compare: a grouped run's first steps hold the longest samples of their group, so
its steps are not like a random run's.

    .venv/bin/python bench/train_grouping.py --run /work/recipe_runs/r2/run [--steps 12] [--rounds 2]
        [--groups 0 512]

Writes bench/results/train_grouping.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_run(base: dict, group: int, steps: int, out: Path) -> dict:
    from specforge_core.events import Events
    from specforge_core.training.batches import EpochBatches
    from specforge_core.training.config import TrainConfig
    from specforge_core.training.trainer import train

    cfg = TrainConfig(**{**base, "output_dir": str(out), "resume": False, "max_steps": steps, "log_every": 1,
                         "eval_every": 10 ** 6, "save_every": 10 ** 6,
                         "group_by_length": group, "report_to": ["none"], "early_stop_patience": 0})
    events = Events(path=out.parent / f"{out.name}.events.jsonl", echo=False)
    # The batches the run will see: padded (B x longest) and real tokens per step.
    seen: list[tuple[int, int]] = []
    real_iter = EpochBatches.iter_epoch

    def counting(self, epoch, start=0):
        for b, batch in real_iter(self, epoch, start):
            seen.append((batch.input_ids.numel(), int(batch.attention_mask.sum())))
            yield b, batch
    EpochBatches.iter_epoch = counting
    try:
        train(cfg, events)
    finally:
        EpochBatches.iter_epoch = real_iter
    times = [r["time"] for r in events.records if r.get("event") == "progress" and r.get("what") == "steps"]
    per_step = [b - a for a, b in zip(times, times[1:])]
    seen = seen[:steps]
    return {"group_by_length": group, "steps": len(times), "s_per_step": statistics.median(per_step),
            "padded_tokens_per_step": statistics.mean(p for p, _ in seen),
            "real_tokens_per_step": statistics.mean(r for _, r in seen)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a training run directory (its run.json gives the settings)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--groups", type=int, nargs="+", default=[0, 512])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_grouping.json"))
    args = ap.parse_args(argv)

    base = json.loads((Path(args.run) / "run.json").read_text())["config"]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for g in args.groups:
                res = one_run(base, g, args.steps, Path(tmp) / f"g{g}_r{r}")
                print(json.dumps(res), flush=True)
                runs.append(res)
    summary = {}
    for g in args.groups:
        mine = [x for x in runs if x["group_by_length"] == g]
        summary[str(g)] = {"s_per_step": round(statistics.median(x["s_per_step"] for x in mine), 3),
                           "padded_tokens_per_step": round(statistics.mean(x["padded_tokens_per_step"] for x in mine)),
                           "real_tokens_per_step": round(statistics.mean(x["real_tokens_per_step"] for x in mine))}
        summary[str(g)]["real_tokens_per_s"] = round(summary[str(g)]["real_tokens_per_step"]
                                                     / summary[str(g)]["s_per_step"], 1)
    g0, g1 = str(args.groups[0]), str(args.groups[-1])
    res = {"run": args.run, "steps": args.steps, "rounds": args.rounds, "runs": runs, "summary": summary,
           "speedup_real_tokens_per_s": round(summary[g1]["real_tokens_per_s"] / summary[g0]["real_tokens_per_s"], 2)}
    print(json.dumps(res["summary"], indent=2), "\nreal tokens/s, grouped vs not:", res["speedup_real_tokens_per_s"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
