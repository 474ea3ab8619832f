"""One EAGLE3 training step, measured: target forward vs draft TTT (forward + backward + AdamW), tokens/s,
the draft step's achieved FLOP/s beside this machine's measured matmul FLOP/s, and peak memory.

    .venv/bin/python bench/train_step.py                       # SmolLM2-config target, lengths 2048 4096
    .venv/bin/python bench/train_step.py --lengths 512 --steps 2
    python bench/train_step.py --preset llama3-8b --device cuda --dtype bfloat16   # on a GPU box
    .venv/bin/python bench/train_step.py --nproc 2 --target-parallel fsdp   # vs --target-parallel replicate

With `--nproc N` each length runs under torchrun with N processes (gloo on CPU, NCCL on GPU): the
target replicated or FSDP2-sharded (`--target-parallel`), the draft under DDP, as the trainer does.
Each rank reports the target weights it holds, its peak memory over the measured steps (CPU: RSS
sampled every 5 ms after set-up and a malloc_trim, since max RSS would count the full target every rank
builds before sharding, with glibc's mmap threshold fixed at 1 MiB so that freed gathered layers leave
RSS; CUDA: max allocated since set-up), and tokens/s is over all ranks.

Each length runs in a fresh subprocess, so peak memory (CPU: max RSS; CUDA: max allocated) is that
length's alone. The target has SmolLM2-135M-Instruct's config with random weights (speed does not
depend on the weights; `--target default` loads the real one). With `--preset llama3-8b` there is no
target forward: aux states and logits are random tensors of the right shapes (H 4096, vocab 128256),
which is what a draft step sees in offline training. Saves bench/results/train_step.json.

Draft FLOPs are counted analytically (matmuls only, forward x3 for forward+backward): per token and
TTT step, q/k/v/o projections, the MLP, attention scores/values over the causal block and the
lm_head over the draft vocab, plus fc once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def matmul_flops(device, dtype, n: int = 2048, reps: int = 5) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def draft_flops_per_token(cfg, T: int, K: int) -> float:
    H = cfg.hidden_size
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or H // nh
    I, Vd = cfg.intermediate_size, cfg.draft_vocab_size
    Ht = getattr(cfg, "target_hidden_size", None) or H
    proj = 2 * (2 * H) * (nh * hd + 2 * nkv * hd) + 2 * (nh * hd) * H
    mlp = 2 * 3 * H * I
    attn = 2 * 2 * nh * hd * (T / 2)  # causal: on average T/2 keys, scores + values
    head = 2 * H * Vd
    fwd = K * (proj + mlp + attn + head) + 2 * 3 * Ht * H
    return 3 * fwd


class _RssPeak:
    """Peak RSS (MiB) of this process while running: a thread samples /proc/self/statm."""

    def __init__(self):
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(0.005)

    def __enter__(self):
        self.peak = self.now()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.now())


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child(args) -> dict:
    import gc

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from specforge_core.models.eagle3 import build_draft_config
    from specforge_core.models.registry import build_draft
    from specforge_core.models.target import Target, default_layer_ids, load_target
    from specforge_core.models.ttt import ttt_forward

    torch.manual_seed(0)
    dev = torch.device(args.device)
    info = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from specforge_core.training.distributed import init_distributed

        info = init_distributed(args.device)
        dev = info.device
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    T, B, K = args.length, args.batch, args.ttt_length
    if args.target:
        target = load_target(args.target, dtype=dtype, device=dev)
        tcfg = target.config
    else:
        tcfg = LlamaConfig(**PRESETS[args.preset])
        target = None
        if args.preset != "llama3-8b":
            target = Target.from_model(LlamaForCausalLM(tcfg).to(dev, dtype).eval())
    if target is not None and info is not None and args.target_parallel == "fsdp":
        from specforge_core.training.distributed import shard_target

        target = shard_target(target, info)
    layer_ids = target.layer_ids if target else default_layer_ids(tcfg.num_hidden_layers)
    dcfg = build_draft_config(tcfg, args.draft_vocab_size, layer_ids=layer_ids)
    draft = build_draft(dcfg)
    V = tcfg.vocab_size
    emb = target.embedding_weight() if target else torch.randn(V, tcfg.hidden_size) * 0.02
    draft.load_embedding(emb.float())
    d2t = torch.zeros(args.draft_vocab_size, dtype=torch.long)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[: args.draft_vocab_size] = True
    draft.set_vocab_mapping(d2t, t2d)
    draft.to(dev)
    engine = None
    if info is not None:
        from specforge_core.training.distributed import DraftEngine

        engine = DraftEngine(draft, info, "ddp")
    run = engine if engine is not None else (lambda thunk: thunk())
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-4)
    from specforge_core.training.distributed import local_param_bytes

    target_mib = local_param_bytes(target.model) / 2 ** 20 if target is not None else 0.0
    gc.collect()
    _malloc_trim()  # what sharding freed (the full target each rank built) goes back to the OS
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = _RssPeak.now()
    sampler = _RssPeak() if dev.type == "cpu" else None
    if sampler:
        sampler.__enter__()
    ids = torch.randint(0, V, (B, T), device=dev)
    am = torch.ones(B, T, dtype=torch.long, device=dev)
    lm = torch.ones(B, T, dtype=torch.long, device=dev)
    use_autocast = dtype == torch.bfloat16
    t_target, t_draft = [], []
    for step in range(args.steps + 1):  # the first step warms up
        sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            if target is not None:
                cap = target.capture(ids, am)
                aux, logits = cap.aux_hidden, cap.logits
            else:
                aux = torch.randn(B, T, 3 * tcfg.hidden_size, device=dev, dtype=dtype)
                logits = torch.randn(B, T, V, device=dev, dtype=dtype)
        sync(dev)
        t1 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
            out = run(lambda: ttt_forward(draft, ids, aux, logits, lm, am, ttt_length=K,
                                          attention_backend=args.attention))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        t2 = time.perf_counter()
        if step:
            t_target.append(t1 - t0)
            t_draft.append(t2 - t1)
    tf = sum(t_target) / len(t_target)
    td = sum(t_draft) / len(t_draft)
    flops = draft_flops_per_token(dcfg, T, K) * B * T
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
        peak_kind = "cuda_max_allocated_MiB"
    elif info is not None:
        sampler.__exit__(None, None, None)
        peak = sampler.peak
        peak_kind = "step_peak_rss_MiB"
    else:
        sampler.__exit__(None, None, None)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_kind = "max_rss_MiB"
    mm = matmul_flops(dev, dtype)
    extra = {"target_held_MiB": round(target_mib, 1), "rss_after_setup_MiB": round(rss0, 1)}
    if info is not None:
        extra.update(rank=info.rank, world_size=info.world_size, target_parallel=args.target_parallel,
                     step_peak_rss_MiB=round(sampler.peak, 1) if sampler else None)
        from specforge_core.training.distributed import cleanup

        cleanup(info)
    return {"length": T, "batch": B, "ttt_length": K, "target_forward_s": round(tf, 4),
            "draft_ttt_s": round(td, 4), "step_s": round(tf + td, 4),
            "tokens_per_s": round(B * T / (tf + td), 1), "draft_tokens_per_s": round(B * T / td, 1),
            "draft_flop_per_s": flops / td, "matmul_flop_per_s": mm, "draft_mfu": flops / td / mm,
            peak_kind: round(peak, 1), **extra}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1, help="measured steps per length (after one warm-up)")
    ap.add_argument("--ttt-length", type=int, default=7)
    ap.add_argument("--draft-vocab-size", type=int, default=32000)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    ap.add_argument("--target", default=None, help="load a real target instead (e.g. `default`)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per length")
    ap.add_argument("--target-parallel", choices=["replicate", "fsdp"], default="replicate",
                    help="with --nproc > 1: a full target per rank, or FSDP2-sharded")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_step.json"))
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0
    rows = []
    for L in args.lengths:
        cmd = [sys.executable, __file__, "--child", "--length", str(L), "--batch", str(args.batch),
               "--steps", str(args.steps), "--ttt-length", str(args.ttt_length),
               "--draft-vocab-size", str(args.draft_vocab_size), "--preset", args.preset, "--device", args.device,
               "--dtype", args.dtype, "--attention", args.attention,
               "--target-parallel", args.target_parallel] + (["--target", args.target] if args.target else [])
        if args.nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                   "--master_port", str(29500 + os.getpid() % 2000), *cmd[1:]]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if args.device == "cpu":
            # Blocks of 1 MiB and more go back to the OS when freed: without it glibc keeps what FSDP's
            # gathered layers used, and RSS measures the allocator's cache instead of the live peak.
            env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not lines:
            print(f"length {L}: failed\n{p.stderr[-2000:]}")
            rows.append({"length": L, "error": p.stderr[-500:]})
            continue
        ranks = sorted((json.loads(x[7:]) for x in lines), key=lambda r: r.get("rank", 0))
        r = dict(ranks[0])
        if args.nproc > 1:   # tokens over all ranks, at the slowest rank's step time; memory per rank
            step = max(x["step_s"] for x in ranks)
            r.update(step_s=step, tokens_per_s=round(len(ranks) * r["batch"] * r["length"] / step, 1),
                     per_rank=[{k: x.get(k) for k in ("rank", "target_held_MiB", "rss_after_setup_MiB", "step_peak_rss_MiB",
                                                      "cuda_max_allocated_MiB", "step_s")} for x in ranks])
        rows.append(r)
        mem = r.get("max_rss_MiB", r.get("cuda_max_allocated_MiB", r.get("step_peak_rss_MiB")))
        print(f"T={L:5d}  target fwd {r['target_forward_s']:7.3f}s  draft TTT {r['draft_ttt_s']:7.3f}s  "
              f"{r['tokens_per_s']:8.1f} tok/s  draft {r['draft_flop_per_s'] / 1e9:7.1f} GFLOP/s vs matmul "
              f"{r['matmul_flop_per_s'] / 1e9:7.1f} GFLOP/s (MFU {100 * r['draft_mfu']:.1f}%)  peak {mem:.0f} MiB")
        for x in r.get("per_rank", []):
            print(f"    rank {x['rank']}: target held {x['target_held_MiB']:.1f} MiB, RSS after set-up "
                  f"{x['rss_after_setup_MiB']:.0f} MiB, peak over the steps "
                  f"{x.get('step_peak_rss_MiB') or x.get('cuda_max_allocated_MiB')} MiB, step {x['step_s']:.3f}s")
    res = {"preset": args.preset, "target": args.target, "device": args.device, "dtype": args.dtype,
           "ttt_length": args.ttt_length, "draft_vocab_size": args.draft_vocab_size, "cpus": os.cpu_count(),
           "nproc": args.nproc, "target_parallel": args.target_parallel,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
