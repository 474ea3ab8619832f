"""The `evaluate` job: plain greedy decoding and each speculative config on the same prompts, in one run.

`evaluate(cfg, events) -> dict` loads the target (capturing the layers the draft was trained on) and
the draft, reads and templates the prompts, runs the baseline (one target forward per token) and then
every `batch,steps,topk,draft_tokens` config through the decoder of the draft's family
(`spec_decode.SpecDecoder` for EAGLE3, `medusa_decode.MedusaDecoder` for Medusa, where steps is the
number of heads used and topk the tree width per head; the family comes from config.json's
`architectures` through the registry), and writes a results
JSON with, per config: the pooled acceptance length (verified tokens / verify steps, bonus token
counted; 1.0 without speculation) and, beside it, the mean of per-request ratios (a different number,
named as such), per-position acceptance rates, the histogram of accepted draft tokens per verify step,
tokens/s, the speedup over the baseline (tokens/s ratio: at temperature 0 both produce the same tokens,
so this is the wall-clock ratio) and, at temperature 0, how many outputs differ from the baseline
(must be 0: greedy speculative decoding is lossless). At temperature 0 an EAGLE3 draft's chain configs
also get `teacher_forced` (`teacher_forced.py`): the trainer's simulated acceptance length on the
baseline's own answers, and how often it predicts each in-process verify step exactly. Prompts with a
`category` (MT-bench's) also get each mode's figures per category (`by_category`).

The first generated token comes from the prefill forward in every mode and is not a verify step; it
is counted in `completion_tokens` (as SGLang does) but not in the acceptance length.

Every prompt's generations (all modes) are appended to `<output>.generations.jsonl` as one line once
the last mode has run it; `resume` reads them back, checks they were made by the same draft and
settings, and runs only the prompts that are missing. A resumed run's timings are those measured when
each prompt ran (modes interleaved prompt by prompt, so every mode shares each session's conditions).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..events import Events, JobCancelled
from ..regen.store import AppendWriter
from .benchsets import prompt_source
from .config import EvaluateConfig
from .medusa_decode import MedusaDecoder
from .spec_decode import GenerationResult, SpecConfig, SpecDecoder, acceptance_summary, greedy_generate
from .teacher_forced import DEFINITION as TEACHER_FORCED_DEFINITION
from .teacher_forced import teacher_forced

# The in-process decoder of each draft family (models.registry names the families).
DECODERS = {"eagle3": SpecDecoder, "medusa": MedusaDecoder}


def make_decoder(family_name: str, target, draft, steps: int, topk: int, draft_tokens: int | None = None,
                 temperature: float = 0.0):
    """The decoder of a draft of `family_name` for steps, topk, draft_tokens (None: the decoder's default)."""
    cls = DECODERS.get(family_name)
    if cls is None:
        raise ValueError(f"in-process decoding has no decoder for draft family {family_name!r}; "
                         f"known: {sorted(DECODERS)}")
    return cls(target, draft, steps, topk, draft_tokens, temperature)


def load_target_and_draft(target_name: str, draft_path, device, dtype: torch.dtype = torch.float32,
                          aux_layer_ids: list[int] | None = None, events: Events | None = None):
    """Load the target (capturing the layers the draft reads, if its family reads any) and the draft.
    Returns (target, draft, DraftSource, family name); the family comes from config.json's
    `architectures` through the registry."""
    from ..models.registry import family_for
    from ..models.serving import draft_layer_ids, load_draft, locate_draft
    from ..models.target import load_target

    arch = locate_draft(draft_path).config.get("architectures") or [None]
    fam = family_for(arch[0]) if isinstance(arch[0], str) else None   # None: load_draft says why
    aux = fam is None or fam.reads_aux
    layer_ids = None
    if aux:
        layer_ids = aux_layer_ids or draft_layer_ids(draft_path)
    elif aux_layer_ids and events is not None:
        # The draft reads only the final normed hidden state (Medusa): nothing is captured.
        events.warning(f"--aux-layer-ids is ignored: a {fam.name} draft reads no captured target layers")
    target = load_target(target_name, dtype=dtype, device=device, layer_ids=layer_ids, aux=aux)
    draft, src = load_draft(draft_path, target=target, device=device, dtype=dtype)
    return target, draft, src, fam.name if fam is not None else "eagle3"


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------
def read_prompts(path, max_prompts: int | None = None, events: Events | None = None) -> list[dict]:
    """Prompt items `{"id", "messages"}` or `{"id", "text"}` from a file (see EvaluateConfig.prompts).
    Unusable rows are reported with file and line and skipped; none usable is an error."""
    from ..data.readers import BadRow, iter_records
    from ..data.schema import RowError, normalize_row

    items: list[dict] = []
    skipped = 0

    def skip(line: int, msg: str) -> None:
        nonlocal skipped
        skipped += 1
        if events is not None and skipped <= 20:
            events.warning(f"{path}:{line}: skipped prompt row: {msg}")

    for line, obj in iter_records(path):
        if max_prompts is not None and len(items) >= max_prompts:
            break
        if isinstance(obj, BadRow):
            skip(line, obj.message)
            continue
        if not isinstance(obj, dict):
            skip(line, f"a {type(obj).__name__}, expected a JSON object")
            continue
        rid = str(obj.get("id", obj.get("question_id", obj.get("task_id", f"line{line}"))))
        if isinstance(obj.get("prompt"), str) or isinstance(obj.get("question"), str):
            text = obj.get("prompt") if isinstance(obj.get("prompt"), str) else obj["question"]
            if not text.strip():
                skip(line, "empty 'prompt'")
                continue
            items.append({"id": rid, "messages": [{"role": "user", "content": text}]})
            continue
        if "turns" in obj:
            turns = obj["turns"]
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
                skip(line, "'turns' must be a non-empty list of strings")
                continue
            item = {"id": rid, "messages": [{"role": "user", "content": turns[0]}]}
            if isinstance(obj.get("category"), str) and obj["category"].strip():
                item["category"] = obj["category"].strip()     # MT-bench's: results are broken down by it
            items.append(item)
            continue
        try:
            row = normalize_row(obj, require_assistant=False)
        except RowError as e:
            skip(line, e.message)
            continue
        if "text" in row:
            items.append({"id": row["id"], "text": row["text"]})
            continue
        conv = list(row["conversations"])
        while conv and conv[-1]["role"] == "assistant":
            conv.pop()
        if not conv or conv[-1]["role"] != "user":
            skip(line, "no user turn to answer")
            continue
        items.append({"id": row["id"], "messages": [{"role": t["role"], "content": t["content"]} for t in conv]})
    if skipped and events is not None:
        events.warning(f"{path}: {skipped} prompt row(s) skipped")
    if not items:
        raise ValueError(f"{path}: no usable prompts" + (f" ({skipped} rows skipped)" if skipped else ""))
    return items


def render_prompt(item: dict, tokenizer, chat_template: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt, ending with the assistant header (the generation prompt)."""
    if "text" in item:
        return tokenizer(item["text"], add_special_tokens=False)["input_ids"]
    messages = list(item["messages"])
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    name = (chat_template or "auto").strip().lower()
    if name == "none":
        text = "\n".join(m["content"] for m in messages)
        return tokenizer(text)["input_ids"]
    if name == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template of its own; pass --chat-template NAME "
                             "(chatml, llama3, ...) or `none`")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        from ..data.templates import get_template

        t = get_template(name)
        text, _ = t.render(messages)
        text += t.assistant_header
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def eos_ids(tokenizer, target) -> list[int]:
    """Stop tokens: the tokenizer's eos and the target config's eos (int or list)."""
    ids: set[int] = set()
    for v in (getattr(tokenizer, "eos_token_id", None), getattr(target.config, "eos_token_id", None),
              getattr(getattr(target.model, "generation_config", None), "eos_token_id", None)):
        if isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v if x is not None)
        elif v is not None:
            ids.add(int(v))
    return sorted(ids)


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------
def _device_dtype(cfg: EvaluateConfig) -> tuple[torch.device, torch.dtype]:
    dev = cfg.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    dt = cfg.dtype
    if dt == "auto":
        dt = "bfloat16" if dev == "cuda" else "float32"
    return torch.device(dev), getattr(torch, dt)


def _linear_kernel(cfg: EvaluateConfig, device: torch.device, dtype: torch.dtype) -> str:
    """The linear kernel this run uses (see EvaluateConfig.linear_kernel)."""
    from ..cpu_kernels import resolve_linear_kernel

    try:
        return resolve_linear_kernel(cfg.linear_kernel, device, dtype)
    except ValueError as e:
        raise ValueError(f"--linear-kernel: {e}") from None


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Resume: per-prompt generations on disk
# ------------------------------------------------------------------------------------------------
# Settings that change what a prompt's generations are; anything else (max_prompts, warmup, output)
# may differ between a stopped run and the one that continues it.
_RESUME_FIELDS = ("target", "prompts", "tokenizer", "chat_template", "system_prompt", "configs", "max_new_tokens",
                  "temperature", "aux_layer_ids", "device", "dtype", "seed")


def generations_path(output) -> Path:
    out = Path(output)
    return out.with_name(out.stem + ".generations.jsonl")


def _draft_digest(path: Path) -> str:
    """sha256 over the draft's config and weight files: the same draft, whatever its directory is called."""
    h = hashlib.sha256()
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + [path / "config.json"]
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def _prompt_digest(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _read_generations(path: Path, header: dict, items: list[dict], prompts: list[list[int]],
                      modes: list[str], events: Events) -> dict[int, dict[str, GenerationResult]]:
    """The finished prompts of a stopped run whose header matches `header` (else a ConfigError naming the
    file and the settings that differ). A torn last line (a kill mid-write) is dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        return {}
    try:
        old = json.loads(lines[0])["header"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{path}:1: not an evaluation's generations file (no header); remove it or use "
                          "another --output") from None
    differ = [k for k in header if old.get(k) != header[k]]
    if differ:
        raise ConfigError(f"{path}: made with other settings ({', '.join(differ)}: "
                          + "; ".join(f"{k} was {old.get(k)!r}, now {header[k]!r}" for k in differ)
                          + "); run without --resume to start over, or use another --output")
    done: dict[int, dict[str, GenerationResult]] = {}
    for n, line in enumerate(lines[1:], start=2):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                events.warning(f"{path}:{n}: dropped a torn last line (the run was killed while writing it)")
                break
            raise ConfigError(f"{path}:{n}: not JSON; remove the file to start over") from None
        i = rec.get("prompt")
        if not isinstance(i, int) or i >= len(prompts) or rec.get("id") != items[i]["id"] \
                or rec.get("prompt_sha") != _prompt_digest(prompts[i]) or set(rec.get("results", {})) != set(modes):
            raise ConfigError(f"{path}:{n}: prompt {i!r} ({rec.get('id')!r}) does not match this run's prompt "
                              f"list; remove the file to start over")
        done[i] = {m: GenerationResult(**r) for m, r in rec["results"].items()}
    return done


def _by_category(results: list[GenerationResult], baseline: list[GenerationResult], categories: list,
                 steps: int) -> dict[str, dict]:
    """Per prompt category (MT-bench's writing, coding, ...) over the prompts run so far: acceptance length,
    tokens/s and the speedup over the baseline on the same prompts."""
    out: dict[str, dict] = {}
    for c in dict.fromkeys(c for c in categories[:len(results)] if c):
        mine = [r for r, k in zip(results, categories) if k == c]
        base = [r for r, k in zip(baseline, categories) if k == c]
        tps = sum(len(r.tokens) for r in mine) / max(sum(r.wall_s for r in mine), 1e-9)
        btps = sum(len(r.tokens) for r in base) / max(sum(r.wall_s for r in base), 1e-9)
        out[c] = {"prompts": len(mine), "acceptance_length": acceptance_summary(mine, steps)["acceptance_length"]
                  if steps else None, "tokens_per_s": tps, "speedup": tps / btps if steps and btps else None}
    return out


def _mode_summary(name: str, results: list[GenerationResult], steps: int) -> dict:
    wall = sum(r.wall_s for r in results)
    toks = sum(len(r.tokens) for r in results)
    out: dict[str, Any] = {"config": name, "prompts": len(results), "completion_tokens": toks,
                           "wall_s": round(wall, 4), "tokens_per_s": toks / wall if wall > 0 else None,
                           "stopped_eos": sum(r.stopped == "eos" for r in results)}
    out.update(acceptance_summary(results, steps))
    prefill, target, draft = (sum(getattr(r, k) for r in results) for k in ("prefill_s", "target_s", "draft_s"))
    other = max(wall - prefill - target - draft, 0.0)
    n = out["verify_steps"]
    out["time_breakdown"] = {
        "prefill_s": round(prefill, 4), "target_s": round(target, 4), "draft_s": round(draft, 4),
        "other_s": round(other, 4),
        # per decode step (baseline) or verify step (speculative), prefill excluded
        "ms_per_step": {k: (1000 * v / n if n else None) for k, v in
                        (("target", target), ("draft", draft), ("other", other), ("total", target + draft + other))},
    }
    return out


def evaluate(cfg: EvaluateConfig, events: Events) -> dict:
    from ..targets import load_tokenizer

    t_start = time.time()
    specs = [SpecConfig.parse(c, where="--configs") for c in cfg.configs]
    if any(s.batch > 1 for s in specs):
        events.warning("in-process decoding runs batch 1: the batch field of the configs is recorded, not used")
    device, dtype = _device_dtype(cfg)
    target, draft, src, family_name = load_target_and_draft(cfg.target, cfg.draft, device, dtype,
                                                            cfg.aux_layer_ids, events)
    kernel = _linear_kernel(cfg, device, dtype)
    if kernel != "native":
        from ..cpu_kernels import pack_linears, use_rowwise_attention

        # Target and draft both: the baseline and every speculative mode run the same kernels. Row-wise
        # attention keeps a verify forward bit-identical to decode steps (a batched attention differs in
        # the last fp32 bits, which can turn into different greedy tokens; bf16 linears amplify them).
        pack_linears(target.model, kernel)
        use_rowwise_attention(target.model)
        pack_linears(draft, kernel)
    tok = load_tokenizer(cfg.tokenizer or cfg.target)
    items = read_prompts(prompt_source(cfg.prompts), cfg.max_prompts, events)
    prompts = [render_prompt(it, tok, cfg.chat_template, cfg.system_prompt) for it in items]
    stop = eos_ids(tok, target)
    categories = [it.get("category") for it in items]
    events.emit("evaluate_start", target=cfg.target, draft=str(src.path), draft_kind=src.kind,
                draft_family=family_name, prompts=len(prompts), configs=cfg.configs, device=str(device),
                dtype=str(dtype).replace("torch.", ""), linear_kernel=kernel, aux_layer_ids=list(target.layer_ids))
    torch.manual_seed(cfg.seed)

    def gen(i: int) -> torch.Generator | None:
        # One seeded generator per prompt: every mode sees the same randomness per prompt.
        return torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + i) if cfg.temperature > 0 else None

    # Built before any generation: a config the draft cannot run (e.g. more Medusa heads than it has)
    # fails here, up front.
    decoders = {s.label: make_decoder(family_name, target, draft, s.steps, s.topk, s.draft_tokens,
                                          cfg.temperature) for s in specs if s.speculative}
    # Warm-up (allocator, kernels, lazy init) so the first timed mode is not penalised.
    for i in range(min(cfg.warmup, len(prompts))):
        greedy_generate(target, prompts[i], min(8, cfg.max_new_tokens), stop, cfg.temperature, gen(i))
        for d in decoders.values():
            d.generate(prompts[i], min(8, cfg.max_new_tokens), stop, gen(i))

    modes = [("baseline", None)] + [(s.label, s) for s in specs]
    total = len(modes) * len(prompts)
    outputs: dict[str, list[GenerationResult]] = {name: [] for name, _ in modes}
    out_path = Path(cfg.output)
    gen_path = generations_path(out_path)
    header = {**{k: getattr(cfg, k) for k in _RESUME_FIELDS}, "draft_sha256": _draft_digest(src.path),
              "linear_kernel": kernel}
    header = json.loads(json.dumps(header))   # as it reads back from JSON
    finished: dict[int, dict[str, GenerationResult]] = {}
    if cfg.resume and gen_path.exists():
        finished = _read_generations(gen_path, header, items, prompts, [m for m, _ in modes], events)
        events.emit("evaluate_resumed", generations=str(gen_path), prompts_done=len(finished),
                    prompts=len(prompts))
    else:
        gen_path.parent.mkdir(parents=True, exist_ok=True)
        gen_path.write_text(json.dumps({"header": header}) + "\n", encoding="utf-8")
    done = len(modes) * sum(1 for i in range(len(prompts)) if i in finished)
    events.progress_from("generations", done)
    summaries: dict[str, dict] = {}
    warned: set[str] = set()

    def payload(finished: bool) -> dict:
        return {"kind": "evaluate", "finished": finished, "target": cfg.target, "draft": str(src.path),
                "draft_kind": src.kind, "draft_family": family_name, "device": str(device),
                "dtype": str(dtype).replace("torch.", ""), "linear_kernel": kernel,
                "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens, "prompts": len(prompts),
                "prompts_done": min(len(v) for v in outputs.values()),   # prompts every mode has run
                "acceptance_length_definition": "pooled: sum(tokens per verify step, bonus counted) / "
                                                "sum(verify steps); 1.0 = no speculation. "
                                                "acceptance_length_sglang: SGLang's sum(completion_tokens) / "
                                                "sum(spec_verify_ct), which also counts the token sampled "
                                                "at prefill",
                "teacher_forced_definition": TEACHER_FORCED_DEFINITION,
                "timing": "modes run interleaved, prompt by prompt (baseline, then each config on the same "
                          "prompt), so a slow spell of a shared machine hits every mode alike",
                "config": cfg.model_dump(mode="json"), "baseline": summaries.get("baseline"),
                "results": [summaries[k] for k in summaries if k != "baseline"]}

    def summarize(final: bool) -> None:
        for name, spec in modes:
            results = outputs[name]
            s = _mode_summary(name, results, spec.steps if spec else 0)
            if spec is not None:
                s.update(batch=spec.batch, steps=spec.steps, topk=spec.topk, draft_tokens=spec.draft_tokens,
                         draft_family=family_name)
                base = summaries["baseline"]
                s["speedup"] = (s["tokens_per_s"] / base["tokens_per_s"]) if base["tokens_per_s"] and \
                    s["tokens_per_s"] else None
                b_ms, s_ms = base["time_breakdown"]["ms_per_step"]["total"], s["time_breakdown"]["ms_per_step"]["total"]
                # What one verify step costs, in plain decode steps: the speedup is about
                # acceptance_length / this (prefill aside).
                s["verify_step_cost_in_decode_steps"] = s_ms / b_ms if b_ms and s_ms else None
                if cfg.temperature == 0:
                    s["mismatches_vs_baseline"] = sum(a.tokens != b.tokens for a, b in zip(results, outputs["baseline"]))
                    if final and s["mismatches_vs_baseline"] and name not in warned:
                        warned.add(name)
                        events.warning(f"{name}: {s['mismatches_vs_baseline']} of {len(results)} greedy outputs "
                                       "differ from plain greedy decoding (float noise in low precision, or a bug)")
            if any(categories):
                s["by_category"] = _by_category(results, outputs["baseline"], categories,
                                                spec.steps if spec else 0)
            summaries[name] = s

    writer = AppendWriter(gen_path, fsync_every=1)
    try:
        for i, ids in enumerate(prompts):
            if i in finished:
                for name, _ in modes:
                    outputs[name].append(finished[i][name])
                continue
            ran: dict[str, GenerationResult] = {}
            for name, spec in modes:
                if events.cancelled:
                    if any(outputs.values()):
                        summarize(final=False)
                    _write_json(out_path, payload(False))
                    raise JobCancelled(f"stopped during {name} at prompt {i}; partial results in {out_path}; "
                                       "run again with --resume to continue")
                if spec is None or not spec.speculative:
                    r = greedy_generate(target, ids, cfg.max_new_tokens, stop, cfg.temperature, gen(i))
                else:
                    r = decoders[spec.label].generate(ids, cfg.max_new_tokens, stop, gen(i))
                ran[name] = r
                done += 1
                events.progress(done, total, what="generations", mode=name)
            for name, _ in modes:
                outputs[name].append(ran[name])
            writer.write({"prompt": i, "id": items[i]["id"], "prompt_sha": _prompt_digest(ids),
                          "results": {name: asdict(r) for name, r in ran.items()}})
            summarize(final=False)
            _write_json(out_path, payload(False))
    finally:
        writer.close()
    summarize(final=True)
    if cfg.teacher_forced and family_name == "eagle3" and cfg.temperature == 0:
        tf = teacher_forced(target, draft, prompts, outputs["baseline"], specs, outputs,
                            progress=lambda d, n: events.progress(d, n, what="teacher-forced"),
                            cancelled=lambda: events.cancelled, categories=categories)
        if events.cancelled:
            _write_json(out_path, payload(False))
            raise JobCancelled(f"stopped during the teacher-forced pass; generations are all in {gen_path}: "
                               "run again with --resume to redo only that pass")
        for label, row in tf.items():
            summaries[label]["teacher_forced"] = row
        events.emit("evaluate_teacher_forced", **{k: {kk: (round(vv, 4) if isinstance(vv, float) else vv)
                                                      for kk, vv in v.items()} for k, v in tf.items()})
    for name, _ in modes:
        s = summaries[name]
        events.emit("evaluate_mode", **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()
                                         if k in ("config", "acceptance_length", "tokens_per_s", "speedup",
                                                  "verify_step_cost_in_decode_steps", "mismatches_vs_baseline")})
    result = payload(True)
    result["output"] = str(out_path)
    result["seconds"] = round(time.time() - t_start, 2)
    _write_json(out_path, result)
    events.emit("evaluate_done", output=str(out_path), seconds=result["seconds"])
    return result
