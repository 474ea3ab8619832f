"""Draft architectures by name: `config.architectures[0]` picks the class that `build_draft` builds.

A new draft kind registers itself with `@register_draft("ArchName")`; serving engines key on the same
name in `config.json`, so the registry is also the list of what export may write.
"""

from __future__ import annotations

from torch import nn

DRAFT_ARCHITECTURES: dict[str, type] = {}


def register_draft(name: str):
    def deco(cls: type) -> type:
        DRAFT_ARCHITECTURES[name] = cls
        return cls

    return deco


def _ensure_builtin() -> None:
    # Importing the module runs its @register_draft decorators.
    from . import eagle3  # noqa: F401


def build_draft(config) -> nn.Module:
    """Instantiate the draft class named by `config.architectures[0]`."""
    _ensure_builtin()
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise ValueError(f"draft config has no 'architectures'; known draft architectures: "
                         f"{sorted(DRAFT_ARCHITECTURES)}")
    cls = DRAFT_ARCHITECTURES.get(archs[0])
    if cls is None:
        raise ValueError(f"unknown draft architecture {archs[0]!r}; known draft architectures: "
                         f"{sorted(DRAFT_ARCHITECTURES)}")
    return cls(config)
