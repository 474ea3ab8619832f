"""Draft families by name and by serving architecture: the one place the rest of the engine asks.

`FAMILIES` has one row per family (a `models.family.DraftFamily` its module defines). Training,
export, check-draft, evaluation and the GUI look a family up here (`family(name)`,
`family_for(architecture)`) and never import a family module by name; `build_draft(config)` builds
the class `config.architectures[0]` names. A new family is one new module plus one row below.
"""

from __future__ import annotations

from torch import nn

from . import eagle3, medusa
from .family import DraftFamily

FAMILIES: dict[str, DraftFamily] = {f.name: f for f in (
    eagle3.FAMILY,
    medusa.FAMILY,
)}

# architecture name -> module class; `register_draft` adds classes that have no family (tests, plug-ins).
DRAFT_ARCHITECTURES: dict[str, type] = {f.architecture: f.model for f in FAMILIES.values()}


def register_draft(name: str):
    def deco(cls: type) -> type:
        DRAFT_ARCHITECTURES[name] = cls
        return cls

    return deco


def family_names() -> list[str]:
    return list(FAMILIES)


def known_architectures() -> list[str]:
    return sorted(DRAFT_ARCHITECTURES)


def family(name: str) -> DraftFamily:
    """The family called `name` (`eagle3`, ...), or a ValueError listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown draft type {name!r}; known draft types: {family_names()}") from None


def family_for(architecture: str) -> DraftFamily | None:
    """The family whose serving checkpoints carry `architectures: [architecture]`."""
    for f in FAMILIES.values():
        if f.architecture == architecture:
            return f
    return None


def guess_family(tensor_names) -> DraftFamily:
    """The family whose required tensors a checkpoint holds most of (for files with a wrong name)."""
    names = set(tensor_names)
    return max(FAMILIES.values(), key=lambda f: len(names & set(f.required_tensors)))


def build_draft(config) -> nn.Module:
    """Instantiate the draft class named by `config.architectures[0]`."""
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise ValueError(f"draft config has no 'architectures'; known draft architectures: {known_architectures()}")
    cls = DRAFT_ARCHITECTURES.get(archs[0])
    if cls is None:
        raise ValueError(f"unknown draft architecture {archs[0]!r}; known draft architectures: "
                         f"{known_architectures()}")
    return cls(config)
