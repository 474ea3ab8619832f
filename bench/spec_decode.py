"""Benchmark: in-process EAGLE3 speculative decoding on the embedded SmolLM2 target, on this CPU.

Acceptance length and wall-clock speedup over plain greedy decoding, measured in the same run on
held-out prompts (MT-bench first turns, read from ../shared/data; not copied into the repository).

    .venv/bin/python bench/spec_decode.py [--draft DIR] [--prompts 10] [--max-new-tokens 96]
                                          [--configs 1,3,1,4 1,5,1,6 1,4,2,6] [--threads N]
                                          [--gen-prompts 256] [--train-steps 400] [--ttt-length 4] ...

Without --draft a draft is trained first, quickly: the target answers `--gen-prompts` training
prompts (GSM8K train questions and ShareGPT first turns, not MT-bench) greedily, those
conversations are the training data (so the draft learns the target's own distribution), and
`specforge_core.training.trainer.train` runs `--train-steps` steps. A draft trained this briefly is
far from a well-trained one: its numbers say what little training buys, not what EAGLE3 can do.
The training rows carry the system prompt the tokenizer's template adds, so they are rendered like
the evaluation prompts.

Writes bench/results/spec_decode.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

import torch  # noqa: E402

from specforge_core.events import Events  # noqa: E402


def training_prompts(n: int, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    out: list[str] = []
    with open(SHARED / "gsm8k_train.jsonl", encoding="utf-8") as f:
        gsm = [json.loads(line)["question"] for line in f if line.strip()]
    share = []
    for row in json.loads((SHARED / "sharegpt_sample.json").read_text(encoding="utf-8")):
        turns = row.get("conversations") or []
        if turns and turns[0].get("from") in ("human", "user") and 10 < len(turns[0].get("value", "")) < 600:
            share.append(turns[0]["value"])
    rnd.shuffle(gsm)
    rnd.shuffle(share)
    for a, b in zip(gsm, share):
        out += [a, b]
    return out[:n]


def _default_system_prompt(tok) -> str | None:
    """The system prompt the tokenizer's own template inserts (SmolLM2 adds one), so the training rows
    are rendered like the evaluation prompts (which use the tokenizer's template)."""
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head):text.index("<|im_end|>")]
    return None


def make_training_data(path: Path, n: int, max_new: int, batch: int, events: Events) -> dict:
    """The target's own greedy answers to n training prompts, as conversation rows.

    Generated in left-padded batches with HF `generate` (many times faster on CPU than one prompt at a
    time); padding can move a logit by float noise, which is harmless for training data."""
    from specforge_core.evaluate.inprocess import eos_ids, render_prompt
    from specforge_core.models.target import load_target
    from specforge_core.targets import load_tokenizer

    target = load_target("default")
    tok = load_tokenizer("default")
    stop = eos_ids(tok, target)
    system = _default_system_prompt(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    qs = training_prompts(n)
    enc = [render_prompt({"messages": [{"role": "user", "content": q}]}, tok, "auto") for q in qs]
    order = sorted(range(len(qs)), key=lambda i: len(enc[i]))   # similar lengths share a batch: less padding
    t0 = time.time()
    toks = rows = 0
    with open(path, "w", encoding="utf-8") as f, torch.inference_mode():
        for b in range(0, len(order), batch):
            idx = order[b:b + batch]
            width = max(len(enc[i]) for i in idx)
            ids = torch.tensor([[pad] * (width - len(enc[i])) + enc[i] for i in idx])
            am = torch.tensor([[0] * (width - len(enc[i])) + [1] * len(enc[i]) for i in idx])
            gen = target.model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max_new, do_sample=False,
                                        eos_token_id=stop, pad_token_id=pad)[:, width:].tolist()
            for i, g in zip(idx, gen):
                cut = next((j for j, t in enumerate(g) if t in stop), len(g))
                toks += cut
                answer = tok.decode(g[:cut], skip_special_tokens=True).strip()
                if answer:
                    conv = ([{"role": "system", "content": system}] if system else []) + [
                        {"role": "user", "content": qs[i]}, {"role": "assistant", "content": answer}]
                    f.write(json.dumps({"id": f"gen{i}", "conversations": conv}) + "\n")
                    rows += 1
            events.progress(min(b + batch, len(order)), len(order), what="training answers")
    return {"prompts": n, "rows": rows, "generated_tokens": toks, "seconds": round(time.time() - t0, 1)}


