"""Directories written all at once: a run killed at any instant leaves the previous directory or the complete new
one, never a model without its config or tokenizer. Checkpoints, a run's `final/`, exports, quantized models and
resized checkpoints are all written through :func:`atomic_dir`."""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError

__all__ = ["atomic_dir", "atomic_write", "check_replaceable", "MODEL_FILES"]

MODEL_FILES = ("config.json", "adapter_config.json", "model.gguf")  # a model lmforge may replace


def check_replaceable(path: Path, models_only: bool = True) -> None:
    """Raise a one-line ConfigError unless ``path`` may become a directory written by :func:`atomic_dir`: it must not
    be a file, and with ``models_only`` an existing non-empty directory must be a model lmforge wrote (one of
    ``MODEL_FILES``), never a folder of the user's files. Call it before slow work to fail fast."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path {path} is a file, not a directory: choose another path")
    if models_only and path.is_dir() and any(path.iterdir()) and not any((path / f).is_file() for f in MODEL_FILES):
        raise ConfigError(f"output directory {path} exists and is not a model directory (no "
                          f"{' / '.join(MODEL_FILES)}): choose a new path (lmforge replaces only a model there)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_like_other_files(path: Path) -> None:
    """Give a written file the permissions `open()` would (0644 under the usual umask): safetensors writes its
    files 0600, which would leave model.safetensors unreadable to the group and others beside a 0644 config.json."""
    os.chmod(path, 0o666 & ~_umask())


def atomic_write(path: Path, write) -> None:
    """Write one file through a temporary file and a rename (`write(tmp)` fills it), so a crash never leaves half
    a file behind; the file gets the permissions of any other file the user creates."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    share_like_other_files(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, replace_only_models: bool = False) -> Iterator[Path]:
    """Write a directory all at once: yields ``<path>.tmp`` to fill, and only when the block ends without an error
    are its files made durable and the directory renamed to ``path`` (replacing an existing one). A run killed at any
    instant leaves the previous ``path`` or the new one, never a half-written directory (a kill between the two
    renames of a replacement leaves both complete, as ``<path>.old`` and ``<path>.tmp``).

    ``replace_only_models``: for paths the user names (export, quantize), refuse up front to replace an existing
    non-empty directory that is not a model (none of ``MODEL_FILES``) rather than delete its files.
    """
    path = Path(path)
    check_replaceable(path, models_only=replace_only_models)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for root, _, files in os.walk(tmp):  # make the bytes durable before the rename publishes them
        for f in files:
            share_like_other_files(Path(root) / f)
            _fsync(Path(root) / f)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent)  # the renames themselves
    shutil.rmtree(old, ignore_errors=True)
