"""The machinery under every typed job config: one pydantic schema per job feeds the CLI flags, the
GUI forms and `run.json`.

Each long job is a function of one config object; the classes live beside their jobs, one
`config.py` per package (`data.config`, `training.config`, `offline.config`, `evaluate.config`,
`regen.config`, `jobs.config`), and all derive from `JobConfig` here. `add_config_args` turns a config class into
argparse flags (field `max_length` -> `--max-length`, help from the field description),
`config_from_args` builds the object back (a `--config FILE` of YAML/JSON supplies defaults that
flags override), and `write_run_json` / `read_run_json` make every artifact directory say what
made it and which format version it is.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError

FORMAT_VERSION = 1


class JobConfig(BaseModel):
    """Base of every job config: unknown keys are an error (a typo in run.yaml must not pass)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # Fields the CLI takes as positionals rather than flags.
    _positional: typing.ClassVar[tuple[str, ...]] = ()
    # Extra flag spellings for a field, e.g. {"configs": ("--config",)}.
    _flag_aliases: typing.ClassVar[dict[str, tuple[str, ...]]] = {}


# ------------------------------------------------------------------------------------------------
# CLI plumbing: config class <-> argparse
# ------------------------------------------------------------------------------------------------
def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, cls: type[JobConfig],
                    exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per field of `cls` (positionals for `cls._positional`). Defaults stay unset
    (None) so that `--config FILE` values are not overridden by flags the user did not give."""
    positional = set(getattr(cls, "_positional", ()))
    for name, field in cls.model_fields.items():
        if name in exclude:
            continue
        tp, _ = _unwrap_optional(field.annotation)
        help_ = field.description or ""
        if not field.is_required():
            default = field.get_default(call_default_factory=True)
            help_ += f" (default: {default})"
        # argparse %-formats help text: a literal % in a description ("within 1% of fp32") must be doubled.
        kwargs: dict[str, Any] = {"help": help_.replace("%", "%%"), "default": None}
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif origin in (list, tuple):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kwargs["nargs"] = "+"
            kwargs["type"] = inner if inner in (int, float, str) else str
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        if name in positional:
            # Optional on the command line even when the schema requires it: a `--config FILE` (how the jobs
            # runner starts every job) may supply it, and the schema names it when neither does.
            kwargs["nargs"] = "?"
            parser.add_argument(name, **kwargs)
        else:
            parser.add_argument(_flag(name), *getattr(cls, "_flag_aliases", {}).get(name, ()), dest=name, **kwargs)


def load_config_file(path: str | Path) -> dict:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e}") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one clear message
        raise ConfigError(f"{p}: not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: {e}") from None
    if isinstance(data, dict) and "config" in data and "kind" in data:  # a run.json
        data = data["config"]
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of field names to values")
    return data


class ConfigError(ValueError):
    """A config that cannot be built; the message names the file or field."""


def format_validation_error(cls: type[BaseModel], err: ValidationError, source: str = "") -> str:
    lines = [f"invalid {cls.__name__}" + (f" from {source}" if source else "") + ":"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        name = loc if source or loc in getattr(cls, "_positional", ()) else _flag(loc)
        lines.append(f"  {name}: {e['msg']}")
    return "\n".join(lines)


def build_config(cls: type[JobConfig], values: dict, source: str = "") -> JobConfig:
    try:
        return cls(**values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(cls, e, source)) from None


def config_from_args(cls: type[JobConfig], ns: argparse.Namespace, config_file: str | None = None) -> JobConfig:
    values: dict[str, Any] = {}
    if config_file:
        values.update(load_config_file(config_file))
    for name in cls.model_fields:
        v = getattr(ns, name, None)
        if v is not None:
            values[name] = v
    return build_config(cls, values, source="")


def config_to_argv(cfg: JobConfig, exclude: tuple[str, ...] = ()) -> list[str]:
    """The CLI flags that rebuild `cfg` (only fields that differ from their defaults)."""
    argv: list[str] = []
    positional = set(getattr(type(cfg), "_positional", ()))
    pos_vals: list[str] = []
    for name, field in type(cfg).model_fields.items():
        if name in exclude:
            continue
        v = getattr(cfg, name)
        if name in positional:
            if v is not None:
                pos_vals.append(str(v))
            continue
        if not field.is_required() and v == field.get_default(call_default_factory=True):
            continue
        if v is None:
            continue
        tp, _ = _unwrap_optional(field.annotation)
        if tp is bool:
            argv.append(_flag(name) if v else "--no-" + name.replace("_", "-"))
        elif isinstance(v, (list, tuple)):
            argv.append(_flag(name))
            argv.extend(str(x) for x in v)
        else:
            argv.extend([_flag(name), str(v)])
    return pos_vals + argv


# ------------------------------------------------------------------------------------------------
# Self-describing artifact directories
# ------------------------------------------------------------------------------------------------
def write_run_json(directory: str | Path, kind: str, cfg: JobConfig | dict, **extra: Any) -> Path:
    from . import __version__

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    payload = {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "specforge_version": __version__,
        "config": cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg,
        **extra,
    }
    tmp = d / "run.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, d / "run.json")
    return d / "run.json"


def read_run_json(directory: str | Path, expect_kind: str | None = None) -> dict:
    p = Path(directory) / "run.json"
    if not p.exists():
        raise ConfigError(f"{directory}: no run.json here; this directory was not made by specforge-wb")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: corrupt run.json: {e}") from None
    if expect_kind and data.get("kind") != expect_kind:
        raise ConfigError(f"{p}: this is a {data.get('kind')!r} directory, expected {expect_kind!r}")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(f"{p}: format version {data.get('format_version')} is newer than this "
                          f"specforge-wb understands ({FORMAT_VERSION}); upgrade it")
    return data
