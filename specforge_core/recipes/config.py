"""The `recipe` command's config, and the schema of a recipe file.

A recipe file (YAML) names a target and, per stage, the fields of the engine config that stage runs
(`RegenConfig` for `answers`, `DumpConfig` for `dump`, `TrainConfig` for `train`, ...): a user copies
one (`specforge-wb recipe show NAME > mine.yaml`), edits it, and runs `recipe run mine.yaml`.
`${name}` in any string is replaced by the recipe's `params` (overridable with `--set name=value`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import JobConfig


class RecipeConfig(JobConfig):
    """Run, list or show recipes: one command for prompts -> answers -> train -> export -> evaluate."""

    _positional: ClassVar[tuple[str, ...]] = ("action", "recipe")
    # Running the same recipe into the same output continues it (finished stages are skipped), so the
    # jobs runner resumes a recipe job by running it again, without a restart it asked for once.
    _continues_itself: ClassVar[bool] = True
    _once_only: ClassVar[tuple[str, ...]] = ("restart_from",)

    action: Literal["list", "show", "run"] = Field("list", description="list: the shipped recipes; show: a "
                                                   "recipe's YAML; run: run (or continue) it")
    recipe: Optional[str] = Field(None, description="a shipped recipe's name (see `recipe list`) or a YAML file")
    output: str = Field("workspace/recipes/r1", description="run: the directory every stage writes into")
    set: Optional[list[str]] = Field(None, description="run: override recipe params, e.g. data_dir=/data")
    restart_from: Optional[str] = Field(None, description="run: redo this stage and every later one (earlier "
                                        "finished stages are kept)")
    stop_after: Optional[str] = Field(None, description="run: stop once this stage is done")

    @model_validator(mode="after")
    def _need_recipe(self) -> "RecipeConfig":
        if self.action != "list" and not self.recipe:
            raise ValueError(f"`recipe {self.action}` needs a recipe name or file (see `specforge-wb recipe list`)")
        return self


# ------------------------------------------------------------------------------------------------
# The recipe file
# ------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptSource(_Strict):
    path: str                                   # JSONL / JSON / Parquet; preset source schemas are detected
    limit: Optional[int] = Field(None, ge=1)    # at most this many rows from it (seeded sample)
    max_turns: Optional[int] = Field(None, ge=1)  # keep the first N user turns of a conversation


class Topic(_Strict):
    """One kind of request the target is steered to write (see `regen.selfinstruct`); with neither starts nor
    a system message, its batches are plain self-instruct (a share of unsteered requests in the mix)."""

    starts: list[str] = Field(default_factory=list)   # first words of the user's turn; row i uses start i mod n
    system: Optional[str] = None                      # a system message before the user header
    weight: int = Field(1, ge=1)                      # batches of this topic per cycle


class SelfInstruct(_Strict):
    """Magpie-style prompts the target writes itself: sampled from its chat template's user header."""

    count: int = Field(0, ge=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(96, ge=8)
    min_chars: int = Field(12, ge=1)
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    topics: dict[str, Topic] = Field(default_factory=dict)   # kinds of request; batches cycle through them


class PromptsStage(_Strict):
    sources: list[PromptSource] = Field(default_factory=list)
    self_instruct: SelfInstruct = Field(default_factory=SelfInstruct)
    exclude_benchmarks: list[str] = Field(["mtbench", "humaneval"])   # never train on what is measured
    max_prompts: Optional[int] = Field(None, ge=1)
    seed: int = 0


class EvaluateStage(_Strict):
    prompts: str = "mtbench"
    first_turn_only: bool = True
    max_prompts: Optional[int] = Field(None, ge=1)
    max_new_tokens: int = 256
    configs: list[str] = Field(["1,3,1,4"])
    fields: dict[str, Any] = Field(default_factory=dict)      # any other EvaluateConfig field


class Recipe(_Strict):
    name: str
    description: str = ""
    target: str = "default"
    chat_template: str = "auto"
    params: dict[str, Any] = Field(default_factory=dict)
    prompts: PromptsStage = Field(default_factory=PromptsStage)
    answers: dict[str, Any] = Field(default_factory=dict)     # RegenConfig fields (backend local by default)
    split: dict[str, Any] = Field(default_factory=lambda: {"split_eval": 0.03})  # PrepareDataConfig fields
    dump: Optional[dict[str, Any]] = None                     # DumpConfig fields; None = train online
    train: dict[str, Any] = Field(default_factory=dict)       # TrainConfig fields
    export: dict[str, Any] = Field(default_factory=lambda: {"dtype": "float16"})
    evaluate: EvaluateStage = Field(default_factory=EvaluateStage)

    STAGES: ClassVar[tuple[str, ...]] = ("prompts", "answers", "split", "dump", "train", "export", "evaluate")
