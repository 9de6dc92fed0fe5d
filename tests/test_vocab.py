"""Vocabulary expansion: tokenizer training and merging, embedding resizing, embedding-only training stages, and
LoRA adapters with resized embeddings read by `peft` (the oracle)."""
from __future__ import annotations

import json

import pytest
import tokenizers
import torch
from safetensors.torch import load_file

from lmforge.config import load_config
from lmforge.data import DataConfig
from lmforge.errors import ConfigError
from lmforge.models import load_hf
from lmforge.models.resize import resize_token_embeddings
from lmforge.peft.peft_format import resize_for_adapter
from lmforge.tokenizer.expand import expand_checkpoint, resize_for_tokenizer
from lmforge.peft import LoraConfig, apply_lora, load_peft_adapter
from lmforge.testing import TINY_CORPUS, make_tiny_checkpoint
from lmforge.tokenizer import Tokenizer, save_pretrained_tokenizer, train_bpe
from lmforge.tokenizer.merge import (CHAR_TO_BYTE, bpe_segment, id_span, merge_tokenizer_dirs, merge_tokenizers,
                                     subtoken_ids, tokens_per_char)
from lmforge.tokenizer.train_cli import TokenizerConfig, read_corpus, run_tokenizer, train_unigram
from lmforge.train import run_training
from lmforge.train.config import ModelSection, OptimSection, TrainConfig, TrainSection
from lmforge.train.trainable import TrainableSection

# A small Chinese corpus (no download): enough for a BPE/unigram to learn multi-character pieces.
ZH = [
    "李白是唐代伟大的浪漫主义诗人，被后人誉为诗仙。", "杜甫是唐代伟大的现实主义诗人，被后人称为诗圣。",
    "大语言模型把文本切分成词元，再逐个预测下一个词元。", "扩充词表以后，中文文本的编码效率明显提高。",
    "今天天气很好，我们一起去公园散步吧。", "机器学习是人工智能的一个重要分支。",
    "深度学习模型需要大量的数据和计算资源。", "中文分词是自然语言处理的基础任务之一。",
    "诗人喜欢在月光下饮酒作诗，留下了许多名篇。", "模型训练的时候要注意学习率和批大小的设置。",
]
ZH_CORPUS = ZH * 30
ZH_SAMPLE = "李白和杜甫都是唐代伟大的诗人。大语言模型需要扩充中文词表，提高编码效率。"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama checkpoint with a 512-id byte-level BPE trained mostly on English."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("vocab") / "base")


@pytest.fixture(scope="module")
def zh_tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab") / "zh-tok"
    save_pretrained_tokenizer(train_bpe(ZH_CORPUS, vocab_size=700), out)
    return out


