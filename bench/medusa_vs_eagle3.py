"""Benchmark: Medusa heads vs an EAGLE3 draft, trained on the same data for the same wall-clock budget.

Target: the embedded default (SmolLM2-135M-Instruct, fp32, CPU). Data: the target's own greedy answers
to GSM8K-train and ShareGPT first turns (generated as `bench/spec_decode.py` does, from ../shared/data;
not MT-bench), split into train and a held-out tail; or `--data FILE` (conversation rows) to reuse
them. Both families train online through the same `training.trainer.train` on the same rows, seed,
batch, lr and draft vocabulary, each for `--budget-s` seconds of its training loop (the clock starts
at the trainer's `train_plan` event, after the target, the tokenised cache and the draft are ready, so
the family that builds the shared cache first is not charged for it; the loop is then cancelled, which
checkpoints, and a `--resume` pass with max_steps = the steps done runs the held-out evaluation).
The schedule is flat for both (no warmup, a cosine horizon far past any budget): neither family is
favoured by a schedule tuned to its own step count. Both warm-start their lm_heads from the target's.

Reported per family:
- simulated acceptance length on the held-out split at chain length `--chain` (1 + sum_j prod_{i<=j}
  acc_i over the first `--chain` steps / heads, from the trainer's eval row). For EAGLE3 acc_k is the
  TTT step-k accuracy (the draft fed its own earlier outputs); for Medusa acc_i is head i's accuracy on
  its own, so the product treats heads as independent (their errors correlate: an underestimate);
- in-process acceptance length (pooled, bonus counted), SGLang's definition beside it, per-position
  rates, tokens/s and speedup over plain greedy decoding, from the `evaluate` job on held-out MT-bench
  first turns (`--prompts mtbench`, the shipped set) with config 1,C,1,C+1 (EAGLE3: C draft steps;
  Medusa: C heads, top-1 each), greedy (outputs checked identical to plain greedy).

Prints a table and writes bench/results/medusa_vs_eagle3.json. A smoke run (minutes on 2 cores):

    .venv/bin/python bench/medusa_vs_eagle3.py --budget-s 30 --gen-prompts 24 --max-prompts 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from specforge_core.events import Events, JobCancelled  # noqa: E402

FAMILIES = ("eagle3", "medusa")


class BudgetEvents(Events):
    """Events that cancel the job `budget_s` seconds after the trainer's `train_plan` (its loop start)."""

    def __init__(self, budget_s: float, **kw):
        super().__init__(None, **kw)
        self.budget_s = budget_s
        self.loop_start: float | None = None
        self._timer: threading.Timer | None = None

    def emit(self, event: str, **fields):
        rec = super().emit(event, **fields)
        if event == "train_plan" and self._timer is None:
            self.loop_start = time.time()
            self._timer = threading.Timer(self.budget_s, self.cancel)
            self._timer.daemon = True
            self._timer.start()
        return rec

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _spec_decode_bench(shared: Path):
    """bench/spec_decode.py as a module (its training-data generator), reading `shared`."""
    spec = importlib.util.spec_from_file_location("bench_spec_decode", ROOT / "bench" / "spec_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.SHARED = shared
    return mod


def make_data(work: Path, args, events: Events) -> tuple[Path, Path, dict]:
    """(train.jsonl, heldout.jsonl, info): the target's own answers, the last `--heldout` share held out."""
    if args.data:
        rows = [line for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
        info = {"source": str(args.data)}
    else:
        gen = work / "generated.jsonl"
        if not gen.exists() or args.regenerate:
            sd = _spec_decode_bench(Path(args.shared))
            tmp = work / "generated.jsonl.tmp"
            info = sd.make_training_data(tmp, args.gen_prompts, args.gen_max_new_tokens, args.gen_batch, events)
            os.replace(tmp, gen)
        else:
            info = {"reused": str(gen)}
        rows = [line for line in gen.read_text(encoding="utf-8").splitlines() if line.strip()]
    n_eval = max(1, int(len(rows) * args.heldout))
    if len(rows) - n_eval < 1:
        raise SystemExit(f"only {len(rows)} conversation rows: too few to hold {n_eval} out")
    train, heldout = work / "train.jsonl", work / "heldout.jsonl"
    train.write_text("\n".join(rows[:-n_eval]) + "\n", encoding="utf-8")
    heldout.write_text("\n".join(rows[-n_eval:]) + "\n", encoding="utf-8")
    info.update(train_rows=len(rows) - n_eval, heldout_rows=n_eval)
    return train, heldout, info


def sim_accept(row: dict, chain: int) -> float | None:
    """1 + sum_{j<chain} chain_j from a metrics row (older rows: 1 + sum_{j<chain} prod_{i<=j} acc_i;
    None when it has fewer steps)."""
    chains = [row.get(f"chain_{i}") for i in range(chain)]
    if all(c is not None for c in chains):
        return 1.0 + sum(float(c) for c in chains)
    accs = [row.get(f"acc_{i}") for i in range(chain)]
    if any(a is None for a in accs):
        return None
    total, prod = 1.0, 1.0
    for a in accs:
        prod *= float(a)
        total += prod
    return total


def train_family(family: str, work: Path, train: Path, heldout: Path, args) -> tuple[Path, dict]:
    from specforge_core.training.config import TrainConfig
    from specforge_core.training.trainer import train as train_job

    run = work / f"run_{family}"
    if run.exists():
        shutil.rmtree(run)
    common = dict(target_model="default", train_data=[str(train)], eval_data=[str(heldout)], chat_template="chatml",
                  max_length=args.train_max_length, draft_vocab_size=args.draft_vocab_size, lr=args.lr,
                  batch_size=args.batch_size, epochs=10_000, max_steps=10_000_000, warmup_ratio=0.0,
                  output_dir=str(run), cache_dir=str(work / "cache"), num_proc=1, device="cpu", log_every=10,
                  eval_max_samples=args.eval_max_samples, init_from_target=not args.no_init_from_target,
                  seed=args.seed, draft_type=family)
    if family == "eagle3":
        common.update(ttt_length=args.ttt_length)
    else:
        common.update(medusa_num_heads=args.medusa_heads, medusa_num_layers=args.medusa_layers)
    events = BudgetEvents(args.budget_s, echo=not args.quiet)
    t0 = time.time()
    steps = cancelled_at = None
    try:
        summary = train_job(TrainConfig(**common), events)   # ran out of data or steps before the budget
        steps = summary["steps"]
    except JobCancelled as e:   # "stopped at step N; ..." (the checkpoint the cancel wrote)
        m = re.search(r"stopped at step (\d+)", str(e))
        cancelled_at = int(m.group(1)) if m else None
    finally:
        events.stop_timer()
    loop_s = time.time() - (events.loop_start or t0)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if steps is None:
        steps = cancelled_at or max((r["step"] for r in rows if r.get("split") == "train"), default=0)
        # Held-out evaluation of the checkpoint the cancel wrote: resume with nothing left to train.
        fin = train_job(TrainConfig(**{**common, "resume": True, "max_steps": max(steps, 1)}),
                        Events(None, echo=not args.quiet))
        steps = fin["steps"]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ev = [r for r in rows if r.get("split") == "eval"]
    last = ev[-1] if ev else {}
    n = args.medusa_heads if family == "medusa" else args.ttt_length
    info = {"train_steps": steps, "train_loop_s": round(loop_s, 1), "steps_per_s": round(steps / max(loop_s, 1e-9), 3),
            "heldout_eval": {k: v for k, v in last.items() if k == "sim_accept_len" or k.startswith("acc_")
                             or k in ("step", "loss", "samples")},
            "sim_accept_len_logged": last.get("sim_accept_len"), "logged_steps": n,
            f"sim_accept_len_chain{args.chain}": sim_accept(last, args.chain)}
    return run, info


def evaluate_family(family: str, run: Path, work: Path, args) -> dict:
    from specforge_core.evaluate.config import EvaluateConfig
    from specforge_core.evaluate.inprocess import evaluate

    c = args.chain
    cfg = EvaluateConfig(target="default", draft=str(run), prompts=args.prompts, configs=[f"1,{c},1,{c + 1}"],
                         max_new_tokens=args.max_new_tokens, max_prompts=args.max_prompts, device="cpu",
                         output=str(work / f"evaluate_{family}.json"), warmup=1)
    res = evaluate(cfg, Events(None, echo=not args.quiet))
    r = res["results"][0]
    keep = ("config", "draft_family", "acceptance_length", "acceptance_length_sglang",
            "acceptance_length_per_request_mean", "per_position_accept_rate", "accept_histogram", "tokens_per_s",
            "speedup", "mismatches_vs_baseline", "completion_tokens", "verify_steps")
    return {"baseline_tokens_per_s": res["baseline"]["tokens_per_s"], **{k: r.get(k) for k in keep}}


def _fmt(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=600.0, help="training-loop seconds per family")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--chain", type=int, default=3, help="chain length compared: EAGLE3 steps = Medusa heads used")
    ap.add_argument("--prompts", default="mtbench", help="held-out prompts for in-process decoding (shipped "
                    "set name or a file, as `evaluate --prompts`)")
    ap.add_argument("--max-prompts", type=int, default=4, help="prompts decoded in process (small: a smoke run)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--data", default=None, help="conversation rows to train on (default: generate them)")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="../shared/data (GSM8K train, "
                    "ShareGPT) for generating the training data")
    ap.add_argument("--gen-prompts", type=int, default=256, help="training prompts the target answers")
    ap.add_argument("--gen-max-new-tokens", type=int, default=128)
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--regenerate", action="store_true", help="generate the data again even if --work has it")
    ap.add_argument("--heldout", type=float, default=0.1, help="share of the rows held out for simulated acceptance")
    ap.add_argument("--eval-max-samples", type=int, default=64)
    ap.add_argument("--train-max-length", type=int, default=320)
    ap.add_argument("--draft-vocab-size", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ttt-length", type=int, default=4, help="EAGLE3 TTT steps trained (>= --chain)")
    ap.add_argument("--medusa-heads", type=int, default=3, help="Medusa heads trained (>= --chain)")
    ap.add_argument("--medusa-layers", type=int, default=1)
    ap.add_argument("--no-init-from-target", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--quiet", action="store_true", help="no event lines from the jobs")
    ap.add_argument("--work", default=str(ROOT / "workspace" / "bench_medusa_vs_eagle3"))
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "medusa_vs_eagle3.json"))
    args = ap.parse_args()
    if args.ttt_length < args.chain or args.medusa_heads < args.chain:
        ap.error(f"--chain {args.chain} needs --ttt-length and --medusa-heads >= {args.chain}")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train, heldout, data_info = make_data(work, args, Events(None, echo=not args.quiet))

    rows = []
    for fam in args.families:
        print(f"== {fam}: training for {args.budget_s:g}s of loop time", file=sys.stderr)
        run, tinfo = train_family(fam, work, train, heldout, args)
        print(f"== {fam}: in-process decoding on {args.prompts} x {args.max_prompts}", file=sys.stderr)
        einfo = evaluate_family(fam, run, work, args)
        rows.append({"family": fam, "run": str(run), **tinfo, "in_process": einfo})

    table = [{"family": r["family"], "train_steps": r["train_steps"], "train_loop_s": r["train_loop_s"],
              f"sim_accept_len_chain{args.chain}_heldout": r[f"sim_accept_len_chain{args.chain}"],
              "acc_per_step_or_head": [r["heldout_eval"].get(f"acc_{i}") for i in range(args.chain)],
              "config": r["in_process"]["config"],
              "inprocess_acceptance_length": r["in_process"]["acceptance_length"],
              "inprocess_acceptance_length_sglang": r["in_process"]["acceptance_length_sglang"],
              "tokens_per_s": r["in_process"]["tokens_per_s"], "speedup": r["in_process"]["speedup"],
              "mismatches_vs_baseline": r["in_process"]["mismatches_vs_baseline"]} for r in rows]
    out = {"benchmark": "medusa_vs_eagle3", "target": "SmolLM2-135M-Instruct (embedded default, fp32, CPU)",
           "budget_s_per_family": args.budget_s, "chain": args.chain, "data": data_info,
           "prompts": f"{args.prompts} first turns x {args.max_prompts}", "max_new_tokens": args.max_new_tokens,
           "torch_threads": torch.get_num_threads(),
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
           "args": vars(args), "table": table, "full": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")

    head = ["family", "steps", "loop s", f"sim AL@{args.chain} (held-out)", "acc per step/head", "config",
            "AL in-process", "AL sglang-def", "tok/s", "speedup", "mismatch"]
    lines = [head] + [[t["family"], str(t["train_steps"]), _fmt(t["train_loop_s"], 1),
                       _fmt(t[f"sim_accept_len_chain{args.chain}_heldout"]),
                       " ".join(_fmt(a, 2) for a in t["acc_per_step_or_head"]), t["config"],
                       _fmt(t["inprocess_acceptance_length"]), _fmt(t["inprocess_acceptance_length_sglang"]),
                       _fmt(t["tokens_per_s"], 1), _fmt(t["speedup"]), str(t["mismatches_vs_baseline"])]
                      for t in table]
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    for i, l in enumerate(lines):
        print(" | ".join(c.ljust(w) for c, w in zip(l, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
