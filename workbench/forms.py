"""Gradio forms built from a job's pydantic config schema: one schema feeds the CLI, the GUI and run.json.

`field_spec` maps a config field to the component that edits it (bool -> Checkbox, Literal ->
Dropdown, int / float -> Number, list -> Textbox of space-separated values, str -> Textbox), with
the label from its name and the info line from its description. `values_to_config` turns the
values a handler receives back into the config object through `specforge_core.config.build_config`,
and reports every problem by field. The conversion half (`spec.parse`, `values_to_config`) has no
Gradio in it, so handlers stay plain functions that tests call directly.

Every tab declares its form the same way, as a `SchemaForm`: the config class, the fields shown up
front, optional groups the tab places itself, the GUI's own defaults, and (unless the tab fixes the
other fields itself) every other field under "Advanced". `SchemaForm.specs()` is the order in which
handlers receive the values; `SchemaForm.layout()` lays the components out (`two_columns` /
`stacked` / `one_row` for the main fields, `advanced_rows` for the rest) inside the open Blocks context.
"""

from __future__ import annotations

import html
import re
import shlex
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from specforge_core.config import ConfigError, JobConfig, _unwrap_optional, build_config

# Optional[bool] needs a third state ("leave it to the engine"), which a Checkbox cannot show.
TRISTATE = ("default", "yes", "no")


class FormError(ValueError):
    """Form values that cannot become a config; `errors` maps field name (or "" for the whole form) to a message."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"{k or 'form'}: {v}" for k, v in errors.items()))


@dataclass
class FieldSpec:
    """How one config field appears in a form and how its raw widget value is read back."""

    name: str
    kind: str                 # checkbox | tristate | dropdown | multiselect | int | float | list | text
    label: str
    info: str
    default: Any
    required: bool
    optional: bool            # None is a valid value (an empty box means None)
    choices: list[Any] = field(default_factory=list)
    item_type: type = str     # for lists

    def to_widget(self, value: Any) -> Any:
        """A config value -> what the widget shows."""
        if self.kind == "tristate":
            return "default" if value is None else ("yes" if value else "no")
        if self.kind == "list":
            return "" if value is None else " ".join(shlex.quote(str(v)) if re.search(r"\s", str(v)) else str(v)
                                                     for v in value)
        if self.kind == "multiselect":
            return list(value or [])
        if self.kind in ("int", "float"):
            return value
        if self.kind == "text":
            return "" if value is None else str(value)
        return value

    def parse(self, raw: Any) -> Any:
        """A widget value -> the value handed to pydantic; `_UNSET` means "leave the field out"."""
        if self.kind == "checkbox":
            return bool(raw)
        if self.kind == "tristate":
            return None if raw in (None, "", "default") else raw == "yes"
        if self.kind == "dropdown":
            return _UNSET if raw in (None, "") and not self.required else raw
        if self.kind == "multiselect":
            vals = list(raw or [])
            return vals if vals else _UNSET
        if self.kind in ("int", "float"):
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                return None if self.optional else _UNSET
            try:
                num = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"not a number: {raw!r}") from None
            if self.kind == "int":
                if num != int(num):
                    raise ValueError(f"must be a whole number, got {raw!r}")
                return int(num)
            return num
        if self.kind == "list":
            text = "" if raw is None else str(raw).strip()
            if not text:
                return None if self.optional else _UNSET
            try:
                items = shlex.split(text)
            except ValueError as e:
                raise ValueError(f"cannot split {text!r} into values: {e}") from None
            if self.item_type in (int, float):
                out = []
                for it in items:
                    try:
                        out.append(self.item_type(it))
                    except ValueError:
                        raise ValueError(f"{it!r} is not a{'n integer' if self.item_type is int else ' number'}") \
                            from None
                return out
            return items
        text = "" if raw is None else str(raw)
        if not text.strip():
            return None if self.optional else _UNSET
        return text.strip()


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def label_for(name: str) -> str:
    return name.replace("_", " ")


def field_spec(cls: type[JobConfig], name: str) -> FieldSpec:
    f = cls.model_fields[name]
    tp, optional = _unwrap_optional(f.annotation)
    required = f.is_required()
    default = None if required else f.get_default(call_default_factory=True)
    origin = typing.get_origin(tp)
    info = (f.description or "").strip()
    common = dict(name=name, label=label_for(name), info=info, default=default, required=required, optional=optional)
    if tp is bool:
        return FieldSpec(kind="tristate" if optional else "checkbox", choices=list(TRISTATE), **common)
    if origin is Literal:
        return FieldSpec(kind="dropdown", choices=list(typing.get_args(tp)), **common)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        inner = args[0] if args else str
        if typing.get_origin(inner) is Literal:
            return FieldSpec(kind="multiselect", choices=list(typing.get_args(inner)), **common)
        return FieldSpec(kind="list", item_type=inner if inner in (int, float) else str, **common)
    if tp is int:
        return FieldSpec(kind="int", **common)
    if tp is float:
        return FieldSpec(kind="float", **common)
    return FieldSpec(kind="text", **common)


def field_specs(cls: type[JobConfig], names: Iterable[str] | None = None) -> list[FieldSpec]:
    names = list(cls.model_fields) if names is None else list(names)
    unknown = [n for n in names if n not in cls.model_fields]
    if unknown:
        raise KeyError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    return [field_spec(cls, n) for n in names]


# ------------------------------------------------------------------------------------------------
# values -> config (no Gradio)
# ------------------------------------------------------------------------------------------------
_ERR_LINE = re.compile(r"^\s+(?P<loc>[^:]+):\s*(?P<msg>.*)$")


def parse_config_error(message: str, names: Iterable[str]) -> dict[str, str]:
    """`build_config`'s message (one `  field: msg` line per problem) -> {field: msg}; "" for the rest."""
    known = set(names)
    out: dict[str, str] = {}
    for line in message.splitlines()[1:]:
        m = _ERR_LINE.match(line)
        if not m:
            continue
        loc = m.group("loc").strip()
        # A list item's error is reported as `field.3`; a model validator's as `(root)`.
        key = loc.split(".")[0].lstrip("-").replace("-", "_")
        msg = m.group("msg").strip()
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        key = key if key in known else ""
        out[key] = f"{out[key]}; {msg}" if key in out else msg
    if not out:
        out[""] = message
    return out


