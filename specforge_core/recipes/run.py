"""The `recipe` job: list, show, or run a recipe, stage by stage, each stage one engine job.

    prompts   sources (files in our schema or a preset's source schema) + prompts the target writes
              itself, deduplicated, benchmark prompts removed              -> prompts.jsonl
    answers   the target answers them in process (`regenerate --backend local`)  -> answers.jsonl
    split     held-out eval split (`prepare-data --split-eval`)      -> data/answers_{train,eval}.jsonl
    dump      the target's hidden states once, for offline epochs (optional)   -> hs/
    train     EAGLE3 draft; best checkpoint by held-out simulated acceptance length -> run/best/
    export    serving checkpoint + check-draft                                     -> draft/
    evaluate  in-process speculative decoding on the benchmark, calibration table  -> eval/

`recipe_state.json` records each finished stage with a fingerprint of its settings. A run that is
stopped (Ctrl-C, SIGKILL, a GUI cancel) continues where it stopped: finished stages are skipped and
the stage in progress resumes through its own job's resume. A finished stage whose settings changed
is refused by name (`--restart-from STAGE` redoes it and what follows).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError, build_config, write_run_json
from ..events import Events, JobCancelled
from ..locks import output_lock
from .config import Recipe, RecipeConfig

RECIPES_DIR = Path(__file__).resolve().parent
STATE_FILE = "recipe_state.json"


# ------------------------------------------------------------------------------------------------
# Finding and reading recipes
# ------------------------------------------------------------------------------------------------
def list_recipes() -> list[dict]:
    out = []
    for f in sorted(RECIPES_DIR.glob("*.yaml")):
        r = load_recipe(str(f))
        out.append({"name": f.stem, "description": r.description, "target": r.target, "path": str(f)})
    return out


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such recipe file")
        return p
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if not shipped.exists():
        raise FileNotFoundError(f"no recipe named {name_or_path!r}; shipped recipes: "
                                f"{[f.stem for f in sorted(RECIPES_DIR.glob('*.yaml'))]}")
    return shipped


def _substitute(obj: Any, params: dict, where: str) -> Any:
    if isinstance(obj, str):
        def one(m: re.Match) -> str:
            if m.group(1) not in params:
                raise ConfigError(f"{where}: ${{{m.group(1)}}} is not a param of this recipe ({sorted(params)})")
            return str(params[m.group(1)])
        return re.sub(r"\$\{(\w+)\}", one, obj)
    if isinstance(obj, list):
        return [_substitute(x, params, where) for x in obj]
    if isinstance(obj, dict):
        return {k: _substitute(v, params, where) for k, v in obj.items()}
    return obj


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    import yaml

    p = recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a recipe is a mapping of fields")
    params = dict(raw.get("params") or {})
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected name=value")
        k, v = item.split("=", 1)
        if k not in params:
            raise ConfigError(f"--set {k}: {p} has no param {k!r} (its params: {sorted(params)})")
        params[k] = v
    raw["params"] = params
    raw = {k: (_substitute(v, params, str(p)) if k != "params" else v) for k, v in raw.items()}
    return build_config(Recipe, raw, source=str(p))


# ------------------------------------------------------------------------------------------------
# State
# ------------------------------------------------------------------------------------------------
def _fingerprint(recipe: Recipe, stage: str) -> str:
    # A stage's output depends on its own section and on the target and template, which every stage uses.
    section = getattr(recipe, stage)
    payload = {"target": recipe.target, "chat_template": recipe.chat_template,
               "stage": section.model_dump(mode="json") if hasattr(section, "model_dump") else section}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class State:
    def __init__(self, out: Path):
        self.path = out / STATE_FILE
        self.data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {"stages": {}}

    def stage(self, name: str) -> dict:
        return self.data["stages"].get(name, {})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, self.path)

    def mark(self, name: str, **fields) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.save()


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------
def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _benchmark_texts(names: list[str]) -> set[str]:
    from ..evaluate.benchsets import load_benchmarks

    texts: set[str] = set()
    for bset in load_benchmarks(names) if names else []:
        for item in bset.items:
            texts.update(_norm(t) for t in item.turns)
            if item.text:
                texts.add(_norm(item.text))
    return texts


def stage_prompts(recipe: Recipe, out: Path, events: Events, resumed: bool) -> dict:
    from ..data.readers import SkipReport, dumps_line, iter_rows

    spec = recipe.prompts
    rng = random.Random(spec.seed)
    rows: list[dict] = []
    per_source = {}
    for src in spec.sources:
        report = SkipReport()
        got = [r for r in iter_rows([src.path], 16 << 20, report, require_assistant=False) if "conversations" in r]
        if src.limit is not None and len(got) > src.limit:
            got = rng.sample(got, src.limit)
        for r in got:
            turns = [t for t in r["conversations"] if t["role"] in ("system", "user", "assistant")]
            if src.max_turns is not None:
                users = [i for i, t in enumerate(turns) if t["role"] == "user"]
                if len(users) > src.max_turns:
                    turns = turns[:users[src.max_turns]]
            r = {"id": f"{Path(src.path).stem}-{r['id']}", "conversations": turns}
            rows.append(r)
        per_source[src.path] = {"rows": len(got), "skipped": sum(report.counts.values())}
    si = spec.self_instruct
    if si.count:
        from ..regen.local import LocalGenerator
        from ..regen.selfinstruct import self_instruct

        gen = LocalGenerator(recipe.target, batch_size=si.batch_size, seed=si.seed)
        res = self_instruct(gen, out / "self_instruct.jsonl", si.count, events, temperature=si.temperature,
                            top_p=si.top_p, max_tokens=si.max_tokens, min_chars=si.min_chars,
                            batch_size=si.batch_size, seed=si.seed,
                            topics={k: t.model_dump() for k, t in si.topics.items()})
        mine = [json.loads(x) for x in (out / "self_instruct.jsonl").read_text(encoding="utf-8").splitlines()]
        rows += [{"id": r["id"], "conversations": r["conversations"]} for r in mine if r["conversations"]]
        per_source["self_instruct"] = {"rows": sum(1 for r in mine if r["conversations"]), **res}
    # Dedupe by the first user turn; drop anything a benchmark asks (the draft must not see the test).
    bench = _benchmark_texts(spec.exclude_benchmarks)
    seen: set[str] = set()
    kept, dup, excluded = [], 0, 0
    for r in rows:
        users = [t["content"] for t in r["conversations"] if t["role"] == "user"]
        if not users:
            continue
        key = _norm(users[0])
        if key in seen:
            dup += 1
            continue
        seen.add(key)
        # The same question, or one quoting / quoted by a benchmark question (short strings match too much).
        if any(_norm(u) in bench for u in users) or \
                (len(key) >= 20 and any(len(b) >= 20 and (b in key or key in b) for b in bench)):
            excluded += 1
            continue
        kept.append(r)
    rng.shuffle(kept)
    if spec.max_prompts is not None:
        kept = kept[:spec.max_prompts]
    tmp = out / "prompts.jsonl.tmp"
    with open(tmp, "wb") as f:
        for r in kept:
            f.write(dumps_line(r))
    os.replace(tmp, out / "prompts.jsonl")
    summary = {"prompts": len(kept), "duplicates": dup, "benchmark_excluded": excluded, "sources": per_source,
               "user_turns": sum(sum(t["role"] == "user" for t in r["conversations"]) for r in kept)}
    events.emit("recipe_prompts", **{k: v for k, v in summary.items() if k != "sources"})
    return summary


def stage_answers(recipe: Recipe, out: Path, events: Events, resumed: bool) -> dict:
    from ..regen.config import RegenConfig
    from ..regen.job import regenerate

    fields = {"backend": "local", "local_model": recipe.target, "temperature": 0.0, **recipe.answers,
              "input": [str(out / "prompts.jsonl")], "output": str(out / "answers.jsonl")}
    fields["resume"] = (out / "answers.jsonl").exists()
    res = regenerate(build_config(RegenConfig, fields, source="recipe answers"), events)
    return res if isinstance(res, dict) else res.to_dict()


def stage_split(recipe: Recipe, out: Path, events: Events, resumed: bool) -> dict:
    from ..data.config import PrepareDataConfig
    from ..data.prepare import prepare_data

    fields = {**recipe.split, "input": [str(out / "answers.jsonl")], "output": str(out / "data"), "name": "answers"}
    return prepare_data(build_config(PrepareDataConfig, fields, source="recipe split"), events)


_DATA_FIELDS = ("max_length", "draft_vocab_size", "train_only_last_turn", "num_proc", "tokenizer")


def _data(recipe: Recipe, out: Path) -> dict:
    d = out / "data"
    return {"target_model": recipe.target, "chat_template": recipe.chat_template,
            "train_data": [str(d / "answers_train.jsonl")], "eval_data": [str(d / "answers_eval.jsonl")],
            "cache_dir": str(out / "cache"), **{k: recipe.train[k] for k in _DATA_FIELDS if k in recipe.train}}


def stage_dump(recipe: Recipe, out: Path, events: Events, resumed: bool) -> dict:
    from ..offline.config import DumpConfig
    from ..offline.dump import dump_hidden_states

    fields = {**_data(recipe, out), **(recipe.dump or {}), "output": str(out / "hs"), "splits": ["train", "eval"]}
    return dump_hidden_states(build_config(DumpConfig, fields, source="recipe dump"), events)


def stage_train(recipe: Recipe, out: Path, events: Events, resumed: bool) -> dict:
    from ..models.checkpoints import latest_checkpoint
    from ..training.config import TrainConfig
    from ..training.trainer import train

    fields = {**_data(recipe, out), **recipe.train, "output_dir": str(out / "run")}
    if recipe.dump is not None:
        fields["train_hidden_states"] = str(out / "hs")
    fields["resume"] = latest_checkpoint(out / "run") is not None
    return train(build_config(TrainConfig, fields, source="recipe train"), events)


def stage_export(recipe: Recipe, out: Path, events: Events, resumed: bool) -> dict:
    from ..models.checkpoints import best_checkpoint
    from ..training.config import CheckDraftConfig, ExportConfig
    from ..training.export import check_draft, export_draft

    ck = best_checkpoint(out / "run") or (out / "run")
    fields = {**recipe.export, "checkpoint": str(ck), "output": str(out / "draft"), "target": recipe.target,
              "overwrite": True}
    res = export_draft(build_config(ExportConfig, fields, source="recipe export"), events)
    chk = check_draft(CheckDraftConfig(path=str(out / "draft"), target=recipe.target), events)
    if not chk["ok"]:
        raise ValueError(f"{out / 'draft'}: check-draft found problems: {chk['problems']}")
    return {**res, "checked": True}


def stage_evaluate(recipe: Recipe, out: Path, events: Events, resumed: bool) -> dict:
    from ..evaluate.config import EvaluateConfig
    from ..evaluate.inprocess import evaluate

    ev = recipe.evaluate
    fields = {**ev.fields, "target": recipe.target, "draft": str(out / "draft"), "prompts": ev.prompts,
              "configs": ev.configs, "max_new_tokens": ev.max_new_tokens, "output": str(out / "eval" / "results.json"),
              "chat_template": recipe.chat_template, "resume": resumed}
    if ev.max_prompts is not None:
        fields["max_prompts"] = ev.max_prompts
    res = evaluate(build_config(EvaluateConfig, fields, source="recipe evaluate"), events)
    results = json.loads((out / "eval" / "results.json").read_text(encoding="utf-8"))
    table = calibration(out, results)
    (out / "eval" / "calibration.json").write_text(json.dumps(table, indent=2), encoding="utf-8")
    write_plot(out / "eval" / "acceptance.html", results, table)
    return {"results": str(out / "eval" / "results.json"), "calibration": table,
            **{k: v for k, v in (res or {}).items() if k in ("speedups", "acceptance_lengths")}}


STAGE_FUNCS: dict[str, Callable[[Recipe, Path, Events, bool], dict]] = {
    "prompts": stage_prompts, "answers": stage_answers, "split": stage_split, "dump": stage_dump,
    "train": stage_train, "export": stage_export, "evaluate": stage_evaluate,
}


# ------------------------------------------------------------------------------------------------
# Training accuracy vs serving: the calibration table
# ------------------------------------------------------------------------------------------------
def calibration(out: Path, results: dict) -> list[dict]:
    """Per chain config: the held-out simulated acceptance length (from the best checkpoint's eval, as a
    chain of `steps` drafts) beside the in-process figure, and their ratio. The simulation is the chain
    one (chain_k: drafts 0..k all right at an anchor, out-of-vocab targets missed) where the eval has it;
    older runs logged only acc_k, for which it is the independent product (`simulation` says which).
    Beside them, where `evaluate` ran its teacher-forced pass: the same simulation on the benchmark's own
    greedy answers (`simulated_on_benchmark`) and its agreement with the verify steps. Held-out vs
    on-benchmark is how far the training data is from the benchmark; on-benchmark vs in-process is how far
    the trainer's metric is from serving."""
    from ..models.checkpoints import best_checkpoint
    from ..training.metrics import chain_acceptance_length, simulated_acceptance_length

    best = best_checkpoint(out / "run")
    ev = {}
    if best is not None:
        ev = json.loads((best / "trainer_state.json").read_text(encoding="utf-8")).get("eval") or {}
    acc = [ev[f"acc_{k}"] for k in range(64) if f"acc_{k}" in ev]
    chain = [ev[f"chain_{k}"] for k in range(64) if f"chain_{k}" in ev]
    rows = []
    for r in results.get("results", []):
        b, steps, topk, n = (int(x) for x in str(r.get("config", "0,0,0,0")).split(","))
        if topk != 1 or steps == 0:
            continue
        if len(chain) >= steps:
            sim, how = chain_acceptance_length(chain[:steps]), "chain"
        elif len(acc) >= steps:
            sim, how = simulated_acceptance_length(acc[:steps]), "independent"
        else:
            sim, how = None, None
        real = r.get("acceptance_length")
        tf = r.get("teacher_forced") or {}
        on_bench = tf.get("acceptance_length")
        rows.append({"config": r.get("config"), "simulated_heldout": sim, "in_process": real,
                     "ratio": (real / sim) if sim and real else None, "simulation": how,
                     "simulated_on_benchmark": on_bench,
                     "ratio_on_benchmark": (real / on_bench) if on_bench and real else None,
                     "agreement": tf.get("agreement"),
                     "note": None if sim is not None else f"trained with ttt_length {len(acc)} < {steps} steps"})
    return rows


