"""``Tokenizer``: a Hugging Face ``tokenizers`` backend plus the checkpoint metadata that transformers layers on top.

A checkpoint's tokenizer is more than ``tokenizer.json``: the special-token names, extra added tokens and the chat
template live in ``tokenizer_config.json`` (or the legacy ``special_tokens_map.json``, or ``chat_template.jinja``).
``Tokenizer.from_dir`` reads them with the same precedence rules as transformers 5, so encoding, decoding and chat
prompts match ``AutoTokenizer`` without importing transformers.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from lmforge.errors import CheckpointError, ConfigError
from lmforge.tokenizer.chat import render_chat_template
from lmforge.tokenizer.templates import BUILTIN_TEMPLATES, get_template

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_str(value: Any) -> str | None:
    """A special token from a config: a plain string, an AddedToken dict (``{"content": ...}``) or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e}); fix or remove the file") from e


def _is_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get back only the newly completed text.

    Decoding token by token is wrong for byte-level BPE (a CJK character or emoji spans several tokens) and for
    SentencePiece (leading-space handling depends on the neighbours). Both implementations decode a small window
    and only emit text once it no longer ends in a partial UTF-8 sequence ("\\ufffd"), so the concatenated pieces
    equal ``decode(all_ids)``. ``tokenizers.decoders.DecodeStream`` is used when available; the fallback is the
    prefix/read-offset scheme of text-generation-inference.
    """

    def __init__(self, backend: tokenizers.Tokenizer, skip_special_tokens: bool = True, native: bool | None = None):
        self._backend = backend
        self._skip = skip_special_tokens
        use_native = DecodeStream is not None if native is None else native
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens) if use_native else None
        self._ids: list[int] = []
        self._prefix = self._read = 0

    def step(self, token_id: int) -> str:
        """Add one token id; return the text it completes, or "" while a character is still incomplete."""
        if self._stream is not None:
            return self._stream.step(self._backend, int(token_id)) or ""
        self._ids.append(int(token_id))
        prefix = self._backend.decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        text = self._backend.decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prefix):]
        return ""


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with named special tokens, stop ids and a chat template.

    ``chat_template`` is a Jinja string, the name of a built-in template (see ``BUILTIN_TEMPLATES``), or a dict of
    named Jinja templates as some checkpoints ship (``"default"`` is used, ``"tool_use"`` when tools are passed).
    Named special tokens missing from the backend vocabulary are added to it as special tokens, as transformers does.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        sep_token: str | None = None,
        cls_token: str | None = None,
        mask_token: str | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        stop_ids: Iterable[int] = (),
        name_or_path: str = "tokenizer",
    ):
        self.backend = backend
        self.name_or_path = name_or_path
        named = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, sep_token=sep_token,
                     pad_token=pad_token, cls_token=cls_token, mask_token=mask_token)
        self.special_tokens: dict[str, str] = {k: v for k, v in named.items() if v is not None}
        missing = [t for t in self.special_tokens.values() if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
        self._extra_stop_ids = [int(i) for i in stop_ids]
        self._templates = self._resolve_templates(chat_template)

    @staticmethod
    def _resolve_templates(chat_template: str | Mapping[str, str] | None) -> dict[str, str]:
        if chat_template is None:
            return {}
        if isinstance(chat_template, Mapping):
            return dict(chat_template)
        if chat_template in BUILTIN_TEMPLATES or not _is_jinja(chat_template):
            return {"default": get_template(chat_template)}  # unknown names raise, listing the built-ins
        return {"default": chat_template}

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dir(cls, path: str | Path, *, chat_template: str | None = None) -> Tokenizer:
        """Load a checkpoint directory holding ``tokenizer.json`` (and usually ``tokenizer_config.json``), or the
        tokenizer a llama.cpp ``.gguf`` file describes (see ``lmforge.tokenizer.gguf``).

        Precedence follows transformers 5: ``chat_template.jinja`` (and ``additional_chat_templates/*.jinja``) over
        the config's ``chat_template`` (a string or a ``[{"name", "template"}]`` list); ``special_tokens_map.json``
        only when the config has no ``added_tokens_decoder``, and then its values win; ``add_bos_token`` in the config
        is ignored because ``tokenizer.json``'s post-processor decides. ``generation_config.json``'s
        ``eos_token_id`` (int or list) adds stop ids. A ``chat_template`` argument (built-in name or Jinja) replaces
        the checkpoint's template.
        """
        root = Path(path)
        if root.suffix.lower() == ".gguf" and root.is_file():  # llama.cpp file: the vocabulary is in its metadata
            from lmforge.tokenizer.gguf import tokenizer_from_gguf

            return tokenizer_from_gguf(root, chat_template=chat_template)
        if not root.is_dir():
            raise CheckpointError(f"tokenizer: directory {root} does not exist; pass a checkpoint dir with tokenizer.json")
        if not (root / "tokenizer.json").is_file():
            raise CheckpointError(
                f"tokenizer: {root / 'tokenizer.json'} not found; only fast (tokenizers) checkpoints are supported, "
                "re-save with transformers' AutoTokenizer.save_pretrained()"
            )
        config = _read_json(root / "tokenizer_config.json") if (root / "tokenizer_config.json").is_file() else {}
        if "added_tokens_decoder" not in config and (root / "special_tokens_map.json").is_file():
            config.update(_read_json(root / "special_tokens_map.json"))

        backend = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
        backend.no_truncation()  # we return raw ids; callers truncate/pad explicitly
        backend.no_padding()
        for _, token in sorted((int(i), t) for i, t in config.get("added_tokens_decoder", {}).items()):
            if backend.token_to_id(token["content"]) is None:
                fields = {k: v for k, v in token.items() if k != "__type"}
                added = tokenizers.AddedToken(**fields)
                (backend.add_special_tokens if added.special else backend.add_tokens)([added])

        stop_ids: list[int] = []
        if (root / "generation_config.json").is_file():
            eos = _read_json(root / "generation_config.json").get("eos_token_id")
            stop_ids = [eos] if isinstance(eos, int) else list(eos or [])

        return cls(
            backend,
            **{name: _token_str(config.get(name)) for name in SPECIAL_TOKEN_NAMES},
            chat_template=chat_template if chat_template is not None else cls._checkpoint_templates(root, config),
            stop_ids=stop_ids,
            name_or_path=str(root),
        )

    @staticmethod
    def _checkpoint_templates(root: Path, config: dict) -> dict[str, str] | None:
        files = {}
        if (root / "chat_template.jinja").is_file():
            files["default"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
        if (root / "additional_chat_templates").is_dir():
            for f in sorted((root / "additional_chat_templates").glob("*.jinja")):
                files[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
        if files:
            return files
        template = config.get("chat_template")
        if isinstance(template, list):
            return {t["name"]: t["template"] for t in template}
        return {"default": template} if isinstance(template, str) else None

    # ------------------------------------------------------------------ properties

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' ``len(tokenizer)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def chat_template(self) -> str | None:
        """The template ``apply_chat_template`` uses without tools (the ``"default"`` one), or None."""
        return self._templates.get("default")

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` runs the post-processor (e.g. prepends bos), as in HF."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """``encode`` for many texts at once (parallel in the Rust backend); no padding."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. No ``clean_up_tokenization_spaces``: transformers 5 skips it for BPE, and it is lossy."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stop_ids(self) -> list[int]:
        """Ids that end generation: the eos token plus ``generation_config.json``'s ``eos_token_id`` values."""
        ids = ([self.eos_id] if self.eos_id is not None else []) + self._extra_stop_ids
        return list(dict.fromkeys(ids))

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh incremental detokenizer for one generated sequence (see ``StreamDecoder``)."""
        return StreamDecoder(self.backend, skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def _template_for(self, tools: Any) -> str:
        if not self._templates:
            names = ", ".join(sorted(BUILTIN_TEMPLATES))
            raise ConfigError(
                f"{self.name_or_path}: the checkpoint has no chat template; pass chat_template=<one of {names}> "
                "or a Jinja string"
            )
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" not in self._templates:
            raise ConfigError(
                f"{self.name_or_path}: the checkpoint has chat templates {sorted(self._templates)} but no 'default'; "
                "pass chat_template=<one of them (as Jinja)> or a built-in name"
            )
        return self._templates["default"]

    def apply_chat_template(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = False,
        tools: Sequence[dict] | None = None,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the chat template; with ``tokenize`` return ids instead of text.

        Like transformers, the named special tokens are template variables (``kwargs`` override them, and may add
        ``documents=`` or template options), and the rendered text is encoded with ``add_special_tokens=False``
        because templates write their own bos.
        """
        text = render_chat_template(
            self._template_for(tools), messages, add_generation_prompt=add_generation_prompt, tools=tools,
            **{**self.special_tokens, **kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"
