"""Where training checkpoints live and which ones are complete: the part of the checkpoint layout that
readers (export, evaluation, the GUI) need, without the trainer.

Layout: `RUN/checkpoints/step_{step:08d}/` holding `model.safetensors`, `config.json` (the draft
config), optimizer / scheduler / rng state and a `COMPLETE` marker written last
(`training/checkpoint.py` writes them). Only `step_*` dirs holding the marker are trusted, so a torn
copy is ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
BEST = "best"          # RUN/best/step_N: the checkpoint with the best held-out simulated acceptance length
COMPLETE = "COMPLETE"
MODEL_FILE = "model.safetensors"
STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{int(step):08d}"


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under `ckpt_root`, oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = []
    for d in ckpt_root.iterdir():
        m = STEP_RE.match(d.name)
        if m and d.is_dir() and (d / COMPLETE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint under a run dir (or its `checkpoints/` dir); None if there is none.

    A checkpoint dir itself (one holding `COMPLETE`) is returned as is."""
    p = Path(run_dir)
    if STEP_RE.match(p.name) and (p / COMPLETE).is_file():
        return p
    root = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def best_checkpoint(run_dir) -> Path | None:
    """The run's best checkpoint by held-out simulated acceptance length (`train --keep-best`), or None."""
    found = complete_checkpoints(Path(run_dir) / BEST)
    return found[-1][1] if found else None


def resolve_checkpoint(path) -> Path:
    """A checkpoint dir, or a run dir meaning its latest complete checkpoint (`RUN/best` means the best
    one); clear errors otherwise."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such checkpoint or run directory")
    if (p / MODEL_FILE).exists() and not (p / COMPLETE).exists():
        raise ValueError(f"{p}: incomplete checkpoint (no {COMPLETE} marker: an interrupted save, "
                         "or not a training checkpoint)")
    found = latest_checkpoint(p)
    if found is None:
        raise FileNotFoundError(f"{p}: no complete checkpoint here (looked for {CHECKPOINTS}/step_*/{COMPLETE})")
    return found
