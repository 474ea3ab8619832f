"""The evaluation jobs' configs: `evaluate` (in-process speculative decoding of a target + an EAGLE3 or
Medusa draft on prompts), `bench` (the SGLang benchmark client) and `serve-reference` (the reference server)."""

from __future__ import annotations

from dataclasses import dataclass

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
                               "(SGLang's tuple; in-process decoding runs batch 1); 1,0,0,0 = plain decoding. "
                               "For a Medusa draft, steps = heads used (at most its num_heads), topk = tree "
                               "width per head (1 = a chain of each head's top-1), draft_tokens = tree nodes "
                               "verified including the root (chain: steps + 1)")
    max_new_tokens: int = Field(128, ge=1, description="tokens to generate per prompt")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (lossless, checked against the baseline); "
                               ">0 = sampling with speculative rejection")
    max_prompts: Optional[int] = Field(None, ge=1, description="use at most this many prompts (the first ones)")
    warmup: int = Field(1, ge=0, description="prompts run once before timing (not counted)")
    aux_layer_ids: Optional[list[int]] = Field(None, description="target layers an EAGLE3 draft reads (default: "
                                               "the draft config's eagle_aux_hidden_state_layer_ids; a Medusa "
                                               "draft reads none)")
    output: str = Field("workspace/eval/evaluate.json", description="results JSON file")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to run")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="target and draft dtype "
                                                                      "(auto: fp32 on CPU, bf16 on GPU)")
    linear_kernel: Literal["auto", "native", "onednn-bf16", "onednn-fp32"] = Field(
        "auto", description="CPU only: `onednn-bf16` / `onednn-fp32` run every linear layer of the target and "
        "the draft as a prepacked oneDNN matmul (bf16 needs AMX/AVX512-BF16; fp32 runs on any x86 CPU), so a "
        "4-8 token verify costs little more than a 1-token step; `native` is PyTorch's own (its fp32 verify "
        "of 4 tokens costs ~1.8 decode steps); `auto` picks onednn-bf16 for an fp32 CPU run where the CPU has "
        "it, else onednn-fp32. Plain and speculative decoding always share the kernels")
    teacher_forced: bool = Field(True, description="greedy EAGLE3 chain configs: also run the baseline's answers "
                                 "through the training-time test, for the trainer's simulated acceptance length "
                                 "on this text and its agreement with each verify step (one target forward per "
                                 "prompt)")
    seed: int = Field(0, description="seed for sampling")
    resume: bool = Field(False, description="continue a stopped evaluation: the prompts every mode finished "
                         "are read back from <output>.generations.jsonl and the rest run (refused if the "
                         "draft or a setting that changes the generations differs); without it that file is "
                         "started over")

    @field_validator("configs")
    @classmethod
    def _check_configs(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one config, e.g. 1,3,1,4")
        out = []
        for i, c in enumerate(v):
            # Several configs may come as one space- or semicolon-separated string from a form.
            for part in str(c).replace(";", " ").split():
                SpecConfig.parse(part, where=f"configs[{i}]")
                out.append(part)
        return out


class BenchConfig(JobConfig):
    """Benchmark a draft against an SGLang server: acceptance length (pooled), tokens/s, latency, speedup."""

    server: Optional[str] = Field(None, description="URL of a running SGLang server (its flags are measured as "
                                  "they are; use --launch to sweep configs)")
    launch: bool = Field(False, description="start `python -m sglang.launch_server` for each server config "
                         "(needs sglang and a GPU)")
    target: Optional[str] = Field(None, description="target model (for --launch; also the default tokenizer)")
    draft: Optional[str] = Field(None, description="EAGLE3 draft directory (for --launch; SGLang has no Medusa: "
                                 "measure a Medusa draft with `evaluate`)")
    tokenizer: Optional[str] = Field(None, description="tokenizer for the chat template (default: --target, else "
                                     "the server's tokenizer_path)")
    benchmark: list[str] = Field(["mtbench:80"], description="benchmark sets `name[:count][=path]`: mtbench, gsm8k, "
                                 "humaneval, math500, or NAME=FILE of prompts")
    config_list: list[str] = Field(["1,0,0,0"], description="configs `batch,steps,topk,draft_tokens`; 1,0,0,0 = "
                                   "no speculation (the speedup baseline)")
    max_new_tokens: int = Field(512, ge=1, description="max tokens generated per request")
    temperature: float = Field(0.0, ge=0.0, description="sampling temperature (0 = greedy, as acceptance "
                               "benchmarks use)")
    system_prompt: Optional[str] = Field(None, description="system prompt applied to every request (use the one "
                                         "the draft was trained with)")
    prompt_format: Literal["chat", "raw"] = Field("chat", description="chat: render with the tokenizer's chat "
                                                  "template and send input_ids; raw: send the prompt text as is")
    output: str = Field("bench_results.json", description="results JSON (also .csv and .requests.jsonl beside it)")
    timeout: float = Field(600.0, gt=0, description="seconds to wait for one request")
    max_errors: int = Field(5, ge=1, description="stop a run after this many failed requests")
    warmup: int = Field(1, ge=0, description="requests sent before each run and not counted")
    host: str = Field("127.0.0.1", description="--launch: host the server binds")
    port: int = Field(30000, ge=1, le=65535, description="--launch: server port")
    tp: int = Field(1, ge=1, description="--launch: tensor-parallel size")
    mem_fraction_static: Optional[float] = Field(None, gt=0, lt=1, description="--launch: SGLang's "
                                                 "--mem-fraction-static")
    launch_timeout: float = Field(900.0, gt=0, description="--launch: seconds to wait for the server's /health")
    server_args: Optional[str] = Field(None, description="--launch: extra launch_server flags, one string "
                                       "written with = so the shell passes it whole: --server-args=\"--dtype bfloat16 --context-length 4096\"")
    python: Optional[str] = Field(None, description="--launch: Python interpreter that has sglang "
                                  "(default: this one)")
    log_dir: Optional[str] = Field(None, description="--launch: server logs go here (default: beside --output)")


class ServeReferenceConfig(JobConfig):
    """Serve a target (and optionally an EAGLE3 draft) behind SGLang's HTTP API, for tests and notebooks.
    Production serving is SGLang: `bench` against this server measures acceptance, not speed."""

    target: str = Field("default", description="target model: `default` (SmolLM2-135M-Instruct), a local HF "
                        "directory or a hub id")
    draft: Optional[str] = Field(None, description="EAGLE3 or Medusa draft directory (serving checkpoint); "
                                 "none = plain decoding (acceptance length 1.0)")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(30000, ge=0, le=65535, description="port (0 = a free one, printed at start)")
    steps: int = Field(3, ge=1, description="speculative steps (with --draft; Medusa: heads used)")
    topk: int = Field(1, ge=1, description="draft tree branching (with --draft; 1 = chain)")
    draft_tokens: Optional[int] = Field(None, ge=2, description="tokens verified per step (default steps+1 "
                                        "for a chain)")
    served_model_name: Optional[str] = Field(None, description="model name in /v1/models (default: the target)")
    device: str = Field("cpu", description="cpu, cuda or auto")
    max_new_tokens_limit: int = Field(4096, ge=1, description="largest max_new_tokens a request may ask for")


# SGLang's batch,steps,topk,draft_tokens: one set of rules for the launcher, bench and the in-process decoder
@dataclass(frozen=True)
class SpecConfig:
    batch: int
    steps: int
    topk: int
    draft_tokens: int

    @property
    def speculative(self) -> bool:
        return self.steps > 0

    @property
    def label(self) -> str:
        return f"{self.batch},{self.steps},{self.topk},{self.draft_tokens}"

    @staticmethod
    def max_tree_nodes(steps: int, topk: int) -> int:
        """How many draft nodes a dynamic tree can offer: topk at level 1, topk^2 at each later level."""
        return topk + (steps - 1) * topk * topk if steps > 0 else 0

    @classmethod
    def parse(cls, text: str, where: str = "config") -> "SpecConfig":
        """`"1,3,1,4"` -> SpecConfig; `"1,0,0,0"` is plain decoding. Errors name the bad value."""
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) != 4:
            raise ValueError(f"{where} {text!r}: expected 4 comma-separated integers batch,steps,topk,draft_tokens "
                             "(e.g. 1,3,1,4)")
        try:
            b, s, k, n = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"{where} {text!r}: every field of batch,steps,topk,draft_tokens must be an integer") \
                from None
        if b < 1:
            raise ValueError(f"{where} {text!r}: batch must be >= 1")
        if s < 0 or k < 0 or n < 0:
            raise ValueError(f"{where} {text!r}: steps, topk and draft_tokens must be >= 0")
        if s == 0:
            if k or n:
                raise ValueError(f"{where} {text!r}: steps 0 means no speculation; write it as {b},0,0,0")
            return cls(b, 0, 0, 0)
        if k < 1:
            raise ValueError(f"{where} {text!r}: topk must be >= 1 when steps > 0")
        if k == 1 and n != s + 1:
            raise ValueError(f"{where} {text!r}: with topk 1 (a chain) draft_tokens must be steps + 1 = {s + 1}")
        if n < 2:
            raise ValueError(f"{where} {text!r}: draft_tokens must be >= 2 (the root plus at least one draft)")
        most = cls.max_tree_nodes(s, k) + 1
        if n > most:
            raise ValueError(f"{where} {text!r}: draft_tokens {n} exceeds what {s} steps of topk {k} can offer "
                             f"({most} including the root)")
        return cls(b, s, k, n)
