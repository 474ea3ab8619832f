"""Data-parallel plumbing on PyTorch's own engines: the same trainer runs alone or under `torchrun`
(gloo on CPU, NCCL on GPU, one node or many).

- The target: `replicate` keeps a full copy on every rank; `fsdp` shards it with FSDP2
  (`fully_shard` per decoder layer, then the root), forward only: every rank still gets the aux
  states and the logits of its own batch out of one forward (`ShardedTarget.capture`), while each
  holds about 1/W of the decoder weights between layers.
- The draft: `DraftEngine` wraps it in `DistributedDataParallel` (`ddp`) or FSDP2 (`fsdp`). The TTT
  calls the draft's pieces (project, qkv, finish, logits), not one `forward()`, so the engine runs
  the whole micro-batch step as a thunk through a wrapper module's forward: DDP's reducer and FSDP2's
  all-gather hooks see one forward per backward, whatever the step calls inside.
- Checkpoints keep the single-file format: `full_model_state` / `full_optim_state` gather a sharded
  draft (every rank calls them; rank 0 writes), and `load_full_state` loads the full state into the
  wrapped draft, so export, `--resume` at another world size and the GUI see no difference.
- Data position: a checkpoint records the world size and batch size it ran at; `rescale_position`
  turns its micro-batch index into the same number of samples at the new world size (the epoch's
  order is the same permutation whatever the world size: see `batches.EpochBatches`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ..models.target import Capture, Target


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Rank, world and device from torchrun's environment; the process group (with a timeout, so a dead
    peer ends the job instead of hanging it) when there is more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        kw = {"timeout": timedelta(seconds=float(timeout_s))} if timeout_s else {}
        dist.init_process_group("nccl" if use_cuda else "gloo", **kw)
    return DistInfo(rank, world, local_rank, dev)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class PeerFailure(ValueError):
    """A collective failed because another rank died or stalled. (A ValueError so that the CLI prints it as
    one line, like every other error a user can act on.)"""


def peer_failure(info: DistInfo, exc: BaseException) -> str | None:
    """A one-line explanation when `exc` looks like a collective that failed because another rank died or
    stalled (gloo/NCCL connection errors, timeouts); None for any other error."""
    if not info.enabled:
        return None
    text = f"{type(exc).__name__}: {exc}"
    signs = ("Connection closed by peer", "Connection reset", "connection", "Timed out", "timed out",
             "Timeout", "NCCL", "gloo", "Broken pipe", "ProcessGroup", "DistBackendError", "DistNetworkError")
    if isinstance(exc, getattr(dist, "DistError", ())) or any(s in text for s in signs):
        return (f"rank {info.rank}: a collective with the other {info.world_size - 1} rank(s) failed ({text[:300]}); "
                "another rank probably died or stalled. Checkpoints on disk are intact: rerun the same command "
                "with --resume to continue from the latest one")
    return None


def _mesh(info: DistInfo):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(info.device.type, (info.world_size,))


# ------------------------------------------------------------------------------------------------
# The target: replicated or FSDP2-sharded (forward only)
# ------------------------------------------------------------------------------------------------
def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """A plain tensor from a (possibly sharded) parameter; a collective when sharded: every rank calls it."""
    if t is None:
        return None
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class ShardedTarget(Target):
    """A `Target` whose decoder layers and root are FSDP2 units: each rank keeps 1/W of every layer and
    all-gathers one layer at a time during the forward. `capture` runs the root's forward (so the root's
    embedding, final norm and lm_head are gathered by FSDP's own hooks) and takes the capture layers' and
    the final norm's outputs with forward hooks. The weight accessors return full tensors (collectives:
    all ranks call them together, as the trainer's set-up does)."""

    @torch.no_grad()
    def capture(self, input_ids, attention_mask=None) -> Capture:
        captured: dict = {}

        def keep(key):
            def hook(_module, _inputs, output):
                captured[key] = output[0] if isinstance(output, (tuple, list)) else output
            return hook

        handles = [self._layers[i].register_forward_hook(keep(i)) for i in self.layer_ids]
        norm = getattr(self.model.model, "norm", None)
        if norm is not None:
            handles.append(norm.register_forward_hook(keep("last")))
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        missing = [i for i in self.layer_ids if i not in captured]
        if missing:
            raise RuntimeError(f"decoder layers {missing} did not run in the forward pass; cannot capture them")
        logits = out.logits if hasattr(out, "logits") else out[0]
        aux = torch.cat([captured[i] for i in self.layer_ids], dim=-1)
        return Capture(aux_hidden=aux, logits=logits, last_hidden=captured.get("last"))

    def embedding_weight(self):
        return _full(self.model.get_input_embeddings().weight)

    def lm_head_weight(self):
        return _full(self.model.get_output_embeddings().weight)

    def final_norm_weight(self):
        norm = getattr(getattr(self.model, "model", None), "norm", None)
        return _full(getattr(norm, "weight", None))

    def logits_from_hidden(self, last_hidden):
        raise NotImplementedError("a sharded target computes its logits inside capture()")

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype


def shard_target(target: Target, info: DistInfo) -> Target:
    """FSDP2 over the frozen target: one unit per decoder layer plus the root (embedding, final norm,
    lm_head, tied or not). Forward only: no gradients, no optimizer state. With one rank: unchanged."""
    if not info.enabled:
        return target
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(info)
    model = target.model
    for layer in target._layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    sharded = ShardedTarget.__new__(ShardedTarget)
    sharded.__dict__.update(target.__dict__)
    return sharded


