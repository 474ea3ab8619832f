"""The offline jobs' configs (`dump-hidden-states`, `estimate-dump`): one schema each for the CLI flags
and `run.json` of a hidden-state store."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ..data.config import DataFields


class DumpConfig(DataFields):
    """Dump a target's hidden states for a dataset into a compact, crash-safe store for offline training."""

    output: str = Field("workspace/hidden_states", description="store directory (resumes if it exists)")
    cache: Optional[str] = Field(None, description="a finished tokenised cache directory (from build-cache); "
                                 "or give --train-data and it is built / found like the trainer does")
    # Same field as DataFields' (it keeps that position); only the help says what it means here.
    draft_vocab_size: int = Field(32000, ge=1, description="draft vocabulary size built with the cache")
    draft_type: Literal["eagle3", "medusa"] = Field("eagle3", description="the draft family the store feeds: "
                                                    "eagle3 keeps the captured aux layers (3H per token), medusa "
                                                    "only the target's final normed last hidden state (H per token)")
    aux_layer_ids: Optional[list[int]] = Field(None, description="eagle3: target layers to capture "
                                               "(default [1, L//2-1, L-4])")
    # Default = the smallest option costing < 2% simulated acceptance length against bf16 storage.
    # Measured by `.venv/bin/python bench/offline_quality.py` (its defaults: SmolLM2-135M on CPU, 80
    # steps, 96 train / 32 eval samples): fp8 aux + top-64 teacher 3.070 vs 3.041 for bf16 (no
    # measurable cost) at 48% of bf16's bytes. The README's "Offline hidden states" summarises it.
    format: Literal["bfloat16", "float16", "float32", "fp8_e4m3"] = Field(
        "fp8_e4m3", description="storage of the captured aux states: fp8_e4m3 (default; fp8 with per-row "
        "scales, lossy), bfloat16, float16, float32 (exact, 2x the bytes of bf16); a last-hidden teacher is "
        "kept in bf16 for fp8")
    teacher: Literal["hidden", "topk"] = Field(
        "topk", description="what stands for the target's distribution: topk (default; its top-k logits in "
        "fp16 + int32 ids; training needs no lm_head; lossy) or hidden (its last hidden state; training "
        "recomputes logits with its lm_head; exact)")
    topk: int = Field(64, ge=1, le=4096, description="k for --teacher topk")
    batch_tokens: int = Field(8192, ge=8, description="max padded tokens per target forward")
    max_batch_size: int = Field(64, ge=1, description="max samples per target forward")
    shard_mb: float = Field(256.0, gt=0, description="target size of one shard file (MiB)")
    splits: list[Literal["train", "eval"]] = Field(["train", "eval"], description="splits to dump (eval only "
                                                   "when the data has one)")
    target_dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="the target's compute "
                                                                 "dtype (auto: bf16 on GPU, fp32 on CPU)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the target runs")
    linear_kernel: Literal["auto", "native", "onednn-bf16", "onednn-fp32"] = Field(
        "native", description="the target's linear layers: native (the same numbers online training sees), "
        "onednn-bf16 (prepacked oneDNN bf16 matmuls on a CPU with AMX / AVX512-BF16: ~2.6x faster forwards of "
        "SmolLM2, states within ~1% of fp32; norms, attention and stored states stay fp32), onednn-fp32 "
        "(prepacked fp32, any x86 CPU), or auto (onednn-bf16 for an fp32 CPU run where the CPU has it, else "
        "onednn-fp32)")
    estimate: bool = Field(False, description="only print the disk estimate and stop")
    force: bool = Field(False, description="start even when the estimate exceeds the free disk")
    repair: bool = Field(False, description="drop corrupt / truncated shards (crc32 checked) and redo them")


class EstimateDumpConfig(DumpConfig):
    """The disk a dump-hidden-states run will need, before it starts (no target weights are loaded)."""
