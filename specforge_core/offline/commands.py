"""CLI rows for offline training: `dump-hidden-states` and `estimate-dump` (picked up by `specforge_core.cli`)."""

from ..cli import Command

COMMANDS = [
    Command("dump-hidden-states", "offline.config:DumpConfig", "offline.dump:dump_hidden_states",
            "run the target once over a dataset and store its hidden states (compact, crash-safe, resumable) "
            "for offline training (train --train-hidden-states DIR)"),
    Command("estimate-dump", "offline.config:EstimateDumpConfig", "offline.dump:estimate_dump",
            "the disk a dump-hidden-states run needs for this data and format (loads no target weights)"),
]
