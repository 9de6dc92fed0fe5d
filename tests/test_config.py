"""Tests for lmforge.config: YAML + dotted overrides -> pydantic sections, with one-line errors."""
from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field

from lmforge.config import Section, describe, dump_config, format_help, load_config, parse_overrides
from lmforge.errors import ConfigError


class Optim(Section):
    learning_rate: float = 3e-4
    """Peak learning rate."""
    betas: list[float] = [0.9, 0.95]


class Train(Section):
    steps: int = 100
    optim: Optim = Field(default_factory=Optim)
    schedule: Literal["cosine", "linear"] = "cosine"


class Cfg(Section):
    model: str = Field(description="Checkpoint directory.")
    max_new_tokens: int = 64
    prompt: str = ""
    greedy: bool = False
    train: Train = Field(default_factory=Train)


def test_parse_overrides_nested_and_types():
    got = parse_overrides(
        ["a.b.c=3", "lr=1e-4", "x=3e5", "y=-2.5E-3", "t=true", "f=False", "n=null", "l=[1, 2]",
         "prompt=a=b", "s=hello world", "empty=", "word=no", "d={k: 1}", "colon=a: b"]
    )
    assert got["a"] == {"b": {"c": 3}}
    assert got["lr"] == 1e-4 and isinstance(got["lr"], float)
    assert got["x"] == 3e5 and isinstance(got["x"], float)
    assert got["y"] == -2.5e-3
    assert got["t"] is True and got["f"] is False and got["n"] is None
    assert got["l"] == [1, 2]
    assert got["prompt"] == "a=b"
    assert got["s"] == "hello world" and got["empty"] == "" and got["word"] == "no"
    assert got["d"] == {"k": 1} and got["colon"] == "a: b"


def test_parse_overrides_later_wins_and_bad_item():
    assert parse_overrides(["a=1", "a.b=2"]) == {"a": {"b": 2}}
    with pytest.raises(ConfigError, match="override 'oops' must look like key=value"):
        parse_overrides(["oops"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_overrides(["a..b=1"])


def test_overrides_reach_nested_sections():
    cfg = load_config(Cfg, overrides=["model=m", "train.optim.learning_rate=1e-4", "train.steps=5", "prompt=x=y"])
    assert cfg.train.optim.learning_rate == 1e-4 and cfg.train.steps == 5 and cfg.prompt == "x=y"
    assert cfg.train.optim.betas == [0.9, 0.95]  # untouched siblings keep defaults


def test_precedence_base_file_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: from_file\nmax_new_tokens: 10\ntrain:\n  optim:\n    learning_rate: 1e-3\n")
    cfg = load_config(Cfg, path, overrides=["max_new_tokens=20"], base={"model": "base", "greedy": True, "max_new_tokens": 1})
    assert (cfg.model, cfg.max_new_tokens, cfg.greedy) == ("from_file", 20, True)
    assert cfg.train.optim.learning_rate == 1e-3  # '1e-3' in the file is a float too


def test_unknown_keys_one_line_with_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, overrides=["model=m", "max_new_token=3"])
    assert str(e.value) == "unknown config key 'max_new_token' (did you mean 'max_new_tokens'?)"
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, overrides=["model=m", "train.optim.lr=3"])
    assert str(e.value) == "unknown config key 'train.optim.lr' (did you mean 'train.optim.learning_rate'?)"
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, overrides=["model=m", "train.zzz=3"])
    assert str(e.value) == "unknown config key 'train.zzz'"


def test_bad_types_name_the_key():
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, overrides=["model=m", "max_new_tokens=abc"])
    assert str(e.value) == "config key 'max_new_tokens': Input should be a valid integer, unable to parse string as an integer (got 'abc')"
    with pytest.raises(ConfigError, match=r"^config key 'model': Field required \[\+1 more error\]$"):
        load_config(Cfg, overrides=["train.steps=x"])
    with pytest.raises(ConfigError, match=r"config key 'train.optim.betas\[1\]'"):
        load_config(Cfg, overrides=["model=m", "train.optim.betas=[1, x]"])



class Free(Section):
    options: dict = {}
    rate: float | None = None


@pytest.mark.parametrize("override, message", [
    ("train.optim.learning_rate=inf", "config key 'train.optim.learning_rate': Input should be a finite number"),
    ("train.optim.learning_rate=.nan", "config key 'train.optim.learning_rate': Input should be a finite number"),
    ("train.optim.learning_rate=-.inf", "config key 'train.optim.learning_rate': Input should be a finite number"),
    ("train.optim.betas=[0.9, .inf]", "config key 'train.optim.betas[1]': Input should be a finite number"),
])
def test_non_finite_numbers_are_refused_naming_the_key(override, message):
    """Every float field of every section refuses inf and NaN (YAML .inf/.nan, or the strings inf/nan)."""
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, overrides=["model=m", override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"'options': a\.b\[1\] must be a finite number, not nan"):
        load_config(Free, overrides=["options={a: {b: [1.0, .nan]}}"])  # inside free-form mappings too
    with pytest.raises(ConfigError, match="'rate': Input should be a finite number"):
        load_config(Free, overrides=["rate=nan"])
    assert load_config(Free, overrides=["options={note: inf}", "rate=1e30"]).options == {"note": "inf"}  # a string

def test_literal_rejects_bad_choice():
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, overrides=["model=m", "train.schedule=step"])
    msg = str(e.value)
    assert "train.schedule" in msg and "'cosine'" in msg and "'linear'" in msg and "\n" not in msg


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ntrain: [1,\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML") as e:
        load_config(Cfg, bad)
    assert "\n" not in str(e.value)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Cfg, lst)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(Cfg, empty, overrides=["model=m"]).model == "m"


def test_validate_assignment():
    cfg = load_config(Cfg, overrides=["model=m"])
    with pytest.raises(Exception):
        cfg.max_new_tokens = "abc"


def test_describe_and_format_help():
    rows = {r[0]: r for r in describe(Cfg)}
    assert rows["model"] == ("model", "str", "(required)", "Checkpoint directory.")
    assert rows["max_new_tokens"][1:3] == ("int", "64")
    assert rows["train.optim.learning_rate"] == ("train.optim.learning_rate", "float", "0.0003", "Peak learning rate.")
    assert rows["train.optim.betas"][1:3] == ("list[float]", "[0.9, 0.95]")
    assert rows["train.schedule"][1:3] == ("'cosine' | 'linear'", "cosine")
    assert "train" not in rows and "train.optim" not in rows
    text = format_help(Cfg)
    lines = text.splitlines()
    assert lines[0].startswith("key") and "train.optim.learning_rate" in text
    col = lines[0].index("type")
    assert all(line[col - 2 : col] == "  " for line in lines)  # aligned columns


def test_dump_config_roundtrip(tmp_path):
    cfg = load_config(Cfg, overrides=["model=m", "train.optim.learning_rate=1e-5", "prompt=yes"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(Cfg, path) == cfg
