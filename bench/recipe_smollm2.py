"""Benchmark: the SmolLM2 CPU recipe's draft, as a table (issue 13's targets).

Runs the recipe (or continues it) unless `--read-only`, then prints and saves what it measured:
pooled acceptance length and wall-clock speedup over plain greedy per config on MT-bench first turns
(in process, token-identical to greedy), the held-out simulated acceptance length beside the in-process
one (calibration), and the wall time of every stage.

    .venv/bin/python bench/recipe_smollm2.py --output /work/recipe_runs/r1 [--read-only] [--set k=v ...] [--ship]

Writes bench/results/recipe_smollm2.json. `--ship` copies the recipe's checked draft, with its provenance
(the training run's run.json and metrics, the evaluation's results and calibration), into
`specforge_core/assets/drafts/smollm2-135m-eagle3/`: the draft `--draft default` loads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specforge_core.events import Events  # noqa: E402
from specforge_core.recipes.config import RecipeConfig  # noqa: E402
from specforge_core.recipes.run import STATE_FILE, calibration, recipe  # noqa: E402

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
                                                 "teacher_forced", "by_category", "time_breakdown")} for x in r.get("results", [])]
        res["baseline_time_breakdown"] = (r.get("baseline") or {}).get("time_breakdown")
        res["prompts"], res["finished"] = r.get("prompts"), r.get("finished")
        res["linear_kernel"] = r.get("linear_kernel", "native")   # results from before the option: native
        res["prompts_done"] = (r.get("baseline") or {}).get("prompts", r.get("prompts_done"))   # prompts every mode ran
        # A stopped evaluation leaves results over the prompts it finished (every mode on the same ones)
        # but no calibration file: the table is computed from them the same way.
        cal = out / "eval" / "calibration.json"
        res["calibration"] = json.loads(cal.read_text(encoding="utf-8")) if cal.exists() else calibration(out, r)
    return res


def _draft_readme(out: Path, res: dict) -> str:
    run = json.loads((out / "run" / "run.json").read_text(encoding="utf-8"))["config"]
    rows = "\n".join(f"| {c['config']} | {c['acceptance_length']:.3f} | {c['speedup']:.2f}x | {c['mismatches_vs_baseline']} |"
                     for c in res.get("configs", []))
    partial = "" if res.get("finished") else (
        f"\n\nThe evaluation was stopped after {res.get('prompts_done')} of its {res.get('prompts')} prompts (every mode ran on "
        "the same prompts, interleaved): the figures below are over those.")
    rc = out / "run.json"
    sets = (json.loads(rc.read_text(encoding="utf-8"))["config"].get("set") or []) if rc.exists() else []
    command = "specforge-wb recipe run smollm2-cpu" + (" --set " + " ".join(sets) if sets else "")
    kind = {"onednn-bf16": "bf16", "onednn-fp32": "fp32"}.get(res.get("linear_kernel"))
    kernel = "" if kind is None else (
        f"\n\nEvery mode ran the target's and the draft's linear layers as prepacked oneDNN {kind} matmuls "
        "(`evaluate --linear-kernel auto` on this CPU), plain greedy included; the outputs were compared with "
        "plain greedy under the same kernels.")
    return f"""# smollm2-135m-eagle3: the draft shipped for the embedded default target

An EAGLE3 draft (one decoder layer, draft vocabulary {run['draft_vocab_size']}) for SmolLM2-135M-Instruct,
made by `{command}` on a 2-core CPU (the recipe as it ran, params resolved, is `recipe.json` here: the
shipped YAML may have moved on since) and loaded by `--draft default`
(`evaluate`, `bench`, `serve-reference`, `check-draft`, the Benchmark tab, notebook 03). fp16 safetensors
in the SGLang / vLLM EAGLE3 format.

Trained on SmolLM2-135M-Instruct's own greedy answers (Apache-2.0 model) to: GSM8K-train questions
(openai/grade-school-math, MIT), the distinct requests of FastChat's `dummy_conversation.json` (Apache-2.0),
and requests SmolLM2 wrote itself from its chat template's user header. MT-bench and HumanEval prompts were
removed from the training prompts.

