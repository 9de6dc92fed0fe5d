"""Agent tools: a calculator, Python in a sandboxed subprocess, file reading inside one folder, and retrieval.

A tool is a name, a description the model reads, a JSON schema of its arguments (what OpenAI `tools` sends), and a
function of those arguments returning text. A tool that fails raises `ToolError`; the agent shows the message to
the model as the observation, so it can correct itself.
"""
from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class ToolError(Exception):
    """A tool could not do what was asked; the message goes back to the model."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable[..., str]
    main_arg: str = "input"  # the argument a ReAct "Action Input:" line fills when it is not a JSON object

    def __call__(self, **kwargs) -> str:
        return str(self.fn(**kwargs))

    def openai_schema(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def _one_string(name: str, what: str) -> dict:
    return {"type": "object", "properties": {name: {"type": "string", "description": what}}, "required": [name]}


# ----------------------------------------------------------------------------------------------- calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "log": math.log,
              "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan,
              "floor": math.floor, "ceil": math.ceil}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def calculate(expression: str) -> str:
    """Evaluate arithmetic safely (numbers, + - * / // % **, parentheses, a few math functions); no names,
    attributes or calls beyond those, and no exponent that would make a huge number."""
    expr = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/").rstrip("=").strip()
    expr = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expr)  # thousands separators: 1,234 -> 1234
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 1000:
                raise ToolError("exponent too large (limit 1000)")
            try:
                return _BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
                and not node.keywords):
            try:
                return _FUNCTIONS[node.func.id](*(ev(a) for a in node.args))
            except (ValueError, TypeError) as e:
                raise ToolError(f"{node.func.id}: {e}") from None
        raise ToolError(f"unsupported in a calculation: {ast.unparse(node)!r}; use numbers, + - * / // % ** and "
                        f"{', '.join(_FUNCTIONS)}")

    value = ev(tree)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(round(value, 10) if isinstance(value, float) else value)


def calculator() -> Tool:
    return Tool("calculator", "Evaluates an arithmetic expression, e.g. (17 + 25) * 3 or sqrt(2) / 4.",
                _one_string("expression", "the arithmetic expression"), calculate, "expression")


# ----------------------------------------------------------------------------------------------- python

def python_sandbox(timeout: float = 10.0, memory_mb: int = 512) -> Tool:
    """Runs code in `lmforge.eval.sandbox` (separate process, resource limits, no network, a wall-clock timeout);
    the observation is what the program printed."""
    from ..eval.sandbox import run_program

    def run(code: str) -> str:
        code = code.strip().removeprefix("```python").removeprefix("```").removesuffix("```")
        res = run_program(code, timeout=timeout, memory_mb=memory_mb)
        if res.status == "timeout":
            raise ToolError(f"the program ran past the {timeout:g} s limit and was stopped")
        if not res.passed:
            last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit status {res.returncode}"
            raise ToolError(f"the program failed: {last}")
        return res.stdout.strip()[-2000:] or "(the program printed nothing; print() the result)"

    return Tool("python", "Runs a Python program in a sandbox and returns what it prints (use print()).",
                _one_string("code", "a complete Python program"), run, "code")


# ----------------------------------------------------------------------------------------------- files

def file_reader(root: str | Path, max_chars: int = 8000) -> Tool:
    """Reads text files under `root` only (paths are resolved, links included, before the check)."""
    base = Path(root).resolve()

    def read(path: str) -> str:
        target = (base / path.strip().strip("'\"")).resolve()
        if not target.is_relative_to(base):
            raise ToolError(f"{path}: outside the allowed folder; give a path inside it")
        if not target.is_file():
            listing = ", ".join(sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())[:30])
            raise ToolError(f"{path}: no such file; files: {listing or '(none)'}")
        text = target.read_text(encoding="utf-8", errors="replace")
        return text if len(text) <= max_chars else text[:max_chars] + f"\n[... {len(text) - max_chars} more chars]"

    return Tool("read_file", "Reads a text file from the allowed folder, given its relative path.",
                _one_string("path", "a path relative to the allowed folder"), read, "path")


# ----------------------------------------------------------------------------------------------- retrieval

def retrieval_tool(retriever, k: int = 3) -> Tool:
    """Searches the indexed documents; returns the best chunks with their sources."""

    def search(query: str) -> str:
        hits = retriever.search(query, k)
        if not hits:
            return "no relevant passages found"
        return "\n\n".join(f"[{h.citation}] {h.text}" for h in hits)

    return Tool("search_docs", "Searches the indexed documents and returns the most relevant passages.",
                _one_string("query", "what to look for"), search, "query")
