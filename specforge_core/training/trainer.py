"""The EAGLE3 trainer: `train(config, events)`, the one function the CLI, the GUI and notebooks call.

Read top to bottom: set up (distributed, data cache + draft vocab, target, draft, optimizer,
schedule), resume if asked, then the loop — per optimizer step, `grad_accum` micro-batches of
(target capture -> training-time test -> backward), gradient all-reduce, clip, step — logging train
metrics to `metrics.jsonl`, evaluating and checkpointing on schedule. SIGTERM (a GUI cancel) makes
the loop checkpoint and stop; `--resume` continues as if never stopped.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..config import write_run_json
from ..events import Events, JobCancelled
from .batches import Batch, EpochBatches
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_grads, all_reduce_sum, barrier, cleanup, init_distributed
from .tracking import Tracker


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------
def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    warmup = max(1, int(round(total_steps * warmup_ratio))) if warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cos

    return f


def prepare_data(cfg: TrainConfig, info: DistInfo, events: Events, target_vocab_size: int):
    """Build (rank 0) or wait for (others) the tokenised cache, then load it."""
    from ..data.cache import build_cache, load_cache

    cache_cfg = cfg.build_cache_config()
    if cache_cfg.draft_vocab_size > target_vocab_size:
        cache_cfg = cache_cfg.model_copy(update={"draft_vocab_size": target_vocab_size})
        events.warning(f"draft_vocab_size {cfg.draft_vocab_size} > target vocab {target_vocab_size}; "
                       f"using {target_vocab_size}")
    summary = build_cache(cache_cfg, events) if info.is_main else None
    barrier(info)
    if summary is None:
        summary = build_cache(cache_cfg, Events(None, echo=False))  # finds the finished cache
    return load_cache(summary["path"])


class OnlineTeacher:
    """The resident target: one forward pass gives the aux hidden states and the logits."""

    def __init__(self, target):
        self.target = target

    @torch.no_grad()
    def __call__(self, batch: Batch, split: str = "train"):
        out = self.target.capture(batch.input_ids, batch.attention_mask)
        return out.aux_hidden, out.logits


class OfflineTeacher:
    """A hidden-state store in place of the target: aux states read from disk; logits recomputed from the
    stored last hidden state with the target's lm_head (zero rows where the TTT never counts), or, for a
    top-k store, rebuilt from the stored top-k logits (a low finite floor elsewhere: see `topk_logits`)."""

    def __init__(self, head, sources: dict, device: torch.device, dtype: torch.dtype):
        self.head = head
        self.sources = sources      # split -> (HiddenStateStore, row map of the (sub)dataset or None)
        self.device = device
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, batch: Batch, split: str = "train"):
        store, rows = self.sources[split]
        idx = [rows[i] for i in batch.indices] if rows is not None else list(batch.indices)
        lengths = [int(x) for x in batch.attention_mask.sum(1).tolist()]
        aux, teacher = store.batch(split, idx, batch.input_ids.shape[1], dtype=self.dtype, lengths=lengths)
        if store.teacher == "topk":
            from ..offline.store import topk_logits

            vals, ids = teacher
            # run.json's vocab_size (checked against the target when the store was opened) is the width
            # the TTT expects; no lm_head is needed.
            logits = topk_logits(vals.to(self.device), ids.to(self.device), int(store.run["vocab_size"]),
                                 self.dtype)
            return aux.to(self.device), logits
        return aux.to(self.device), self.head.logits_from_hidden(teacher.to(self.device))


def _store_rows(store, split: str, n: int, where: str) -> list[int] | None:
    """Rows of a split the store holds; None when it holds all n. Missing rows that the dump did not
    skip on purpose (non-finite states) mean an unfinished dump: refused."""
    have = set(store.indices(split))
    if len(have) == n and all(i in have for i in range(n)):
        return None
    skipped = {int(i) for r in store.records if r["split"] == split for i in r.get("skipped", [])}
    missing = [i for i in range(n) if i not in have and i not in skipped]
    if missing:
        raise ValueError(f"{where}: the {split} split has {len(have)} of {n} samples stored ({len(missing)} "
                         f"missing, e.g. {missing[:5]}): the dump is unfinished; run dump-hidden-states again")
    return sorted(have)


def setup_offline(cfg: TrainConfig, info: DistInfo, events: Events, use_bf16: bool):
    """(target head, teacher, data, train dataset, train row map, eval source) for offline training.

    The target's decoder weights are never loaded: only its config, embedding and (unless every store
    holds a top-k teacher) lm_head. The store must come from this target (weights hash), these layers
    and this tokenised cache."""
    from ..config import read_run_json
    from ..offline.store import HiddenStateStore, StoreError, TargetHead, check_store_matches, target_identity

    store = HiddenStateStore(cfg.train_hidden_states)
    run = store.run
    where = str(store.dir)
    name = cfg.target_model if "target_model" in cfg.model_fields_set else run["target"]["resolved"]
    ident = target_identity(name)
    check_store_matches(run, target=ident, where=where)
    if cfg.aux_layer_ids is not None:
        check_store_matches(run, layer_ids=cfg.aux_layer_ids, where=where)
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    ev_store = HiddenStateStore(cfg.eval_hidden_states) if cfg.eval_hidden_states else store
    need_head = store.teacher != "topk" or ev_store.teacher != "topk"
    head = TargetHead(name, dtype=dtype, device=info.device, layer_ids=run["layer_ids"],
                      pad_token_id=run.get("pad_token_id"), lm_head=need_head)
    check_store_matches(run, vocab_size=head.vocab_size, where=where)
    dump_cfg = run.get("config") or {}
    if cfg.train_data:
        data = prepare_data(cfg.model_copy(update={"target_model": name}), info, events, head.vocab_size)
    elif dump_cfg.get("train_data"):
        # The dump's own data fields find the same cache (and rebuild only the vocab if its size differs).
        upd = {k: dump_cfg[k] for k in ("train_data", "eval_data", "chat_template", "max_length",
                                        "train_only_last_turn", "cache_dir") if k in dump_cfg}
        upd["tokenizer"] = dump_cfg.get("tokenizer") or dump_cfg.get("target_model") or name
        data = prepare_data(cfg.model_copy(update={"target_model": name, **upd}), info, events, head.vocab_size)
    else:
        from ..data.cache import load_cache

        data = load_cache(run["cache_path"])
        want = min(cfg.draft_vocab_size, head.vocab_size)
        if data.vocab.draft_vocab_size != want:
            raise StoreError(f"{where}: its cache {data.path} has a draft vocab of {data.vocab.draft_vocab_size}, "
                             f"this run asks for {want}: pass --draft-vocab-size {data.vocab.draft_vocab_size} "
                             "or rebuild the cache with build-cache")
    key = read_run_json(data.path, expect_kind="build-cache")["key"]
    check_store_matches(run, cache_key=key, where=where)
    train_rows = _store_rows(store, "train", len(data.train), where)
    train_ds = data.train if train_rows is None else data.train.select(train_rows)
    if train_rows is not None:
        events.warning(f"{where}: {len(data.train) - len(train_rows)} train sample(s) were skipped by the dump "
                       "(non-finite states); training on the rest")
    sources = {"train": (store, train_rows)}
    eval_ds = None
    if data.eval is not None and len(data.eval):
        if cfg.eval_hidden_states:
            check_store_matches(ev_store.run, target=ident, cache_key=key, vocab_size=head.vocab_size,
                                layer_ids=run["layer_ids"], where=str(ev_store.dir))
        cand = range(min(len(data.eval), cfg.eval_max_samples))
        rows = [i for i in cand if ev_store.exists("eval", i)]
        if rows:
            if len(rows) < len(cand):
                events.warning(f"{ev_store.dir}: {len(cand) - len(rows)} eval sample(s) not in the store; "
                               "evaluating on the rest")
            eval_ds = data.eval.select(rows)
            sources["eval"] = (ev_store, rows)
        else:
            events.warning(f"{ev_store.dir}: holds no eval split; offline training runs without evaluation")
    teacher = OfflineTeacher(head, sources, info.device, dtype)
    events.emit("offline_store", path=where, format=run.get("format"), teacher=store.teacher,
                topk=store.topk if store.teacher == "topk" else None, target=ident["resolved"],
                train_samples=len(train_ds), eval_samples=len(eval_ds) if eval_ds is not None else 0)
    return head, teacher, data, train_ds, eval_ds


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, events: Events) -> dict:
    from ..models.eagle3 import build_draft_config
    from ..models.registry import build_draft
    from ..models.target import load_target
    from .checkpoint import latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
    from .ttt import simulated_acceptance_length, ttt_forward

    t_start = time.time()
    info = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_dir = run_dir / "checkpoints"
        if not cfg.resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
            raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue it, "
                             "or choose another --output-dir")
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and info.device.type == "cuda")
    events.emit("train_start", output_dir=str(run_dir), world_size=info.world_size, device=str(info.device),
                bf16=use_bf16)

    # -- target and data ---------------------------------------------------------------------------
    if cfg.train_hidden_states:
        target, teacher, data, train_ds, eval_ds = setup_offline(cfg, info, events, use_bf16)
    else:
        target = load_target(cfg.target_model, dtype=torch.bfloat16 if use_bf16 else torch.float32,
                             device=info.device, layer_ids=cfg.aux_layer_ids)
        teacher = OnlineTeacher(target)
        data = prepare_data(cfg, info, events, target.vocab_size)
        train_ds = data.train
        eval_ds = None if data.eval is None else data.eval.select(range(min(len(data.eval), cfg.eval_max_samples)))
    vocab = data.vocab
    if vocab.target_vocab_size != target.vocab_size:
        raise ValueError(f"the draft vocab in {data.path} maps a target vocab of {vocab.target_vocab_size} ids, "
                         f"but {cfg.target_model} has {target.vocab_size}: tokenizer and target do not match")

    # -- draft -------------------------------------------------------------------------------------
    overrides = None
    if cfg.draft_model_config:
        import json
        overrides = json.loads(Path(cfg.draft_model_config).read_text(encoding="utf-8"))
    draft_config = build_draft_config(target.config, vocab.draft_vocab_size, layer_ids=target.layer_ids,
                                      overrides=overrides)
    draft = build_draft(draft_config)
    draft.load_embedding(target.embedding_weight())
    draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
    draft.to(info.device)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    batches = EpochBatches(train_ds, cfg.batch_size, cfg.seed, info.rank, info.world_size,
                           pad_id=target.pad_token_id)
    steps_per_epoch = max(1, math.ceil(batches.batches_per_epoch() / cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, cfg.warmup_ratio, cfg.min_lr_ratio))

    # -- resume ------------------------------------------------------------------------------------
    step, epoch, micro = 0, 0, 0
    tracker = Tracker(run_dir, [r for r in cfg.report_to if r != "none"], cfg.model_dump(mode="json"),
                      is_main=info.is_main, wandb_project=cfg.wandb_project, wandb_name=cfg.wandb_name)
    if cfg.resume:
        last = latest_checkpoint(run_dir)
        if last is None:
            events.warning(f"--resume: no complete checkpoint in {run_dir}; starting from scratch")
        else:
            ck = load_checkpoint(last)
            missing, unexpected = draft.load_state_dict(ck["model_state"], strict=False)
            bad = [m for m in missing if not m.startswith("embed_tokens")] + list(unexpected)
            if bad:
                raise ValueError(f"{last}: checkpoint does not fit this draft: {bad[:5]}")
            opt.load_state_dict(ck["optimizer_state"])
            sched.load_state_dict(ck["scheduler_state"])
            restore_rng(ck["rng"])
            st = ck["trainer_state"]
            step, epoch, micro = st["step"], st["epoch"], st["micro"]
            tracker.truncate_after(step)
            events.emit("resumed", checkpoint=str(last), step=step, epoch=epoch, micro=micro)
    if info.is_main:
        write_run_json(run_dir, "train-eagle3", cfg, draft_config=draft_config.to_dict(), cache=str(data.path),
                       world_size=info.world_size, mode="offline" if cfg.train_hidden_states else "online")

    autocast = (torch.autocast(device_type=info.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())

    def run_ttt(batch: Batch, split: str = "train"):
        aux, logits = teacher(batch, split)
        with autocast:
            return ttt_forward(draft, batch.input_ids, aux, logits, batch.loss_mask, batch.attention_mask,
                               ttt_length=cfg.ttt_length, decay=cfg.ttt_decay,
                               attention_backend=cfg.attention_backend)

    def checkpoint(reason: str) -> None:
        save_checkpoint(run_dir, step, draft.state_dict(), opt, sched,
                        extra={"step": step, "epoch": epoch, "micro": micro, "reason": reason},
                        config=draft_config.to_dict(), keep_last=cfg.keep_last, is_main=info.is_main)
        barrier(info)
        events.emit("checkpoint", step=step, reason=reason)

    def evaluate() -> dict | None:
        if eval_ds is None or len(eval_ds) == 0:
            return None
        ds = eval_ds
        if len(ds) < info.world_size:
            return None
        ev = EpochBatches(ds, cfg.batch_size, cfg.seed, info.rank, info.world_size, shuffle=False,
                          pad_id=target.pad_token_id)
        K = cfg.ttt_length
        sums = [0.0] * (3 * K)
        draft.eval()
        with torch.no_grad():
            for _, b in ev.iter_epoch(0):
                out = run_ttt(b.to(info.device), "eval")
                for k in range(K):
                    sums[k] += out.ploss[k] * out.counts[k]
                    sums[K + k] += out.acc[k] * out.counts[k]
                    sums[2 * K + k] += out.counts[k]
        draft.train()
        sums = all_reduce_sum(sums, info)
        counts = sums[2 * K:]
        acc = [sums[K + k] / max(counts[k], 1) for k in range(K)]
        ploss = [sums[k] / max(counts[k], 1) for k in range(K)]
        row = {"split": "eval", "step": step, "epoch": epoch,
               "loss": sum(cfg.ttt_decay ** k * ploss[k] for k in range(K)),
               **{f"ploss_{k}": ploss[k] for k in range(K)}, **{f"acc_{k}": acc[k] for k in range(K)},
               "sim_accept_len": simulated_acceptance_length(acc), "samples": len(ds)}
        tracker.log(row)
        events.emit("eval", **{k: v for k, v in row.items() if k in ("step", "loss", "acc_0", "sim_accept_len")})
        return row

    # -- loop --------------------------------------------------------------------------------------
    draft.train()
    K = cfg.ttt_length
    last_eval = None
    events.emit("train_plan", total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                train_samples=len(train_ds), eval_samples=len(eval_ds) if eval_ds is not None else 0,
                draft_vocab_size=vocab.draft_vocab_size, vocab_coverage=vocab.coverage)
    tok_count, t_log = 0, time.time()
    try:
        if micro >= batches.batches_per_epoch():
            epoch, micro = epoch + 1, 0
        it = batches.iter_epoch(epoch, micro) if epoch < cfg.epochs else iter(())
        while step < total_steps:
            opt.zero_grad(set_to_none=True)
            agg = [0.0] * (3 * K)
            n_micro = 0
            for _ in range(cfg.grad_accum):
                nxt = next(it, None)
                if nxt is None:
                    break
                micro = nxt[0] + 1
                batch = nxt[1].to(info.device)
                out = run_ttt(batch)
                (out.loss / cfg.grad_accum).backward()
                for k in range(K):
                    agg[k] += out.ploss[k] * out.counts[k]
                    agg[K + k] += out.acc[k] * out.counts[k]
                    agg[2 * K + k] += out.counts[k]
                tok_count += batch.num_tokens
                n_micro += 1
            if n_micro == 0:
                break  # epoch exhausted
            all_reduce_grads(params, info)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            opt.step()
            sched.step()
            step += 1
            if step % cfg.log_every == 0 or step == total_steps:
                agg = all_reduce_sum(agg, info)
                counts = agg[2 * K:]
                acc = [agg[K + k] / max(counts[k], 1) for k in range(K)]
                ploss = [agg[k] / max(counts[k], 1) for k in range(K)]
                now = time.time()
                row = {"split": "train", "step": step, "epoch": epoch,
                       "loss": sum(cfg.ttt_decay ** k * ploss[k] for k in range(K)),
                       **{f"ploss_{k}": ploss[k] for k in range(K)}, **{f"acc_{k}": acc[k] for k in range(K)},
                       "sim_accept_len": simulated_acceptance_length(acc), "lr": sched.get_last_lr()[0],
                       "grad_norm": float(grad_norm), "counted_positions": int(counts[0]),
                       "tokens_per_s": tok_count * info.world_size / max(now - t_log, 1e-9),
                       "loss_normalization": "counted"}
                tracker.log(row)
                events.progress(step, total_steps, what="steps", loss=round(row["loss"], 4),
                                acc_0=round(acc[0], 4), force=True)
                tok_count, t_log = 0, now
            if micro >= batches.batches_per_epoch():
                epoch, micro = epoch + 1, 0
                it = batches.iter_epoch(epoch, 0) if epoch < cfg.epochs else iter(())
            if cfg.eval_every and step % cfg.eval_every == 0:
                last_eval = evaluate()
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                checkpoint("periodic")
            if events.cancelled:
                checkpoint("cancelled")
                raise JobCancelled(f"stopped at step {step}; --resume continues from here")
        last_eval = evaluate() or last_eval
        checkpoint("final")
    finally:
        tracker.close()
        cleanup(info)
    summary = {"output_dir": str(run_dir), "steps": step, "epochs_done": epoch,
               "seconds": round(time.time() - t_start, 1), "eval": last_eval,
               "latest_checkpoint": str(latest_checkpoint(run_dir)) if info.is_main else None}
    events.emit("train_done", **{k: v for k, v in summary.items() if k != "eval"})
    return summary
