"""Import layering: the model is the bottom layer. Nothing under lmforge/models imports the trainer, alignment,
inference, serving, fine-tuning methods, the tokenizer or the CLI (those configure the model through its seams:
`prefix_kv`, `CheckpointPolicy`, `layer_masks` / `run_blocks`, the cache protocol). The areas' entry points (eval,
plan, rag, serve) parse their arguments with `lmforge.args`, not by importing the top-level CLI. Imports are read
with `ast`, function-level (lazy) ones included."""
from __future__ import annotations

import ast
from pathlib import Path

import lmforge

SRC = Path(lmforge.__file__).parent
ABOVE_MODELS = ("train", "align", "infer", "serve", "cli", "eval", "rag", "plan", "peft", "tokenizer")


def _imports(path: Path) -> set[str]:
    """lmforge modules `path` imports (relative imports resolved), at any depth (function-level ones too); for
    `from X import name`, X.name too (it may be a module: `from .. import cli`)."""
    package = path.relative_to(SRC.parent).with_suffix("").parts[:-1]  # ("lmforge", "models")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "lmforge" or m.startswith("lmforge.")}


def _violations(area: str, forbidden: tuple[str, ...]) -> list[str]:
    """'file imports module' for every import under lmforge/<area> of a package in `forbidden` (top-level names)."""
    return [f"{path.relative_to(SRC)} imports {m}" for path in sorted((SRC / area).rglob("*.py"))
            for m in sorted(_imports(path)) if m.split(".")[1:2] and m.split(".")[1] in forbidden]


def test_import_reader_resolves_relative_and_lazy_imports():
    assert "lmforge.errors" in _imports(SRC / "models" / "resize.py")
    assert "lmforge.args" in _imports(SRC / "eval" / "runner.py")  # a function-level `from ..args import`
    assert "lmforge.rag.cli" in _imports(SRC / "rag" / "__main__.py")  # `from .cli` is rag's own cli, not lmforge's


def test_models_import_nothing_above_them():
    bad = _violations("models", ABOVE_MODELS)
    assert not bad, bad


def test_areas_do_not_import_the_cli():
    bad = [v for area in ("eval", "plan", "rag", "serve") for v in _violations(area, ("cli",))]
    assert not bad, bad


def test_quant_does_not_import_peft():
    """peft's QLoRA builds on quant's NF4 linears; quant's own methods (QAT, BitNet) register through
    `lmforge.method`, the registry both build on, so the two packages do not import each other."""
    bad = _violations("quant", ("peft",))
    assert not bad, bad
