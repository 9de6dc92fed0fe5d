"""Prompt templates with named `{variables}` (str.format syntax; `{{` for a literal brace).

    qa = PromptTemplate("Context:\n{context}\n\nQuestion: {question}")
    qa.variables            # ['context', 'question']
    qa.format(context=..., question=...)
    ChatPromptTemplate([("system", "You are {persona}."), ("user", "{question}")]).format(persona=..., question=...)
"""
from __future__ import annotations

import string
from collections.abc import Sequence

from ..errors import ConfigError


class PromptTemplate:
    def __init__(self, template: str, **partials: str):
        self.template, self.partials = template, partials
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as e:
            raise ConfigError(f"prompt template: {e} (write {{{{ and }}}} for literal braces)") from None
        if any(not f.isidentifier() for f in fields):
            bad = next(f for f in fields if not f.isidentifier())
            raise ConfigError(f"prompt template: '{{{bad}}}' is not a variable name; use {{name}} "
                              "(and {{ }} for literal braces)")
        self.variables = list(dict.fromkeys(fields))

    def format(self, **values) -> str:
        values = {**self.partials, **values}
        missing = [v for v in self.variables if v not in values]
        if missing:
            raise ConfigError(f"prompt template needs {', '.join(repr(m) for m in missing)} "
                              f"(its variables: {', '.join(self.variables)})")
        return self.template.format(**{k: values[k] for k in self.variables})

    def partial(self, **values) -> PromptTemplate:
        """The same template with some variables filled in."""
        return PromptTemplate(self.template, **{**self.partials, **values})


class ChatPromptTemplate:
    """A list of (role, template) turns formatted into chat messages."""

    def __init__(self, turns: Sequence[tuple[str, str]]):
        self.turns = [(role, PromptTemplate(text)) for role, text in turns]
        self.variables = list(dict.fromkeys(v for _, t in self.turns for v in t.variables))

    def format(self, **values) -> list[dict]:
        return [{"role": role, "content": t.format(**values)} for role, t in self.turns]
