"""Small, regular chat data for smoke runs, tests, benchmarks and notebooks.

Capital-city questions with a fixed answer pattern, every other row followed by an addition: a
draft learns it within a few dozen steps, so a short run can show its loss falling and `acc_0`
rising. Rows differ in length, so batches carry padding. Written for this project (no source data).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CITIES = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
          ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Norway", "Oslo"), ("Cuba", "Havana")]


def toy_conversations(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        country, city = rnd.choice(CITIES)
        a, b = rnd.randint(2, 40), rnd.randint(2, 40)
        turns = [{"role": "user", "content": f"What is the capital of {country}?"},
                 {"role": "assistant", "content": f"The capital of {country} is {city}. It is a large city "
                                                  f"and the seat of the government of {country}."}]
        if i % 2:
            turns += [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        rows.append({"id": f"row{i}", "conversations": turns})
    return rows


def write_conversations(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write `toy_conversations(n, seed)` as JSONL and return the path."""
    p = Path(path)
    with open(p, "w", encoding="utf-8") as f:
        for row in toy_conversations(n, seed):
            f.write(json.dumps(row) + "\n")
    return p
