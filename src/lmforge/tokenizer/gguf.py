"""A ``Tokenizer`` from a GGUF file's metadata: llama.cpp stores the vocabulary, not a ``tokenizer.json``.

Two vocabulary kinds cover today's open models (``tokenizer.ggml.model``):

- ``gpt2``: byte-level BPE. Tokens (already in the byte-to-unicode spelling) and merges in rank order; text is split
  before BPE by the regexes llama.cpp picks from ``tokenizer.ggml.pre`` (Llama 3, Qwen 2, GPT-2, SmolLM/StarCoder
  digits, GPT-4o ...), applied one after another, then byte-encoded.
- ``llama``: SentencePiece BPE. Tokens with scores; merges are the splits of each piece into two pieces, best score
  first (what llama.cpp's merge loop does), unknown characters fall back to ``<0xNN>`` byte tokens, and with
  ``tokenizer.ggml.add_space_prefix`` (the default) every text run starts with "▁".

Token types say which pieces are special: control tokens (and the unknown token) become special added tokens,
user-defined ones (``<think>``) plain added tokens, so both are matched whole. ``add_bos_token`` / ``add_eos_token``
follow the file, with llama.cpp's defaults where it is silent; the chat template is ``tokenizer.chat_template``
(named extras ``tokenizer.chat_template.NAME``); eot/eom ids join the stop ids.
"""
from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from lmforge.errors import CheckpointError
from lmforge.tokenizer.tokenizer import Tokenizer

__all__ = ["tokenizer_from_gguf", "save_tokenizer", "PRE_TOKENIZERS"]

# ---------------------------------------------------------------------------------------------------------------
# Pre-tokenizer regexes, as llama.cpp applies them per tokenizer.ggml.pre (src/llama-vocab.cpp), written in the form
# the models' tokenizer.json files use (the `tokenizers` regex engine reads them as is).
# ---------------------------------------------------------------------------------------------------------------

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
         rf"{_CONTRACTIONS}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|\p{{N}}"
          rf"| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK3 = [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
             r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
             r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"]
LLAMA_CPP_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]


def _family(regexes: list[str], add_bos: bool = False, ignore_merges: bool = False, *names: str) -> dict:
    return {n: (regexes, add_bos, ignore_merges) for n in names}


# tokenizer.ggml.pre -> (regexes applied in order, llama.cpp's add_bos default, ignore_merges)
PRE_TOKENIZERS: dict[str, tuple[list[str], bool, bool]] = {
    **_family([LLAMA3], True, True, "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
              "lfm2", "jina-v5-nano"),
    **_family([LLAMA3], False, False, "dbrx", "smaug-bpe", "glm4", "chatglm-bpe"),
    **_family([QWEN2], False, False, "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2",
              "hunyuan", "solar-open"),
    **_family([QWEN35], False, False, "qwen35"),
    **_family([GPT2], False, False, "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "gigachat",
              "granite-docling", "a.x-4.0", "mellum", "roberta-bpe"),
    **_family([r"\p{N}", GPT2], False, False, "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
              "minerva-7b", "mellum2"),
    **_family([GPT4O], False, False, "gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"),
    **_family([TEKKEN], True, True, "tekken"),
    **_family(DEEPSEEK3, False, False, "deepseek-v3", "hunyuan-dense", "joyai-llm"),
    **_family(LLAMA_CPP_DEFAULT, False, False, "default", ""),
}

CONTROL, UNKNOWN, USER_DEFINED, BYTE = 3, 2, 4, 6  # llama.cpp token types (1 = normal, 5 = unused)


