"""The vocabulary half of a GGUF file: tokens, merges, special ids, chat template and the pre-tokenizer name.

llama.cpp does not run a ``tokenizer.json``: it rebuilds a byte-level BPE from ``tokenizer.ggml.tokens`` / ``merges``
and splits text before BPE with regexes it picks by the ``tokenizer.ggml.pre`` name. The wrong name splits text
differently (Llama 3 groups digits by three, Qwen 2 by one, GPT-2 not at all), so the name must be detected, the way
llama.cpp's own converter does it: tokenize a fixed check string and look the sha256 of the token ids up in a table
of known vocabularies (``KNOWN_PRE_HASHES``). A tokenizer not in the table (one trained with lmforge, a fine-tune that
changed the vocabulary) is matched by its pre-tokenizer instead: the name whose regexes (as lmforge's GGUF reader
applies them) cut the check string into the same pieces. Neither matching is an error naming the ``pre_tokenizer``
option, never a silent ``gpt-2``.
"""
from __future__ import annotations

import hashlib
import json

from ..errors import ConfigError
from ..tokenizer import Tokenizer

__all__ = ["CHECK_TEXT", "KNOWN_PRE_HASHES", "detect_pre_tokenizer", "write_vocab"]

# The string llama.cpp's converter tokenizes to identify a vocabulary's pre-tokenizer: whitespace runs, emoji with
# joiners, digit runs, Khmer, Chinese, Cyrillic, repeated punctuation and English contractions in mixed case.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis "
    "concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\""
    "......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? "
    "We'Ve a'lL"
)

# sha256(str(token ids of CHECK_TEXT)) -> tokenizer.ggml.pre, for the vocabularies of the families lmforge loads
# (values as llama.cpp's converter records them).
KNOWN_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x, SmolLM3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5 / 2 / 2.5 / 3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
}

# Candidates for the structural match, most common first (one name per distinct regex set).
_CANDIDATES = ("llama-bpe", "qwen2", "gpt-2", "smollm", "gpt-4o", "tekken", "deepseek-v3", "qwen35")


def check_hash(tok: Tokenizer) -> str:
    """The sha256 llama.cpp's converter computes for this vocabulary (special tokens added as the tokenizer does)."""
    return hashlib.sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()


def _splits_like(tok: Tokenizer, pre: str, texts: list[str]) -> bool:
    """Whether llama.cpp's split rule for `pre` (as lmforge's GGUF reader rebuilds it) cuts `texts` into the same
    pieces as `tok`'s pre-tokenizer: independent of the vocabulary, so a small one cannot hide a difference."""
    from tokenizers import Regex, pre_tokenizers

    from ..tokenizer.gguf import PRE_TOKENIZERS

    ours = tok.backend.pre_tokenizer
    if ours is None or tok.backend.normalizer is not None:
        return False
    regexes = PRE_TOKENIZERS[pre][0]
    theirs = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
                                     + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return all([p for p, _ in ours.pre_tokenize_str(t)] == [p for p, _ in theirs.pre_tokenize_str(t)] for t in texts)


def detect_pre_tokenizer(tok: Tokenizer) -> str:
    """The ``tokenizer.ggml.pre`` name for a byte-level BPE tokenizer: by llama.cpp's hash table, else by the split
    rule that cuts the check text into the same pieces; ConfigError when neither identifies it."""
    name = KNOWN_PRE_HASHES.get(check_hash(tok))
    if name is not None:
        return name
    texts = [CHECK_TEXT, "Hello world 12345 don't STOP\n\n  x = f(a[1], 'b')  # 李白 1234567"]
    for pre in _CANDIDATES:
        if _splits_like(tok, pre, texts):
            return pre
    raise ConfigError("GGUF export cannot tell which llama.cpp pre-tokenizer this vocabulary uses (its hash is not "
                      "a known one and no known split reproduces it): set pre_tokenizer=NAME (llama-bpe, qwen2, "
                      "gpt-2, smollm, ...)")


