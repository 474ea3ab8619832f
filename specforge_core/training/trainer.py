"""The draft trainer (EAGLE3 or Medusa): `train(config, events)`, the one function the CLI, the GUI and
notebooks call.

`train` (at the bottom; the pieces above come in the order it uses them) reads top to bottom: set
up (distributed, target or hidden-state store, tokenised cache and draft vocab, draft, optimizer,
schedule), resume if asked, then the loop. Each `train_step` runs `grad_accum` micro-batches of
(teacher -> the family's loss -> backward), then gradient all-reduce, clip and step; the loop logs
train metrics to `metrics.jsonl`, evaluates and checkpoints on schedule. Everything the loop carries
from step to step is a `TrainState`, which is what a checkpoint saves: SIGTERM (a GUI cancel) makes
the loop checkpoint and stop, and `--resume` continues as if never stopped.

The family (`--draft-type`) decides what the teacher hands the draft and which loss runs: EAGLE3 gets
the captured aux layers and the unrolled TTT (`ttt.py`), Medusa the target's final normed last hidden
state and the per-head loss (`medusa_loss.py`). Both give a `TTTOutput` (one entry per TTT step or
head), so metrics, keep-best and early stopping are the same code.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import ConfigError, write_run_json
from ..data.batches import Batch
from ..events import Events, JobCancelled
from ..locks import output_lock
from .batches import EpochBatches
from ..models.checkpoints import BEST, best_checkpoint
from .checkpoint import latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from .config import TrainConfig
from .distributed import (DistInfo, DraftEngine, PeerFailure, all_reduce_sum, barrier, cleanup, init_distributed, peer_failure,
                          rescale_position, shard_target)
from .metrics import TTTMetrics
from .tracking import Tracker
from .medusa_loss import medusa_forward
from ..models.ttt import TTTOutput, ttt_forward


# ------------------------------------------------------------------------------------------------
# Set-up
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


def load_training_data(cfg: TrainConfig, info: DistInfo, events: Events, target_vocab_size: int):
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


def _family(cfg: TrainConfig):
    from ..models.registry import family

    return family(cfg.draft_type)


class OnlineTeacher:
    """The resident target: one forward pass gives the states the draft reads (the aux hidden states for
    EAGLE3, the final normed last hidden state for a family that reads no aux layers) and the logits."""

    def __init__(self, target, reads_aux: bool = True):
        self.target = target
        self.reads_aux = reads_aux

    @torch.no_grad()
    def __call__(self, batch: Batch, split: str = "train"):
        out = self.target.capture(batch.input_ids, batch.attention_mask)
        return (out.aux_hidden if self.reads_aux else out.last_hidden), out.logits


class OfflineTeacher:
    """A hidden-state store in place of the target: the draft's input states (aux layers, or the last
    hidden state for a `states: last` store) read from disk; logits recomputed from the
    stored last hidden state with the target's lm_head (zero rows where the TTT never counts), or, for a
    top-k store, the stored top-k logits as `TopKLogits` (the TTT reads them in the draft vocab; a low finite
    floor elsewhere: see `topk_logits`)."""

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
            from ..offline.store import TopKLogits

            vals, ids = teacher
            # run.json's vocab_size (checked against the target when the store was opened) is the width
            # the TTT expects; no lm_head is needed, and the TTT reads the k ids into the draft vocab itself.
            return aux.to(self.device), TopKLogits(vals.to(self.device), ids.to(self.device),
                                                   int(store.run["vocab_size"]), self.dtype)
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
    """(target head, teacher, data, train dataset, eval dataset) for offline training.

    The target's decoder weights are never loaded: only its config, embedding and (unless every store
    holds a top-k teacher and the draft needs no warm start) lm_head. The store must come from this
    target (weights hash), these layers and this tokenised cache, and hold the states this family reads
    (aux layers for EAGLE3, the last hidden state for Medusa)."""
    from ..config import read_run_json
    from ..offline.store import HiddenStateStore, StoreError, TargetHead, check_store_matches, target_identity

    reads_aux = _family(cfg).reads_aux
    store = HiddenStateStore(cfg.train_hidden_states)
    run = store.run
    where = str(store.dir)
    check_store_matches(run, reads_aux=reads_aux, draft_type=cfg.draft_type, where=where)
    name = cfg.target_model if "target_model" in cfg.model_fields_set else run["target"]["resolved"]
    ident = target_identity(name)
    check_store_matches(run, target=ident, where=where)
    if cfg.aux_layer_ids is not None:
        check_store_matches(run, layer_ids=cfg.aux_layer_ids, where=where)
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    ev_store = HiddenStateStore(cfg.eval_hidden_states) if cfg.eval_hidden_states else store
    if cfg.eval_hidden_states:
        check_store_matches(ev_store.run, reads_aux=reads_aux, draft_type=cfg.draft_type, where=str(ev_store.dir))
    # Medusa heads always start from the target's lm_head (`build_draft_model`).
    need_head = store.teacher != "topk" or ev_store.teacher != "topk" or cfg.init_from_target or not reads_aux
    head = TargetHead(name, dtype=dtype, device=info.device, layer_ids=run["layer_ids"] if reads_aux else None,
                      pad_token_id=run.get("pad_token_id"), lm_head=need_head, aux=reads_aux)
    check_store_matches(run, vocab_size=head.vocab_size, where=where)
    dump_cfg = run.get("config") or {}
    if cfg.train_data:
        data = load_training_data(cfg.model_copy(update={"target_model": name}), info, events, head.vocab_size)
    elif dump_cfg.get("train_data"):
        # The dump's own data fields find the same cache (and rebuild only the vocab if its size differs).
        upd = {k: dump_cfg[k] for k in ("train_data", "eval_data", "chat_template", "max_length",
                                        "train_only_last_turn", "cache_dir") if k in dump_cfg}
        upd["tokenizer"] = dump_cfg.get("tokenizer") or dump_cfg.get("target_model") or name
        data = load_training_data(cfg.model_copy(update={"target_model": name, **upd}), info, events, head.vocab_size)
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


def setup_online(cfg: TrainConfig, info: DistInfo, events: Events, use_bf16: bool):
    """(target, teacher, data, train dataset, eval dataset) for online training: the target stays resident
    and runs on every batch."""
    from ..models.target import load_target

    reads_aux = _family(cfg).reads_aux
    target = load_target(cfg.target_model, dtype=torch.bfloat16 if use_bf16 else torch.float32,
                         device=info.device, layer_ids=capture_layers(cfg) if reads_aux else None, aux=reads_aux)
    if reads_aux:
        servable_or_raise(target.layer_ids, target.num_layers)
    if cfg.target_parallel == "fsdp":
        target = shard_target(target, info)
    data = load_training_data(cfg, info, events, target.vocab_size)
    eval_ds = None if data.eval is None else data.eval.select(range(min(len(data.eval), cfg.eval_max_samples)))
    return target, OnlineTeacher(target, reads_aux), data, data.train, eval_ds


def draft_overrides(cfg: TrainConfig) -> dict | None:
    """The --draft-model-config JSON (SpecForge style), or None."""
    if not cfg.draft_model_config:
        return None
    p = Path(cfg.draft_model_config)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read the draft config: {e}") from None


def capture_layers(cfg: TrainConfig) -> list[int] | None:
    """The target layers to capture: --aux-layer-ids, else the ones a --draft-model-config names, else
    None (the target's default). The two must agree: one set is trained and the same set is served."""
    named = _family(cfg).layers_from_overrides(draft_overrides(cfg))
    if cfg.aux_layer_ids is not None and named is not None and list(cfg.aux_layer_ids) != named:
        raise ValueError(f"--aux-layer-ids {list(cfg.aux_layer_ids)} and the layers {cfg.draft_model_config} "
                         f"names {named} differ: the target would capture one set and the server feed the other; "
                         "give one of them")
    return list(cfg.aux_layer_ids) if cfg.aux_layer_ids is not None else named


def servable_or_raise(layer_ids: list[int], num_layers: int) -> None:
    from ..models.registry import family

    problems = family("eagle3").layer_problems(layer_ids, num_layers)  # only EAGLE3 captures layers
    if problems:
        raise ValueError("--aux-layer-ids: " + "; ".join(problems))


def build_draft_config(cfg: TrainConfig, target_config, draft_vocab_size: int, layer_ids):
    """The draft's config for this run, shaped after the target's: the one place the run's family fields
    (EAGLE3 overrides, Medusa heads and blocks) reach the family's config builder."""
    extra = {"num_heads": cfg.medusa_num_heads, "num_layers": cfg.medusa_num_layers} \
        if cfg.draft_type == "medusa" else {}
    return _family(cfg).build_config(target_config, draft_vocab_size, layer_ids=layer_ids,
                                     overrides=draft_overrides(cfg), **extra)


def build_draft_model(cfg: TrainConfig, target, data, device: torch.device):
    """(draft, draft config): shaped after the target (plus --draft-model-config overrides), with the
    target's embedding (EAGLE3) and the cache's draft vocabulary. The family (`--draft-type`) comes from
    the registry. Medusa heads always start as the target's lm_head rows of the draft vocabulary with
    identity blocks (Medusa's own initialisation); EAGLE3 warm-starts only with --init-from-target."""
    from ..models.registry import build_draft

    vocab = data.vocab
    if vocab.target_vocab_size != target.vocab_size:
        raise ValueError(f"the draft vocab in {data.path} maps a target vocab of {vocab.target_vocab_size} ids, "
                         f"but {cfg.target_model} has {target.vocab_size}: tokenizer and target do not match")
    draft_config = build_draft_config(cfg, target.config, vocab.draft_vocab_size, target.layer_ids)
    draft = build_draft(draft_config)
    if hasattr(draft, "load_embedding"):
        draft.load_embedding(target.embedding_weight())
    draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
    if hasattr(draft, "init_from_target"):
        head = target.lm_head_weight()
        if head is None:
            raise ValueError("the Medusa heads start from the target's lm_head, which was not loaded")
        draft.init_from_target(head.detach().float().cpu(), vocab.t2d)
    elif cfg.init_from_target:
        warm_start(draft, target, vocab)
    return draft.to(device), draft_config


# ------------------------------------------------------------------------------------------------
# State: what the loop carries, saves and resumes
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where the loop stands; a checkpoint's `trainer_state.json` holds it and `--resume` starts from it."""

    step: int = 0     # optimizer steps taken
    epoch: int = 0
    micro: int = 0    # micro-batches of `epoch` consumed; reaching batches_per_epoch rolls to the next epoch
    best: float | None = None   # best held-out simulated acceptance length so far (RUN/best holds it)
    since_best: int = 0         # evaluations since it improved (early stopping)


@dataclass
class Run:
    """What `train` sets up once and the loop's pieces (step, log, evaluate, checkpoint) share."""

    cfg: TrainConfig
    info: DistInfo
    events: Events
    run_dir: Path
    draft: torch.nn.Module
    draft_config: Any
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    teacher: Any              # OnlineTeacher | OfflineTeacher: batch -> (aux hidden states, target logits)
    tracker: Tracker
    bf16: bool
    pad_id: int
    eval_ds: Any = None
    engine: Any = None        # distributed.DraftEngine: the draft as DDP / FSDP2 sees it (forward, sync, state)


@dataclass
class StepOutput:
    metrics: TTTMetrics       # this step's micro-batches, this rank only
    tokens: int               # real (non-padding) tokens this rank trained on
    grad_norm: torch.Tensor   # before clipping


def resume(run: Run) -> TrainState:
    """Restore draft, optimizer, schedule and RNG from the run's latest complete checkpoint and cut
    `metrics.jsonl` back to it, so the resumed run continues the curve exactly; a fresh state when
    there is none."""
    last = latest_checkpoint(run.run_dir)
    if last is None:
        run.events.warning(f"--resume: no complete checkpoint in {run.run_dir}; starting from scratch")
        return TrainState()
    ck = load_checkpoint(last)
    # The single-file state goes into the (possibly sharded) draft whatever world size wrote it.
    missing, unexpected = run.engine.load_full_state(ck["model_state"], run.opt, ck["optimizer_state"])
    # Checkpoints leave out the frozen embedding (the target's, already loaded); anything else must fit.
    bad = [m for m in missing if not m.startswith("embed_tokens")] + list(unexpected)
    if bad:
        raise ValueError(f"{last}: checkpoint does not fit this draft: {bad[:5]}")
    run.sched.load_state_dict(ck["scheduler_state"])
    restore_rng(ck["rng"])
    st = ck["trainer_state"]
    # Checkpoints older than the world size in trainer_state.json resume at the same world size and batch.
    was_world, was_batch = st.get("world_size", run.info.world_size), st.get("batch_size", run.cfg.batch_size)
    micro, again = rescale_position(st["micro"], was_world, was_batch, run.info.world_size, run.cfg.batch_size)
    if again:
        run.events.warning(f"--resume: the checkpoint was taken at {was_world} rank(s) x batch {was_batch}; at "
                           f"{run.info.world_size} x {run.cfg.batch_size} the run resumes {again} sample(s) early in "
                           "the epoch (they are trained on again)")
    state = TrainState(step=st["step"], epoch=st["epoch"], micro=micro, best=st.get("best"),
                       since_best=st.get("since_best", 0))
    run.tracker.truncate_after(state.step)
    run.events.emit("resumed", checkpoint=str(last), step=state.step, epoch=state.epoch, micro=state.micro)
    run.events.progress_from("steps", state.step)
    return state


def checkpoint(run: Run, state: TrainState, reason: str) -> None:
    # Gathered on every rank (a collective when the draft is sharded), written by rank 0 alone.
    model_state, opt_state = run.engine.full_model_state(), run.engine.full_optim_state(run.opt)
    save_checkpoint(run.run_dir, state.step, model_state, opt_state, run.sched,
                    extra={**asdict(state), "reason": reason, "world_size": run.info.world_size,
                           "batch_size": run.cfg.batch_size}, config=run.draft_config.to_dict(),
                    keep_last=run.cfg.keep_last, is_main=run.info.is_main)
    barrier(run.info)  # rank 0 alone writes; no rank leaves the loop before the checkpoint is on disk
    run.events.emit("checkpoint", step=state.step, reason=reason)


def keep_if_best(run: Run, state: TrainState, row: dict | None) -> bool:
    """After an eval: save the draft to RUN/best when its simulated acceptance length is the best yet.
    Returns True when early stopping says to stop (that many evaluations without a better one)."""
    if row is None:
        return False
    metric = float(row["sim_accept_len"])
    if state.best is None or metric > state.best:
        state.best, state.since_best = metric, 0
        if run.cfg.keep_best:
            save_checkpoint(run.run_dir, state.step, run.engine.full_model_state(), None, None,
                            extra={**asdict(state), "reason": "best", "eval": row},
                            config=run.draft_config.to_dict(), keep_last=1, is_main=run.info.is_main, subdir=BEST)
            barrier(run.info)
            run.events.emit("best_checkpoint", step=state.step, sim_accept_len=round(metric, 4))
        return False
    state.since_best += 1
    return bool(run.cfg.early_stop_patience) and state.since_best >= run.cfg.early_stop_patience


def warm_start(draft, target, vocab) -> None:
    """lm_head rows and final norm from the target's: the draft starts out reading its hidden state the way
    the target reads its own, instead of from a random projection."""
    head = target.lm_head_weight()
    norm = target.final_norm_weight()
    with torch.no_grad():
        if head is not None:
            ids = vocab.target_ids.to(head.device)
            draft.lm_head.weight.copy_(head[ids].to(draft.lm_head.weight))
        if norm is not None:
            draft.norm.weight.copy_(norm.to(draft.norm.weight))


# ------------------------------------------------------------------------------------------------
# One step, its log, the eval pass
# ------------------------------------------------------------------------------------------------
def epoch_batches(batches: EpochBatches, state: TrainState, epochs: int) -> Iterator[tuple[int, Batch]]:
    """The micro-batches left in the current epoch, moving `state` to the next epoch if this one is
    used up; nothing once `epochs` are done."""
    if state.micro >= batches.batches_per_epoch():
        state.epoch, state.micro = state.epoch + 1, 0
    return batches.iter_epoch(state.epoch, state.micro) if state.epoch < epochs else iter(())


def run_ttt(run: Run, batch: Batch, split: str = "train") -> TTTOutput:
    """The teacher's view of the batch, then the family's loss against it: EAGLE3's unrolled TTT, or the
    Medusa heads' per-head loss (same output shape: one entry per step / head)."""
    states, logits = run.teacher(batch, split)
    cfg = run.cfg
    with torch.autocast(device_type=run.info.device.type, dtype=torch.bfloat16) if run.bf16 else nullcontext():
        if cfg.draft_type == "medusa":
            return medusa_forward(run.draft, states, logits, batch.loss_mask, batch.attention_mask,
                                  decay=cfg.medusa_decay)
        return ttt_forward(run.draft, batch.input_ids, states, logits, batch.loss_mask, batch.attention_mask,
                           ttt_length=cfg.ttt_length, decay=cfg.ttt_decay, attention_backend=cfg.attention_backend)


def train_step(run: Run, state: TrainState, micro_batches: Iterator[tuple[int, Batch]]) -> StepOutput | None:
    """One optimizer step: forward and backward over up to `grad_accum` micro-batches (fewer where the
    epoch ends: a step never spans two), gradients averaged over ranks, clipped, optimizer and schedule
    stepped. None when no micro-batch was left."""
    cfg = run.cfg
    run.opt.zero_grad(set_to_none=True)
    metrics, tokens, n = TTTMetrics(cfg.draft_steps), 0, 0
    items = list(itertools.islice(micro_batches, cfg.grad_accum))
    for index, batch in items:
        state.micro = index + 1
        batch = batch.to(run.info.device)
        n += 1
        # Through the engine: DDP / FSDP2 see one forward per backward and reduce gradients on the last.
        with run.engine.sync(last=n == len(items)):
            out = run.engine(lambda: run_ttt(run, batch))
            (out.loss / cfg.grad_accum).backward()
        metrics.add(out)
        tokens += batch.num_tokens
    if n == 0:
        return None
    grad_norm = run.engine.clip_grad_norm(cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    run.opt.step()
    run.sched.step()
    state.step += 1
    return StepOutput(metrics, tokens, grad_norm)


def log_train(run: Run, state: TrainState, out: StepOutput, tokens_per_s: float, total_steps: int) -> None:
    """A train row of `metrics.jsonl` and a progress event. Its TTT metrics are this step's, pooled over
    ranks (not a mean since the last log); `tokens_per_s` is the caller's, over the whole interval."""
    m = out.metrics.reduced(lambda sums: all_reduce_sum(sums, run.info))
    row = {"split": "train", "step": state.step, "epoch": state.epoch, **m.row(run.cfg.loss_decay),
           "lr": run.sched.get_last_lr()[0], "grad_norm": float(out.grad_norm),
           "counted_positions": int(m.counts[0]), "tokens_per_s": tokens_per_s, "loss_normalization": "counted"}
    run.tracker.log(row)
    run.events.progress(state.step, total_steps, what="steps", loss=round(row["loss"], 4),
                        acc_0=round(row["acc_0"], 4), force=True)


def evaluate(run: Run, state: TrainState) -> dict | None:
    """TTT metrics over the whole eval split (each rank a share, pooled), logged as an eval row; None
    without an eval split or with fewer samples than ranks."""
    cfg, info, ds = run.cfg, run.info, run.eval_ds
    if ds is None or len(ds) == 0 or len(ds) < info.world_size:
        return None
    batches = EpochBatches(ds, cfg.batch_size, cfg.seed, info.rank, info.world_size, shuffle=False,
                           pad_id=run.pad_id)
    metrics = TTTMetrics(cfg.draft_steps)
    run.draft.eval()
    with torch.no_grad():
        for _, batch in batches.iter_epoch(0):
            batch = batch.to(info.device)
            metrics.add(run.engine(lambda: run_ttt(run, batch, "eval")))
    run.draft.train()
    m = metrics.reduced(lambda sums: all_reduce_sum(sums, info))
    row = {"split": "eval", "step": state.step, "epoch": state.epoch, **m.row(cfg.loss_decay), "samples": len(ds)}
    run.tracker.log(row)
    run.events.emit("eval", **{k: v for k, v in row.items() if k in ("step", "loss", "acc_0", "sim_accept_len")})
    return row


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, events: Events) -> dict:
    t_start = time.time()
    info = init_distributed(cfg.device, cfg.dist_timeout)
    if cfg.estimate_memory:  # report the per-rank estimate and stop: nothing is loaded or written
        from .memory import plan_memory

        try:
            return {"memory_estimate": plan_memory(cfg, info, events, _bf16(cfg, info), only=True)}
        finally:
            cleanup(info)
    run_dir = Path(cfg.output_dir)
    if not info.is_main:
        return _train(cfg, events, info, t_start)
    run_dir.mkdir(parents=True, exist_ok=True)
    # One writer per run dir (rank 0 writes for all): a second `train` on it stops here, naming the first.
    with output_lock(run_dir, "training", lock_file=run_dir / "run.lock", error=ConfigError):
        return _train(cfg, events, info, t_start)


def _bf16(cfg: TrainConfig, info: DistInfo) -> bool:
    if info.device.type == "cpu" and cfg.dtype == "bfloat16":
        # Without AVX512-BF16 / AMX, PyTorch emulates bf16 matmuls: ~300x slower than fp32 on an AVX2 CPU
        # (0.3 vs 87 GFLOP/s measured), so a recipe written for a bf16 CPU would not finish. fp32 instead.
        from ..cpu_kernels import onednn_bf16_available

        return onednn_bf16_available()
    return cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and info.device.type == "cuda")


