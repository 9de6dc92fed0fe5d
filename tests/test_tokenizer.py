"""lmforge.tokenizer.Tokenizer against transformers' AutoTokenizer on a tiny byte-level BPE trained here."""
from __future__ import annotations

import json

import pytest
import tokenizers

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer, save_pretrained_tokenizer, train_bpe
from lmforge.tokenizer.tokenizer import StreamDecoder

# A few KB of English (and a little Chinese) so BPE learns merges; characters outside it stay multi-token.
CORPUS = [
    f"Sentence {i}: the quick brown fox jumps over the lazy dog, and {w} is a word we like. 你好，世界！\n"
    for i, w in enumerate(["hello", "world", "token", "model", "stream", "decode", "lmforge", "chat"] * 6)
]

SAMPLES = [
    "Hello world!",
    "the quick brown fox",
    "  leading spaces and\ttabs\nnew lines  ",
    "你好，世界！这是一个测试。",
    "emoji 🤗🎉 and accents: café naïve",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "",
]


@pytest.fixture(scope="module")
def bpe() -> tokenizers.Tokenizer:
    return train_bpe(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def tok_dir(bpe, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    save_pretrained_tokenizer(bpe, out, bos_token="<s>", eos_token="</s>", pad_token="<pad>", add_bos_token=True,
                              chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def test_round_trip_and_bos(tok):
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id  # prepended by tokenizer.json's TemplateProcessing
        assert tok.encode(text, add_special_tokens=False) == ids[1:]
        assert tok.decode(ids, skip_special_tokens=False).removeprefix("<s>") == text
        if "<|" not in text:
            assert tok.decode(ids) == text
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


def test_properties(tok, tok_dir):
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.stop_ids() == [1]
    assert tok.vocab_size == len(tok) == 400
    # plain `tokenizers` adds the bos too: it lives in tokenizer.json, not only in our wrapper
    assert tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json")).encode("hi").ids[0] == tok.bos_id


def test_no_bos_without_add_bos_token(bpe, tmp_path):
    save_pretrained_tokenizer(bpe, tmp_path, bos_token="<s>", eos_token="</s>")
    t = Tokenizer.from_dir(tmp_path)
    assert t.encode("hello") == t.encode("hello", add_special_tokens=False)
    assert t.chat_template is None


def test_matches_transformers(tok, hf_tok):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(hf_tok, PreTrainedTokenizerFast)
    assert len(hf_tok) == tok.vocab_size
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for text in SAMPLES:
        ids = hf_tok(text)["input_ids"]
        assert tok.encode(text) == ids, text
        assert tok.encode(text, add_special_tokens=False) == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids)
    msgs = [{"role": "user", "content": "你好 there"}, {"role": "assistant", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == hf_tok.apply_chat_template(msgs, tokenize=False)
    assert tok.apply_chat_template(msgs, tokenize=True) == hf_tok.apply_chat_template(msgs, return_dict=False)


def test_added_token_dicts_special_tokens_map_and_generation_config(bpe, tmp_path):
    """AddedToken dicts in the config, an added token missing from tokenizer.json, legacy special_tokens_map.json."""
    (tmp_path / "tokenizer.json").write_text(bpe.to_str(), encoding="utf-8")
    extra = {"content": "<|tool|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
             "special": True}
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False},
              "eos_token": "</s>", "added_tokens_decoder": {"400": extra}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 8]}), encoding="utf-8")
    t = Tokenizer.from_dir(tmp_path)
    assert (t.bos_token, t.eos_token, t.pad_token) == ("<s>", "</s>", None)
    assert t.encode("a<|tool|>b", add_special_tokens=False)[1] == 400 and t.vocab_size == 401
    assert t.stop_ids() == [1, 8]
    hf = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(tmp_path)
    assert hf.bos_token == "<s>" and len(hf) == 401
    assert hf("a<|tool|>b")["input_ids"] == t.encode("a<|tool|>b")

    # without added_tokens_decoder, special_tokens_map.json is read and its values win (transformers' legacy path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}), encoding="utf-8")
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": "<|eot_id|>"}, "pad_token": "<pad>"}), encoding="utf-8")
    t = Tokenizer.from_dir(tmp_path)
    assert (t.eos_token, t.pad_token, t.stop_ids()) == ("<|eot_id|>", "<pad>", [8, 1])  # de-duplicated
    hf = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.eos_token, hf.pad_token) == (t.eos_token, t.pad_token)


@pytest.mark.parametrize("native", [True, False], ids=["DecodeStream", "offsets"])
@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder(tok, native, skip):
    text = "流式解码：漢字と絵文字 🧑‍💻🚀 mixed with English, done."
    ids = tok.encode(text) + [tok.eos_id]
    assert len(ids) > len(text)  # most characters span several byte tokens
    dec = StreamDecoder(tok.backend, skip_special_tokens=skip, native=native)
    pieces = [dec.step(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    public = tok.stream_decoder(skip_special_tokens=skip)
    assert "".join(public.step(i) for i in ids) == tok.decode(ids, skip_special_tokens=skip)


def test_errors(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist") as e:
        Tokenizer.from_dir(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LmforgeError, match="tokenizer.json") as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
