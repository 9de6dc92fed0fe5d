"""Render Jinja chat templates exactly the way ``transformers``' ``apply_chat_template`` does.

Chat templates shipped with checkpoints are written against the Jinja environment that transformers builds in
``transformers/utils/chat_template_utils.py``; any difference (whitespace handling, ``tojson`` escaping, the
``None``-valued keys transformers drops from messages) changes the prompt and therefore the model's output. So this
module mirrors that environment and input preparation, and the tests compare the output byte for byte.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import LmforgeError

# Message keys under which a model's reasoning may arrive; templates read the first one, gpt-oss reads "thinking".
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(LmforgeError, jinja2.exceptions.TemplateError):
    """A chat template rejected its input (``raise_exception``) or is not valid Jinja.

    It is both an ``LmforgeError`` (so the CLI prints one line) and a ``jinja2.TemplateError`` (the type transformers
    raises), so code written against either keeps working.
    """

    def __init__(self, message: str):
        LmforgeError.__init__(self, message)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers uses it to mark assistant tokens; we render the body.

    Without it, templates that carry the tag (some SFT-ready templates do) would not even parse.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed attributes, as transformers' sandbox does."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r} on a namespace")


class _TemplateDict:
    """``dict(...)`` for templates without exposing the ``dict`` type itself (transformers does the same)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise ChatTemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes (<, >, &, ') and sorts keys; chat templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=64)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile ``template`` once (cached by its text) in a sandbox configured like transformers'."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template is not valid Jinja (line {e.lineno}: {e.message}); fix the template") from e


def _plain(value: Any) -> Any:
    """Rebuild ``value`` from plain JSON types, as transformers does before rendering.

    Dataclasses and pydantic models become dicts; str/int/float subclasses lose their extra methods; anything else
    (tensors, images) becomes an inert ``"<TypeName>"`` placeholder, which templates only test for presence.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.generic):  # np.bool_(False) must stay falsy
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Sequence[Any]) -> list[dict]:
    """Copy messages the way transformers does: drop ``None`` values, plain types, alias reasoning fields."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or len(messages) == 0:
        raise LmforgeError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        message = _plain(message)
        if not isinstance(message, dict):
            raise LmforgeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat_template(
    template: str,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[dict] | None = None,
    documents: Sequence[dict] | None = None,
    **special_tokens_and_kwargs: Any,
) -> str:
    """Render one conversation with a Jinja chat template; byte-identical to ``apply_chat_template(tokenize=False)``.

    ``special_tokens_and_kwargs`` become template variables: pass ``bos_token``/``eos_token``/... (transformers passes
    the tokenizer's named special tokens) and any template options (``enable_thinking=False``, ``date_string=...``).
    ``tools`` must be JSON-schema dicts (transformers also accepts Python functions and converts them; we do not).
    """
    if tools is not None:
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise LmforgeError(f"tools[{i}] must be a JSON-schema dict, got {type(tool).__name__}")
    if documents is not None:
        for i, doc in enumerate(documents):
            if not isinstance(doc, dict):
                raise LmforgeError(f"documents[{i}] must be a dict with 'title' and 'text', got {type(doc).__name__}")
    return compile_chat_template(template).render(
        messages=_prepare_messages(messages),
        tools=_plain(list(tools)) if tools is not None else None,
        documents=_plain(documents),
        add_generation_prompt=add_generation_prompt,
        **_plain(special_tokens_and_kwargs),
    )