def _train(cfg: TrainConfig, events: Events, info: DistInfo, t_start: float) -> dict:
    torch.manual_seed(cfg.seed)  # before anything random: the draft's initial weights
    run_dir = Path(cfg.output_dir)
    if info.is_main:
        ckpt_dir = run_dir / "checkpoints"
        if not cfg.resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
            raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue it, "
                             "or choose another --output-dir")
    use_bf16 = _bf16(cfg, info)
    if cfg.dtype == "bfloat16" and not use_bf16:
        events.warning("dtype bfloat16 asked for, but this CPU has no native bf16 matmuls (AVX512-BF16 or AMX), "
                    "where they run hundreds of times slower than fp32: training in fp32")
    events.emit("train_start", output_dir=str(run_dir), world_size=info.world_size, device=str(info.device),
                bf16=use_bf16)
    from .memory import plan_memory

    plan_memory(cfg, info, events, use_bf16)  # refuses, naming the part, a plan that cannot fit

    setup = setup_offline if cfg.train_hidden_states else setup_online
    target, teacher, data, train_ds, eval_ds = setup(cfg, info, events, use_bf16)
    draft, draft_config = build_draft_model(cfg, target, data, info.device)
    engine = DraftEngine(draft, info, cfg.draft_parallel)  # before the optimizer: FSDP2 swaps the parameters
    params = engine.params
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    batches = EpochBatches(train_ds, cfg.batch_size, cfg.seed, info.rank, info.world_size,
                           pad_id=target.pad_token_id, group_by_length=cfg.group_by_length)
    steps_per_epoch = max(1, math.ceil(batches.batches_per_epoch() / cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, cfg.warmup_ratio, cfg.min_lr_ratio))
    tracker = Tracker(run_dir, [r for r in cfg.report_to if r != "none"], cfg.model_dump(mode="json"),
                      is_main=info.is_main, wandb_project=cfg.wandb_project, wandb_name=cfg.wandb_name)
    run = Run(cfg, info, events, run_dir, draft, draft_config, params, opt, sched, teacher, tracker, use_bf16,
              target.pad_token_id, eval_ds, engine)
    state = resume(run) if cfg.resume else TrainState()
    if info.is_main:
        write_run_json(run_dir, f"train-{cfg.draft_type}", cfg, draft_config=draft_config.to_dict(), cache=str(data.path),
                       world_size=info.world_size, mode="offline" if cfg.train_hidden_states else "online")

    # -- loop --------------------------------------------------------------------------------------
    draft.train()
    last_eval = None
    events.emit("train_plan", total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                train_samples=len(train_ds), eval_samples=len(eval_ds) if eval_ds is not None else 0,
                draft_vocab_size=data.vocab.draft_vocab_size, vocab_coverage=data.vocab.coverage)
    tokens, t_log = 0, time.time()
    try:
        micro_batches = epoch_batches(batches, state, cfg.epochs)
        while state.step < total_steps:
            out = train_step(run, state, micro_batches)
            if out is None:
                break  # the last epoch is used up
            tokens += out.tokens
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                now = time.time()
                log_train(run, state, out, tokens * info.world_size / max(now - t_log, 1e-9), total_steps)
                tokens, t_log = 0, now
            if state.micro >= batches.batches_per_epoch():
                micro_batches = epoch_batches(batches, state, cfg.epochs)
            if cfg.eval_every and state.step % cfg.eval_every == 0:
                last_eval = evaluate(run, state)
                if keep_if_best(run, state, last_eval):
                    events.emit("early_stop", step=state.step, best_sim_accept_len=state.best,
                                evaluations_without_gain=state.since_best)
                    break
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps:
                checkpoint(run, state, "periodic")
            if events.cancelled:  # SIGTERM from a GUI cancel: save, so --resume loses nothing
                checkpoint(run, state, "cancelled")
                raise JobCancelled(f"stopped at step {state.step}; --resume continues from here")
        final_eval = evaluate(run, state)
        keep_if_best(run, state, final_eval)
        last_eval = final_eval or last_eval
        checkpoint(run, state, "final")
    except RuntimeError as e:
        why = peer_failure(info, e)
        if why is None:
            raise
        events.emit("peer_failure", rank=info.rank, step=state.step, message=why)
        raise PeerFailure(why) from e
    finally:
        tracker.close()
        cleanup(info)
    summary = {"output_dir": str(run_dir), "steps": state.step, "epochs_done": state.epoch,
               "seconds": round(time.time() - t_start, 1), "eval": last_eval,
               "latest_checkpoint": str(latest_checkpoint(run_dir)) if info.is_main else None,
               "best_checkpoint": str(best_checkpoint(run_dir) or "") or None if info.is_main else None,
               "best_sim_accept_len": state.best}
    events.emit("train_done", **{k: v for k, v in summary.items() if k != "eval"})
    return summary
