"""Model arguments as people write them: a directory, a `.gguf` file, or a Hugging Face id.

    resolve_model("./ckpt")                               # a local path: returned as is
    resolve_model("Qwen/Qwen2.5-0.5B-Instruct")           # the snapshot folder in the Hugging Face cache
    resolve_model("org/repo-GGUF/model-Q4_K_M.gguf")      # one file of a repository
    resolve_model("Qwen/Qwen2.5-0.5B-Instruct", revision="v1.0")

Ids go through `huggingface_hub` and its cache (`HF_HOME` / `HF_HUB_CACHE`), so a model downloaded once, by lmforge,
transformers or `hf download`, is found again without the network. With `HF_HUB_OFFLINE=1` only the cache is read.
Only the files lmforge loads are fetched (config, safetensors, tokenizer, chat template), never `.bin` or `.pt`
duplicates. Every verb's model loading calls `resolve_model` first; a path that exists always wins over an id.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ConfigError

__all__ = ["resolve_model", "is_hub_id", "HUB_FILES"]

# what lmforge reads from a checkpoint repository (weights, config, tokenizer, generation defaults, chat template)
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as the Hub allows them
# names that end like this are files, not repositories (`ckpt/model.gguf` is a path; `org/repo/model.gguf` an id)
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json")


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as `org/name` or `org/name/file.gguf` (and is not a path that exists): never an explicit
    path (`./x`, `/x`, `~/x`) or a two-part name ending like a file (`ckpt/model.gguf`)."""
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return False
    parts = name.split("/")
    if len(parts) == 2:
        return _ID.fullmatch(name) is not None and not name.lower().endswith(_FILE_SUFFIXES)
    return _ID.fullmatch("/".join(parts[:2])) is not None and name.endswith(".gguf")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str | None:
    """The cache to read, from the environment at call time (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def resolve_model(name: str | Path, revision: str | None = None, *, marker: str = "config.json") -> Path:
    """The local path of model argument `name`: itself when it is a path that exists, else the Hugging Face cache's
    snapshot of the id at `revision` (a branch, tag or commit; default main), downloading what is missing unless
    HF_HUB_OFFLINE is set. `marker` is the file a snapshot must have (adapter_config.json for adapters). A name that
    is neither (a mistyped path: `./ckpt`, `model.gguf`) is never looked up on the Hub. Failures are one-line
    ConfigErrors."""
    name = str(name)
    if not is_hub_id(name):
        path = Path(name).expanduser()
        if path.exists():
            return path
        if revision is not None:
            raise ConfigError(f"revision={revision!r} needs a Hugging Face id (org/name) as the model, got '{name}'")
        if marker == "adapter_config.json":
            raise ConfigError(f"no such file or directory: '{name}', name an adapter directory or a hub id like "
                              "org/name")
        # (the loader's old wording stays for directories: it is what scripts and tests match)
        looked = "" if name.lower().endswith(".gguf") else f" (no config.json in '{name}')"
        raise ConfigError(f"no such file or directory: '{name}'{looked}, name a checkpoint directory, a .gguf file "
                          "or a hub id like org/name")
    try:
        import huggingface_hub as hub
        from huggingface_hub import errors
    except ImportError:  # a dependency; only a broken install lacks it
        raise ConfigError(f"'{name}' is a Hugging Face id but huggingface_hub is not installed: "
                          "pip install huggingface_hub") from None
    repo, _, file = name.partition("/")[2].partition("/")
    repo = f"{name.split('/')[0]}/{repo}"
    offline, cache = _offline(), _cache_dir()
    at = f"@{revision}" if revision else ""
    what = "adapter" if marker == "adapter_config.json" else "model"
    try:
        if file:
            return Path(hub.hf_hub_download(repo, file, revision=revision, cache_dir=cache, local_files_only=offline))
        path = Path(hub.snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=offline,
                                          allow_patterns=HUB_FILES))
    except errors.RevisionNotFoundError:
        raise ConfigError(f"{what} '{name}': the Hugging Face repository has no revision '{revision}'; give a "
                          "branch, tag or commit it has") from None
    except errors.GatedRepoError:
        raise ConfigError(f"{what} '{name}' is gated on the Hugging Face Hub: accept its licence on the model page, "
                          "then log in (`hf auth login` or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise ConfigError(f"{what} '{name}' is neither a local path nor a Hugging Face repository (check the id; "
                          "private repositories need `hf auth login` or HF_TOKEN)") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError) as e:
        where = cache or "the default Hugging Face cache"
        if offline:
            get = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
            raise ConfigError(f"{what} '{name}{at}' is not a local path and not in {where}, and HF_HUB_OFFLINE is set: "
                              f"download it once online (`{get}`), or give a local directory") from None
        raise ConfigError(f"{what} '{name}{at}' is not a local path, not in {where}, and the Hugging Face Hub cannot "
                          f"be reached ({type(e).__name__}); check the path or the network") from None
    except errors.EntryNotFoundError:  # (after LocalEntryNotFoundError, its subclass)
        raise ConfigError(f"{what} '{name}': the repository has no file '{file}'") from None
    if not (path / marker).is_file():
        hint = f"; for a GGUF repository name one file: {repo}/FILE.gguf" if marker == "config.json" else ""
        raise ConfigError(f"'{name}{at}': the Hugging Face repository has no {marker}{hint}")
    return path