def _bpe_backend(meta: dict, name: str) -> tuple[tokenizers.Tokenizer, bool]:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{name}: GGUF tokenizer.ggml.pre '{pre}' is not supported; supported: "
                              f"{', '.join(sorted(p for p in PRE_TOKENIZERS if p))}")
    regexes, add_bos, ignore_merges = PRE_TOKENIZERS[pre]
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, add_bos


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two vocabulary pieces, best (highest) piece score first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for t, score, kind in zip(tokens, scores, types):
        if kind not in (1, USER_DEFINED):
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                found.append((-score, vocab[a], vocab[b], a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]


def _spm_backend(meta: dict) -> tuple[tokenizers.Tokenizer, bool]:
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    merges = ([tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]] if "tokenizer.ggml.merges" in meta
              else _spm_merges(tokens, scores, types))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = tokenizers.Tokenizer(models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=tokens[unk] if unk is not None else None,
        fuse_unk=True, byte_fallback=BYTE in types))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), *steps] if prefix else steps)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    return tok, True


def tokenizer_from_gguf(path: str | Path, chat_template: str | None = None) -> Tokenizer:
    """The tokenizer a GGUF file describes, as an lmforge ``Tokenizer`` (special tokens, chat template, stop ids)."""
    from lmforge.models.gguf import read_metadata, stop_token_ids

    path = Path(path)
    meta = read_metadata(path, "tokenizer.")
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"{path.name}: the GGUF file has no vocabulary (tokenizer.ggml.tokens); pass a "
                              "tokenizer directory separately")
    if len(set(meta["tokenizer.ggml.tokens"])) != len(meta["tokenizer.ggml.tokens"]):  # llama.cpp refuses these too
        raise CheckpointError(f"{path.name}: GGUF tokenizer.ggml.tokens lists a token twice; the file is corrupt")
    if kind == "gpt2":
        tok, add_bos = _bpe_backend(meta, path.name)
    elif kind == "llama":
        tok, add_bos = _spm_backend(meta)
    else:
        raise CheckpointError(f"{path.name}: GGUF tokenizer.ggml.model '{kind}' is not supported; supported: gpt2 "
                              "(byte-level BPE), llama (SentencePiece)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])

    def named(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = named("bos_token_id"), named("eos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos) and bos is not None
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False) and eos is not None
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = single + " " + " ".join([f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    specials = [(t, tokens.index(t)) for t in dict.fromkeys([bos] * add_bos + [eos] * add_eos)]
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    tok.post_processor = (processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
                          if kind == "gpt2" else template)

    if chat_template is None:  # tokenizer.chat_template, plus named ones as tokenizer.chat_template.NAME
        chat_template = {name.removeprefix("tokenizer.chat_template."): text for name, text in meta.items()
                         if name.startswith("tokenizer.chat_template.") and isinstance(text, str)}
        if isinstance(meta.get("tokenizer.chat_template"), str):
            chat_template["default"] = meta["tokenizer.chat_template"]
        chat_template = chat_template or None
    return Tokenizer(tok, bos_token=bos, eos_token=eos, pad_token=named("padding_token_id"),
                     unk_token=named("unknown_token_id"), chat_template=chat_template,
                     stop_ids=stop_token_ids(meta), name_or_path=str(path))


def save_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, chat template) and any extra named chat
    templates (``additional_chat_templates/NAME.jinja``): what ``Tokenizer.from_dir`` and transformers read."""
    from lmforge.tokenizer.train import save_pretrained_tokenizer

    out = Path(out_dir)
    templates = dict(tok._templates)
    named = {k: v for k, v in tok.special_tokens.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    save_pretrained_tokenizer(tok.backend, out, **named, chat_template=templates.pop("default", None))
    if templates:
        (out / "additional_chat_templates").mkdir(exist_ok=True)
        for name, text in templates.items():
            (out / "additional_chat_templates" / f"{name}.jinja").write_text(text, encoding="utf-8")
    if len(tok.stop_ids()) > 1:  # eot/eom: generation_config.json is where Tokenizer.from_dir and transformers see them
        gen = out / "generation_config.json"
        data = json.loads(gen.read_text()) if gen.is_file() else {}
        data["eos_token_id"] = tok.stop_ids() if len(tok.stop_ids()) > 1 else tok.stop_ids()[0]
        gen.write_text(json.dumps(data, indent=2) + "\n")
    return out
