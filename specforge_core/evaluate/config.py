"""The `evaluate` job's config: in-process speculative decoding of a target + EAGLE3 draft on prompts."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, field_validator

from ..config import JobConfig


class EvaluateConfig(JobConfig):
    """Measure a draft in-process: acceptance length, per-position acceptance and speedup over plain
    greedy decoding of the same target, on the same prompts, in the same run."""

    # `--config 1,3,1,4` is how users spell a speculative config (SGLang's batch,steps,topk,draft_tokens)
    _flag_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"configs": ("--config",)}

    target: str = Field("default", description="target model: `default` (SmolLM2-135M-Instruct), a local HF "
                        "directory, or a hub id")
    draft: str = Field(..., description="the draft: a serving export (config.json + model.safetensors), a "
                       "training checkpoint dir, or a run dir (its latest checkpoint)")
    prompts: str = Field(..., description="JSONL / JSON / Parquet prompts: conversation rows (the turns before "
                         "the last assistant turn are the prompt), {\"prompt\": str}, {\"turns\": [...]} (first "
                         "turn, MT-bench), {\"text\": str} (templated), or a shipped set: mtbench, gsm8k, humaneval")
    tokenizer: Optional[str] = Field(None, description="tokenizer (default: the target's)")
    chat_template: str = Field("auto", description="`auto` (the tokenizer's own chat template), a named template "
                               "(chatml, llama3, ...), or `none` (prompt text tokenised as is)")
    system_prompt: Optional[str] = Field(None, description="system prompt added to every prompt that has none")
    configs: list[str] = Field(["1,3,1,4"], description="speculative configs batch,steps,topk,draft_tokens "
                               "(SGLang's tuple; in-process decoding runs batch 1); 1,0,0,0 = plain decoding")
    max_new_tokens: int = Field(128, ge=1, description="tokens to generate per prompt")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (lossless, checked against the baseline); "
                               ">0 = sampling with speculative rejection")
    max_prompts: Optional[int] = Field(None, ge=1, description="use at most this many prompts (the first ones)")
    warmup: int = Field(1, ge=0, description="prompts run once before timing (not counted)")
    aux_layer_ids: Optional[list[int]] = Field(None, description="target layers the draft reads (default: the "
                                               "draft config's eagle_aux_hidden_state_layer_ids)")
    output: str = Field("workspace/eval/evaluate.json", description="results JSON file")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to run")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="target and draft dtype "
                                                                      "(auto: fp32 on CPU, bf16 on GPU)")
    seed: int = Field(0, description="seed for sampling")

    @field_validator("configs")
    @classmethod
    def _check_configs(cls, v: list[str]) -> list[str]:
        from .spec_decode import SpecConfig

        if not v:
            raise ValueError("give at least one config, e.g. 1,3,1,4")
        out = []
        for i, c in enumerate(v):
            # Several configs may come as one space- or semicolon-separated string from a form.
            for part in str(c).replace(";", " ").split():
                SpecConfig.parse(part, where=f"configs[{i}]")
                out.append(part)
        return out
