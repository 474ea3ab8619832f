"""The command table (`specforge_core.commands`): every row imports, the CLI and the job runner read the
same table, and `--help` stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from specforge_core import cli
from specforge_core.commands import COMMANDS, Command
from specforge_core.config import JobConfig
from specforge_core.jobs.runner import config_class, job_kinds

pytestmark = pytest.mark.unit

ENGINE = Path(__file__).resolve().parent.parent / "specforge_core"


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.name)
def test_every_row_resolves(cmd: Command):
    # A broken import in an engine module must fail here, not remove its command from the CLI.
    assert issubclass(cmd.config, JobConfig)
    assert callable(cmd.resolve())


def test_a_bad_function_name_is_an_error_not_a_missing_command():
    with pytest.raises(ImportError, match="'nope'.*no 'missing'"):
        Command("nope", JobConfig, "data.prepare:missing", "").resolve()
    with pytest.raises(ModuleNotFoundError):
        Command("nope", JobConfig, "no_such_module:f", "").resolve()


def test_cli_and_job_runner_read_the_same_table():
    names = [c.name for c in COMMANDS]
    assert len(names) == len(set(names))
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == names + ["ui"]
    assert set(job_kinds()) <= set(names)
    for kind in job_kinds():
        assert config_class(kind) is next(c.config for c in COMMANDS if c.name == kind)


def test_help_imports_no_engine_weights():
    code = ("import sys, specforge_core.cli as c; c.build_parser().format_help();"
            "heavy = [m for m in ('torch', 'transformers', 'aiohttp') if m in sys.modules];"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_engine_does_not_import_the_cli():
    # Only `python -m specforge_core` starts the CLI; engine packages read `commands` instead.
    pattern = re.compile(r"^\s*(from\s+(specforge_core|\.+)\s+import\s+cli\b|from\s+(specforge_core)?\.*cli\s+import"
                         r"|import\s+specforge_core\.cli)", re.M)
    offenders = [str(p.relative_to(ENGINE)) for p in ENGINE.rglob("*.py")
                 if p.name != "__main__.py" and pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


@pytest.mark.unit
def test_positionals_can_come_from_the_config_file(tmp_path):
    # The jobs runner starts every job as `specforge-wb KIND --config job_config.json`: a command whose
    # config has positionals (export CHECKPOINT, check-draft PATH) must take them from the file.
    import json

    from specforge_core.cli import main

    f = tmp_path / "job.json"
    f.write_text(json.dumps({"path": str(tmp_path / "missing")}))
    assert main(["check-draft", "--config", str(f), "--quiet"]) == 1       # ran: the dir is missing
    assert main(["check-draft", "--quiet"]) == 2                            # no path anywhere: named
