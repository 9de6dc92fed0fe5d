"""Command-line arguments of every verb: `split_args` turns `--config F`, `--key v`, `--key=v`, `key=v` and bare
arguments into a config path plus dotted overrides for `lmforge.config.load_config`, and `report_errors` runs a
verb's body so that a user error is one line on stderr and exit status 2.

It lives next to the config code, not in `lmforge.cli`, so the entry points of the areas (eval, plan, rag, serve)
parse their arguments the same way without importing the top-level CLI.
"""
from __future__ import annotations

import json
import re
import sys

from .errors import ConfigError, LmforgeError

__all__ = ["split_args", "report_errors"]

_OVERRIDE = re.compile(r"[A-Za-z_][\w.-]*=")  # the start of a `key=value` override


def _flag_field(cls: type | None, key: str):
    """The pydantic field a `--key` names in config class `cls` (dotted keys walk nested sections), or None."""
    if cls is None:
        return None
    from .config import _section_at, find_field

    *head, last = key.split(".")
    owner = _section_at(cls, tuple(head))
    return None if owner is None else find_field(owner, last)


def _takes_value(cls: type | None, key: str, following: str) -> bool:
    """Whether `--key` takes the argument after it as its value. A boolean field is a bare flag unless `true` or
    `false` follows (`--ui rag_store=X`: ui=true, then an override); another field always takes it; a key `cls`
    does not know takes it unless it looks like a `key=value` override."""
    field = _flag_field(cls, key)
    if field is not None:
        is_bool = field.annotation in (bool, bool | None)
        return not is_bool or following.lower() in ("true", "false")
    return not _OVERRIDE.match(following)


def split_args(args: list[str], positional: str | tuple[str, str] = "model",
               cls: type | None = None) -> tuple[str | None, list[str]]:
    """(config path, ["key=value", ...]) from `--config F`, `--key v`, `--key=v`, `key=v` and bare arguments: the
    first bare one is the verb's positional key (the model for most verbs, the config file for `train`); with a pair
    such as ("model", "tasks") the rest of the bare arguments form the list key (`lmforge eval MODEL T1 T2`).
    `cls`, the verb's config class, tells which `--key`s are booleans: those never take a following override as
    their value."""
    config, overrides = None, []
    rest_key = None
    if isinstance(positional, tuple):
        positional, rest_key = positional
    rest: list[str] = []
    seen_positional = False
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-c", "--config"):
            if i + 1 >= len(args):
                raise ConfigError(f"{a} needs a file path")
            config, i = args[i + 1], i + 2
            continue
        if a.startswith("--"):
            key, eq, value = a[2:].partition("=")
            key = key.replace("-", "_")
            if not eq:
                following = args[i + 1] if i + 1 < len(args) else None
                if following is not None and not following.startswith("--") and _takes_value(cls, key, following):
                    value, i = following, i + 1
                else:
                    value = "true"  # a bare flag
            overrides.append(f"{key}={value}")
        elif _OVERRIDE.match(a):
            key, _, value = a.partition("=")
            overrides.append(f"{key.replace('-', '_')}={value}")
        elif not seen_positional and positional == "config":
            config, seen_positional = a, True
        elif not seen_positional:
            overrides.append(f"{positional}={a}")
            seen_positional = True
        elif rest_key is not None:
            rest.append(a)
        else:
            raise ConfigError(f"unexpected argument '{a}'; write overrides as key=value or --key value")
        i += 1
    if rest:
        overrides.append(f"{rest_key}=[{', '.join(json.dumps(r) for r in rest)}]")
    return config, overrides


def report_errors(label: str, body, debug: bool) -> int:
    """Run a verb's body and return the exit status: an LmforgeError becomes one line on stderr and status 2 (the
    traceback with --debug), Ctrl-C status 130."""
    try:
        body()
    except LmforgeError as e:
        if debug:
            raise
        print(f"{label}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
