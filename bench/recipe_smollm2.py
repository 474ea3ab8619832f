"""Benchmark: the SmolLM2 CPU recipe's draft, as a table (issue 13's targets).

Runs the recipe (or continues it) unless `--read-only`, then prints and saves what it measured:
pooled acceptance length and wall-clock speedup over plain greedy per config on MT-bench first turns
(in process, token-identical to greedy), the held-out simulated acceptance length beside the in-process
one (calibration), and the wall time of every stage.

    .venv/bin/python bench/recipe_smollm2.py --output /work/recipe_runs/r1 [--read-only] [--set k=v ...]

Writes bench/results/recipe_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specforge_core.events import Events  # noqa: E402
from specforge_core.recipes.config import RecipeConfig  # noqa: E402
from specforge_core.recipes.run import STATE_FILE, recipe  # noqa: E402

TARGETS = {"acceptance_length_1,3,1,4": 3.0, "speedup_1,3,1,4": 1.5, "hours": 3.0, "calibration_within": 0.10}


def table(out: Path) -> dict:
    state = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
    stages = {s: {"status": v.get("status"), "seconds": v.get("seconds")} for s, v in state["stages"].items()}
    res = {"output": str(out), "stages": stages,
           "hours": round(sum(float(v.get("seconds") or 0) for v in state["stages"].values()) / 3600, 3)}
    ev = out / "eval" / "results.json"
    if ev.exists():
        r = json.loads(ev.read_text(encoding="utf-8"))
        res["baseline_tokens_per_s"] = (r.get("baseline") or {}).get("tokens_per_s")
        res["configs"] = [{k: x.get(k) for k in ("config", "acceptance_length", "acceptance_length_sglang",
                                                 "tokens_per_s", "speedup", "mismatches_vs_baseline",
                                                 "per_position_accept_rate", "verify_step_cost_in_decode_steps",
                                                 "time_breakdown")} for x in r.get("results", [])]
        res["baseline_time_breakdown"] = (r.get("baseline") or {}).get("time_breakdown")
    cal = out / "eval" / "calibration.json"
    if cal.exists():
        res["calibration"] = json.loads(cal.read_text(encoding="utf-8"))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="smollm2-cpu")
    ap.add_argument("--output", default="workspace/recipes/smollm2-cpu")
    ap.add_argument("--set", nargs="*", default=None, help="recipe params, name=value")
    ap.add_argument("--read-only", action="store_true", help="only read an existing recipe output")
    args = ap.parse_args()
    out = Path(args.output)
    if not args.read_only:
        recipe(RecipeConfig(action="run", recipe=args.recipe, output=str(out), set=args.set),
               Events(out / "events.jsonl", echo=True))
    res = {**table(out), "targets": TARGETS}
    print(f"recipe output {out}: {res['hours']} h over the stages that ran")
    for s, v in res["stages"].items():
        print(f"  {s:9s} {v['status']:8s} {v['seconds'] or 0:9.1f} s")
    for c in res.get("configs", []):
        print(f"  {c['config']:9s} acceptance length {c['acceptance_length'] or 0:.3f} "
              f"(SGLang's definition {c['acceptance_length_sglang'] or 0:.3f})  speedup {c['speedup'] or 0:.2f}x "
              f"outputs differing from greedy: {c['mismatches_vs_baseline']}")
    b = (res.get("baseline_time_breakdown") or {}).get("ms_per_step") or {}
    if b:
        print(f"  per step, ms (prefill aside): plain greedy decode {b['total'] or 0:.1f}")
    for c in res.get("configs", []):
        m = ((c.get("time_breakdown") or {}).get("ms_per_step")) or {}
        if m:
            print(f"  {c['config']:9s} verify step {m['total'] or 0:.1f} ms = target verify {m['target'] or 0:.1f} + "
                  f"draft {m['draft'] or 0:.1f} + bookkeeping {m['other'] or 0:.1f}  "
                  f"({c.get('verify_step_cost_in_decode_steps') or 0:.2f} decode steps)")
    for c in res.get("calibration", []):
        print(f"  calibration {c['config']}: simulated (held-out) {c['simulated_heldout']}, in process "
              f"{c['in_process']}, ratio {c['ratio']}")
    dest = ROOT / "bench" / "results" / "recipe_smollm2.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(res, indent=2), encoding="utf-8")
    print(f"saved {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
