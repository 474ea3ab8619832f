"""CLI rows for evaluation (picked up by `specforge_core.cli`): in-process `evaluate`; the SGLang
benchmark client and the reference server add their rows here too."""

from __future__ import annotations

from ..cli import Command

COMMANDS = [
    # `--config 1,3,1,4` is the users' spelling of the speculative config (an abbreviation of
    # --configs), so the settings file is `--config-file FILE` here.
    Command("evaluate", "evaluate.config:EvaluateConfig", "evaluate.inprocess:evaluate",
            "in-process speculative decoding (target + EAGLE3 draft): acceptance length, per-position "
            "acceptance, speedup over plain greedy on the same prompts", config_flag="--config-file"),
]

# The SGLang benchmark client and the reference server (issue 6, benchmarks side).
COMMANDS += [
    Command("bench", "evaluate.config:BenchConfig", "evaluate.bench:bench",
            "benchmark a draft on an SGLang server (--server URL, or --launch per config): pooled acceptance "
            "length, tokens/s, latency, speedup vs 1,0,0,0; results saved as they come"),
    Command("serve-reference", "evaluate.config:ServeReferenceConfig", "evaluate.refserver:serve_reference",
            "serve a target (+ EAGLE3 draft) behind SGLang's HTTP API for tests and notebooks "
            "(production serving is SGLang)"),
]
