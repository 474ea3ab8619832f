"""Prepacked oneDNN bf16 linears for decoding on a CPU: the verify step's cost stops growing with its width.

On a CPU, PyTorch's fp32 linear packs the weight matrix on every call, and a 4-token verify of
SmolLM2-135M costs ~1.5x a 1-token decode step; a speculative decoder then needs an acceptance length
of ~2 only to break even. oneDNN's bf16 matmul with weights reordered once into its blocked layout
(`mkldnn::_reorder_linear_weight`, the path Inductor's CPU freezing uses) runs on AMX / AVX512-BF16 at
the same cost for 1 to 8 rows (measured on this project's CPU, see `bench/verify_cost.py`), and its
output for a row does not depend on how many rows are in the call (checked bit for bit in
`tests/test_cpu_kernels.py`), so greedy speculative decoding stays token-identical to plain decoding
under the same kernels.

`pack_linears(module, kernel)` swaps every `nn.Linear` inside `module` for a `PackedLinear` in place. With
`onednn-bf16` the weight is rounded to bf16 once, inputs are rounded to bf16 at each call, accumulation is
fp32; with `onednn-fp32` (any x86 CPU: on one without native bf16, where PyTorch's fp32 F.linear made a
4-token verify cost 1.86 decode steps, the prepacked fp32 matmul made it 1.29) everything stays fp32. The
output comes back in the input's dtype; everything outside the linears (norms, attention, residuals)
keeps its dtype. Inference only: the packed weight has no gradient. Both kernels give a row the same bits
whatever the number of rows in the call (`tests/test_cpu_kernels.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def onednn_bf16_available() -> bool:
    """Whether this PyTorch build and CPU run oneDNN bf16 matmuls natively (AVX512-BF16 or AMX)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def onednn_fp32_available() -> bool:
    """Whether this PyTorch build has oneDNN's prepacked linear (any x86 CPU it supports runs it in fp32)."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """`nn.Linear` for CPU inference with a weight prepacked once into oneDNN's blocked layout, computed in
    bf16 (inputs and weight rounded, fp32 accumulation) or in fp32. Built from an `nn.Linear` or from a
    weight [out, in] (and bias [out]) tensor, such as fused q|k|v rows. Keeps the original `weight` (and
    `bias`) as attributes so code that reads `.weight.dtype` / `.weight.shape` still works."""

    def __init__(self, linear: nn.Linear | Tensor, bias: Tensor | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        weight, bias = (linear.weight, linear.bias) if isinstance(linear, nn.Linear) else (linear, bias)
        self.out_features, self.in_features = weight.shape
        self.weight, self.bias = weight, bias
        self.compute_dtype = dtype
        w = weight.detach().to(dtype).contiguous()
        self._packed = torch.ops.mkldnn._reorder_linear_weight(w, None)   # [out, in], oneDNN layout
        self._bias = None if bias is None else bias.detach().to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()   # [rows, in]
        y = torch.ops.mkldnn._linear_pointwise(x2, self._packed, self._bias, "none", [], "")  # [rows, out]
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        kind = str(self.compute_dtype).replace("torch.", "")
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN {kind} prepacked"


# Each packed kernel and the dtype its matmuls run in. On a CPU without AVX512-BF16 / AMX the fp32 one is
# what flattens a verify's cost: PyTorch's fp32 F.linear repacks the weight on every call and takes 1.83x
# a 1-token decode step for a 4-token verify of SmolLM2 on an AVX2 CPU (bench/verify_cost.py).
PACKED_KERNELS = {"onednn-bf16": torch.bfloat16, "onednn-fp32": torch.float32}
LINEAR_KERNELS = ("auto", "native", *PACKED_KERNELS)


def _kernel_runs(kernel: str) -> str | None:
    """Why `kernel` cannot run on this CPU / build, or None."""
    if kernel == "onednn-bf16" and not onednn_bf16_available():
        return ("this CPU / PyTorch build has no native oneDNN bf16 matmul (needs AVX512-BF16 or AMX); "
                "use onednn-fp32 or native")
    if kernel == "onednn-fp32" and not onednn_fp32_available():
        return "this PyTorch build has no oneDNN (mkldnn); use native"
    return None


def resolve_linear_kernel(choice: str, device, dtype) -> str:
    """The kernel a run uses for `choice` (auto | native | onednn-bf16 | onednn-fp32): auto is, for an fp32
    run on a CPU, onednn-bf16 where the CPU has native bf16 matmuls, else onednn-fp32 where PyTorch has
    oneDNN, else native; on a GPU, or for a bf16 run, native. An explicit packed kernel that cannot run is
    an error naming why, never a silent fallback."""
    if choice not in LINEAR_KERNELS:
        raise ValueError(f"linear kernel must be one of {', '.join(LINEAR_KERNELS)}, not {choice!r}")
    device = torch.device(device)
    if choice in PACKED_KERNELS:
        if device.type != "cpu":
            raise ValueError(f"linear kernel {choice} is for CPU runs; this one runs on {device}")
        why = _kernel_runs(choice)
        if why:
            raise ValueError(f"linear kernel {choice}: {why}")
        return choice
    if choice == "auto" and device.type == "cpu" and dtype == torch.float32:
        for k in PACKED_KERNELS:
            if _kernel_runs(k) is None:
                return k
    return "native"


@torch.no_grad()
def pack_linears(module: nn.Module, kernel: str = "onednn-bf16") -> int:
    """Replace every `nn.Linear` under `module` (CPU, inference) by a `PackedLinear` of `kernel`; returns
    how many."""
    if kernel not in PACKED_KERNELS:
        raise ValueError(f"pack_linears: kernel must be one of {', '.join(PACKED_KERNELS)}, not {kernel!r}")
    why = _kernel_runs(kernel)
    if why:
        raise RuntimeError(f"linear_kernel={kernel}: {why}")
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if child.weight.device.type != "cpu":
                    raise ValueError(f"linear_kernel={kernel} is for CPU inference; {name} is on "
                                     f"{child.weight.device}")
                setattr(parent, name, PackedLinear(child, dtype=PACKED_KERNELS[kernel]))
                count += 1
    return count


# ------------------------------------------------------------------------------------------------
# Row-wise attention: each query row of a short forward attends exactly as a 1-token decode step would
# ------------------------------------------------------------------------------------------------
ROWWISE_ATTENTION = "specforge_rowwise_sdpa"
ROWWISE_MAX_ROWS = 64   # verify steps are a few to a few dozen tokens; a prompt's prefill runs as one SDPA call


def rowwise_sdpa(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs):
    """An HF attention function: query [b, h, n, d], key/value [b, kvh, S, d] (cache included), mask None
    (causal) or 4D [b, 1, n, S] (bool: True = seen; float: 0 = seen). For n <= ROWWISE_MAX_ROWS every
    query row runs as its own 1-row SDPA over exactly the keys it may see, in cache order: the same call,
    on the same values, that a plain decode step makes for that token. Batched SDPA over n rows differs
    from it in the last fp32 bits, and bf16 linears downstream turn such bits into different logits;
    row by row, a verify forward reproduces sequential decoding exactly."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n, S = query.shape[2], key.shape[2]
    if n == 1 or n > ROWWISE_MAX_ROWS:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and query.shape[0] != 1:
        raise ValueError("row-wise attention with a mask runs batch 1 (in-process decoding)")
    outs = []
    for i, seen in enumerate(_row_plan(attention_mask, n, S)):
        if isinstance(seen, int):    # a prefix of the keys, as a decode step sees its cache: a view
            k, v = key[:, :, :seen], value[:, :, :seen]
        else:                        # a tree node: its ancestors, in cache order
            k, v = key.index_select(2, seen), value.index_select(2, seen)
        o, _ = sdpa_attention_forward(module, query[:, :, i: i + 1], k, v, None, **kwargs)
        outs.append(o)                                   # [b, 1, h, d]
    return torch.cat(outs, dim=1), None                  # [b, n, h, d]


_plan_memo: list = [None, None]   # (mask, plan) of the last forward: every layer gets the same mask object


def _row_plan(attention_mask: Tensor | None, n: int, S: int) -> list:
    """Per query row, the keys it sees: an int (that many leading keys) or an index tensor."""
    if attention_mask is None:
        return [S - n + i + 1 for i in range(n)]
    if _plan_memo[0] is attention_mask:
        return _plan_memo[1]
    plan: list = []
    for i in range(n):
        row = attention_mask[0, 0, i]
        idx = (row if row.dtype == torch.bool else row == 0).nonzero().flatten()
        plan.append(int(idx.numel()) if int(idx[-1]) + 1 == idx.numel() else idx)
    _plan_memo[:] = [attention_mask, plan]
    return plan


def use_rowwise_attention(model) -> None:
    """Switch an HF model's attention to `rowwise_sdpa` (registered once under ROWWISE_ATTENTION)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ROWWISE_ATTENTION, rowwise_sdpa)
    model.set_attn_implementation(ROWWISE_ATTENTION)