def _space_prefix(data: dict) -> bool | None:
    """For a SentencePiece-style tokenizer.json: whether "▁" is put before the text (llama.cpp's add_space_prefix);
    None when its spaces are not handled as SentencePiece does (then llama.cpp would split differently)."""
    norm, pre = data.get("normalizer") or {}, data.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", [norm]) if norm else []
    replaces = any(n.get("type") == "Replace" and n.get("content") == "\u2581" for n in steps)
    prepends = any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in steps)
    if replaces and not pre:
        return prepends
    if pre.get("type") == "Metaspace" and not pre.get("split", True) and not steps:
        return pre.get("prepend_scheme", "always") in ("always", "first")
    return None


def _spm_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined piece scores highest: score each
    piece by minus the rank of the merge that makes it, so it merges in the BPE's order."""
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", "", 1) if isinstance(m, str) else "".join(m), r)
    return [-float(rank[t]) if t in rank else (0.0 if len(t) == 1 else -1e9) for t in tokens]


def write_vocab(writer, tok: Tokenizer, vocab_size: int, pre_tokenizer: str | None = None) -> str:
    """Add the tokenizer metadata of `tok` to a GGUF writer, padded to the model's `vocab_size`: a byte-level BPE as
    llama.cpp's ``gpt2`` model (with the detected pre-tokenizer), a SentencePiece-style BPE (``byte_fallback``, "▁"
    for spaces: Llama 2, Mistral, Gemma, Phi-3) as its ``llama`` model with scores. Returns the pre-tokenizer name."""
    import gguf

    from ..tokenizer.gguf import PRE_TOKENIZERS

    data = json.loads(tok.backend.to_str())
    model = data["model"]
    spm = model["type"] == "BPE" and bool(model.get("byte_fallback"))
    if model["type"] != "BPE":
        raise ConfigError(f"GGUF export writes BPE vocabularies (byte-level or SentencePiece-style); this tokenizer is "
                          f"{model['type']}")
    if spm:
        prefix = _space_prefix(data)
        if prefix is None:
            raise ConfigError("GGUF export: this byte-fallback BPE does not handle spaces as SentencePiece does "
                              "(\u2581 replacement without splitting); llama.cpp would tokenize it differently")
        pre = "default"
    else:
        if pre_tokenizer is not None and pre_tokenizer not in PRE_TOKENIZERS:
            raise ConfigError(f"pre_tokenizer '{pre_tokenizer}' is not a llama.cpp pre-tokenizer name; use one of "
                              f"{', '.join(sorted(p for p in PRE_TOKENIZERS if p))}")
        pre = pre_tokenizer or detect_pre_tokenizer(tok)
    vocab = tok.backend.get_vocab(with_added_tokens=True)  # {token: id}
    if max(vocab.values()) >= vocab_size:
        raise ConfigError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["content"]: a.get("special", False) for a in data.get("added_tokens", [])}
    unk = model.get("unk_token")
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:  # rows the embedding has beyond the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(t)
        if spm and t == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif t in added:
            types.append(gguf.TokenType.CONTROL if added[t] else gguf.TokenType.USER_DEFINED)
        elif spm and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if spm:
        writer.add_token_scores(_spm_scores(tokens, merges))
        writer.add_add_space_prefix(prefix)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id,
           "unk": tok.token_to_id(tok.special_tokens.get("unk_token", unk))}
    for name, tid in ids.items():
        if tid is not None:
            getattr(writer, f"add_{name}_token_id")(tid)
    stops = [i for i in tok.stop_ids() if i != tok.eos_id]
    eot = next((i for i in stops if by_id.get(i) in ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")), None)
    if eot is not None:
        writer.add_eot_token_id(eot)
    probe = tok.encode("a")  # does the tokenizer put BOS / EOS around text? llama.cpp must do the same
    writer.add_add_bos_token(tok.bos_id is not None and probe[:1] == [tok.bos_id])
    writer.add_add_eos_token(tok.eos_id is not None and probe[-1:] == [tok.eos_id] and len(probe) > 1)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
    return pre