def local_param_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shards, for an FSDP module)."""
    from torch.distributed.tensor import DTensor

    n = 0
    for p in module.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        n += t.numel() * t.element_size()
    return n


# ------------------------------------------------------------------------------------------------
# The draft: DDP or FSDP2 around a thunk-running wrapper
# ------------------------------------------------------------------------------------------------
class _Step(torch.nn.Module):
    """Holds the draft; `forward(thunk)` runs the thunk, which calls the draft's pieces. Wrapping this
    module (not the draft) lets DDP / FSDP2 hook one forward per backward."""

    def __init__(self, draft: torch.nn.Module):
        super().__init__()
        self.draft = draft

    def forward(self, thunk: Callable):
        return thunk()


class DraftEngine:
    """How the draft is replicated across ranks: `none` (one rank), `ddp`, or `fsdp` (FSDP2, one unit).

    Built before the optimizer (FSDP2 replaces the parameters with sharded ones); `params` are what the
    optimizer owns. `__call__(thunk)` runs a micro-batch's forward; `sync(last)` skips DDP's gradient
    all-reduce on all but the last micro-batch of an optimizer step."""

    def __init__(self, draft: torch.nn.Module, info: DistInfo, mode: str = "ddp"):
        self.draft = draft
        self.info = info
        self.mode = mode if info.enabled else "none"
        self.module: torch.nn.Module | None = None
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            dev = [info.device.index] if info.device.type == "cuda" else None
            self.module = DistributedDataParallel(_Step(draft), device_ids=dev, broadcast_buffers=False)
        elif self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            self.module = _Step(draft)
            fully_shard(self.module, mesh=_mesh(info), reshard_after_forward=True)
        elif self.mode != "none":
            raise ValueError(f"--draft-parallel {mode!r}: expected ddp or fsdp")
        self.params = [p for p in draft.parameters() if p.requires_grad]

    def __call__(self, thunk: Callable):
        return self.module(thunk) if self.module is not None else thunk()

    def sync(self, last: bool):
        """Context for one micro-batch's forward+backward: DDP all-reduces only on the last."""
        if self.mode == "ddp" and not last:
            return self.module.no_sync()
        if self.mode == "fsdp" and not last:
            return _fsdp_no_sync(self.module)
        return nullcontext()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        return _full(norm)

    # -- checkpoints: the single-file format, whatever the wrapping --------------------------------
    def full_model_state(self) -> dict:
        """The draft's state dict with full tensors (a collective under FSDP: every rank calls it)."""
        if self.mode != "fsdp":
            return self.draft.state_dict()
        return {k: _full(v).detach().cpu() if isinstance(v, torch.Tensor) else v
                for k, v in self.draft.state_dict().items()}

    def full_optim_state(self, opt: torch.optim.Optimizer) -> dict:
        """The optimizer's state dict in the plain (index-keyed, full tensor) layout."""
        sd = opt.state_dict()
        if self.mode != "fsdp":
            return sd
        state = {i: {k: _full(v).detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                 for i, st in sd["state"].items()}
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_full_state(self, model_state: dict, opt: torch.optim.Optimizer | None = None,
                        opt_state: dict | None = None):
        """Load a full (single-file) state into the possibly sharded draft; (missing, unexpected) keys."""
        if self.mode != "fsdp":
            res = self.draft.load_state_dict(model_state, strict=False)
            if opt is not None and opt_state is not None:
                opt.load_state_dict(opt_state)
            return res
        from torch.distributed.tensor import DTensor, distribute_tensor

        own = self.draft.state_dict()
        missing = [k for k in own if k not in model_state]
        unexpected = [k for k in model_state if k not in own]
        with torch.no_grad():
            for k, full in model_state.items():
                if k not in own:
                    continue
                dst = own[k]
                if isinstance(dst, DTensor):
                    src = distribute_tensor(full.to(dst.dtype).to(dst.device_mesh.device_type), dst.device_mesh,
                                            dst.placements)
                    dst.to_local().copy_(src.to_local())
                else:
                    dst.copy_(full.to(dst.dtype))
        if opt is not None and opt_state is not None:
            state = {}
            for i, st in opt_state["state"].items():
                p = self.params[int(i)]
                state[i] = {k: (distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)
                                if isinstance(p, DTensor) and isinstance(v, torch.Tensor)
                                and tuple(v.shape) == tuple(p.shape) else v) for k, v in st.items()}
            opt.load_state_dict({"state": state, "param_groups": opt_state["param_groups"]})
        return missing, unexpected


@contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


# ------------------------------------------------------------------------------------------------
# Data position across world sizes
# ------------------------------------------------------------------------------------------------
def rescale_position(micro: int, saved_world: int, saved_batch: int, world: int, batch: int) -> tuple[int, int]:
    """(micro-batch index at the new world size and batch size, samples of the epoch that will be seen twice)
    for a checkpoint taken after `micro` micro-batches at `saved_world` x `saved_batch`. The epoch's order is
    one permutation whatever the world size and every global micro-batch takes the next `world * batch`
    samples of it, so the position is a sample count; when it is not a multiple of the new global batch, the
    resumed run starts at the last boundary before it (the remainder is trained on again)."""
    samples = int(micro) * int(saved_world) * int(saved_batch)
    per = int(world) * int(batch)
    return samples // per, samples % per