Files: `config.json` + `model.safetensors` (the draft), `run.json` + `metrics.jsonl` (its training run),
`recipe.json` (the recipe that ran), `recipe_state.json` (its stages and their times), `results.json` (in-process evaluation on the 80
MT-bench first turns, greedy, up to 256 new tokens), `calibration.json` (held-out simulated acceptance length
beside the in-process one).{partial}{kernel}

| config | acceptance length | speedup over plain greedy (this 2-core CPU) | outputs differing from greedy |
|---|---|---|---|
{rows}
"""


def ship(out: Path) -> Path:
    """The recipe's draft -> the package's shipped default draft (<= 25 MB), with what made and measured it."""
    from specforge_core.targets import DEFAULT_DRAFT, SHIPPED_DRAFTS_DIR

    state = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))["stages"]
    if state.get("export", {}).get("status") != "done" or not (out / "eval" / "results.json").exists():
        raise SystemExit(f"{out}: no checked export or no evaluation yet; run the recipe through `evaluate` first")
    res = table(out)
    dest = SHIPPED_DRAFTS_DIR / DEFAULT_DRAFT
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for src, name in [(out / "draft" / "config.json", "config.json"),
                      (out / "draft" / "model.safetensors", "model.safetensors"),
                      (out / "run" / "run.json", "run.json"), (out / "run" / "metrics.jsonl", "metrics.jsonl"),
                      (out / "eval" / "results.json", "results.json"),
                      (out / "recipe_state.json", "recipe_state.json"), (out / "run.json", "recipe.json")]:
        shutil.copyfile(src, tmp / name)
    (tmp / "calibration.json").write_text(json.dumps(res["calibration"], indent=2), encoding="utf-8")
    (tmp / "README.md").write_text(_draft_readme(out, res), encoding="utf-8")
    size = sum(p.stat().st_size for p in tmp.iterdir())
    if size > 25 * 2**20:
        raise SystemExit(f"{tmp}: {size / 2**20:.1f} MiB, over the 25 MiB a shipped draft may take")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="smollm2-cpu")
    ap.add_argument("--output", default="workspace/recipes/smollm2-cpu")
    ap.add_argument("--set", nargs="*", default=None, help="recipe params, name=value")
    ap.add_argument("--read-only", action="store_true", help="only read an existing recipe output")
    ap.add_argument("--ship", action="store_true", help="copy the finished recipe's draft into the package as "
                    "the shipped default draft (`--draft default`)")
    args = ap.parse_args()
    out = Path(args.output)
    if not args.read_only:
        recipe(RecipeConfig(action="run", recipe=args.recipe, output=str(out), set=args.set),
               Events(out / "events.jsonl", echo=True))
    res = {**table(out), "targets": TARGETS}
    print(f"recipe output {out}: {res['hours']} h over the stages that ran")
    if "prompts" in res:
        print(f"  evaluation: {res['prompts_done']} of {res['prompts']} prompts"
              + ("" if res["finished"] else " (stopped early: figures over those)"))
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
    for c in res.get("configs", []):
        tf = (c.get("teacher_forced") or {}).get("by_category") or {}
        for cat, row in (c.get("by_category") or {}).items():
            print(f"  {c['config']:9s} {cat:12s} prompts {row['prompts']:3d}  acceptance length "
                  f"{row['acceptance_length'] or 0:.3f}  speedup {row['speedup'] or 0:.2f}x  teacher-forced "
                  f"{(tf.get(cat) or {}).get('acceptance_length') or 0:.3f}")
    for c in res.get("calibration", []):
        print(f"  calibration {c['config']}: simulated (held-out) {c['simulated_heldout']}, in process "
              f"{c['in_process']}, ratio {c['ratio']}; simulated on the benchmark's own answers "
              f"{c.get('simulated_on_benchmark')}, ratio {c.get('ratio_on_benchmark')}, verify steps predicted "
              f"exactly {c.get('agreement')}")
    dest = ROOT / "bench" / "results" / "recipe_smollm2.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(res, indent=2), encoding="utf-8")
    print(f"saved {dest}")
    if args.ship:
        print(f"shipped the draft: {ship(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