def write_plot(path: Path, results: dict, table: list[dict]) -> None:
    from plotly.subplots import make_subplots

    rs = results.get("results", [])
    labels = [r.get("config") for r in rs]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("acceptance length", "speedup over greedy",
                                                        "simulated (held-out) vs in-process"))
    fig.add_bar(x=labels, y=[r.get("acceptance_length") for r in rs], row=1, col=1, name="acceptance length")
    fig.add_bar(x=labels, y=[r.get("speedup") for r in rs], row=1, col=2, name="speedup")
    fig.add_bar(x=[t["config"] for t in table], y=[t["simulated_heldout"] for t in table], row=1, col=3,
                name="simulated")
    fig.add_bar(x=[t["config"] for t in table], y=[t["in_process"] for t in table], row=1, col=3, name="in-process")
    fig.update_layout(title="recipe evaluation", height=420, width=1200)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True)  # offline: the page carries plotly itself


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------
def recipe(cfg: RecipeConfig, events: Events) -> dict:
    if cfg.action == "list":
        return {"recipes": list_recipes()}
    if cfg.action == "show":
        p = recipe_path(cfg.recipe)
        return {"path": str(p), "recipe": load_recipe(cfg.recipe, cfg.set).model_dump(mode="json")}
    return run_recipe(cfg, events)


