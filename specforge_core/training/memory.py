"""What one rank of a training plan needs in memory, before anything is loaded, and whether it fits.

`estimate_memory(cfg, world_size, ...)` counts parameters exactly by building the target (from its config
alone) and the draft on the meta device, and prices, per rank:

- target: its weights in the compute dtype; under `--target-parallel fsdp` a 1/W shard plus what FSDP2
  gathers at once during the forward (the root's embedding / norm / lm_head and two decoder layers: the
  one running and the one prefetched); offline training keeps only the embedding and lm_head.
- draft: fp32 weights (the trainable ones plus its copy of the target's embedding, frozen); DDP adds
  the gradients and its all-reduce buckets (one more gradient's worth); FSDP2 keeps a 1/W shard of
  weights and gradients plus the full weights and gradients while a step runs.
- optimizer: AdamW's two fp32 moments per trainable weight (1/W under FSDP2).
- activations for one micro-batch of `batch_size` x `max_length`: the target's logits and captured
  states (compute dtype) and one layer's transient MLP block; the TTT's fp32 teacher distribution over
  the draft vocabulary; and per unrolled step what the backward keeps (two draft-vocab rows per position,
  and the decoder layer's states). Measured on CPU (T 512 and 1024, 7 steps, draft vocab 32000) the TTT's
  peak is 1.5 draft-vocab rows per position and step; the estimate keeps a margin above that.

`check_fits` compares the total with the memory the rank can use (CUDA: free memory on its device;
CPU: MemAvailable shared by the node's ranks) and refuses a plan that does not fit, naming the number
that does not and the part that is largest.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

GiB = float(1 << 30)


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _count(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def _target_on_meta(name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..targets import resolve_model

    conf = AutoConfig.from_pretrained(resolve_model(name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    return model


def estimate_memory(cfg, world_size: int, device_type: str = "cpu", bf16: bool = False) -> dict:
    """Per-rank bytes of each part of the plan `cfg` (a TrainConfig) at `world_size` ranks."""
    from ..models.registry import build_draft
    from ..models.target import default_layer_ids
    from .trainer import _family, build_draft_config, capture_layers

    W = max(1, int(world_size))
    model = _target_on_meta(cfg.target_model)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = model.model.layers
    layer_params = [_count(layer) for layer in layers]
    total = _count(model)
    root = total - sum(layer_params)
    b = 2 if bf16 else 4
    V, H = int(text.vocab_size), int(text.hidden_size)
    I_t = int(getattr(text, "intermediate_size", 4 * H))
    offline = bool(cfg.train_hidden_states)
    if offline:
        target = (model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()) * b
        target_note = "offline: embedding + lm_head only"
    elif cfg.target_parallel == "fsdp" and W > 1:
        target = total * b / W + (root + 2 * max(layer_params)) * b
        target_note = f"1/{W} shard + gathered root and two layers"
    else:
        target = total * b
        target_note = "full copy"

    # The draft, exactly as the trainer shapes it (on meta: no memory).
    Vd = min(int(cfg.draft_vocab_size), V)
    layer_ids = (capture_layers(cfg) or default_layer_ids(len(layers))) if _family(cfg).reads_aux else None
    dconf = build_draft_config(cfg, text, Vd, layer_ids)
    with torch.device("meta"):
        draft = build_draft(dconf)
    emb = draft.embed_tokens.weight.numel() if hasattr(draft, "embed_tokens") else 0
    trainable = _count(draft) - emb
    fsdp_draft = cfg.draft_parallel == "fsdp" and W > 1
    if fsdp_draft:
        draft_bytes = (trainable + emb) * 4 / W + (trainable + emb) * 4 + trainable * 4 / W + trainable * 4
        draft_note = f"1/{W} shard of weights and grads + full ones during a step"
        optim = 8 * trainable / W
    else:
        ddp = W > 1
        draft_bytes = (trainable + emb) * 4 + trainable * 4 * (2 if ddp else 1)
        draft_note = "weights + grads" + (" + DDP buckets" if ddp else "")
        optim = 8 * trainable

    Bt = int(cfg.batch_size) * int(cfg.max_length)
    Hd = int(getattr(dconf, "hidden_size", H))
    Id = int(getattr(dconf, "intermediate_size", 4 * Hd))
    K = int(cfg.draft_steps)
    act_target = 0 if offline else Bt * (2 * I_t + 4 * H) * b          # one layer's transient block
    act_teacher = Bt * (V + 3 * H) * b + Bt * Vd * 4                   # logits + aux, fp32 teacher probs
    act_draft = K * Bt * (2 * Vd + 12 * Hd + 3 * Id) * 4               # per TTT step, kept for backward
    activations = act_target + act_teacher + act_draft
    parts = {"target": target, "draft": draft_bytes, "optimizer": optim, "activations": activations}
    return {"world_size": W, "bytes": {k: int(v) for k, v in parts.items()}, "total_bytes": int(sum(parts.values())),
            "notes": {"target": target_note, "draft": draft_note,
                      "activations": f"batch {cfg.batch_size} x length {cfg.max_length}, ttt {K}"},
            "params": {"target": total, "target_layers": len(layers), "draft_trainable": trainable,
                       "draft_embedding": emb},
            "readable": {k: _gib(v) for k, v in {**parts, "total": sum(parts.values())}.items()}}


def available_bytes(device: torch.device, local_world: int | None = None) -> tuple[int, str]:
    """(bytes this rank may use, where): free memory of its CUDA device, or the host's MemAvailable shared by
    the node's ranks (LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    n = max(1, int(local_world or os.environ.get("LOCAL_WORLD_SIZE", "1")))
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        import psutil  # noqa: PLC0415 - only where /proc is missing

        avail = int(psutil.virtual_memory().available)
    return avail // n, "host RAM available" + (f" / {n} local ranks" if n > 1 else "")


class PlanDoesNotFit(ValueError):
    """The memory estimate exceeds what the rank can use."""


def check_fits(est: dict, capacity: int, where: str) -> None:
    total = est["total_bytes"]
    if total <= capacity:
        return
    parts = est["bytes"]
    big = max(parts, key=parts.get)
    detail = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items())
    hint = ""
    if big == "target" and "full copy" in est["notes"]["target"]:
        hint = "; --target-parallel fsdp under torchrun shards the target across ranks"
    elif big == "activations":
        hint = "; lower --batch-size, --max-length or --ttt-length"
    raise PlanDoesNotFit(f"memory estimate per rank {_gib(total)} ({detail}) does not fit {_gib(capacity)} "
                         f"({where}); the largest part is {big}: {_gib(parts[big])} ({est['notes'][big]}){hint}")


def plan_memory(cfg, info, events, bf16: bool, only: bool = False) -> dict:
    """The trainer's check before it loads anything: emit the estimate; refuse a plan that does not fit
    (unless `only`: then just report it). Offline runs price the target their store names."""
    if cfg.train_hidden_states and "target_model" not in cfg.model_fields_set:
        from ..config import read_run_json

        run = read_run_json(cfg.train_hidden_states, expect_kind="hidden-states")
        cfg = cfg.model_copy(update={"target_model": run["target"]["resolved"]})
    est = estimate_memory(cfg, info.world_size, info.device.type, bf16)
    cap, where = available_bytes(info.device)
    est.update(capacity_bytes=cap, capacity=_gib(cap), capacity_source=where, fits=est["total_bytes"] <= cap)
    events.emit("memory_estimate", **est["readable"], capacity=est["capacity"], capacity_source=where,
                fits=est["fits"], world_size=info.world_size)
    if not only:
        check_fits(est, cap, where)
    return est