def values_to_config(cls: type[JobConfig], specs: Sequence[FieldSpec], values: Sequence[Any],
                     fixed: dict[str, Any] | None = None, transform: Any = None) -> JobConfig:
    """Widget values (in `specs` order) + `fixed` values -> a validated config; raises `FormError`.

    `transform(values_dict) -> values_dict` runs between parsing and validation (the GUI uses it to
    resolve paths inside the workspace); it may raise `FormError` itself.
    """
    if len(values) != len(specs):
        raise ValueError(f"{len(values)} values for {len(specs)} fields")
    errors: dict[str, str] = {}
    data: dict[str, Any] = {}
    for spec, raw in zip(specs, values):
        try:
            v = spec.parse(raw)
        except ValueError as e:
            errors[spec.name] = str(e)
            continue
        if v is not _UNSET:
            data[spec.name] = v
    if errors:
        raise FormError(errors)
    data.update(fixed or {})
    if transform is not None:
        data = transform(data)
    try:
        return build_config(cls, data, source="form")
    except ConfigError as e:
        raise FormError(parse_config_error(str(e), cls.model_fields)) from None


def config_to_values(cfg: JobConfig, specs: Sequence[FieldSpec]) -> list[Any]:
    """The inverse: a config -> widget values, e.g. to load a saved run.yaml into the form."""
    return [s.to_widget(getattr(cfg, s.name)) for s in specs]


def render_errors(err: FormError | str, specs: Sequence[FieldSpec] = ()) -> str:
    """Errors as HTML, one line per field, naming the field by its label and its CLI flag."""
    if isinstance(err, str):
        return f'<div class="mask-error">✖ {html.escape(err)}</div>'
    labels = {s.name: s.label for s in specs}
    lines = []
    for name, msg in err.errors.items():
        where = f"<b>{html.escape(labels.get(name, label_for(name)))}</b> (<code>--{name.replace('_', '-')}</code>): " \
            if name else ""
        lines.append(f'<div class="mask-error form-error" data-field="{html.escape(name)}">✖ {where}'
                     f"{html.escape(msg)}</div>")
    return "".join(lines)


# ------------------------------------------------------------------------------------------------
# Gradio layout
# ------------------------------------------------------------------------------------------------
def component_value(spec: FieldSpec, value: Any) -> Any:
    """A config value -> the value of the component `make_component` made for `spec` (to set it later,
    e.g. when a reloaded page restores a form from a run's saved config)."""
    shown = spec.to_widget(value)
    if spec.kind in ("int", "float") and spec.optional:
        return "" if shown is None else str(shown)
    return shown


