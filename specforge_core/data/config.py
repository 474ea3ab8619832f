"""The data jobs' configs (`prepare-data`, `inspect-mask`, `build-cache`): one schema each for the CLI
flags, the GUI forms and `run.json`."""

from __future__ import annotations

import os
from typing import Literal, Optional

from pydantic import Field

from ..config import JobConfig


class PrepareDataConfig(JobConfig):
    """Turn a preset dataset or local files into our conversation schema (train / eval JSONL)."""

    dataset: Optional[str] = Field(None, description="preset name (ultrachat, sharegpt, perfectblend, "
                                   "daring-anteater, magpie); its source is read with `datasets`")
    input: Optional[list[str]] = Field(None, description="local file(s): JSONL, JSON list or Parquet, "
                                       "in our schema or a preset's source schema; several are merged")
    source_path: Optional[str] = Field(None, description="where a preset's source lives locally "
                                       "(file or directory); default: the hub id through the HF cache")
    output: str = Field("workspace/data", description="output directory")
    name: Optional[str] = Field(None, description="output name prefix (default: dataset or input stem)")
    sample_size: Optional[int] = Field(None, ge=1, description="keep at most this many rows (random, seeded)")
    split_eval: float = Field(0.05, ge=0.0, lt=1.0, description="fraction of rows written to the eval file")
    seed: int = Field(0, description="seed for sampling and the train/eval split")
    system_prompt: Optional[str] = Field(None, description="add this system turn to rows that have none")
    max_row_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="rows larger than this are skipped")


class MaskOptions(JobConfig):
    """How conversations become token ids and a loss mask."""

    tokenizer: str = Field("default", description="tokenizer: `default` (SmolLM2-135M-Instruct), "
                           "`llama3` (Meta's Llama-3 tokenizer), a local directory, or a hub id")
    chat_template: str = Field("auto", description="named template (llama3, chatml, qwen, qwen3-thinking, ...) "
                               "or `auto` (render with the tokenizer's own chat template and diff prefixes)")
    max_length: int = Field(2048, ge=8, description="truncate samples to this many tokens")
    train_only_last_turn: bool = Field(False, description="train only on the last assistant turn")


class InspectMaskConfig(MaskOptions):
    """Show which tokens of a sample are trained (green) and which are masked (red)."""

    input: str = Field(..., description="JSONL / JSON / Parquet file of conversations or text rows")
    index: Optional[list[int]] = Field(None, description="row indices to show (default: 0)")
    format: Literal["text", "json"] = Field("text", description="text: coloured tokens; json: one object per sample")
    color: Optional[bool] = Field(None, description="force ANSI colours on/off (default: when stdout is a terminal)")


class BuildCacheConfig(MaskOptions):
    """Tokenise + mask a dataset once, keyed by a hash of its inputs, and build the draft vocab."""

    data: list[str] = Field(..., description="conversation JSONL file(s) (train); several are concatenated")
    eval_data: Optional[list[str]] = Field(None, description="eval file(s), cached beside the train split")
    cache_dir: str = Field("workspace/cache", description="where caches live (one subdirectory per key)")
    num_proc: int = Field(max(1, min(4, os.cpu_count() or 1)), ge=1, description="worker processes for tokenising")
    draft_vocab_size: int = Field(32000, ge=1, description="size of the draft vocabulary (top ids under the mask)")
    overwrite: bool = Field(False, description="rebuild even when a cache with the same key exists")


class DataFields(JobConfig):
    """The data and target fields of a job that runs a target over a tokenised cache (`train`,
    `dump-hidden-states`): the same fields, flags and defaults in each, and one way from them to the
    cache, so an online and an offline run over the same data find the same cache (same key)."""

    target_model: str = Field("default", description="target model: `default` (SmolLM2-135M-Instruct), "
                              "a local HF directory, or a hub id")
    train_data: Optional[list[str]] = Field(None, description="conversation JSONL file(s) for training")
    eval_data: Optional[list[str]] = Field(None, description="conversation JSONL file(s) for evaluation")
    tokenizer: Optional[str] = Field(None, description="tokenizer (default: the target's)")
    chat_template: str = Field("auto", description="chat template name or `auto`")
    max_length: int = Field(2048, ge=8, description="max tokens per sample")
    train_only_last_turn: bool = Field(False, description="train only on the last assistant turn")
    cache_dir: str = Field("workspace/cache", description="tokenised-cache root")
    num_proc: int = Field(max(1, min(4, os.cpu_count() or 1)), ge=1, description="tokenising processes")
    draft_vocab_size: int = Field(32000, ge=1, description="draft vocabulary size (capped at the target's)")

    def build_cache_config(self) -> BuildCacheConfig:
        """The `build-cache` config of these fields (the caller caps draft_vocab_size at its target's)."""
        return BuildCacheConfig(
            tokenizer=self.tokenizer or self.target_model, chat_template=self.chat_template,
            max_length=self.max_length, train_only_last_turn=self.train_only_last_turn, data=self.train_data,
            eval_data=self.eval_data, cache_dir=self.cache_dir, num_proc=self.num_proc,
            draft_vocab_size=self.draft_vocab_size)
