"""The dump job: run the target once over a tokenised cache and keep what a draft needs in a store.

`dump_hidden_states(cfg, events)` (CLI `dump-hidden-states`) builds or finds the tokenised cache
exactly as the trainer does (same key, so online and offline runs see the same samples), emits the
size estimate and the free disk *before* it loads the target, refuses to start when the estimate does
not fit (unless `--force`), then runs the target over the samples sorted by length (batches bounded
by `batch_tokens`), checks each sample's states are finite (non-finite ones are reported and
skipped), and appends them to the store (`offline.store.StoreWriter`), one atomically committed shard
at a time. A crash or SIGKILL loses at most the shard in flight: running the same command again skips
every committed sample. `--estimate` stops after the estimate; `--repair` drops corrupt or truncated
shards and redoes their samples.

What is stored per token is `format` (the states: bfloat16, float16, float32 or fp8_e4m3 with
per-row scales; for `--draft-type eagle3` the captured aux layers, 3H wide, for `medusa` the target's
final normed last hidden state, H wide: run.json `states` aux / last) and, at the positions that teach, `teacher`: the last hidden state (training recomputes
the logits with the target's lm_head; exact) or the target's top-`topk` logits (fp16 values + int32
ids; training needs no lm_head; lossy). Bytes per token of each option are in `offline.store`'s
docstring; the estimate event lists them for this data (`bytes_per_token_by_option`) beside the chosen
one and SpecForge's 8H + 16.

`estimate-dump` is the same estimate as its own command (no target weights are loaded).

Under `torchrun` the ranks split the work: rank 0 builds the cache, takes the lock, recovers the store and
writes `run.json`; every rank then takes every W-th length batch of what is left and commits its own shards
to its own journal (`StoreWriter(rank_tag=...)`); when all are done rank 0 merges the journals into the one
`manifest.jsonl` and writes `manifest.json`. A killed parallel dump resumes like a single one (at any
world size): the first thing a dump does is merge whatever rank journals a previous run left.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from ..config import ConfigError, read_run_json, write_run_json
from ..events import Events, JobCancelled
from ..locks import output_lock
from .config import DumpConfig
from .store import (STORE_FORMAT, STORE_KIND, StoreError, StoreWriter, bytes_per_token, estimate_bytes,
                    human_bytes, merge_rank_journals, specforge_bytes_per_token, target_identity, teacher_positions,
                    topk_rows)

# Fault injection for crash tests: seconds to sleep after each forward batch.
_SLEEP_ENV = "SPECFORGE_DUMP_SLEEP"


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------
def _target_config(name: str):
    from transformers import AutoConfig

    from ..targets import resolve_model

    conf = AutoConfig.from_pretrained(resolve_model(name))
    get = getattr(conf, "get_text_config", None)
    return get() if callable(get) else conf


class _Ranks:
    """The dump's view of torchrun: rank, world size, barrier (all no-ops for one process)."""

    def __init__(self, device: str, alone: bool = False):
        self.world = 1 if alone else int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0 if alone else int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        self._own = False
        if self.world > 1:
            import torch.distributed as dist
            from datetime import timedelta

            if self.cuda:
                torch.cuda.set_device(self.local_rank)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.cuda else "gloo", timeout=timedelta(seconds=1800))
                self._own = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self._own:
            import torch.distributed as dist

            dist.destroy_process_group()


def _load_data(cfg: DumpConfig, vocab_size: int, events: Events, ranks: "_Ranks | None" = None):
    from ..data.cache import build_cache, load_cache

    if cfg.cache:
        return load_cache(cfg.cache)
    if not cfg.train_data:
        raise ValueError("dump-hidden-states: give --cache (a finished tokenised cache) or --train-data")
    cc = cfg.build_cache_config()
    if cc.draft_vocab_size > vocab_size:
        cc = cc.model_copy(update={"draft_vocab_size": vocab_size})
    if ranks is not None and ranks.world > 1:   # rank 0 builds, the others find the finished cache
        path = build_cache(cc, events)["path"] if ranks.main else None
        ranks.barrier()
        return load_cache(path or build_cache(cc, Events(None, echo=False))["path"])
    return load_cache(build_cache(cc, events)["path"])


def _split_stats(ds) -> tuple[list[int], list[int]]:
    """(lengths, teacher rows) per sample, read column-wise."""
    import pyarrow.compute as pc

    lengths: list[int] = []
    rows: list[int] = []
    table = ds.with_format("arrow")
    for start in range(0, len(ds), 10_000):
        b = table[start:start + 10_000]
        lengths += b.column("length").to_pylist()
        trained = b.column("num_trained").to_pylist()
        first = pc.list_element(b.column("loss_mask"), 0).to_pylist()
        rows += [int(t) - int(f or 0) for t, f in zip(trained, first)]
    return lengths, rows


