"""The draft shipped for the embedded default target (issue 13): it is in the package, it loads by name
(`--draft default`), it passes check-draft against SmolLM2-135M-Instruct, and speculative decoding with it
is lossless and accepts drafts. It is never retrained here: it is the output of `recipe run smollm2-cpu`."""

from __future__ import annotations

import json

import pytest


def _shipped():
    from specforge_core.targets import shipped_draft_dir

    return shipped_draft_dir("default")


@pytest.mark.unit
def test_shipped_draft_is_complete_small_fp16_and_found_by_name():
    from safetensors import safe_open

    from specforge_core.models.serving import locate_draft

    d = _shipped()
    sizes = {p.name: p.stat().st_size for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "run.json", "metrics.jsonl", "results.json", "calibration.json",
            "README.md"} <= set(sizes), sizes
    assert sum(sizes.values()) <= 25 * 2**20, sizes
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k not in ("d2t", "t2d")}
    assert dtypes == {"F16"}, dtypes
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["hidden_size"] == 576
    for name in ("default", "smollm2"):
        src = locate_draft(name)
        assert src.kind == "serving" and src.path == d
    # The provenance travels with it: the recipe's training run and its measured results.
    run = json.loads((d / "run.json").read_text())
    assert run["config"]["target_model"] == "default" and run["config"]["draft_vocab_size"] == cfg["draft_vocab_size"]
    res = json.loads((d / "results.json").read_text())
    assert {r["config"] for r in res["results"]} >= {"1,3,1,4"}
    assert all(r["mismatches_vs_baseline"] == 0 for r in res["results"])


@pytest.mark.integration
def test_shipped_draft_passes_check_draft_against_the_default_target():
    from specforge_core.cli import main

    assert main(["check-draft", "default", "--target", "default"]) == 0


@pytest.mark.integration
@pytest.mark.slow
def test_shipped_draft_is_lossless_and_accepts_drafts_on_held_out_prompts(tmp_path):
    from specforge_core.evaluate.config import EvaluateConfig
    from specforge_core.evaluate.inprocess import evaluate
    from specforge_core.events import null_events

    # MT-bench first turns: never in the recipe's training prompts (it removes benchmark prompts).
    ev = evaluate(EvaluateConfig(target="default", draft="default", prompts="mtbench", configs=["1,3,1,4", "1,3,4,8"],
                                 max_new_tokens=48, max_prompts=3, warmup=0, device="cpu", chat_template="chatml",
                                 output=str(tmp_path / "ev.json")), null_events())
    for r in ev["results"]:
        assert r["mismatches_vs_baseline"] == 0, r   # greedy speculative decoding reproduces plain greedy
        assert r["acceptance_length"] > 1.15, r      # a trained draft: above the 1.0 of a useless one
    # Training's view of the same answers: the TTT predicts the decoder's verify steps (float noise could
    # flip a rare near-tie; none did on 1,064 steps of 12 prompts), and its simulated acceptance length
    # is the in-process one up to where on the text the verify steps happened to anchor.
    chain = next(r for r in ev["results"] if r["config"] == "1,3,1,4")
    tf = chain["teacher_forced"]
    assert tf["replayed_steps"] > 60 and tf["agreement"] >= 0.97, tf
    assert abs(tf["acceptance_length"] / chain["acceptance_length"] - 1) < 0.1, (tf, chain["acceptance_length"])
    assert "teacher_forced" not in next(r for r in ev["results"] if r["config"] == "1,3,4,8")   # a tree: no chain
