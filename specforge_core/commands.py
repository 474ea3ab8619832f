"""The command table: every `specforge-wb` job command in one place, read by the CLI (`cli.py`) and by
the background-job runner (`jobs/runner.py`).

A row is a command's name, its config class (the CLI flags, the GUI forms and `run.json` all come
from that schema), the engine function that runs it, its help line, and how it spells the settings-file
flag. Config classes are imported here: config modules hold pydantic schemas only. Engine functions
are named as "module:function" under `specforge_core` and imported when a command runs, because they
pull in torch, transformers or aiohttp and `specforge-wb --help` should not. A function that fails to
import is an error when it is asked for, never a command that quietly disappears
(`tests/test_commands.py` imports every row).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from .config import JobConfig
from .data.config import BuildCacheConfig, InspectMaskConfig, PrepareDataConfig
from .evaluate.config import BenchConfig, EvaluateConfig, ServeReferenceConfig
from .jobs.config import JobsConfig
from .offline.config import DumpConfig, EstimateDumpConfig
from .regen.config import RegenConfig
from .recipes.config import RecipeConfig
from .training.config import CheckDraftConfig, ExportConfig, TrainConfig


@dataclass(frozen=True)
class Command:
    name: str
    config: type[JobConfig]
    func: str                # "module:function" under specforge_core; called as func(cfg, events)
    help: str
    config_flag: bool | str = True  # accept --config FILE (a string: that flag name instead of --config)

    def resolve(self) -> Callable[..., Any]:
        """The engine function; raises ImportError naming the command when it cannot be imported."""
        mod, attr = self.func.split(":")
        module = importlib.import_module(f"specforge_core.{mod}")
        try:
            return getattr(module, attr)
        except AttributeError:
            raise ImportError(f"command {self.name!r}: specforge_core.{mod} has no {attr!r}") from None


COMMANDS: tuple[Command, ...] = (
    # -- data ----------------------------------------------------------------------------------------
    Command("prepare-data", PrepareDataConfig, "data.prepare:prepare_data",
            "convert a preset dataset or local files into train/eval JSONL in our schema"),
    Command("inspect-mask", InspectMaskConfig, "data.inspect:inspect_mask",
            "show which tokens are trained (green) and masked (red)"),
    Command("build-cache", BuildCacheConfig, "data.cache:build_cache",
            "tokenise + mask a dataset once (cached by key) and build the draft vocab"),
    # -- training ------------------------------------------------------------------------------------
    Command("train", TrainConfig, "training.trainer:train",
            "train an EAGLE3 draft (online: the target computes hidden states on the fly); torchrun-ready"),
    Command("export", ExportConfig, "training.export:export_draft",
            "write a checkpoint as the SGLang / vLLM serving layout (config.json + model.safetensors), checked"),
    Command("check-draft", CheckDraftConfig, "training.export:check_draft",
            "check a serving checkpoint: tensor names, shapes, dtypes, d2t/t2d, fit to a target"),
    # -- regeneration --------------------------------------------------------------------------------
    Command("regenerate", RegenConfig, "regen.job:regenerate",
            "re-write the assistant turns with the target (OpenAI-compatible servers or in-process), "
            "resumable"),
    # -- offline training ----------------------------------------------------------------------------
    Command("dump-hidden-states", DumpConfig, "offline.dump:dump_hidden_states",
            "run the target once over a dataset and store its hidden states (compact, crash-safe, resumable) "
            "for offline training (train --train-hidden-states DIR)"),
    Command("estimate-dump", EstimateDumpConfig, "offline.dump:estimate_dump",
            "the disk a dump-hidden-states run needs for this data and format (loads no target weights)"),
    # -- evaluation ----------------------------------------------------------------------------------
    # `--config 1,3,1,4` is the users' spelling of the speculative config (an abbreviation of
    # --configs), so the settings file is `--config-file FILE` here.
    Command("evaluate", EvaluateConfig, "evaluate.inprocess:evaluate",
            "in-process speculative decoding (target + EAGLE3 draft): acceptance length, per-position "
            "acceptance, speedup over plain greedy on the same prompts", config_flag="--config-file"),
    Command("bench", BenchConfig, "evaluate.bench:bench",
            "benchmark a draft on an SGLang server (--server URL, or --launch per config): pooled acceptance "
            "length, tokens/s, latency, speedup vs 1,0,0,0; results saved as they come"),
    Command("serve-reference", ServeReferenceConfig, "evaluate.refserver:serve_reference",
            "serve a target (+ EAGLE3 draft) behind SGLang's HTTP API for tests and notebooks "
            "(production serving is SGLang)"),
    # -- the job registry ----------------------------------------------------------------------------
    Command("jobs", JobsConfig, "jobs.runner:jobs_command",
            "list, show, tail, cancel or resume background jobs (the GUI's job registry)"),
    # -- recipes -------------------------------------------------------------------------------------
    Command("recipe", RecipeConfig, "recipes.run:recipe",
            "list, show or run a recipe: prompts -> answers -> train -> export -> evaluate as one resumable job"),
)
