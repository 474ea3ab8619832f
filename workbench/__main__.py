"""`python -m workbench`: serve the workbench (this is what `specforge-wb ui` execs).

Flags mirror `specforge-wb ui`. The bind policy (`workbench.security`) is checked before anything
heavy is imported, so a refused launch fails fast with a message instead of a half-started server.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workbench", description="serve the specforge-wb Gradio workbench")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--workspace", default="workspace", help="root for data, runs and the jobs database; "
                   "the GUI reads and writes nothing outside it")
    p.add_argument("--share", action="store_true", help="ask Gradio for a temporary public link (needs --auth)")
    p.add_argument("--auth", default=None, help="user:pass (required with a non-loopback --host or --share)")
    p.add_argument("--allow-unauthenticated-remote", action="store_true",
                   help="bind a non-loopback host (or --share) without --auth; you accept the risk")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from .security import SecurityError, check_bind_policy

    try:
        creds = check_bind_policy(ns.host, ns.auth, ns.allow_unauthenticated_remote, ns.share)
    except SecurityError as e:
        print(f"specforge-wb ui: refusing to start: {e}", file=sys.stderr)
        return 2
    from .app import build_app, launch

    app = build_app(ns.workspace)
    launch(app, host=ns.host, port=ns.port, auth=creds, share=ns.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
