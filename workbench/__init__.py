"""The Gradio workbench: a thin GUI over `specforge_core`, one module per tab (see `workbench.tabs`).

`python -m workbench` (what `specforge-wb ui` runs) serves the full workbench on a workspace
directory; `python -m workbench.mask_demo` serves the stand-alone loss-mask demo, which has no file
system or job access and is safe to host publicly.
"""

import os

# Set before gradio is imported anywhere: the workbench must not phone home (it runs offline).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
