"""Constrained decoding to one JSON object (OpenAI's `response_format: {"type": "json_object"}`).

A character-level pushdown automaton tracks where the output is in the JSON grammar; a token is allowed when its
text keeps the output a valid JSON prefix *and* the shortest completion from there still fits in the tokens left
(one character per token at worst), so the output always parses, even when max_tokens cuts it short. When the
object closes, the request stops. The model's own choice is kept whenever it is allowed (usually), so the cost is
a text check per step; only a rejected token triggers a search through the ranked or re-drawn alternatives.
"""
from __future__ import annotations

import torch

_WS = " \t\n\r"
_DIGITS = "0123456789"
_HEX = "0123456789abcdefABCDEF"
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}

# A state is (mode, stack, aux): mode names the grammar position, stack holds the open containers ('{' / '['),
# aux is mode data (string: is-key flag; number: sub-state; literal: remaining chars; \u: hex digits left).
State = tuple


def feed(state: State, ch: str) -> State | None:
    """The state after one more character, or None if the character cannot come next."""
    mode, stack, aux = state
    if mode == "str":
        if ch == '"':
            return ("colon", stack, None) if aux else _after(stack)
        if ch == "\\":
            return ("esc", stack, aux)
        return None if ord(ch) < 0x20 else state
    if mode == "esc":
        if ch == "u":
            return ("uni", stack, (aux, 4))
        return ("str", stack, aux) if ch in '"\\/bfnrt' else None
    if mode == "uni":
        if ch not in _HEX:
            return None
        key, left = aux
        return ("uni", stack, (key, left - 1)) if left > 1 else ("str", stack, key)
    if mode == "num":
        nxt = _number(aux, ch)
        if nxt is not None:
            return ("num", stack, nxt)
        return feed(_after(stack), ch) if aux in ("0", "int", "frac", "exp") else None
    if mode == "lit":
        if ch != aux[0]:
            return None
        return ("lit", stack, aux[1:]) if len(aux) > 1 else _after(stack)
    if ch in _WS:  # whitespace between tokens; the object itself starts the output
        return None if mode in ("done", "start") else state
    if mode == "start":
        return ("obj_first", "{", None) if ch == "{" else None
    if mode == "obj_first" and ch == "}" or mode == "after" and ch in "}]":
        want = "{" if ch == "}" else "["
        return _after(stack[:-1]) if stack and stack[-1] == want else None
    if mode in ("obj_first", "key"):
        return ("str", stack, True) if ch == '"' else None
    if mode == "colon":
        return ("value", stack, None) if ch == ":" else None
    if mode == "after":
        if ch != ",":
            return None
        return ("key", stack, None) if stack[-1] == "{" else ("value", stack, None)
    if mode == "arr_first" and ch == "]":
        return _after(stack[:-1])
    if mode in ("value", "arr_first"):
        return _value_start(stack, ch)
    return None


def _after(stack: str) -> State:
    return ("after", stack, None) if stack else ("done", "", None)


def _value_start(stack: str, ch: str) -> State | None:
    if ch == "{":
        return ("obj_first", stack + "{", None)
    if ch == "[":
        return ("arr_first", stack + "[", None)
    if ch == '"':
        return ("str", stack, False)
    if ch == "-":
        return ("num", stack, "-")
    if ch in _DIGITS:
        return ("num", stack, "0" if ch == "0" else "int")
    if ch in _LITERALS:
        return ("lit", stack, _LITERALS[ch])
    return None


def _number(sub: str, ch: str) -> str | None:
    """Number sub-states: - 0 int . frac e esign exp (RFC 8259 grammar); None when ch does not extend it."""
    if sub == "-":
        return "0" if ch == "0" else "int" if ch in _DIGITS else None
    if sub in ("0", "int"):
        if ch in _DIGITS:
            return None if sub == "0" else "int"
        return "." if ch == "." else "e" if ch in "eE" else None
    if sub in (".", "frac"):
        return "frac" if ch in _DIGITS else ("e" if sub == "frac" and ch in "eE" else None)
    if sub in ("e", "esign"):
        return "exp" if ch in _DIGITS else ("esign" if sub == "e" and ch in "+-" else None)
    if sub == "exp":
        return "exp" if ch in _DIGITS else None
    return None


def _closing_char(state: State) -> str:
    """The next character of a shortest completion."""
    mode, stack, aux = state
    if mode == "str":
        return '"'
    if mode == "esc":
        return "n"
    if mode == "uni":
        return "0"
    if mode == "num":
        return "0" if aux in ("-", ".", "e", "esign") else "}" if stack[-1] == "{" else "]"
    if mode == "lit":
        return aux[0]
    if mode == "start":
        return "{"
    if mode == "obj_first" or mode == "after":
        return "}" if stack[-1] == "{" else "]"
    if mode == "arr_first":
        return "]"
    if mode == "key":
        return '"'
    if mode == "colon":
        return ":"
    return "0"  # value


def closing(state: State) -> str:
    """A shortest text that completes the JSON object from `state`."""
    out = []
    while state[0] != "done":
        ch = _closing_char(state)
        out.append(ch)
        state = feed(state, ch)
    return "".join(out)


def advance(state: State, text: str) -> State | None:
    for ch in text:
        state = feed(state, ch)
        if state is None:
            return None
    return state


START: State = ("start", "", None)


class JsonObjectConstraint:
    """Tracks one request's output; `pick` returns an allowed token (the model's when it is allowed)."""

    def __init__(self, token_texts: list[str], max_tokens: int):
        self.texts = token_texts  # decoded text of every token id ("" for special tokens: never allowed)
        self.state, self.left = START, max_tokens

    @property
    def done(self) -> bool:
        return self.state[0] == "done"

    def next_state(self, token: int) -> State | None:
        """The state after `token` if it is allowed now, else None."""
        text = self.texts[token] if 0 <= token < len(self.texts) else ""
        if not text or "\ufffd" in text:
            return None
        state = advance(self.state, text)
        if state is None or len(closing(state)) > self.left - 1:
            return None
        return state

    def accept(self, token: int) -> None:
        state = self.next_state(token)
        if state is None:
            raise ValueError(f"token {token} ({self.texts[token]!r}) is not allowed here")
        self.state, self.left = state, self.left - 1

    def pick(self, scores: torch.Tensor, greedy: bool, generator: torch.Generator | None, token: int) -> int:
        """An allowed token: `token` itself if allowed; else the best-scored (greedy) or a re-drawn one from the
        probabilities `scores` (V,) restricted to allowed tokens."""
        if self.next_state(token) is not None:
            return token
        scores = scores.float().cpu()
        if not greedy:  # (NaN, inf or negative entries are given no mass: multinomial refuses them)
            probs = torch.where(scores.isfinite() & (scores > 0), scores, 0.0)
            probs[token] = 0
            for _ in range(16):  # rejection sampling = sampling from the allowed set
                if not probs.sum() > 0:
                    break
                t = int(torch.multinomial(probs, 1, generator=_cpu(generator)))
                if self.next_state(t) is not None:
                    return t
                probs[t] = 0
        for t in scores.argsort(descending=True).tolist():  # ranked scan: exact for greedy
            if self.next_state(t) is not None:
                return t
        raise RuntimeError("no token can continue the JSON object")  # unreachable with single-character tokens


def _cpu(generator: torch.Generator | None) -> torch.Generator | None:
    return generator if generator is None or generator.device.type == "cpu" else None
