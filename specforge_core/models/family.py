"""What a draft family is: the one object training, export, check-draft, evaluation and the GUI ask.

A family (EAGLE3, Medusa) owns its model class, how its config is derived from the target's, its
serving format (what `config.json` and `model.safetensors` hold: read, write, check) and which target
layers it reads. Everything outside `models/` reaches a family through `models.registry`, never a
family module by name, so a new family is one new module plus one row in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DraftFamily:
    name: str                     # the CLI / config name (`--draft-type eagle3`)
    architecture: str             # `config.json` architectures[0]: what SGLang / vLLM key on
    model: type                   # the nn.Module, built from a transformers config
    # (target_config, draft_vocab_size, layer_ids, overrides) -> transformers config of the draft
    build_config: Callable[..., Any]
    # a config.json dict (serving export or training checkpoint) -> transformers config
    config_from_dict: Callable[[dict, str], Any]
    # (checkpoint config dict, state dict, dtype name) -> the serving config.json dict
    serving_config: Callable[[dict, dict, str], dict]
    # (state dict, dtype name) -> the tensors the serving file holds
    serving_tensors: Callable[[dict, str], dict]
    # (config.json dict, tensor index {name: (dtype, shape, file)}, target config dict or None) -> problems
    check_serving: Callable[[dict, dict, "dict | None"], list[str]]
    # config.json dict -> the target layers the draft reads (None: the family reads no aux layers)
    layer_ids: Callable[[dict], "list[int] | None"]
    # (capture layer ids, target layers) -> why the servers could not feed them ([] when they can)
    layer_problems: Callable[[list[int], "int | None"], list[str]] = lambda ids, n: []
    # a SpecForge-style draft config (JSON overrides) -> the capture layers it names, or None
    layers_from_overrides: Callable[["dict | None"], "list[int] | None"] = lambda ov: None
    # tensors the serving file must hold, and those it may hold (a family whose names depend on its
    # config, like Medusa's per-head tensors, lists the fixed part or nothing: `check_serving` knows all)
    required_tensors: tuple[str, ...] = ()
    optional_tensors: tuple[str, ...] = ()
    # (serving tensors, config.json dict) -> the module's state dict (undoes serving_tensors' renames)
    state_from_serving: Callable[[dict, dict], dict] = lambda state, config: state
    # does the draft read the target's captured aux layers (EAGLE3) or only its last hidden state (Medusa)
    reads_aux: bool = True


class VocabMappedDraft(nn.Module):
    """The draft-vocabulary mapping every family shares (docs/ARCHITECTURE.md, "TTT", draft vocabulary).

    `d2t` [draft_vocab] int64 offsets, target_id = draft_id + d2t[draft_id]; `t2d` [vocab] bool, True for
    the target ids in the draft vocabulary. Both are persistent buffers, so checkpoints carry them;
    until `set_vocab_mapping` the draft vocabulary is the first `draft_vocab_size` target ids."""

    def _init_vocab_buffers(self, vocab_size: int, draft_vocab_size: int) -> None:
        self.vocab_size, self.draft_vocab_size = int(vocab_size), int(draft_vocab_size)
        self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.long), persistent=True)
        t2d = torch.zeros(vocab_size, dtype=torch.bool)
        t2d[:draft_vocab_size] = True
        self.register_buffer("t2d", t2d, persistent=True)

    def set_vocab_mapping(self, d2t: Tensor, t2d: Tensor) -> None:
        """d2t: int offsets [draft_vocab] (target_id = i + d2t[i]); t2d: bool [V_target], draft_vocab True."""
        d2t = torch.as_tensor(d2t).long()
        t2d = torch.as_tensor(t2d).bool()
        if d2t.shape != (self.draft_vocab_size,) or t2d.shape != (self.vocab_size,):
            raise ValueError(f"vocab mapping shapes d2t {tuple(d2t.shape)}, t2d {tuple(t2d.shape)} do not fit "
                             f"draft_vocab_size {self.draft_vocab_size}, vocab_size {self.vocab_size}")
        if int(t2d.sum()) != self.draft_vocab_size:
            raise ValueError(f"t2d marks {int(t2d.sum())} target ids, expected {self.draft_vocab_size}")
        target_ids = torch.arange(self.draft_vocab_size) + d2t
        if not torch.equal(torch.nonzero(t2d).flatten().sort().values, target_ids.sort().values):
            raise ValueError("d2t and t2d disagree: the target ids d2t maps to are not the ones t2d marks")
        self.d2t.copy_(d2t.to(self.d2t.device))
        self.t2d.copy_(t2d.to(self.t2d.device))

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        """Draft vocabulary indices (any shape) -> target token ids."""
        return draft_ids + self.d2t[draft_ids]

    def draft_to_target(self, draft_ids: Tensor) -> Tensor:
        return self.to_target_ids(draft_ids)
