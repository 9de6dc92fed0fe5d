"""Every `lmforge ...` command line written in README.md and docs/*.md names a verb that exists and only keys its
config class knows: a renamed option or verb breaks this test, not the reader's first try.

Values and required keys are not checked (paths in the docs need not exist here, a config file may hold the rest):
only the verb and that no key is unknown to the verb's config class (pydantic's `extra_forbidden`).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pydantic
import pytest

from lmforge.cli import VERBS, split_args, train_config_class
from lmforge.config import parse_overrides

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^\s*(```|~~~)")


def _commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of every `lmforge ...` line inside a fenced block, continuations joined, comments cut."""
    out, in_block, pending, start = [], False, "", 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if _FENCE.match(line):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        if pending:
            line, pending = pending + " " + line.strip(), ""
        if line.rstrip().endswith("\\"):
            pending, start = line.rstrip()[:-1], start or n
            continue
        for part in re.split(r"&&|\|\||;", line.split(" #")[0]):
            part = part.strip().removeprefix("$ ").removesuffix("&").strip()
            if part.startswith("lmforge "):
                out.append((start or n, part))
        start = 0
    return out


def _args(command: str) -> list[str] | None:
    try:
        words = shlex.split(command, comments=True)
    except ValueError:  # an unbalanced quote inside a comment or an example string: not a command to check
        return None
    if any(("<" in w and ">" in w) or "..." in w or w in ("[key=value", "[key=value]") for w in words):
        return None  # a usage pattern (`lmforge <verb> ...`), not a runnable line
    return words[1:]


CASES = [(f"{p.relative_to(ROOT)}:{n}", c) for p in FILES for n, c in _commands(p)]


def test_the_docs_have_commands_to_check():
    assert len(CASES) > 40  # README + docs: if the extraction breaks, this says so instead of passing empty


@pytest.mark.parametrize("where,command", CASES, ids=[w for w, _ in CASES])
def test_every_documented_command_names_a_verb_and_keys_that_exist(where, command):
    args = _args(command)
    if not args or args[0] in ("-h", "--help", "--version"):
        return
    verb, rest = args[0], [a for a in args[1:] if a != "--debug"]
    if verb == "rag":
        from lmforge.rag.cli import SUBVERBS

        assert rest and rest[0] in SUBVERBS, f"{where}: `lmforge rag {rest[:1]}`: unknown rag command"
        cls, _, positional, _ = SUBVERBS[rest[0]]
        rest = rest[1:]
    else:
        assert verb in VERBS, f"{where}: unknown verb {verb!r} in `{command}`"
        cls, _, positional, _ = VERBS[verb]
        cls = cls if isinstance(cls, type) else cls()
    if "-h" in rest or "--help" in rest:
        return
    config, overrides = split_args(rest, positional, cls)
    if verb == "train":  # the stage may come from the config file (examples/ are in the repo)
        cls = train_config_class(str(ROOT / config) if config and (ROOT / config).is_file() else None, overrides)
    try:
        cls.model_validate(parse_overrides(overrides, cls))
    except pydantic.ValidationError as e:
        unknown = [".".join(map(str, err["loc"])) for err in e.errors() if err["type"] == "extra_forbidden"]
        assert not unknown, f"{where}: unknown config key(s) {unknown} in `{command}`"