@pytest.fixture(scope="module")
def merged_dir(base_dir, zh_tok_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab") / "merged"
    merge_tokenizer_dirs(base_dir, zh_tok_dir, out, sample_text=ZH_SAMPLE)
    return out


@pytest.fixture(scope="module")
def expanded_dir(base_dir, merged_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab") / "expanded"
    expand_checkpoint(base_dir, merged_dir, out, init="subtoken")
    return out


# ------------------------------------------------------------------------------------------------ tokenizers


def _assert_keeps_ids(base: tokenizers.Tokenizer, merged: tokenizers.Tokenizer) -> None:
    old = base.get_vocab(with_added_tokens=True)
    new = merged.get_vocab(with_added_tokens=True)
    assert all(new[piece] == i for piece, i in old.items())
    assert sorted(set(new.values()) - set(old.values())) == list(range(id_span(base), id_span(merged)))


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_merge_keeps_every_old_id_and_encodes_chinese_with_fewer_tokens(base_dir, kind):
    base = Tokenizer.from_dir(base_dir).backend
    new = train_bpe(ZH_CORPUS, vocab_size=700) if kind == "bpe" else train_unigram(ZH_CORPUS, vocab_size=700)
    merged, report = merge_tokenizers(base, new)
    _assert_keeps_ids(base, merged)
    before, after = tokens_per_char(base, ZH_SAMPLE), tokens_per_char(merged, ZH_SAMPLE)
    print(f"{kind}: tokens/char {before:.3f} -> {after:.3f} ({after / before:.2f}x), {report.summary()}")
    assert after < 0.6 * before and report.added > 100
    assert merged.decode(merged.encode(ZH_SAMPLE).ids) == ZH_SAMPLE
    english = TINY_CORPUS.split("\n")[0]
    assert merged.encode(english).ids == base.encode(english).ids  # no Chinese piece applies to English text
    # every appended piece that is whole text is reachable: encoding its text gives exactly that one token
    reached = 0
    for piece, i in merged.get_vocab().items():
        if i >= report.base_vocab_size:
            try:
                text = bytes(CHAR_TO_BYTE[c] for c in piece).decode("utf-8")
            except UnicodeDecodeError:
                continue  # part of a character: only reachable inside a longer piece
            assert merged.encode(text, add_special_tokens=False).ids == [i], piece
            reached += 1
    assert reached > 100


def test_merge_into_a_sentencepiece_style_unigram_base():
    base = train_unigram([TINY_CORPUS.split("大语言")[0]] * 20, vocab_size=400)  # English only, byte fallback
    assert all(t.startswith("<0x") for t in base.encode("诗").tokens if t != "▁")
    merged, report = merge_tokenizers(base, train_bpe(ZH_CORPUS, vocab_size=700))
    _assert_keeps_ids(base, merged)
    assert tokens_per_char(merged, ZH_SAMPLE) < 0.5 * tokens_per_char(base, ZH_SAMPLE)
    assert report.skipped > 0  # partial-character byte pieces cannot be written as SentencePiece pieces
    assert merged.decode(merged.encode(ZH_SAMPLE).ids) == ZH_SAMPLE


def test_unigram_has_byte_fallback_and_round_trips():
    tok = train_unigram(ZH_CORPUS, vocab_size=600)
    text = "李白 likes 🍵 tea"
    enc = tok.encode(text)
    assert "<0xF0>" in enc.tokens and "<unk>" not in enc.tokens  # the emoji falls back to its UTF-8 bytes
    assert tok.decode(enc.ids) == text and tok.get_vocab_size() <= 600


def test_bpe_segment_matches_the_tokenizers_library():
    tok = train_bpe([TINY_CORPUS] * 5 + ZH_CORPUS, vocab_size=600)
    spec = json.loads(tok.to_str())["model"]
    ranks = {tuple(m): i for i, m in enumerate(spec["merges"])}
    words = [w for line in (TINY_CORPUS + "".join(ZH)).split() for w in tok.pre_tokenizer.pre_tokenize_str(line)]
    for word, _ in words:
        assert bpe_segment(word, ranks) == [t.value for t in tok.model.tokenize(word)]


def test_subtoken_ids_split_new_pieces_with_the_old_model(base_dir, merged_dir):
    old, new = Tokenizer.from_dir(base_dir), Tokenizer.from_dir(merged_dir)
    start = id_span(old)
    parts = subtoken_ids(old, new, range(start, start + 50))
    for i, ids in zip(range(start, start + 50), parts):
        assert len(ids) >= 2 and max(ids) < start
        assert "".join(old.backend.id_to_token(j) for j in ids) == new.backend.id_to_token(i)


# ------------------------------------------------------------------------------------------------ the verb


def test_tokenizer_verb_train_merge_resize(base_dir, tmp_path):
    corpus = tmp_path / "zh.jsonl"
    corpus.write_text("".join(json.dumps({"instruction": s, "output": s[::-1]}, ensure_ascii=False) + "\n"
                              for s in ZH_CORPUS))
    sample = tmp_path / "sample.txt"
    sample.write_text(ZH_SAMPLE)
    assert len(read_corpus([corpus])) == 2 * len(ZH_CORPUS)  # every string field of every record

    got = run_tokenizer(TokenizerConfig(action="train", inputs=[str(corpus)], out=str(tmp_path / "new"),
                                        vocab_size=600, model="unigram", sample=str(sample)))
    assert got["vocab_size"] <= 600 and Tokenizer.from_dir(tmp_path / "new").eos_token == "</s>"
    got = run_tokenizer(TokenizerConfig(action="merge", inputs=[str(base_dir), str(tmp_path / "new")],
                                        out=str(tmp_path / "merged"), sample=str(sample)))
    assert got["tokens_per_char_after"] < got["tokens_per_char_before"]
    merged = Tokenizer.from_dir(tmp_path / "merged")
    assert merged.chat_template == Tokenizer.from_dir(base_dir).chat_template  # config files come along
    info = json.loads((tmp_path / "merged" / "vocab_expansion.json").read_text())
    assert info["base_vocab_size"] == 512 and info["vocab_size"] == merged.vocab_size
    got = run_tokenizer(TokenizerConfig(action="resize", inputs=[str(base_dir), str(tmp_path / "merged")],
                                        out=str(tmp_path / "expanded"), pad_to_multiple_of=64))
    assert got["vocab_size"] % 64 == 0 and got["vocab_size"] >= merged.vocab_size
    assert load_hf(tmp_path / "expanded", progress=False).embed.weight.shape[0] == got["vocab_size"]

    with pytest.raises(ConfigError, match="tokenizer merge takes 2 tokenizer dirs") as e:
        load_config(TokenizerConfig, overrides=["action=merge", "inputs=[a]", "out=x"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="'vocab_size' does not apply to tokenizer merge"):
        load_config(TokenizerConfig, overrides=["action=merge", "inputs=[a, b]", "out=x", "vocab_size=900"])


def test_tokenizer_verb_as_it_will_be_wired_into_the_cli(base_dir, tmp_path, monkeypatch, capsys):
    from lmforge import cli

    verb = (cli._lazy(".tokenizer.train_cli", "TokenizerConfig"), cli._lazy(".tokenizer.train_cli", "run_tokenizer"),
            ("action", "inputs"), "train a tokenizer, merge one into a base (ids kept), resize a model for it")
    monkeypatch.setitem(cli.VERBS, "tokenizer", verb)
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n\n".join(ZH_CORPUS))
    assert cli.main(["tokenizer", "train", str(corpus), "--vocab-size", "600", "--out", str(tmp_path / "t")]) == 0
    assert cli.main(["tokenizer", "merge", str(base_dir), str(tmp_path / "t"), "--out", str(tmp_path / "m"),
                     "--sample", str(corpus)]) == 0
    assert "tokens per character on the sample" in capsys.readouterr().out
    assert cli.main(["tokenizer", "merge", str(base_dir), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "tokenizer merge takes 2 tokenizer dirs" in err and "\n" not in err


# ------------------------------------------------------------------------------------------------ resizing


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "PhiForCausalLM"])
@pytest.mark.parametrize("init", ["mean", "subtoken"])
@torch.no_grad()
def test_resized_model_gives_identical_logits_for_old_tokens(tmp_path, zh_tok_dir, arch, init):
    """Untied head (Llama), tied (Qwen2), head with a bias (Phi): old rows untouched, new rows as the init says."""
    ckpt = make_tiny_checkpoint(tmp_path / arch, arch=arch)
    merged_tok, _ = merge_tokenizers(Tokenizer.from_dir(ckpt).backend,
                                     tokenizers.Tokenizer.from_file(str(zh_tok_dir / "tokenizer.json")))
    model = load_hf(ckpt, progress=False)
    old_size = model.embed.weight.shape[0]
    old_embed = model.embed.weight.clone()
    x = torch.randint(0, old_size, (2, 12), generator=torch.Generator().manual_seed(0))
    before = model(x)
    info = resize_for_tokenizer(model, Tokenizer.from_dir(ckpt), merged_tok, init=init)
    after = model(x)
    assert info["vocab_size"] == id_span(merged_tok) == after.shape[-1] == model.cfg.vocab_size > old_size
    assert torch.equal(after[..., :old_size], before)
    new = model.embed.weight[old_size:]
    if init == "mean":
        torch.testing.assert_close(new, old_embed.mean(0).expand_as(new), atol=1e-6, rtol=0)
    else:
        parts = subtoken_ids(Tokenizer.from_dir(ckpt), merged_tok, [old_size])[0]
        torch.testing.assert_close(new[0], old_embed[parts].mean(0), atol=1e-6, rtol=0)
    if model.lm_head is not None and model.lm_head.bias is not None:
        assert model.lm_head.bias.shape == (info["vocab_size"],)


def test_resize_errors(base_dir):
    model = load_hf(base_dir, progress=False)
    with pytest.raises(ConfigError, match="only grows"):
        resize_token_embeddings(model, 100)
    with pytest.raises(ConfigError, match="needs the old tokenizer's split"):
        resize_token_embeddings(model, 600, init="subtoken")
    apply_lora(model, LoraConfig(target_modules=["lm_head"]))
    with pytest.raises(ConfigError, match="resize the vocabulary before applying LoRA"):
        resize_token_embeddings(model, 600)


# ------------------------------------------------------------------------------------------------ training stages


def _zh_text(tmp_path):
    path = tmp_path / "zh.txt"
    path.write_text("\n".join(ZH * 4) + "\n")
    return path


def _stage(model_dir, data, out, method="full", trainable="all", **extra) -> TrainConfig:
    return TrainConfig(stage="pretrain", method=method, model=ModelSection(path=str(model_dir)),
                       data=DataConfig(path=str(data), format="text", text_mode="lines", max_seq_len=32),
                       optim=OptimSection(lr=1e-2, weight_decay=0.1), trainable=TrainableSection(params=trainable),
                       train=TrainSection(output_dir=str(out), max_steps=3, micro_batch_size=4, device="cpu",
                                          progress=False, tensorboard=False), **extra)


def test_embedding_stage_changes_only_the_embedding_and_head(expanded_dir, tmp_path):
    base = load_hf(expanded_dir, progress=False).state_dict()
    result = run_training(_stage(expanded_dir, _zh_text(tmp_path), tmp_path / "s1", trainable="embeddings"))
    trained = load_hf(result["output"], progress=False).state_dict()
    changed = sorted(n for n in base if not torch.equal(base[n], trained[n]))
    assert changed == ["embed.weight", "lm_head.weight"]
    assert (tmp_path / "s1" / "final" / "vocab_expansion.json").is_file()  # stage 2 finds the first new id


def test_new_embedding_stage_changes_only_new_rows_even_with_weight_decay(expanded_dir, tmp_path):
    start = json.loads((expanded_dir / "vocab_expansion.json").read_text())["base_vocab_size"]
    base = load_hf(expanded_dir, progress=False).state_dict()
    result = run_training(_stage(expanded_dir, _zh_text(tmp_path), tmp_path / "s1", trainable="new_embeddings"))
    trained = load_hf(result["output"], progress=False).state_dict()
    for name in base:
        if name in ("embed.weight", "lm_head.weight"):
            assert torch.equal(base[name][:start], trained[name][:start]), name
            assert not torch.equal(base[name][start:], trained[name][start:]), name
        else:
            assert torch.equal(base[name], trained[name]), name


def test_trainable_errors(expanded_dir, base_dir, tmp_path):
    with pytest.raises(ConfigError, match="trainable=embeddings needs method full.*modules_to_save"):
        run_training(_stage(expanded_dir, _zh_text(tmp_path), tmp_path / "a", method="lora", trainable="embeddings"))
    with pytest.raises(ConfigError, match="needs trainable.new_token_start"):
        run_training(_stage(base_dir, _zh_text(tmp_path), tmp_path / "b", trainable="new_embeddings"))
    with pytest.raises(ConfigError, match="needs the embedding or output layer"):
        run_training(_stage(expanded_dir, _zh_text(tmp_path), tmp_path / "c", method="lora",
                            trainable="new_embeddings"))
    cfg = load_config(TrainConfig, overrides=["model.path=x", "data.path=y", "trainable=new_embeddings"])
    assert cfg.trainable.params == "new_embeddings"  # the short form


@pytest.mark.parametrize("name", ["stage1.yaml", "stage2.yaml"])
def test_example_stage_configs_are_valid(name):
    from pathlib import Path

    cfg = load_config(TrainConfig, Path(__file__).parents[1] / "examples" / "vocab_expansion" / name)
    assert [s.weight for s in cfg.data.mix] == [1, 5] and cfg.data.path is None
    assert cfg.trainable.params == ("embeddings" if name == "stage1.yaml" else "all")


def test_lora_stage_with_resized_embeddings_writes_a_peft_loadable_adapter(base_dir, expanded_dir, tmp_path):
    """Stage 2 as Chinese-LLaMA ran it: LoRA + embed/lm_head in modules_to_save (only their new rows trained).
    `peft` loads the adapter onto the expanded checkpoint, and onto the original one once transformers has resized
    it (the adapter's full embedding and head replace whatever rows the resize made)."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    start = json.loads((expanded_dir / "vocab_expansion.json").read_text())["base_vocab_size"]
    cfg = _stage(expanded_dir, _zh_text(tmp_path), tmp_path / "s2", method="lora", trainable="new_embeddings",
                 lora=LoraConfig(r=4, alpha=8, modules_to_save=["embed", "lm_head"]))
    result = run_training(cfg)
    adapter, model = result["output"], result["model"].eval()
    saved = load_file(f"{adapter}/adapter_model.safetensors")
    emb = saved["base_model.model.model.embed_tokens.weight"]
    original = load_hf(expanded_dir, progress=False).embed.weight
    assert emb.shape == original.shape and torch.equal(emb[:start], original[:start])
    assert not torch.equal(emb[start:], original[start:])

    x = torch.randint(0, emb.shape[0], (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x)
        hf = transformers.AutoModelForCausalLM.from_pretrained(expanded_dir, dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(hf, adapter).eval()(x).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
        hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        hf.resize_token_embeddings(emb.shape[0])
        theirs = peft.PeftModel.from_pretrained(hf, adapter).eval()(x).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
        plain = load_hf(base_dir, progress=False)  # lmforge does the same with resize_for_adapter
        assert resize_for_adapter(plain, adapter) == emb.shape[0]
        load_peft_adapter(plain, adapter)
        torch.testing.assert_close(plain(x), ours, atol=1e-5, rtol=0)
