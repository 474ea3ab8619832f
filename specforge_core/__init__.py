"""specforge_core: the engine behind specforge-wb (data, masks, regeneration, training, evaluation, jobs).

Nothing here imports Gradio or the workbench: the engine runs alone on a GPU box or a cluster.
"""

__version__ = "0.1.0"
