"""Benchmark sets for acceptance-length runs: MT-bench, GSM8K, HumanEval, MATH-500 and any prompt file.

A set is named `name[:count][=path]`:

    mtbench:80                                            # shipped: FastChat's 80 questions, two turns each
    gsm8k:200                                             # shipped: the GSM8K test split, {"question", "answer"}
    humaneval                                             # shipped: OpenAI's 164 problems, {"task_id", "prompt"}
    math500:100                                           # HuggingFaceH4/MATH-500 through `datasets`
    mtbench:80=my/question.jsonl                          # the same format from your own file
    prompts=my_prompts.jsonl                              # {"prompt"} rows or our conversation rows

MT-bench, GSM8K (test split) and HumanEval ship with the package (`specforge_core/assets/benchmarks/`,
licences and sources in its NOTICE.md), so those names work offline with no flag. `=path` reads a
file instead, in its source's own format (JSONL, .gz, JSON list or Parquet, through `data.readers`).
MATH-500 is not shipped: without `=path` it comes from the hub through `datasets`, and when that fails
(offline, no `datasets`) the error says to give `=path`. `count` keeps the first `count` items, so two
runs of the same spec send the same prompts in the same order.

An item is a list of user turns (MT-bench has two; the second is sent after the server answered
the first, with that answer in the context, as FastChat and SGLang's own benchmark do), an
optional system prompt, or one pre-formatted `text` sent as is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from ..data.readers import BadRow, iter_records

# How each named set is read: hub id (+ config, split) and the row -> item converter.
HUB_SOURCES: dict[str, tuple[str, Optional[str], str]] = {
    "mtbench": ("HuggingFaceH4/mt_bench_prompts", None, "train"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "humaneval": ("openai/openai_humaneval", None, "test"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test"),
}
# Sets shipped in the package (see assets/benchmarks/NOTICE.md): the default when no `=path` is given.
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "benchmarks"
SHIPPED: dict[str, str] = {
    "mtbench": "mt_bench_questions.jsonl.gz",   # FastChat llm_judge, Apache-2.0
    "gsm8k": "gsm8k_test.jsonl.gz",             # openai/grade-school-math test split, MIT
    "humaneval": "humaneval.jsonl.gz",          # openai/human-eval, MIT
}
ALIASES = {"mt-bench": "mtbench", "mt_bench": "mtbench", "gsm-8k": "gsm8k", "human-eval": "humaneval",
           "human_eval": "humaneval", "math-500": "math500", "math_500": "math500",
           "jsonl": "prompts", "custom": "prompts", "file": "prompts"}
# The instruction SpecForge / EAGLE benchmarks append to maths questions: it makes the target write
# a worked solution, which is what the draft is measured on.
MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CODE_PREFIX = "Complete the following Python function. Reply with the whole function in one code block.\n\n"

_SPEC_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)(?::(?P<count>[^=]*))?(?:=(?P<path>.+))?$")


class BenchmarkSetError(ValueError):
    """A benchmark spec or file that cannot be used; the message names the spec, file and line."""


@dataclass
class BenchItem:
    """One benchmark prompt: user turns sent one after another, or one pre-formatted text."""

    id: str
    turns: list[str] = field(default_factory=list)
    system: Optional[str] = None
    text: Optional[str] = None      # already templated: sent as `text`, no chat template applied
    category: Optional[str] = None

    @property
    def num_requests(self) -> int:
        return 1 if self.text is not None else len(self.turns)


@dataclass
class BenchSet:
    name: str                       # the format (mtbench, gsm8k, ..., prompts)
    spec: str                       # as the user wrote it
    source: str                     # file path or hub id
    items: list[BenchItem]

    @property
    def label(self) -> str:
        return f"{self.name}:{len(self.items)}"

    @property
    def num_requests(self) -> int:
        return sum(i.num_requests for i in self.items)


@dataclass(frozen=True)
class BenchSpec:
    name: str
    count: Optional[int]
    path: Optional[str]
    raw: str


def parse_spec(spec: str) -> BenchSpec:
    """`name[:count][=path]` -> BenchSpec. An unknown name needs `=path` (it is then a prompt file)."""
    s = spec.strip()
    m = _SPEC_RE.match(s)
    if not s or not m:
        raise BenchmarkSetError(f"benchmark {spec!r}: expected name[:count][=path], e.g. "
                                "mtbench:80 or prompts=my_prompts.jsonl")
    name = m.group("name").lower()
    name = ALIASES.get(name, name)
    count = None
    if m.group("count") is not None:
        try:
            count = int(m.group("count"))
        except ValueError:
            raise BenchmarkSetError(f"benchmark {spec!r}: count {m.group('count')!r} is not an integer") from None
        if count < 1:
            raise BenchmarkSetError(f"benchmark {spec!r}: count must be at least 1")
    path = m.group("path")
    if name not in HUB_SOURCES and name != "prompts" and path is None:
        raise BenchmarkSetError(f"benchmark {spec!r}: unknown set {name!r}; known: "
                                f"{', '.join([*HUB_SOURCES, 'prompts'])} (any other name needs =path to a "
                                "JSONL of prompts)")
    if name == "prompts" and path is None:
        raise BenchmarkSetError(f"benchmark {spec!r}: a prompt set needs =path to its file")
    return BenchSpec(name=name, count=count, path=path.strip() if path else None, raw=s)


# ------------------------------------------------------------------------------------------------
# Row converters: source row -> BenchItem (raise ValueError naming the field)
# ------------------------------------------------------------------------------------------------
def _need_str(row: dict, key: str) -> str:
    if key not in row:
        raise ValueError(f"missing field {key!r} (fields: {sorted(row)[:8]})")
    v = row[key]
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"field {key!r} must be a non-empty string, got {type(v).__name__}")
    return v


def _mtbench(row: dict, idx: int) -> BenchItem:
    # FastChat's question.jsonl has "turns"; the hub copy (mt_bench_prompts) names them "prompt".
    key = "turns" if "turns" in row else "prompt" if isinstance(row.get("prompt"), list) else None
    if key is None:
        raise ValueError(f"missing field 'turns' (fields: {sorted(row)[:8]})")
    turns = row[key]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise ValueError(f"field {key!r} must be a non-empty list of strings")
    qid = row.get("question_id", row.get("prompt_id", idx))
    return BenchItem(id=f"mtbench-{qid}", turns=list(turns), category=row.get("category"))


def _gsm8k(row: dict, idx: int) -> BenchItem:
    return BenchItem(id=f"gsm8k-{idx}", turns=[_need_str(row, "question") + MATH_SUFFIX])


def _humaneval(row: dict, idx: int) -> BenchItem:
    prompt = _need_str(row, "prompt")
    return BenchItem(id=str(row.get("task_id", f"humaneval-{idx}")), turns=[CODE_PREFIX + prompt])


def _math500(row: dict, idx: int) -> BenchItem:
    return BenchItem(id=str(row.get("unique_id", f"math500-{idx}")), turns=[_need_str(row, "problem") + MATH_SUFFIX],
                     category=row.get("subject"))


def _prompts(row: dict, idx: int) -> BenchItem:
    """{"prompt": str | [str, ...]}, {"turns": [...]}, {"question"}, our conversation rows or {"text"}."""
    rid = str(row.get("id", row.get("question_id", idx)))
    if "prompt" in row:
        p = row["prompt"]
        if isinstance(p, list):
            turns = _mtbench({"turns": p}, idx).turns
            return BenchItem(id=rid, turns=turns, system=row.get("system"))
        return BenchItem(id=rid, turns=[_need_str(row, "prompt")], system=row.get("system"))
    if "turns" in row:
        item = _mtbench(row, idx)
        item.id = rid
        return item
    conv_key = next((k for k in ("conversations", "messages", "conversation") if k in row), None)
    if conv_key is not None:
        from ..data.schema import normalize_row

        norm = normalize_row(row, require_assistant=False)
        conv = norm["conversations"]
        system = conv[0]["content"] if conv and conv[0]["role"] == "system" else None
        # Only the user turns are sent: the server's own answers replace the recorded assistant turns.
        users = [t["content"] for t in conv if t["role"] == "user"]
        if not users:
            raise ValueError("conversation has no user turn")
        return BenchItem(id=str(norm["id"]), turns=users, system=system)
    if "text" in row:
        return BenchItem(id=rid, text=_need_str(row, "text"))
    if "question" in row:
        return BenchItem(id=rid, turns=[_need_str(row, "question")])
    if "problem" in row:
        return BenchItem(id=rid, turns=[_need_str(row, "problem")])
    raise ValueError(f"no prompt field: expected 'prompt', 'turns', 'conversations' or 'text' "
                     f"(fields: {sorted(row)[:8]})")


CONVERTERS: dict[str, Callable[[dict, int], BenchItem]] = {
    "mtbench": _mtbench, "gsm8k": _gsm8k, "humaneval": _humaneval, "math500": _math500, "prompts": _prompts,
}


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def _from_file(spec: BenchSpec, conv: Callable[[dict, int], BenchItem], fmt: str) -> list[BenchItem]:
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise BenchmarkSetError(f"benchmark {spec.raw!r}: {path}: no such file")
    if path.is_dir():
        raise BenchmarkSetError(f"benchmark {spec.raw!r}: {path} is a directory; give the file")
    items: list[BenchItem] = []
    try:
        records = iter_records(path)
        for line, obj in records:
            if isinstance(obj, BadRow):
                raise BenchmarkSetError(f"{path}:{line}: {obj.message}")
            if not isinstance(obj, dict):
                raise BenchmarkSetError(f"{path}:{line}: row is a {type(obj).__name__}, expected a JSON object "
                                        f"({fmt} format)")
            try:
                items.append(conv(obj, len(items)))
            except BenchmarkSetError:
                raise
            except ValueError as e:
                raise BenchmarkSetError(f"{path}:{line}: not a {fmt} row: {e}") from None
            if spec.count is not None and len(items) >= spec.count:
                break
    except BenchmarkSetError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise BenchmarkSetError(f"benchmark {spec.raw!r}: cannot read {path}: {e}") from None
    return items


def _from_hub(spec: BenchSpec, conv: Callable[[dict, int], BenchItem]) -> tuple[str, list[BenchItem]]:
    hub_id, subset, split = HUB_SOURCES[spec.name]
    hint = (f"download it and give the file: `{spec.name}{':' + str(spec.count) if spec.count else ''}=PATH`")
    try:
        import datasets
    except ImportError:
        raise BenchmarkSetError(f"benchmark {spec.raw!r}: reading {hub_id} from the hub needs the `datasets` "
                                f"package; or {hint}") from None
    try:
        ds = datasets.load_dataset(hub_id, subset, split=split)
    except Exception as e:  # noqa: BLE001 - offline, missing, gated: all need the same advice
        raise BenchmarkSetError(f"benchmark {spec.raw!r}: cannot fetch {hub_id} ({split}) from the hub "
                                f"({type(e).__name__}: {str(e)[:200]}); {hint}") from None
    items: list[BenchItem] = []
    for i, row in enumerate(ds):
        try:
            items.append(conv(dict(row), i))
        except ValueError as e:
            raise BenchmarkSetError(f"{hub_id} row {i}: not a {spec.name} row: {e}") from None
        if spec.count is not None and len(items) >= spec.count:
            break
    return hub_id, items


def shipped_path(name: str) -> Optional[Path]:
    """The packaged file of a shipped set (`mtbench`, `gsm8k`, `humaneval` or an alias), else None."""
    key = name.strip().lower()
    fname = SHIPPED.get(ALIASES.get(key, key))
    if fname is None:
        return None
    path = SHIPPED_DIR / fname
    return path if path.is_file() else None


def prompt_source(path):
    """A prompt file for `evaluate --prompts`: an existing file as is, else a shipped set's name
    (`mtbench`, `gsm8k`, `humaneval`) gives its packaged file; anything else is returned unchanged."""
    if Path(str(path)).expanduser().exists():
        return path
    return shipped_path(str(path)) or path


def load_benchmark(spec: str | BenchSpec) -> BenchSet:
    """Read one benchmark set (see the module docstring)."""
    bs = parse_spec(spec) if isinstance(spec, str) else spec
    fmt = bs.name if bs.name in CONVERTERS else "prompts"
    conv = CONVERTERS[fmt]
    if bs.path is not None:
        items, source = _from_file(bs, conv, fmt), str(bs.path)
    elif (shipped := shipped_path(bs.name)) is not None:
        items, source = _from_file(replace(bs, path=str(shipped)), conv, fmt), str(shipped)
    else:
        source, items = _from_hub(bs, conv)
    if not items:
        raise BenchmarkSetError(f"benchmark {bs.raw!r}: {source} holds no prompts")
    return BenchSet(name=bs.name, spec=bs.raw, source=source, items=items)


def load_benchmarks(specs: Iterable[str]) -> list[BenchSet]:
    sets = [load_benchmark(s) for s in specs]
    labels = [s.spec for s in sets]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise BenchmarkSetError(f"benchmark given twice: {', '.join(sorted(dup))}")
    return sets


def item_to_dict(item: BenchItem) -> dict[str, Any]:
    return {k: v for k, v in item.__dict__.items() if v not in (None, [])}
