"""What a draft family is: the one object training, export, check-draft, evaluation and the GUI ask.

A family (EAGLE3 today) owns its model class, how its config is derived from the target's, its
serving format (what `config.json` and `model.safetensors` hold: read, write, check) and which target
layers it reads. Everything outside `models/` reaches a family through `models.registry`, never a
family module by name, so a new family is one new module plus one row in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


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
    # tensors the serving file must hold, and those it may hold
    required_tensors: tuple[str, ...] = ()
    optional_tensors: tuple[str, ...] = ()
