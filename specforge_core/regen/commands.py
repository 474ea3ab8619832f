"""CLI rows for regeneration; `specforge_core.cli` loads this module and adds its COMMANDS."""

from __future__ import annotations

from ..cli import Command

COMMANDS = [
    Command("regenerate", "regen.config:RegenConfig", "regen.job:regenerate",
            "re-write the assistant turns with the target (OpenAI-compatible servers or in-process), "
            "resumable"),
]
