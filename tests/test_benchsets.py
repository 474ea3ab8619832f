"""The benchmark sets shipped in the package (MT-bench, the GSM8K test split, HumanEval) load with no
network and no path, keep their licence notices, and `evaluate --prompts` takes their names too."""

from __future__ import annotations

import pytest

from specforge_core.evaluate import benchsets
from specforge_core.evaluate.benchsets import (SHIPPED, SHIPPED_DIR, BenchmarkSetError, load_benchmark,
                                               load_benchmarks, prompt_source)

pytestmark = pytest.mark.unit


@pytest.fixture
def offline(monkeypatch):
    """No hub: HF_HUB_OFFLINE set, and any `datasets.load_dataset` call fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_hub(spec, conv):
        raise AssertionError(f"{spec.raw}: went to the hub although the set is shipped")

    monkeypatch.setattr(benchsets, "_from_hub", no_hub)


def test_shipped_sets_load_offline_with_their_counts(offline):
    mt = load_benchmark("mtbench")
    assert len(mt.items) == 80 and all(len(i.turns) == 2 for i in mt.items)
    assert mt.num_requests == 160
    assert [i.id for i in mt.items[:2]] == ["mtbench-81", "mtbench-82"] and mt.items[0].category == "writing"
    assert mt.source.endswith("mt_bench_questions.jsonl.gz")

    he = load_benchmark("humaneval")
    assert len(he.items) == 164
    assert [i.id for i in he.items[:1]] + [he.items[-1].id] == ["HumanEval/0", "HumanEval/163"]
    assert "def has_close_elements" in he.items[0].turns[0]

    gsm = load_benchmark("gsm8k")
    # The test split (1,319 problems), not the 7,473-problem train split used as training data.
    assert len(gsm.items) == 1319
    assert gsm.items[0].turns[0].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert "step by step" in gsm.items[0].turns[0]


def test_specs_with_counts_and_aliases_use_the_shipped_copy(offline):
    sets = load_benchmarks(["mtbench:80", "gsm8k:200", "human-eval:10", "MT-Bench:3"])
    assert [s.label for s in sets] == ["mtbench:80", "gsm8k:200", "humaneval:10", "mtbench:3"]
    # the bench command's and the GUI's default set
    assert load_benchmark("mtbench:80").num_requests == 160


def test_a_path_still_wins_over_the_shipped_copy(offline, tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question_id": 1, "turns": ["only one"]}\n', encoding="utf-8")
    bs = load_benchmark(f"mtbench:80={f}")
    assert bs.source == str(f) and [i.turns for i in bs.items] == [["only one"]]


def test_sets_not_shipped_still_need_the_hub_or_a_path(monkeypatch):
    def boom(*a, **k):
        raise ConnectionError("offline")

    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(BenchmarkSetError, match=r"math500:5=PATH"):
        load_benchmark("math500:5")


def test_shipped_files_are_small_and_keep_their_licence_notices():
    notice = (SHIPPED_DIR / "NOTICE.md").read_text(encoding="utf-8")
    for fname in SHIPPED.values():
        path = SHIPPED_DIR / fname
        assert path.is_file() and path.stat().st_size < 400_000, fname
        assert f"`{fname}`" in notice, f"NOTICE.md does not describe {fname}"
    licences = {"LICENSE-Apache-2.0-FastChat.txt": "Apache License", "LICENSE-MIT-grade-school-math.txt":
                "Copyright (c) 2021 OpenAI", "LICENSE-MIT-human-eval.txt": "Copyright (c) OpenAI"}
    for fname, needle in licences.items():
        assert needle in (SHIPPED_DIR / fname).read_text(encoding="utf-8"), fname
        assert fname in notice, f"NOTICE.md does not point at {fname}"
    assert not any("train" in f for f in SHIPPED.values()), "a training split is not a benchmark"


def test_evaluate_prompts_take_a_shipped_name(offline, tmp_path, monkeypatch):
    from specforge_core.evaluate.inprocess import read_prompts

    monkeypatch.chdir(tmp_path)
    assert prompt_source("mtbench") == SHIPPED_DIR / SHIPPED["mtbench"]
    items = read_prompts(prompt_source("mtbench"), max_prompts=80)
    assert len(items) == 80 and items[0]["messages"][0]["role"] == "user"
    assert len(read_prompts(prompt_source("humaneval"))) == 164
    # a file of that name in the working directory is the user's, and wins
    (tmp_path / "mtbench").write_text('{"prompt": "mine"}\n', encoding="utf-8")
    assert prompt_source("mtbench") == "mtbench"
    assert prompt_source("other.jsonl") == "other.jsonl"
