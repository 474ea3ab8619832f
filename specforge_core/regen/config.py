"""The regeneration job's config: one schema for `specforge-wb regenerate`, the GUI form and run files.

Output naming: `output` is the JSONL of regenerated rows (e.g. `out.jsonl`); failures go beside it
in `out.errors.jsonl`, the run's config in `out.run.json` (checked on `--resume`, see `runinfo.py`)
and the lock of the running job in `out.lock` (see `specforge_core.locks`). With `num_samples > 1` every input row yields samples `<id>#0 .. <id>#N-1`,
each regenerated independently (sampling with temperature > 0 makes them differ) and each keyed by
that id for resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, model_validator

from ..config import JobConfig


class RegenConfig(JobConfig):
    """Re-write the assistant turns of a dataset with the target model (OpenAI-compatible servers or in-process)."""

    # -- what to read and write --------------------------------------------------------------------
    input: list[str] = Field(..., description="conversation file(s) (JSONL / JSON / Parquet) in our schema or ShareGPT style")
    output: str = Field(..., description="output JSONL of regenerated rows; failures go to <output stem>.errors.jsonl")
    resume: bool = Field(False, description="continue an earlier run: skip every id already in the output or errors file")
    overwrite: bool = Field(False, description="start over, truncating an existing output and errors file")
    retry_errors: bool = Field(False, description="with --resume: take the ids in the errors file out of it and try them again")
    force: bool = Field(False, description="with --resume: continue even though the earlier run (out.run.json) "
                        "used other output-changing settings (model, sampling, num_samples, input, ...); "
                        "the output then mixes both")
    max_rows: Optional[int] = Field(None, ge=1, description="read at most this many input rows")
    max_row_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="input rows larger than this are skipped")

    # -- where the target runs ---------------------------------------------------------------------
    backend: Literal["server", "local"] = Field("server", description="server: OpenAI-compatible servers "
                                                "(SGLang, vLLM); local: HF generate in this process (small targets)")
    server_address: Optional[list[str]] = Field(None, description="one or more host:port (or http(s) URLs) "
                                                "of OpenAI-compatible servers")
    api_key: Optional[str] = Field(None, description="bearer token for the servers (default: $OPENAI_API_KEY if set)")
    model: Optional[str] = Field(None, description="model name sent to the servers (default: the first one "
                                 "the first server lists at /v1/models)")
    concurrency: int = Field(64, ge=1, description="requests in flight per server")
    timeout_s: float = Field(600.0, gt=0, description="timeout of one whole request, in seconds (long answers "
                             "need minutes)")
    idle_timeout_s: float = Field(60.0, ge=0, description="retry a request that sent no byte for this many "
                                  "seconds (hung server, stalled stream); not counted while the server queues "
                                  "it before its first token; 0 = off")
    connect_timeout_s: float = Field(10.0, gt=0, description="timeout to open a connection / answer a health probe")
    max_retries: int = Field(3, ge=0, description="retries of one request after a 5xx, 429, reset, timeout or bad JSON")
    retry_backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each attempt (with jitter, max 30 s)")
    retire_after: int = Field(3, ge=1, description="consecutive failures after which a server is health-probed "
                              "and retired if the probe fails")
    reprobe_s: float = Field(30.0, ge=0, description="health-probe retired servers this often (seconds); one that "
                             "answers (restarted, finished loading) rejoins the pool; 0 = never")

    local_model: str = Field("default", description="local backend: model (`default` = SmolLM2-135M-Instruct, "
                             "a local HF directory, or a hub id)")
    local_batch_size: int = Field(8, ge=1, description="local backend: prompts per generate call (grouped by length)")
    local_device: Literal["auto", "cpu", "cuda"] = Field("auto", description="local backend: where to run")
    local_linear_kernel: Literal["auto", "native", "onednn-bf16", "onednn-fp32"] = Field(
        "auto", description="local backend: auto = prepacked oneDNN matmuls for an fp32 CPU run (the kernels "
        "`evaluate` uses): bf16 where the CPU has native bf16 matmuls (1.67x the tokens/s of fp32 on SmolLM2 "
        "at batch 64), else fp32")

    # -- sampling ----------------------------------------------------------------------------------
    temperature: float = Field(0.7, ge=0.0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling")
    max_tokens: int = Field(2048, ge=1, description="max new tokens per assistant turn; a turn that hits it is "
                            "reported as truncated")
    num_samples: int = Field(1, ge=1, description="samples per input row; sample k gets id `<id>#k` when > 1")
    seed: int = Field(0, description="seed for local sampling and retry jitter")
    system_prompt: Optional[str] = Field(None, description="replace (or add) the system turn of every conversation")
    reasoning: Literal["none", "save", "disable"] = Field("none", description="thinking models: none = keep "
                                                          "the answer only; save = keep the reasoning as "
                                                          "`reasoning_content` of the turn; disable = ask the "
                                                          "template not to think (enable_thinking false)")
    stop: Optional[list[str]] = Field(None, description="extra stop strings")

    @model_validator(mode="after")
    def _check(self) -> "RegenConfig":
        if self.backend == "server" and not self.server_address:
            raise ValueError("backend 'server' needs --server-address (one or more host:port); "
                             "or use --backend local for a small target in this process")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: pick one")
        if self.retry_errors and not self.resume:
            raise ValueError("--retry-errors only makes sense with --resume")
        if self.force and not self.resume:
            raise ValueError("--force only makes sense with --resume (it accepts a changed config)")
        return self

    @property
    def errors_path(self) -> Path:
        return errors_path_for(self.output)


    @property
    def run_json_path(self) -> Path:
        return sidecar_path(self.output, ".run.json")

    @property
    def lock_path(self) -> Path:
        return sidecar_path(self.output, ".lock")


def sidecar_path(output: str | Path, suffix: str) -> Path:
    """A file beside the output, keyed by its name: `out.jsonl` -> `out<suffix>` (any other name just
    gets the suffix appended), so several outputs can share a folder."""
    p = Path(output)
    if p.suffix == ".jsonl":
        return p.with_name(p.name[: -len(".jsonl")] + suffix)
    return p.with_name(p.name + suffix)


def errors_path_for(output: str | Path) -> Path:
    """`out.jsonl` -> `out.errors.jsonl` (any other name just gets `.errors.jsonl` appended)."""
    return sidecar_path(output, ".errors.jsonl")
