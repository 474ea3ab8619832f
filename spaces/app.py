"""Hugging Face Spaces entry point: the public loss-mask demo (`workbench.mask_demo`).

The demo has no file system or job access: visitors paste a conversation, pick a tokenizer from a
fixed allow-list and a chat template, and see which tokens a draft would be trained on. Spaces sets
GRADIO_SERVER_NAME=0.0.0.0; that is fine here because nothing on disk is reachable.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:
    import workbench  # noqa: F401  (installed, or copied next to this file)
except ImportError:
    # Run from a checkout of the repository: the packages live one directory up.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.app import launch_options  # noqa: E402
from workbench.mask_demo import build_demo  # noqa: E402

demo = build_demo()

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), **launch_options())
