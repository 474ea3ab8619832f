"""Recipes (issue 13): a YAML recipe runs every stage as the engine's own jobs, records what finished,
continues where it stopped, and refuses a finished stage whose settings changed."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from specforge_core.config import ConfigError
from specforge_core.events import null_events
from specforge_core.recipes.config import RecipeConfig
from specforge_core.recipes.run import STATE_FILE, list_recipes, load_recipe, recipe
from test_train import tiny_target  # noqa: F401 - the fixture


@pytest.mark.unit
def test_shipped_recipes_load():
    names = [r["name"] for r in list_recipes()]
    assert "smollm2-cpu" in names
    r = load_recipe("smollm2-cpu", ["data_dir=/x"])
    assert r.prompts.sources[0].path == "/x/gsm8k_train.jsonl"
    assert "mtbench" in r.prompts.exclude_benchmarks and r.evaluate.prompts == "mtbench"
    with pytest.raises(ConfigError, match="no param 'nope'"):
        load_recipe("smollm2-cpu", ["nope=1"])


def tiny_recipe(tmp_path, target) -> str:
    rows = [{"id": f"q{i}", "conversations": [{"role": "user", "content": f"question number {i} about cats"},
                                               {"role": "assistant", "content": "old answer"}]} for i in range(12)]
    rows.append(dict(rows[0], id="dup"))                                    # a duplicate prompt
    mt = json.loads(__import__("gzip").open(__import__("specforge_core").__path__[0]
                                            + "/assets/benchmarks/mt_bench_questions.jsonl.gz").readline())
    rows.append({"id": "leak", "conversations": [{"role": "user", "content": mt["turns"][0]}]})  # a benchmark prompt
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = tmp_path / "eval_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "turns": [f"tell me about dogs {i}"]}) + "\n"
                               for i in range(2)))
    spec = {
        "name": "tiny", "target": str(target), "chat_template": "chatml",
        "prompts": {"sources": [{"path": str(src)}], "exclude_benchmarks": ["mtbench"],
                    "self_instruct": {"count": 8, "batch_size": 4, "max_tokens": 16, "min_chars": 1}},
        "answers": {"max_tokens": 12, "local_batch_size": 8},
        "split": {"split_eval": 0.25},
        "train": {"max_length": 96, "draft_vocab_size": 256, "ttt_length": 3, "lr": 3e-3, "batch_size": 2,
                  "max_steps": 3, "eval_every": 1, "num_proc": 1, "device": "cpu"},
        "export": {"dtype": "float32"},
        "evaluate": {"prompts": str(prompts), "max_new_tokens": 8, "configs": ["1,2,1,3"],
                     "fields": {"device": "cpu"}},
    }
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(spec))
    return str(f)


@pytest.mark.unit
def test_tiny_recipe_runs_every_stage_then_resumes_and_guards(tmp_path, tiny_target):  # noqa: F811
    f = tiny_recipe(tmp_path, tiny_target)
    out = tmp_path / "r1"
    part = recipe(RecipeConfig(action="run", recipe=f, output=str(out), stop_after="split"), null_events())
    assert part["stages"]["split"] == "done" and part["stages"]["train"] is None
    state = json.loads((out / STATE_FILE).read_text())
    assert state["stages"]["prompts"]["result"]["duplicates"] == 1
    assert state["stages"]["prompts"]["result"]["benchmark_excluded"] == 1
    si = state["stages"]["prompts"]["result"]["sources"]["self_instruct"]
    assert si["batches"] == 2 and (out / "self_instruct.jsonl").exists()
    assert state["stages"]["prompts"]["result"]["prompts"] == 12 + si["rows"]

    res = recipe(RecipeConfig(action="run", recipe=f, output=str(out)), null_events())  # continues
    assert all(v == "done" for v in res["stages"].values())
    assert (out / "draft" / "config.json").exists() and (out / "run" / "best").is_dir()
    results = json.loads((out / "eval" / "results.json").read_text())
    assert [r["config"] for r in results["results"]] == ["1,2,1,3"]
    (cal,) = res["calibration"]
    assert cal["config"] == "1,2,1,3" and cal["simulated_heldout"] is not None and cal["in_process"] is not None
    # evaluate's teacher-forced pass: the trainer's metric on the benchmark's own answers, and the decoder's
    # verify steps replayed against it (the tiny draft runs in fp32: a near-tie may flip, rarely)
    assert cal["simulated_on_benchmark"] is not None and cal["agreement"] >= 0.9, cal
    assert (out / "eval" / "acceptance.html").exists()

    # A finished stage with other settings is refused by name; --restart-from redoes it and what follows.
    spec = yaml.safe_load(open(f))
    spec["train"]["lr"] = 1e-3
    open(f, "w").write(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"\['train'\].*--restart-from train"):
        recipe(RecipeConfig(action="run", recipe=f, output=str(out)), null_events())


@pytest.mark.unit
@pytest.mark.parametrize("topics", [None, {"poems": {"starts": ["Write a poem about", "Compose a sonnet"]},
                                           "code": {"system": "The user asks for code.", "starts": ["Fix this"],
                                                    "weight": 2}}])
def test_self_instruct_continues_after_the_last_whole_call(tmp_path, tiny_target, topics):  # noqa: F811
    from specforge_core.regen.local import LocalGenerator
    from specforge_core.regen.selfinstruct import self_instruct, user_header_ids

    gen = LocalGenerator(str(tiny_target), device="cpu", batch_size=4)
    head = gen.tokenizer.decode(user_header_ids(gen.tokenizer))
    assert head.rstrip().endswith("user")                      # ChatML: ...<|im_start|>user\n
    # Two batches per decoder call: 3 batches are calls [0, 1] and [2].
    kw = dict(max_tokens=8, min_chars=1, batch_size=4, seed=5, topics=topics, batches_per_call=2)
    if topics:
        # A random target never samples its end token: end every reply after its 2 sampled tokens, so
        # requests (the start and what the target wrote after it) are kept.
        real = gen.generate_ids

        def ended(*a, **k):
            return [dataclasses.replace(r, finish_reason="stop") for r in real(*a, **dict(k, max_tokens=2))]
        gen.generate_ids = ended
    calls = []
    inner = gen.generate_ids

    def counted(prompts, *a, **k):
        calls.append(len(prompts))
        return inner(prompts, *a, **k)
    gen.generate_ids = counted
    once = tmp_path / "once.jsonl"
    res = self_instruct(gen, once, 12, null_events(), **kw)
    assert calls == [8, 4]                                      # the decoder sees whole calls, not batches
    twice = tmp_path / "twice.jsonl"
    self_instruct(gen, twice, 8, null_events(), **kw)        # stopped after the first call
    with open(twice, "a") as f:
        f.write('{"id": "torn", "bat')                         # a write cut by a kill
    self_instruct(gen, twice, 12, null_events(), **kw)
    assert twice.read_text() == once.read_text()
    rows = [json.loads(x) for x in once.read_text().splitlines()]
    if topics is None:
        assert all("topic" not in r for r in rows) and "new_prompts_per_topic" not in res
        return
    # Batches cycle through the topics by weight; each request begins with its row's start.
    assert {(r["batch"], r["topic"]) for r in rows} == {(0, "poems"), (1, "code"), (2, "code")}
    assert sum(res["new_prompts_per_topic"].values()) == res["new_prompts"] > 6
    for r in rows:
        if not r["conversations"]:
            continue
        i = int(r["id"].rsplit("-", 1)[1])
        starts = topics[r["topic"]]["starts"]
        assert r["conversations"][0]["content"].startswith(starts[i % len(starts)])
    h = gen.tokenizer.decode(user_header_ids(gen.tokenizer, "The user asks for code."))
    assert h.index("The user asks for code.") < h.rindex("user") and h.rstrip().endswith("user")


@pytest.mark.unit
def test_jobs_runner_resumes_a_recipe_by_running_it_again(tmp_path):
    import time

    from specforge_core.jobs.runner import JobRunner
    from specforge_core.jobs.store import LIVE

    r = JobRunner(tmp_path / "ws")
    cfg = RecipeConfig(action="run", recipe="smollm2-cpu", output=str(tmp_path / "out"), restart_from="train",
                       set=["data_dir=/nowhere"])
    job = r.submit("recipe", cfg)
    deadline = time.time() + 120
    while r.get(job.id).status in LIVE and time.time() < deadline:   # it fails fast: no data at /nowhere
        time.sleep(0.2)
    new = r.resume(job.id)
    assert new.kind == "recipe" and new.config["output"] == str(tmp_path / "out")
    assert "restart_from" not in new.config or new.config["restart_from"] is None
    assert new.config["set"] == ["data_dir=/nowhere"]