def make_component(spec: FieldSpec, value: Any = _UNSET, elem_id: str | None = None, **kw: Any) -> Any:
    import gradio as gr

    shown = spec.to_widget(spec.default if value is _UNSET else value)
    info = spec.info or None
    common = dict(label=spec.label, info=info, elem_id=elem_id, **kw)
    if spec.kind == "checkbox":
        return gr.Checkbox(value=bool(shown), **common)
    if spec.kind == "tristate":
        return gr.Dropdown(list(TRISTATE), value=shown, **common)
    if spec.kind == "dropdown":
        return gr.Dropdown(spec.choices, value=shown, **common)
    if spec.kind == "multiselect":
        return gr.Dropdown(spec.choices, value=shown, multiselect=True, **common)
    if spec.kind in ("int", "float"):
        if spec.optional:
            # gr.Number cannot be empty (it shows and sends 0), and None means "not set" here.
            return gr.Textbox(value="" if shown is None else str(shown), placeholder="empty = not set",
                              lines=1, max_lines=1, **common)
        return gr.Number(value=shown, precision=0 if spec.kind == "int" else None, **common)
    placeholder = "space-separated values" if spec.kind == "list" else None
    return gr.Textbox(value=shown, placeholder=placeholder, lines=1, max_lines=3, **common)


def two_columns(specs: Sequence[FieldSpec], make: Callable[[FieldSpec], Any]) -> None:
    """The main fields of a form, in two columns, inside the open Blocks context."""
    import gradio as gr

    with gr.Row(equal_height=False):
        for col in (specs[0::2], specs[1::2]):
            with gr.Column(min_width=300):
                for spec in col:
                    make(spec)


def advanced_rows(specs: Sequence[FieldSpec], make: Callable[[FieldSpec], Any], title: str,
                  elem_id: str | None = None) -> None:
    """Every other field of a form, three to a row, in a closed accordion."""
    import gradio as gr

    with gr.Accordion(title, open=False, elem_id=elem_id):
        for i in range(0, len(specs), 3):
            with gr.Row(equal_height=False):
                for spec in specs[i:i + 3]:
                    make(spec)


def stacked(specs: Sequence[FieldSpec], make: Callable[[FieldSpec], Any]) -> None:
    """The fields one under the other, in the open column."""
    for spec in specs:
        make(spec)


def one_row(specs: Sequence[FieldSpec], make: Callable[[FieldSpec], Any]) -> None:
    """A short form side by side in one row."""
    import gradio as gr

    with gr.Row():
        for spec in specs:
            make(spec)


# ------------------------------------------------------------------------------------------------
# One tab's form
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SchemaForm:
    """A tab's form over one config class; handlers receive its values in `specs()` order."""

    load: Callable[[], type[JobConfig]]      # imports the engine's config class when first needed (start-up time)
    main: Sequence[str]
    elem_prefix: str                         # component elem_ids are `<prefix>-<field-name>`
    defaults: Mapping[str, Any] = field(default_factory=dict)   # where the GUI differs from the CLI
    groups: Sequence[Sequence[str]] = ()     # fields after `main` that the tab places itself
    advanced: bool = True                    # False: the tab fixes every other field itself

    def sections(self) -> list[list[FieldSpec]]:
        """[main, *groups] and, with `advanced`, every other field in schema order."""
        cls = self.load()
        out = [field_specs(cls, self.main), *(field_specs(cls, g) for g in self.groups)]
        if self.advanced:
            shown = {s.name for sec in out for s in sec}
            out.append(field_specs(cls, [n for n in cls.model_fields if n not in shown]))
        return out

    def specs(self) -> list[FieldSpec]:
        return [s for sec in self.sections() for s in sec]

    def default(self, spec: FieldSpec) -> Any:
        return self.defaults.get(spec.name, spec.default)

    def to_config(self, values: Sequence[Any], fixed: dict[str, Any] | None = None, transform: Any = None) -> JobConfig:
        return values_to_config(self.load(), self.specs(), list(values), fixed=fixed, transform=transform)

    def layout(self, main_layout: Callable[[Sequence[FieldSpec], Callable[[FieldSpec], Any]], None] = two_columns,
               place_groups: Callable[[list[list[FieldSpec]], Callable[[FieldSpec], Any]], None] | None = None,
               ) -> tuple[dict[str, Any], list[Any]]:
        """Lay the form out; (components by field name, the components in `specs()` order).

        `place_groups(groups, make)` lays out the `groups` (the tab decides where, e.g. an accordion
        with a button of its own); `make(spec)` creates a field's component.
        """
        comps: dict[str, Any] = {}

        def make(spec: FieldSpec) -> Any:
            comps[spec.name] = make_component(spec, self.default(spec),
                                              elem_id=f"{self.elem_prefix}-{spec.name.replace('_', '-')}")
            return comps[spec.name]

        sections = self.sections()
        main_layout(sections[0], make)
        groups = sections[1:1 + len(self.groups)]
        if groups:
            if place_groups is None:
                raise ValueError(f"{self.elem_prefix}: a form with groups needs place_groups")
            place_groups(groups, make)
        if self.advanced:
            advanced_rows(sections[-1], make, f"Advanced (every other {self.load().__name__} field)",
                          elem_id=f"{self.elem_prefix}-advanced")
        return comps, [comps[s.name] for sec in sections for s in sec]
