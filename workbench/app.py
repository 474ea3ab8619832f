"""The workbench app: `build_app(workspace)` assembles the tabs into one `gr.Blocks`; `launch` serves it.

Building and launching are separate so tests (and notebooks) can build the app without a server.
Gradio 6 takes `css` and `theme` at `launch()`, not in `Blocks(...)`, so `launch_options()` is the
one place that supplies them (also used by the mask demo). Fonts are system fonts: the default
theme would fetch Google Fonts, and the workbench must work offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from . import common  # noqa: E402
from .tabs import TabContext, load_tabs  # noqa: E402

CSS_PATH = Path(__file__).with_name("style.css")
TITLE = "specforge-wb"


def load_css() -> str:
    """style.css, the job cards every job tab shows, and each tab module's own `CSS` (a tab's look
    lives beside its layout)."""
    parts = [CSS_PATH.read_text(encoding="utf-8"), common.CSS]
    for mod in load_tabs():
        if getattr(mod, "CSS", None):
            parts.append(mod.CSS)
    return "\n".join(parts)


def make_theme() -> gr.themes.Base:
    return gr.themes.Default(
        primary_hue="indigo",
        font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    )


def launch_options() -> dict[str, Any]:
    """Keyword arguments for `Blocks.launch` shared by the workbench and the demo."""
    return {"css": load_css(), "theme": make_theme(), "ssr_mode": False, "footer_links": [],
            "show_error": False, "enable_monitoring": False, "mcp_server": False,
            # The upload box's cap, enforced by the server before a file lands (save_upload checks again).
            "max_file_size": common.UPLOAD_MAX_BYTES}


def build_app(workspace: str | os.PathLike) -> gr.Blocks:
    """The full workbench over `workspace` (created if missing, and given the sample dataset while it has no
    data: `common.seed_workspace`); nothing is served yet."""
    ws = Path(workspace).expanduser().resolve()
    ws.mkdir(parents=True, exist_ok=True)
    common.seed_workspace(ws)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"## {TITLE} · speculative-decoding draft workbench\n"
                    f"<span class='wb-workspace'>workspace: <code>{ws}</code></span>", elem_id="wb-header")
        ctx = TabContext(workspace=ws, app=app)
        with gr.Tabs(elem_id="wb-tabs"):
            for mod in load_tabs():
                with gr.Tab(mod.TITLE, elem_id="tab-" + mod.__name__.rsplit(".", 1)[-1]):
                    mod.build(ctx)
    app.workspace = ws  # type: ignore[attr-defined]
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
           share: bool = False, **kw: Any) -> None:
    """Serve `app` (blocking). The caller has already checked the bind policy."""
    opts = launch_options()
    opts.update(kw)
    app.queue(default_concurrency_limit=2)
    app.launch(server_name=host, server_port=port, auth=auth, share=share, inbrowser=False, **opts)