def recipe_stages(rec: Recipe) -> list[str]:
    """The stages `rec` runs, in order (`dump` only when it trains offline)."""
    return [s for s in Recipe.STAGES if not (s == "dump" and rec.dump is None)]


def run_recipe(cfg: RecipeConfig, events: Events) -> dict:
    rec = load_recipe(cfg.recipe, cfg.set)
    stages = recipe_stages(rec)
    for name, what in (("restart_from", cfg.restart_from), ("stop_after", cfg.stop_after)):
        if what is not None and what not in stages:
            raise ConfigError(f"--{name.replace('_', '-')} {what!r}: the stages of this recipe are {stages}")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out, "recipe", lock_file=out / "recipe.lock", error=ConfigError):
        state = State(out)
        if cfg.restart_from:
            for s in stages[stages.index(cfg.restart_from):]:
                state.data["stages"].pop(s, None)
            state.save()
        changed = [s for s in stages if state.stage(s).get("status") == "done"
                   and state.stage(s).get("fingerprint") != _fingerprint(rec, s)]
        if changed:
            raise ConfigError(f"{out}: stage(s) {changed} finished with other settings than this recipe's; pass "
                              f"--restart-from {changed[0]} to redo from there, or use another --output")
        write_run_json(out, "recipe", cfg, recipe=rec.model_dump(mode="json"))
        t0 = time.time()
        results = {}
        for i, s in enumerate(stages):
            st = state.stage(s)
            if st.get("status") == "done":
                events.emit("recipe_stage", stage=s, index=i + 1, stages=len(stages), status="done earlier")
                results[s] = st.get("result")
                continue
            events.emit("recipe_stage", stage=s, index=i + 1, stages=len(stages), status="started")
            started = time.time()
            state.mark(s, status="running", started=st.get("started", started))
            before = float(st.get("seconds", 0) or 0)
            try:
                res = STAGE_FUNCS[s](rec, out, events, st.get("status") == "running")
            except BaseException:
                # A stopped stage keeps the time it ran, so the total says what the recipe cost (a SIGKILL
                # cannot be caught: that run's share of the stage is lost from the count).
                state.mark(s, seconds=round(before + time.time() - started, 1))
                raise
            secs = round(time.time() - started + before, 1)
            state.mark(s, status="done", finished=time.time(), seconds=secs, fingerprint=_fingerprint(rec, s),
                       result=json.loads(json.dumps(res, default=str)))
            results[s] = res
            events.emit("recipe_stage", stage=s, index=i + 1, stages=len(stages), status="done", seconds=secs)
            if events.cancelled:
                raise JobCancelled(f"recipe stopped after stage {s}; run it again to continue")
            if cfg.stop_after == s:
                break
        return {"output": str(out), "stages": {s: state.stage(s).get("status") for s in stages},
                "seconds_total": round(sum(float(state.stage(s).get("seconds") or 0) for s in stages), 1),
                "seconds_this_run": round(time.time() - t0, 1),
                "calibration": (results.get("evaluate") or {}).get("calibration")}
