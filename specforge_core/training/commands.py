"""CLI rows for training: `train`, `export`, `check-draft` (picked up by `specforge_core.cli`)."""

from ..cli import Command

COMMANDS = [
    Command("train", "training.config:TrainConfig", "training.trainer:train",
            "train an EAGLE3 draft (online: the target computes hidden states on the fly); torchrun-ready"),
    Command("export", "training.config:ExportConfig", "training.export:export_draft",
            "write a checkpoint as the SGLang / vLLM serving layout (config.json + model.safetensors), checked"),
    Command("check-draft", "training.config:CheckDraftConfig", "training.export:check_draft",
            "check a serving checkpoint: tensor names, shapes, dtypes, d2t/t2d, fit to a target"),
]
