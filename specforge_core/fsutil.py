"""Directories that appear whole or not at all: build into a temp dir beside the final place, then swap.

Checkpoints, serving exports, tokenised caches and converted models are all written this way, so a
crash (or a SIGKILL from the GUI) leaves either the old directory or the new one, never half of one.
Ground floor: imports nothing from the engine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def staged_dir(final: str | Path, prefix: str | None = None) -> Iterator[Path]:
    """A fresh temp dir beside `final` for the block to fill; when the block ends cleanly it replaces
    `final` (an existing one is moved aside first: a directory cannot be renamed over a full one), and
    when it raises the temp dir is removed and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".tmp_{final.name}_", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old_{final.name}_", dir=final.parent))
            os.rename(final, old / final.name)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
