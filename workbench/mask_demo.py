"""`python -m workbench.mask_demo`: the loss-mask view alone, safe to host publicly (e.g. a HF Space).

It has no file system and no job access: the only input is a pasted conversation, a tokenizer from
a fixed allow-list (checked on the server too, since any event can be called through the API) and
a chat template. Because nothing on disk is reachable, binding a public interface needs no password.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from .tabs.mask_tab import DEFAULT_ALLOWED_TOKENIZERS, build_mask_view  # noqa: E402

TITLE = "Loss-mask inspector · specforge-wb"


def build_demo(allowed_tokenizers: dict[str, str] | None = None) -> gr.Blocks:
    allowed = dict(allowed_tokenizers or DEFAULT_ALLOWED_TOKENIZERS)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown("## Which tokens does a speculative-decoding draft learn from?\n"
                    "Paste a conversation, pick a tokenizer and a chat template. **Green** tokens are trained "
                    "(assistant output and its end-of-turn token), **red** ones are masked. An all-red mask means "
                    "the template does not fit: that sample would teach the draft nothing.", elem_id="demo-header")
        build_mask_view(None, allowed, app=demo)
    return demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.mask_demo", description=__doc__.splitlines()[0])
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7861")))
    ns = p.parse_args(argv)
    from .app import launch

    launch(build_demo(), host=ns.host, port=ns.port)
    return 0


def launch_kwargs() -> dict[str, Any]:
    from .app import launch_options

    return launch_options()


if __name__ == "__main__":
    raise SystemExit(main())
