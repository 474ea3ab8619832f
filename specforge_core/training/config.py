"""The training jobs' configs (`train`, `export`, `check-draft`): one schema each for the CLI flags, the
GUI's Train tab and `run.json`."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator

from ..config import JobConfig
from ..data.config import DataFields

# The draft families `models.registry` defines (a config module imports no registry: floors in
# docs/ARCHITECTURE.md); tests/test_medusa.py checks the two agree.
DRAFT_TYPES = ("eagle3", "medusa")
DraftType = Literal["eagle3", "medusa"]


class TrainConfig(DataFields):
    """Train a draft (EAGLE3 or Medusa) against a target (online: the target computes hidden states on the fly)."""

    # -- what to train on (with DataFields: target, data, tokenising, cache, draft vocab) ----------
    train_hidden_states: Optional[str] = Field(None, description="offline training: a hidden-state store "
                                               "made by dump-hidden-states (the target's weights are not loaded)")
    eval_hidden_states: Optional[str] = Field(None, description="offline eval: a hidden-state store")

    # -- the draft ---------------------------------------------------------------------------------
    draft_type: DraftType = Field("eagle3", description="draft family: eagle3 (one decoder layer over 3 "
                                  "captured target layers, trained by TTT) or medusa (K heads over the target's "
                                  "last hidden state)")
    draft_model_config: Optional[str] = Field(None, description="JSON draft config (SpecForge style) "
                                              "overriding the one derived from the target")
    aux_layer_ids: Optional[list[int]] = Field(None, description="target layers to capture "
                                               "(default [1, L//2-1, L-4])")
    ttt_length: int = Field(7, ge=1, le=32, description="training-time-test unroll length")
    ttt_decay: float = Field(0.8, gt=0.0, le=1.0, description="weight of step k is decay**k")
    attention_backend: Literal["sdpa", "flex", "eager"] = Field("sdpa", description="draft attention kernel "
                                                       "(flex needs a GPU)")
    medusa_num_heads: int = Field(3, ge=1, le=16, description="medusa: heads K (head i predicts token t+2+i)")
    medusa_num_layers: int = Field(1, ge=1, le=8, description="medusa: residual blocks per head")
    medusa_decay: float = Field(0.8, gt=0.0, le=1.0, description="medusa: weight of head i is decay**i")

    # -- optimisation ------------------------------------------------------------------------------
    lr: float = Field(1e-4, gt=0.0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.02, ge=0.0, lt=1.0, description="fraction of steps spent warming up")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine floor, as a fraction of lr")
    grad_clip: float = Field(0.5, ge=0.0, description="max grad norm (0 = off)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    batch_size: int = Field(1, ge=1, description="samples per micro-batch (per process)")
    epochs: int = Field(1, ge=1, description="passes over the training data")
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many optimizer steps")
    seed: int = Field(0, description="seed for data order and init")
    group_by_length: int = Field(0, ge=0, description="0 = random micro-batches; N = sort each N consecutive "
                                 "samples of the epoch's shuffled order by length, so a batch holds samples "
                                 "of similar length (far less padding; the order stays seeded and resumable)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU; bfloat16 on a CPU without native bf16 matmuls trains in fp32 (with a warning)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to train")

    # -- scale-out (under torchrun; one process ignores these) -------------------------------------
    target_parallel: Literal["replicate", "fsdp"] = Field("replicate", description="online target across "
                                                          "ranks: a full copy on each, or FSDP2-sharded per "
                                                          "decoder layer (forward only)")
    draft_parallel: Literal["ddp", "fsdp"] = Field("ddp", description="the draft across ranks: "
                                                   "DistributedDataParallel, or FSDP2-sharded")
    dist_timeout: int = Field(600, ge=10, description="seconds a collective waits for the other ranks "
                              "before the job fails (a dead or stalled rank)")
    estimate_memory: bool = Field(False, description="print the per-rank memory estimate (target shard, "
                                  "draft, optimizer, activations) and stop without training")

    # -- bookkeeping -------------------------------------------------------------------------------
    output_dir: str = Field("workspace/runs/eagle3", description="run directory (checkpoints, metrics.jsonl)")
    resume: bool = Field(False, description="continue from the latest checkpoint in output_dir")
    log_every: int = Field(1, ge=1, description="write train metrics every N steps")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0 = at the end only)")
    eval_max_samples: int = Field(256, ge=1, description="cap on eval samples per evaluation")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0 = at the end and on cancel)")
    keep_last: int = Field(2, ge=1, description="checkpoints to keep")
    keep_best: bool = Field(True, description="also keep the checkpoint with the best held-out simulated "
                            "acceptance length in RUN/best (needs eval data and --eval-every)")
    early_stop_patience: int = Field(0, ge=0, description="stop after this many evaluations without a better "
                                     "held-out simulated acceptance length (0 = never)")
    init_from_target: bool = Field(False, description="warm start: the draft's lm_head from the target's "
                                   "lm_head rows of the draft vocabulary, its final norm from the target's")
    report_to: list[Literal["none", "wandb", "tensorboard"]] = Field(["none"], description="trackers "
                                                                     "besides metrics.jsonl")
    wandb_project: str = Field("specforge-wb", description="wandb project")
    wandb_name: Optional[str] = Field(None, description="wandb run name")

    @model_validator(mode="after")
    def _check_sources(self):
        if not self.train_data and not self.train_hidden_states:
            raise ValueError("give --train-data (online) or --train-hidden-states (offline)")
        if self.draft_type == "medusa" and self.aux_layer_ids is not None:
            raise ValueError("--aux-layer-ids: a Medusa draft reads only the target's last hidden state")
        return self

    # What the metrics columns (acc_k, ploss_k) count and how the loss weighs them, for either family:
    # EAGLE3's TTT steps, Medusa's heads.
    @property
    def draft_steps(self) -> int:
        return self.medusa_num_heads if self.draft_type == "medusa" else self.ttt_length

    @property
    def loss_decay(self) -> float:
        return self.medusa_decay if self.draft_type == "medusa" else self.ttt_decay


class ExportConfig(JobConfig):
    """Write the serving checkpoint (config.json + model.safetensors) SGLang / vLLM load, and check it."""

    _positional: ClassVar[tuple[str, ...]] = ("checkpoint",)

    checkpoint: str = Field(..., description="a checkpoint dir (RUN/checkpoints/step_N) or a run dir "
                            "(meaning its latest complete checkpoint)")
    output: str = Field(..., description="directory to write the serving checkpoint into")
    target: Optional[str] = Field(None, description="target model to check against (`default`, a local dir, "
                                  "or a hub id): vocab and hidden sizes must match")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="dtype of the exported weights")
    overwrite: bool = Field(False, description="replace an existing output directory")


class CheckDraftConfig(JobConfig):
    """Check a serving checkpoint: names, shapes, dtypes, vocab mapping, and fit to a target."""

    _positional: ClassVar[tuple[str, ...]] = ("path",)

    path: str = Field(..., description="serving checkpoint directory (config.json + model.safetensors)")
    target: Optional[str] = Field(None, description="target model to check against (`default`, a local dir, "
                                  "or a hub id)")
