"""The workbench's tabs: one module per tab, listed here in display order.

Each module named in `TAB_MODULES` exposes `TITLE` (the tab label) and `build(ctx)`, which adds its
components and events inside an open `gr.Tab`, and optionally `CSS` (its styles, added to the
page). Handlers live in the module as plain functions so they are testable without a browser; they
call `specforge_core` and never the reverse. A new tab is one new module plus one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

TAB_MODULES: list[str] = [
    # The loss mask stays first: it is the view that works before any job has run.
    "mask_tab",
    "data_tab",
    "regen_tab",
    "train_tab",
    "recipe_tab",
    "bench_tab",
    "jobs_tab",
]


@dataclass
class TabContext:
    """What every tab gets: the workspace root (the only directory it may read or write) and the app."""

    workspace: Path
    app: Any = None  # the enclosing gr.Blocks, for page-load events
    extras: dict = field(default_factory=dict)


def load_tabs() -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{name}") for name in TAB_MODULES]
