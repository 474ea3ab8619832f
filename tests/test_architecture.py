"""The import rules of docs/ARCHITECTURE.md, enforced: parse every engine and workbench module's imports
(lazy ones inside functions included) and fail on any that goes up a floor or across a wall."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]

# The engine's floors, lowest first. A module may import its own package and anything on a lower floor;
# two packages on the same floor never import each other (training and evaluate: measuring needs no
# trainer, and the trainer needs no benchmark).
FLOORS: list[set[str]] = [
    {"__init__", "fsutil"},                                      # files that appear whole: imports nothing
    {"config", "events", "asyncutil", "targets", "locks", "cpu_kernels"},  # plumbing every job uses
    {"data"},                                                    # data is the ground floor of the work
    {"regen", "models"},
    {"offline"},
    {"training", "evaluate"},
    {"recipes"},                                                 # whole runs over the jobs below
    {"commands"},                                                # the one command table (reads every config)
    {"jobs"},
    {"cli"},
    {"__main__"},
]
FLOOR = {part: i for i, parts in enumerate(FLOORS) for part in parts}


def _modules(top: str):
    for f in sorted((ROOT / top).rglob("*.py")):
        yield f, ".".join(f.relative_to(ROOT).with_suffix("").parts)


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` names submodules
                # `from . import x` names a submodule, or an attribute of the package itself
                names = [name] if node.module else [
                    f"{name}.{a.name}" if _is_module(f"{name}.{a.name}") else name for a in node.names]
            else:
                names = [node.module]
            out += [(node.lineno, n) for n in names]
    return out


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or p.is_dir()


def _is_config(name: str) -> bool:
    """specforge_core.<package>.config: a package's job configs, readable from anywhere."""
    parts = name.split(".")
    return len(parts) == 3 and parts[2] == "config"


def _part(module: str) -> str:
    """specforge_core.training.trainer -> training; specforge_core.config -> config."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def engine_violations() -> list[str]:
    bad = []
    for f, mod in _modules("specforge_core"):
        here = _part(mod)
        for line, name in _imports(f, mod):
            where = f"{f.relative_to(ROOT)}:{line} imports {name}"
            top = name.split(".")[0]
            if top in ("workbench", "gradio"):
                bad.append(f"{where}: the engine never imports the GUI")
                continue
            if top != "specforge_core" or name == "specforge_core":
                continue
            there = _part(name)
            if mod.endswith(".config") and mod != "specforge_core.config" and FLOOR[there] > 1 \
                    and not _is_config(name):
                bad.append(f"{where}: a config module holds schemas only (pydantic + other configs)")
            elif _is_config(name) and there != here:
                continue  # any job may build any job's config (the command table reads them all)
            elif there == "cli" and here != "__main__":
                bad.append(f"{where}: the engine knows no argv; shared rows live in specforge_core.commands")
            elif there != here and FLOOR[there] >= FLOOR[here]:
                bad.append(f"{where}: {there!r} is not below {here!r} (floors: docs/ARCHITECTURE.md)")
    return bad


def workbench_violations() -> list[str]:
    bad = []
    for f, mod in _modules("workbench"):
        for line, name in _imports(f, mod):
            if mod.startswith("workbench.tabs.") and name.startswith("workbench.tabs.") \
                    and name != "workbench.tabs" and name != mod:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {name}: tabs are peers; share through "
                           "workbench/common.py")
    return bad


def test_every_engine_module_is_on_a_floor():
    parts = {_part(mod) for _, mod in _modules("specforge_core")}
    assert parts <= set(FLOOR), f"packages without a floor in this test and docs/ARCHITECTURE.md: {parts - set(FLOOR)}"


def test_engine_imports_go_down_only():
    assert engine_violations() == []


def test_tabs_do_not_import_each_other():
    assert workbench_violations() == []


@pytest.mark.parametrize("src,expected", [
    ("from ..training.checkpoint import x\n", "'training' is not below 'evaluate'"),
    ("import gradio\n", "never imports the GUI"),
    ("from ..cli import Command\n", "knows no argv"),
])
def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch, src, expected):
    # The check itself must be able to fail: plant one bad import in a copy of an evaluate module.
    fake = tmp_path / "specforge_core" / "evaluate"
    fake.mkdir(parents=True)
    (fake / "planted.py").write_text(src, encoding="utf-8")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert any(expected in v for v in engine_violations())
