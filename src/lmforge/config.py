"""Config loading shared by every CLI verb: a YAML file plus dotted ``key=value`` overrides, validated by pydantic.

Precedence (lowest to highest): ``base`` dict < YAML file < command-line overrides. Every problem surfaces as a
one-line :class:`~lmforge.errors.ConfigError` that names the dotted key, e.g.
``unknown config key 'train.lr' (did you mean 'train.learning_rate'?)``.

YAML values (in files and overrides) follow a YAML-1.2-like core schema: ``1e-4`` and ``3e5`` are floats, only
``true``/``false`` are booleans (``yes``/``no``/``on``/``off`` stay strings) and dates stay strings.
"""
from __future__ import annotations

import math
import re
import types
import typing
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic
import yaml
from pydantic import ConfigDict

from lmforge.errors import ConfigError, did_you_mean

__all__ = ["Section", "changed_fields", "aliases", "key_names", "find_field", "parse_overrides", "load_config", "describe", "format_help",
           "dump_config"]


class Section(pydantic.BaseModel):
    """Base class of every lmforge config section: unknown keys are errors and assignments are validated.

    No setting is inf or NaN (``.inf``, ``.nan`` and ``inf`` are YAML/pydantic floats): typed float fields refuse them
    (``allow_inf_nan=False``), and a validator on every field finds them inside free-form mappings and lists (such as
    ``model.config``). Field descriptions come from ``Field(description=...)`` or from a docstring right below the
    field.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True,
                              allow_inf_nan=False)
    # keys this section does not have but a related config does: key -> the fix, added to the unknown-key error
    elsewhere: ClassVar[dict[str, str]] = {}

    @pydantic.field_validator("*", mode="after")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        where = _nonfinite_at(value)
        if where is not None:
            key, bad = where
            raise ValueError(f"{key + ' ' if key else ''}must be a finite number, not {bad}")
        return value


def changed_fields(section: Section) -> list[str]:
    """Fields of `section` set to something other than their default (a dumped config sets every field, so being
    set is not enough): what makes a section of an unchosen method, optimizer or stage an error, not ignored."""
    return [k for k, f in type(section).model_fields.items()  # in declaration order, so errors name the same key
            if k in section.model_fields_set and getattr(section, k) != f.get_default(call_default_factory=True)]


def aliases(name: str, *others: str) -> pydantic.AliasChoices:
    """`Field(validation_alias=aliases("r", "rank", "lora_rank"))`: a key also accepted under the names users type
    (the field's own name first); `--help` lists them, configs are saved under the field's name."""
    return pydantic.AliasChoices(name, *others)


def key_names(name: str, field: pydantic.fields.FieldInfo) -> list[str]:
    """Every key that sets this field: its alias or name, then any `aliases(...)` choices."""
    names = [field.alias or name]
    if isinstance(field.validation_alias, pydantic.AliasChoices):
        names += [c for c in field.validation_alias.choices if isinstance(c, str) and c not in names]
    return names


def find_field(owner: type[pydantic.BaseModel], key: str) -> pydantic.fields.FieldInfo | None:
    """The field of `owner` that `key` sets (by name, alias or an `aliases(...)` choice), or None."""
    return next((f for n, f in owner.model_fields.items() if key == n or key in key_names(n, f)), None)


def _nonfinite_at(value: Any, key: str = "") -> tuple[str, float] | None:
    """``(dotted key inside value, the number)`` of the first inf/NaN float in a plain value, mapping or list."""
    if isinstance(value, float) and not math.isfinite(value):
        return key, value
    if isinstance(value, dict):
        items = ((f"{key}.{k}" if key else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{key}[{i}]", v) for i, v in enumerate(value))
    else:
        return None  # scalars, strings and nested Sections (which validate themselves)
    return next((found for k, v in items if (found := _nonfinite_at(v, k)) is not None), None)


# --------------------------------------------------------------------------------------------------- YAML parsing


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML-1.2-style floats (``1e-4``), strict booleans and no implicit dates."""


_DROP = {"tag:yaml.org,2002:float", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp"}
_Loader.yaml_implicit_resolvers = {
    ch: [r for r in rs if r[0] not in _DROP] for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _yaml_load(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error becomes a one-line ConfigError with ``source:line``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None


def _parse_value(text: str) -> Any:
    """Parse one override value with YAML rules, falling back to the raw string where YAML would surprise.

    ``a=b`` stays ``'a=b'``, ``x: y`` and ``#tag`` stay strings (a mapping needs ``{...}``), an empty value is ``''``.
    """
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506
    except yaml.YAMLError:
        return text
    if value is None and text.strip() not in ("null", "Null", "NULL", "~"):
        return text
    if isinstance(value, dict) and not text.lstrip().startswith("{"):
        return text
    return value


def _is_text_field(cls: type[Section] | None, parts: list[str]) -> bool:
    """Whether ``parts`` names a ``str`` / ``str | None`` field of ``cls`` (its value must stay the raw text)."""
    owner = _section_at(cls, tuple(parts[:-1])) if cls is not None else None
    field = find_field(owner, parts[-1]) if owner is not None else None
    return field is not None and field.annotation in (str, str | None, typing.Optional[str])


def parse_overrides(items: Iterable[str], cls: type[Section] | None = None) -> dict:
    """Turn ``["a.b.c=1", "x=[1,2]"]`` into ``{"a": {"b": {"c": 1}}, "x": [1, 2]}``; later items win.

    With ``cls``, values of text fields stay as typed (``prompt=0.10`` is the string ``'0.10'``, not a float).
    """
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.learning_rate=1e-4)")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = raw if _is_text_field(cls, parts) else _parse_value(raw)
    return out


# ------------------------------------------------------------------------------------------------------- loading


def _merge(low: dict, high: dict) -> dict:
    """Deep-merge ``high`` over ``low`` (new dict; nested mappings merge, anything else is replaced)."""
    out = dict(low)
    for k, v in high.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _lookup(data: dict, dotted: str) -> Any:
    """``data['a']['b']`` for ``'a.b'``; None where a level is missing."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _without(data: dict, dotted: str) -> dict:
    """A copy of ``data`` without the key at ``dotted``."""
    head, _, rest = dotted.partition(".")
    out = dict(data)
    if rest:
        out[head] = _without(out[head], rest)
    else:
        out.pop(head, None)
    return out


def _read_yaml(path: str | Path) -> dict:
    """Read a YAML config file whose top level must be a mapping (an empty file is ``{}``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}" if not p.exists() else f"config path is not a file: {p}")
    data = _yaml_load(p.read_text(encoding="utf-8"), str(p))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level of a config file must be a mapping of keys, got {type(data).__name__}")
    return data


def _sections(tp: Any) -> list[type[Section]]:
    """Section classes inside an annotation (``X``, ``X | None``, ``Optional[X]``)."""
    if isinstance(tp, type) and issubclass(tp, Section):
        return [tp]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [s for arg in typing.get_args(tp) for s in _sections(arg)]
    return []


def _section_at(cls: type[Section], loc: tuple) -> type[Section] | None:
    """The Section class that holds ``loc`` (walking nested sections, lists and dicts), or None if unknown."""
    tp: Any = cls
    for part in loc:
        secs = _sections(tp)
        origin = typing.get_origin(tp)
        if len(secs) == 1 and isinstance(part, str) and part in secs[0].model_fields:
            tp = secs[0].model_fields[part].annotation
        elif origin in (list, tuple, set, frozenset, dict) and typing.get_args(tp):
            tp = typing.get_args(tp)[-1]  # element type of list[X] / value type of dict[K, X]
        else:
            return None
    secs = _sections(tp)
    return secs[0] if len(secs) == 1 else None


def _suggest(name: str, choices: list[str]) -> str | None:
    """Closest choice by spelling, else by initials (``lr`` -> ``learning_rate``), else a unique prefix."""
    hint = did_you_mean(name, choices)
    if hint:
        return hint.split("'")[1]
    low = name.lower()
    by_initials = [c for c in choices if "_" in c and "".join(w[:1] for w in c.split("_") if w) == low]
    by_prefix = [c for c in choices if len(low) >= 2 and c.startswith(low)]
    for hits in (by_initials, by_prefix):
        if len(hits) == 1:
            return hits[0]
    return None


def _dotted(loc: Iterable[Any]) -> str:
    """``('layers', 0, 'dim')`` -> ``'layers[0].dim'``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_line(cls: type[Section], exc: pydantic.ValidationError) -> str:
    """One line for the first validation error (plus a count of the others)."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = tuple(err["loc"])
    key = _dotted(loc)
    if err["type"] == "extra_forbidden":
        owner = _section_at(cls, loc[:-1])
        choices = [k for n, f in owner.model_fields.items() for k in key_names(n, f)] if owner else []
        best = _suggest(str(loc[-1]), choices) if isinstance(loc[-1], str) else None
        prefix = _dotted(loc[:-1])
        line = f"unknown config key '{key}'"
        fix = getattr(owner, "elsewhere", {}).get(loc[-1]) if owner else None
        if fix:
            line += f": {fix}"
        elif best:
            line += f" (did you mean '{prefix + '.' if prefix else ''}{best}'?)"
    else:
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        line = f"config key '{key}': {msg}" if key else f"config: {msg}"
        if err["type"] != "missing" and "input" in err and not isinstance(err["input"], dict):  # not a section
            line += f" (got {_short(err['input'])})"
    if len(errors) > 1:
        line += f" [+{len(errors) - 1} more error{'s' if len(errors) > 2 else ''}]"
    return line


def load_config(
    cls: type[Section],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    base: dict | None = None,
) -> Section:
    """Build ``cls`` from ``base`` < YAML file at ``path`` < ``key=value`` overrides; raise a one-line ConfigError.

    A switch the overrides change (``cls.switches``: ``method``, ``stage``, ``optim.name``) takes the file's section
    of the value it replaces with it: ``examples/sft_lora.yaml method=full`` drops the file's ``lora:`` section (a
    warning says so) instead of refusing it as an option of another method."""
    layer = _read_yaml(path) if path is not None else {}
    high = parse_overrides(overrides, cls)
    for key, section_of in getattr(cls, "switches", {}).items():
        old, new = _lookup(layer, key), _lookup(high, key)
        section = section_of(old) if isinstance(old, str) and new is not None and new != old else None
        if section and _lookup(layer, section) is not None and _lookup(high, section) is None:
            layer = _without(layer, section)
            warnings.warn(f"{key}={new} replaces the config file's {key} '{old}': its '{section}' section is not "
                          "used", UserWarning, stacklevel=2)
    data = _merge(_merge(dict(base or {}), layer), high)
    try:
        return cls.model_validate(data)
    except pydantic.ValidationError as e:
        raise ConfigError(_error_line(cls, e)) from None


def dump_config(cfg: pydantic.BaseModel) -> str:
    """YAML text of a resolved config (JSON-compatible values), loadable again with :func:`load_config`."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------------------- help


def _type_name(tp: Any) -> str:
    """Readable type: ``int``, ``float | None``, ``'greedy' | 'sample'``, ``list[int]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _default_text(field: pydantic.fields.FieldInfo) -> str:
    """The default as a user would type it on the command line; ``(required)`` when there is none."""
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, pydantic.BaseModel):
        value = value.model_dump(mode="json")
    try:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    except yaml.YAMLError:
        return str(value)


def describe(cls: type[Section], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(dotted key, type, default, description)`` for every leaf field, recursing into nested sections."""
    rows: list[tuple[str, str, str, str]] = []
    for name, field in cls.model_fields.items():
        if name in getattr(cls, "derived", ()):  # set by the section itself (e.g. a method's inherited fields)
            continue
        key = f"{prefix}{field.alias or name}"
        secs = _sections(field.annotation)
        if len(secs) == 1:
            rows.extend(describe(secs[0], prefix=f"{key}."))
        else:
            desc = " ".join((field.description or "").split())
            if len(names := key_names(name, field)) > 1:
                desc = f"{desc} (also: {', '.join(names[1:])})".lstrip()
            rows.append((key, _type_name(field.annotation), _default_text(field), desc))
    return rows


def format_help(cls: type[Section]) -> str:
    """An aligned ``key  type  default  description`` table of :func:`describe` rows for ``--help``."""
    rows = [("key", "type", "default", "description"), *describe(cls)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len("description"))
    return "\n".join(line.rstrip() for line in lines)
