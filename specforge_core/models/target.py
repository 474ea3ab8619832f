"""The target model wrapper: one forward pass gives what EAGLE3 and Medusa train on.

`Target.capture` returns the hidden states *output by* three decoder layers (default
`[1, L//2 - 1, L - 4]`, 0-based) concatenated to `3*H` per token, the final normed hidden state and
the logits. The layer outputs are taken with forward hooks on `model.model.layers[i]` rather than
`output_hidden_states=True`, which would keep all L layers' states alive at once (memory on a big
target). In HF's `hidden_states` tuple, entry `i + 1` is the output of layer `i` (entry 0 is the
embedding); the hooks return exactly those tensors.

A Medusa draft reads only the final normed hidden state: `Target(..., aux=False)` captures no layers
(`layer_ids` is empty and `Capture.aux_hidden` None), so a target of any depth works.

Works for any HF causal LM whose decoder stack is `model.model.layers` (Llama, Qwen2/3, Mistral,
Gemma, Phi3, ...); anything else gets a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MIN_LAYERS_FOR_DEFAULT = 7  # below 7 the three default layers are not distinct


def default_layer_ids(num_layers: int) -> list[int]:
    """EAGLE3's capture layers: low, middle, high (`[1, L//2 - 1, L - 4]`, 0-based)."""
    L = int(num_layers)
    if L < MIN_LAYERS_FOR_DEFAULT:
        raise ValueError(f"the default EAGLE3 capture layers [1, L//2-1, L-4] are three distinct layers only for a target with at least "
                         f"{MIN_LAYERS_FOR_DEFAULT} decoder layers, this one has {L}; "
                         "give the layers explicitly (--aux-layer-ids)")
    return [1, L // 2 - 1, L - 4]


def validate_layer_ids(layer_ids: list[int], num_layers: int) -> list[int]:
    ids = [int(i) for i in layer_ids]
    if not ids:
        raise ValueError("aux layer ids: give at least one layer")
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"aux layer ids {bad} out of range: the target has {num_layers} decoder layers "
                         f"(valid ids 0..{num_layers - 1})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"aux layer ids {ids} repeat a layer")
    return ids


@dataclass
class Capture:
    """What one target forward pass gives the draft trainer."""

    aux_hidden: Tensor | None  # [B, T, len(layer_ids) * H]: outputs of the capture layers, in layer_ids
                               # order; None for a target built with aux=False
    logits: Tensor       # [B, T, V]
    last_hidden: Tensor  # [B, T, H]: after the final norm (logits = lm_head(last_hidden))


def _decoder_layers(model) -> torch.nn.ModuleList:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None) if base is not None else None
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} is not supported as a target: EAGLE3 capture needs an HF "
                         "causal LM whose decoder layers are `model.model.layers` (Llama, Qwen2, Mistral, ...)")
    return layers


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _first_id(v) -> int | None:
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    return int(v) if v is not None else None


class Target:
    """A frozen HF causal LM plus the layers EAGLE3 captures from it (none with aux=False)."""

    def __init__(self, model, layer_ids: list[int] | None = None, pad_token_id: int | None = None,
                 aux: bool = True):
        self._layers = _decoder_layers(model)
        self.model = model
        self.config = _text_config(model.config)
        n = len(self._layers)
        self.num_layers = n
        if not aux:
            self.layer_ids: list[int] = []
        else:
            self.layer_ids = validate_layer_ids(layer_ids, n) if layer_ids is not None else default_layer_ids(n)
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no lm_head (output embeddings): not a causal LM")
        self.vocab_size = int(head.weight.shape[0])
        self.hidden_size = int(self.config.hidden_size)
        if pad_token_id is None:
            pad_token_id = _first_id(getattr(self.config, "pad_token_id", None))
        if pad_token_id is None:
            pad_token_id = _first_id(getattr(self.config, "eos_token_id", None))
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        # The target is a teacher only: never trained, never in dropout mode.
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_model(cls, hf_model, layer_ids: list[int] | None = None, pad_token_id: int | None = None,
                   aux: bool = True) -> "Target":
        return cls(hf_model, layer_ids=layer_ids, pad_token_id=pad_token_id, aux=aux)

    @property
    def device(self) -> torch.device:
        return self.embedding_weight().device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding_weight().dtype

    def embedding_weight(self) -> Tensor:
        return self.model.get_input_embeddings().weight

    def lm_head_weight(self) -> Tensor:
        return self.model.get_output_embeddings().weight

    def final_norm_weight(self) -> Tensor | None:
        """The weight of the norm before the lm_head (None when the model has no `model.norm`)."""
        norm = getattr(getattr(self.model, "model", None), "norm", None)
        return getattr(norm, "weight", None)

    def logits_from_hidden(self, last_hidden: Tensor) -> Tensor:
        """Logits from the final normed hidden state (offline training recomputes them this way)."""
        logits = self.model.get_output_embeddings()(last_hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:  # Gemma-2 style soft-capping is part of the target's distribution
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.no_grad()
    def capture(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Capture:
        """One forward pass: aux hidden states of `layer_ids` (None when there are none), logits, and the
        final normed state (HF `last_hidden_state`, what Medusa heads read)."""
        captured: dict[int, Tensor] = {}
        handles = []

        def make_hook(i: int):
            def hook(_module, _inputs, output):
                # Older transformers return (hidden, ...) from a decoder layer, newer a tensor.
                captured[i] = output[0] if isinstance(output, (tuple, list)) else output
            return hook

        for i in self.layer_ids:
            handles.append(self._layers[i].register_forward_hook(make_hook(i)))
        try:
            out = self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        missing = [i for i in self.layer_ids if i not in captured]
        if missing:
            raise RuntimeError(f"decoder layers {missing} did not run in the forward pass "
                               f"({type(self.model).__name__}); cannot capture their outputs")
        last_hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        aux = torch.cat([captured[i] for i in self.layer_ids], dim=-1) if self.layer_ids else None
        return Capture(aux_hidden=aux, logits=self.logits_from_hidden(last_hidden), last_hidden=last_hidden)


def _pick_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16  # pre-Ampere GPUs: half is the fast path there
    return dtype


def load_target(name: str, dtype: torch.dtype = torch.float32, device="cpu",
                layer_ids: list[int] | None = None, aux: bool = True) -> Target:
    """Load a target by name (`default`, a local HF dir, or a hub id) as a frozen `Target`; aux=False
    captures no layers (a Medusa draft's target)."""
    from transformers import AutoModelForCausalLM

    from ..targets import ModelNotFoundError, resolve_model

    resolved = resolve_model(name)
    device = torch.device(device)
    dtype = _pick_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load target model {name!r} (from {resolved}): {e}") from None
    model.to(device)
    pad = None
    try:
        from ..targets import load_tokenizer

        tok = load_tokenizer(name)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    except Exception:  # noqa: BLE001 - a target without a tokenizer still works; pad falls back to the config
        pad = None
    return Target(model, layer_ids=layer_ids, pad_token_id=pad, aux=aux)