def _free_bytes(path: Path) -> int:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def length_batches(order: list[int], lengths: list[int], batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Greedy batches over indices sorted by length (longest first): B * longest <= batch_tokens."""
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and ((len(cur) + 1) * lengths[cur[0]] > batch_tokens or len(cur) >= max_batch):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _check_existing(out: Path, identity: dict, key: str, fmt: str, layer_ids: list[int],
                    teacher: str = "hidden", topk: int = 64, states: str = "aux") -> None:
    if not (out / "run.json").exists():
        if out.exists() and any(p for p in out.iterdir() if p.name not in ("shards",)):
            raise StoreError(f"{out}: exists and is not a hidden-state store; choose another --output")
        return
    run = read_run_json(out, expect_kind=STORE_KIND)
    diffs = []
    if run.get("target", {}).get("sha256") != identity["sha256"]:
        diffs.append(f"target {run.get('target', {}).get('resolved')!r} vs {identity['resolved']!r}")
    if run.get("cache_key") != key:
        diffs.append(f"cache {run.get('cache_key')!r} vs {key!r}")
    if run.get("format") != fmt:
        diffs.append(f"format {run.get('format')!r} vs {fmt!r}")
    if run.get("states", "aux") != states:
        diffs.append(f"states {run.get('states', 'aux')!r} vs {states!r} (--draft-type)")
    if list(run.get("layer_ids", [])) != list(layer_ids):
        diffs.append(f"layers {run.get('layer_ids')} vs {layer_ids}")
    if run.get("teacher", "hidden") != teacher:
        diffs.append(f"teacher {run.get('teacher', 'hidden')!r} vs {teacher!r}")
    elif teacher == "topk" and int(run.get("topk", -1)) != int(topk):
        diffs.append(f"topk {run.get('topk')} vs {topk}")
    if diffs:
        raise StoreError(f"{out}: holds a store made with other inputs ({'; '.join(diffs)}); it cannot be resumed "
                         "with these, choose another --output")


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------
def dump_hidden_states(cfg: DumpConfig, events: Events) -> dict:
    """The dump job; one writer per store (`<store>.lock` beside it), an estimate needs no lock."""
    if cfg.estimate:
        return _dump(cfg, events)
    ranks = _Ranks(cfg.device)
    try:
        if not ranks.main:   # rank 0 holds the lock for all
            return _dump(cfg, events, ranks)
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        with output_lock(cfg.output, "hidden-state dump", error=ConfigError):
            return _dump(cfg, events, ranks)
    finally:
        ranks.close()


def _dump(cfg: DumpConfig, events: Events, ranks: _Ranks | None = None) -> dict:
    from ..models.registry import family
    from ..models.target import default_layer_ids, validate_layer_ids

    t0 = time.time()
    out = Path(cfg.output)
    tconf = _target_config(cfg.target_model)
    n_layers = int(tconf.num_hidden_layers)
    reads_aux = family(cfg.draft_type).reads_aux
    states = "aux" if reads_aux else "last"
    if not reads_aux:
        if cfg.aux_layer_ids:
            raise ValueError(f"--aux-layer-ids: a {cfg.draft_type} draft reads only the target's last hidden state")
        layer_ids: list[int] = []
    else:
        layer_ids = validate_layer_ids(cfg.aux_layer_ids, n_layers) if cfg.aux_layer_ids \
            else default_layer_ids(n_layers)
        problems = family(cfg.draft_type).layer_problems(layer_ids, n_layers)
        if problems:
            raise ValueError("--aux-layer-ids: " + "; ".join(problems))
    n_states = len(layer_ids) if reads_aux else 1   # H-wide states per token
    H = int(tconf.hidden_size)
    identity = target_identity(cfg.target_model)
    vocab_size = int(identity.get("vocab_size") or tconf.vocab_size)
    ranks = ranks or _Ranks("cpu", alone=True)   # an estimate: every process alone
    data = _load_data(cfg, vocab_size, events, ranks)
    cache_run = read_run_json(data.path, expect_kind="build-cache")
    key = cache_run["key"]
    if data.vocab.target_vocab_size != vocab_size:
        raise ValueError(f"the tokenised cache {data.path} maps a target vocab of {data.vocab.target_vocab_size} ids, "
                         f"but {cfg.target_model} has {vocab_size}: tokenizer and target do not match")
    _check_existing(out, identity, key, cfg.format, layer_ids, cfg.teacher, cfg.topk, states)
    tk = {"teacher": cfg.teacher, "topk": cfg.topk}

    splits = [(s, data.train if s == "train" else data.eval) for s in cfg.splits
              if (data.train if s == "train" else data.eval) is not None]
    writer = None
    tag = f"r{ranks.rank}" if ranks.world > 1 else None
    resuming = (out / "run.json").exists()
    ranks.barrier()  # every rank has looked before rank 0 can write run.json: all take the same path
    if resuming and not cfg.estimate:
        if ranks.main:  # what a killed parallel dump committed joins the manifest; then recovery, alone
            merge_rank_journals(out)
            writer = StoreWriter(out, cfg.format, n_states, int(cfg.shard_mb * (1 << 20)),
                                 verify=cfg.repair, repair=cfg.repair, events=events, **tk)
        ranks.barrier()
        if tag:
            writer = StoreWriter(out, cfg.format, n_states, int(cfg.shard_mb * (1 << 20)), events=events,
                                 rank_tag=tag, **tk)
    stats = {s: _split_stats(ds) for s, ds in splits}
    todo = {s: [i for i in range(len(ds)) if writer is None or not writer.exists(s, i)] for s, ds in splits}

    # -- the estimate, before anything heavy ---------------------------------------------------------
    total_tokens = sum(sum(st[0]) for st in stats.values())
    total_rows = sum(sum(st[1]) for st in stats.values())
    need_all = sum(estimate_bytes(st[0], st[1], H, cfg.format, n_states, **tk) for st in stats.values())
    need = sum(estimate_bytes([stats[s][0][i] for i in todo[s]], [stats[s][1][i] for i in todo[s]], H, cfg.format,
                              n_states, **tk) for s in todo)
    free = _free_bytes(out)
    frac = total_rows / max(total_tokens, 1)
    est = {"format": cfg.format, "teacher": cfg.teacher, **({"topk": cfg.topk} if cfg.teacher == "topk" else {}),
           "draft_type": cfg.draft_type, "states": states,
           "hidden_size": H, "layer_ids": layer_ids, "samples": sum(len(st[0]) for st in
           stats.values()), "tokens": total_tokens, "teacher_rows": total_rows, "teacher_fraction": round(frac, 4),
           "bytes_per_token": round(need_all / max(total_tokens, 1), 2),
           "bytes_per_token_formula": round(bytes_per_token(H, cfg.format, frac, n_states, **tk), 2),
           "bytes_per_token_by_option": {
               (f if t == "hidden" else f"{f}+top{cfg.topk}"): round(bytes_per_token(H, f, frac, n_states, t,
                                                                                    cfg.topk), 1)
               for f in ("float32", "bfloat16", "fp8_e4m3") for t in ("hidden", "topk")},
           # This format and teacher for either family, so the two can be compared before dumping.
           "bytes_per_token_by_draft_type": {
               "eagle3": round(bytes_per_token(H, cfg.format, frac, 3, **tk), 1),
               "medusa": round(bytes_per_token(H, cfg.format, frac, 1, **tk), 1)},
           "specforge_bytes_per_token": specforge_bytes_per_token(H), "estimated_bytes": need_all,
           "remaining_bytes": need, "free_bytes": free,
           "remaining_samples": sum(len(v) for v in todo.values())}
    events.emit("dump_estimate", **est, estimated=human_bytes(need_all), remaining=human_bytes(need),
                free=human_bytes(free))
    if cfg.estimate:
        return {**est, "output": str(out), "estimate_only": True}
    if need > free and not cfg.force:
        raise ValueError(f"dump-hidden-states: the store needs about {human_bytes(need)} more but {out} has "
                         f"{human_bytes(free)} free; free space, pick a smaller --format, or pass --force")

    # -- the store ---------------------------------------------------------------------------------
    if writer is None and ranks.main:
        out.mkdir(parents=True, exist_ok=True)
    from ..models.target import load_target

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)
    use_bf16 = cfg.target_dtype == "bfloat16" or (cfg.target_dtype == "auto" and device.type == "cuda")
    target = load_target(cfg.target_model, dtype=torch.bfloat16 if use_bf16 else torch.float32, device=device,
                         layer_ids=layer_ids if reads_aux else None, aux=reads_aux)
    from ..cpu_kernels import pack_linears, resolve_linear_kernel

    kernel = resolve_linear_kernel(cfg.linear_kernel, device, torch.bfloat16 if use_bf16 else torch.float32)
    if kernel != "native":
        pack_linears(target.model, kernel)
    if not (out / "run.json").exists() and ranks.main:
        write_run_json(out, STORE_KIND, cfg, store_format=STORE_FORMAT, format=cfg.format, target=identity,
                       teacher=cfg.teacher, topk=cfg.topk if cfg.teacher == "topk" else None,
                       cache_key=key, cache_path=str(data.path), layer_ids=layer_ids, hidden_size=H,
                       states=states, draft_type=cfg.draft_type,
                       vocab_size=target.vocab_size, num_layers=target.num_layers,
                       pad_token_id=target.pad_token_id, target_dtype="bfloat16" if use_bf16 else "float32",
                       linear_kernel=kernel,
                       split_sizes={s: len(ds) for s, ds in splits})
    ranks.barrier()  # run.json is on disk before any rank writes a shard
    if writer is None:
        writer = StoreWriter(out, cfg.format, n_states, int(cfg.shard_mb * (1 << 20)), events=events,
                             rank_tag=tag, **tk)
    events.emit("dump_start", output=str(out), device=str(device), linear_kernel=kernel, already_done=sum(writer.done_count(s)
                for s, _ in splits), remaining_samples=est["remaining_samples"])

    from ..data.batches import collate

    sleep = float(os.environ.get(_SLEEP_ENV, "0") or 0)
    t_loop, cpu_loop = time.time(), time.process_time()
    t_fwd = 0.0
    done_tokens = 0
    for split, ds in splits:
        lengths = stats[split][0]
        order = sorted(todo[split], key=lambda i: (-lengths[i], i))
        total = len(ds)
        done = total - len(order)
        events.progress(done, total, what=f"{split} samples dumped", force=True)
        # Under torchrun rank r takes every W-th batch (longest first, so each rank gets a share of each size).
        groups = length_batches(order, lengths, cfg.batch_tokens, cfg.max_batch_size)[ranks.rank::ranks.world]
        for group in groups:
            if events.cancelled:
                writer.flush()
                raise JobCancelled(f"dump stopped with {done}/{total} {split} samples stored; run again to resume")
            rows = ds.select(group) if len(group) > 1 else [ds[group[0]]]
            batch = collate(list(rows), group, target.pad_token_id).to(device)
            t1 = time.time()
            cap = target.capture(batch.input_ids, batch.attention_mask)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_fwd += time.time() - t1
            for b, idx in enumerate(group):
                n = lengths[idx]
                pos = teacher_positions(batch.loss_mask[b, :n].cpu())
                aux = (cap.aux_hidden if reads_aux else cap.last_hidden)[b, :n]   # the draft's input states
                if cfg.teacher == "topk":
                    # The check reads the logits the top-k is taken from: a NaN anywhere in a row counts.
                    logits = cap.logits[b, :n][pos.long().to(device)]
                    finite = bool(torch.isfinite(aux).all() and torch.isfinite(logits).all())
                    teach = {"topk": topk_rows(logits, cfg.topk)} if finite else {}
                else:
                    last = cap.last_hidden[b, :n][pos.long().to(device)]
                    finite = bool(torch.isfinite(aux).all() and torch.isfinite(last).all())
                    teach = {"last": last}
                if not finite:
                    writer.skip(split, idx, "non-finite hidden states (NaN/inf) from the target")
                    continue
                writer.put(split, idx, aux, pos, **teach)
                done_tokens += n
            done += len(group)
            events.progress(done, total, what=f"{split} samples dumped")
            if sleep:
                time.sleep(sleep)
        writer.flush(split)
        events.progress(done, total, what=f"{split} samples dumped", force=True)
    if ranks.world > 1:
        writer.flush()
        ranks.barrier()   # every rank's shards are committed to its journal
        if not ranks.main:
            return {"output": str(out), "rank": ranks.rank, "tokens_this_run": done_tokens,
                    "seconds": round(time.time() - t0, 2)}
        merge_rank_journals(out)
        writer = StoreWriter(out, cfg.format, n_states, int(cfg.shard_mb * (1 << 20)), events=events, **tk)
    complete = {s: all(writer.exists(s, i) for i in range(len(ds))) for s, ds in splits}
    summary = writer.finish(complete, {"seconds": round(time.time() - t0, 2)})
    result = {"output": str(out), "format": cfg.format, "teacher": cfg.teacher, "states": states,
              "complete": complete,
              "samples": {s: v["samples"] for s, v in summary["splits"].items()},
              "skipped": {s: v["skipped"] for s, v in summary["splits"].items()},
              "bytes": sum(v["bytes"] for v in summary["splits"].values()),
              "bytes_per_token": round(sum(v["bytes"] for v in summary["splits"].values())
                                       / max(sum(v["tokens"] for v in summary["splits"].values()), 1), 2),
              "specforge_bytes_per_token": specforge_bytes_per_token(H),
              "forward_seconds": round(t_fwd, 3), "loop_seconds": round(time.time() - t_loop, 3),
              "loop_cpu_seconds": round(time.process_time() - cpu_loop, 3),
              "seconds": round(time.time() - t0, 2),
              "tokens_this_run": done_tokens}
    events.emit("dump_done", **result)
    return result


def estimate_dump(cfg: DumpConfig, events: Events) -> dict:
    """`estimate-dump`: the estimate only."""
    return dump_hidden_states(cfg.model_copy(update={"estimate": True}), events)
