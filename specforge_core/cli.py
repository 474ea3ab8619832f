"""The `specforge-wb` command line: parse -> config -> one engine call. Nothing else lives here.

Each subcommand is a row of the command table (`specforge_core.commands.COMMANDS`): its config class
(the flags come from the schema) and the engine function, imported only when the command runs so
`specforge-wb --help` stays fast. Engine functions take `(config, events)` and return a JSON-able
summary, which is printed as the last line of stdout (`--json`) or as readable text.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from . import __version__
from .commands import COMMANDS, Command
from .config import ConfigError, add_config_args, config_from_args
from .events import Events, JobCancelled


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specforge-wb", description="Train speculative-decoding drafts "
                                "(EAGLE3) for SGLang / vLLM: data, masks, training, evaluation.")
    p.add_argument("--version", action="version", version=f"specforge-wb {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for c in COMMANDS:
        sp = sub.add_parser(c.name, help=c.help, description=c.help)
        if c.config_flag:
            flag = c.config_flag if isinstance(c.config_flag, str) else "--config"
            sp.add_argument(flag, dest="_config_file", default=None,
                            help="YAML/JSON file (or a run.json) with field values; flags override it")
        sp.add_argument("--events", dest="_events_file", default=None,
                        help="also append structured events (JSON lines) to this file")
        sp.add_argument("--json", dest="_json", action="store_true", help="print the result as JSON")
        sp.add_argument("--quiet", dest="_quiet", action="store_true", help="do not echo events to stderr")
        add_config_args(sp, c.config)
        sp.set_defaults(_command=c)

    ui = sub.add_parser("ui", help="start the Gradio workbench", description="start the Gradio workbench")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--share", action="store_true", help="ask Gradio for a temporary public link")
    ui.add_argument("--workspace", default="workspace", help="root for data, runs and the jobs database")
    ui.add_argument("--auth", default=None, help="user:pass (required with a non-loopback --host)")
    ui.add_argument("--allow-unauthenticated-remote", action="store_true",
                    help="bind a non-loopback host without --auth (you accept the risk)")
    return p


def machine_output(cfg, as_json: bool) -> bool:
    """True when stdout is for a program: `--json`, or a job writing JSON lines (`--format json`)."""
    return as_json or getattr(cfg, "format", None) == "json"


def _print_result(result, as_json: bool, machine: bool) -> None:
    """The job's summary: JSON on stdout with `--json`; else readable lines, on stdout unless stdout carries
    the job's own JSON lines (then on stderr, so `| jq` reads only JSON)."""
    if result is None:
        return
    if hasattr(result, "to_dict"):
        result = result.to_dict()
    if as_json:
        print(json.dumps(result, ensure_ascii=False, default=str))
        return
    out = sys.stderr if machine else sys.stdout
    if not isinstance(result, dict):
        print(json.dumps(result, ensure_ascii=False, default=str), file=out)
        return
    for k, v in result.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v, ensure_ascii=False, default=str)
        print(f"{k}: {v}", file=out)


def _run_ui(ns: argparse.Namespace) -> int:
    # The engine never imports the GUI: it starts it as a program, as it would start a server.
    argv = [sys.executable, "-m", "workbench", "--host", ns.host, "--port", str(ns.port),
            "--workspace", ns.workspace]
    if ns.share:
        argv.append("--share")
    if ns.auth:
        argv += ["--auth", ns.auth]
    if ns.allow_unauthenticated_remote:
        argv.append("--allow-unauthenticated-remote")
    os.execv(sys.executable, argv)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    if ns.command == "ui":
        return _run_ui(ns)
    cmd: Command = ns._command
    try:
        cfg = config_from_args(cmd.config, ns, getattr(ns, "_config_file", None))
    except ConfigError as e:
        print(f"specforge-wb {cmd.name}: {e}", file=sys.stderr)
        return 2
    events = Events(ns._events_file, echo=not ns._quiet)
    events.install_signal_handlers()
    func = cmd.resolve()
    # Under --json stdout carries JSON only: whatever else a job prints goes to stderr (a job's own JSON
    # lines, `--format json`, stay on stdout).
    divert = ns._json and getattr(cfg, "format", None) != "json"
    try:
        with contextlib.redirect_stdout(sys.stderr) if divert else contextlib.nullcontext():
            result = func(cfg, events)
    except JobCancelled as e:
        print(f"specforge-wb {cmd.name}: cancelled ({e}); outputs so far are kept and the job can resume",
              file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"specforge-wb {cmd.name}: error: {e}", file=sys.stderr)
        return 1
    _print_result(result, ns._json, machine_output(cfg, ns._json))
    return int(getattr(result, "exit_code", 0) or 0) if not isinstance(result, dict) else int(result.get("exit_code", 0))


if __name__ == "__main__":
    raise SystemExit(main())