def train_quick_draft(work: Path, args, events: Events) -> tuple[Path, dict]:
    from specforge_core.training.config import TrainConfig
    from specforge_core.training.trainer import train

    data = work / "train.jsonl"
    gen = make_training_data(data, args.gen_prompts, args.gen_max_new_tokens, args.gen_batch, events)
    cfg = TrainConfig(target_model="default", train_data=[str(data)], chat_template="chatml",
                      max_length=args.train_max_length, draft_vocab_size=args.draft_vocab_size, ttt_length=args.ttt_length,
                      lr=args.lr, batch_size=args.batch_size, epochs=100, max_steps=args.train_steps, warmup_ratio=0.05,
                      output_dir=str(work / "run"), cache_dir=str(work / "cache"), num_proc=1, device="cpu",
                      log_every=10)
    t0 = time.time()
    summary = train(cfg, events)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in rows if r.get("split") == "train"][-10:]
    info = {"generated_data": gen, "train_steps": summary["steps"], "train_seconds": round(time.time() - t0, 1),
            "last_train_acc_0": sum(r["acc_0"] for r in last) / max(len(last), 1),
            "last_train_sim_accept_len": sum(r["sim_accept_len"] for r in last) / max(len(last), 1)}
    return work / "run", info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draft", default=None, help="draft dir (serving export, checkpoint or run dir)")
    ap.add_argument("--prompts", type=int, default=10, help="MT-bench first turns to decode")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--configs", nargs="+", default=["1,3,1,4", "1,5,1,6", "1,4,2,6"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--work", default=str(ROOT / "workspace" / "bench_spec_decode"))
    ap.add_argument("--gen-prompts", type=int, default=256, help="training prompts the target answers")
    ap.add_argument("--gen-max-new-tokens", type=int, default=128)
    ap.add_argument("--gen-batch", type=int, default=16, help="prompts per batched generate call")
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--ttt-length", type=int, default=4)
    ap.add_argument("--train-max-length", type=int, default=320)
    ap.add_argument("--draft-vocab-size", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "spec_decode.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    events = Events(None, echo=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    trained = None
    draft = args.draft
    if draft is None:
        print(f"no --draft given: training a quick draft ({args.train_steps} steps on {args.gen_prompts} "
              "target-generated answers) first", file=sys.stderr)
        run = work / "run"
        if run.exists():
            import shutil
            shutil.rmtree(run)
        draft_path, trained = train_quick_draft(work, args, events)
        draft = str(draft_path)

    prompts = work / "mtbench_first_turns.jsonl"
    with open(SHARED / "mt_bench_questions.jsonl", encoding="utf-8") as f, open(prompts, "w") as out:
        for line in f:
            q = json.loads(line)
            out.write(json.dumps({"id": str(q["question_id"]), "prompt": q["turns"][0]}) + "\n")

    from specforge_core.evaluate.config import EvaluateConfig
    from specforge_core.evaluate.inprocess import evaluate

    cfg = EvaluateConfig(target="default", draft=draft, prompts=str(prompts), configs=args.configs,
                         max_new_tokens=args.max_new_tokens, max_prompts=args.prompts, device="cpu",
                         output=str(work / "evaluate.json"))
    res = evaluate(cfg, events)
    table = [{"config": "1,0,0,0 (plain greedy)", "acceptance_length": 1.0,
              "tokens_per_s": round(res["baseline"]["tokens_per_s"], 2), "speedup": 1.0}]
    for r in res["results"]:
        table.append({"config": r["config"], "acceptance_length": round(r["acceptance_length"], 3),
                      "acceptance_length_per_request_mean": round(r["acceptance_length_per_request_mean"], 3),
                      "per_position_accept_rate": [round(x, 3) for x in r["per_position_accept_rate"]],
                      "tokens_per_s": round(r["tokens_per_s"], 2), "speedup": round(r["speedup"], 3),
                      "mismatches_vs_baseline": r.get("mismatches_vs_baseline")})
    out = {"benchmark": "spec_decode", "target": "SmolLM2-135M-Instruct (embedded default, fp32, CPU)",
           "draft": draft, "draft_trained_here": trained, "prompts": f"MT-bench first turns x {args.prompts}",
           "max_new_tokens": args.max_new_tokens, "torch_threads": torch.get_num_threads(),
           "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform()},
           "table": table, "full": res}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")
    for row in table:
        print(json.dumps(row))
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
