"""Import layering: the model is the bottom layer. Nothing under lmforge/models imports the trainer, alignment,
inference, serving or the CLI (those configure the model through its seams: `prefix_kv`, `CheckpointPolicy`,
`layer_masks` / `run_blocks`, the cache protocol)."""
from __future__ import annotations

import ast
from pathlib import Path

import lmforge

SRC = Path(lmforge.__file__).parent
ABOVE_MODELS = ("train", "align", "infer", "serve", "cli", "eval", "rag", "plan")


def _imports(path: Path) -> set[str]:
    """lmforge modules `path` imports (relative imports resolved), at any depth (function-level ones too)."""
    package = path.relative_to(SRC.parent).with_suffix("").parts[:-1]  # ("lmforge", "models")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            found.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "lmforge" or m.startswith("lmforge.")}


def test_models_import_nothing_above_them():
    bad = [f"{path.relative_to(SRC)} imports {m}" for path in sorted((SRC / "models").rglob("*.py"))
           for m in sorted(_imports(path)) if m.split(".")[1:2] and m.split(".")[1] in ABOVE_MODELS]
    assert not bad, bad
