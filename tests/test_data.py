"""Tests for lmforge.data: formats, loss masks (pre-shifted labels), truncation, packing, collation, real files."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pydantic
import pytest
import tokenizers
import torch

from lmforge.data import (
    Conversation,
    DataConfig,
    Document,
    Sample,
    build_datasets,
    collate,
    encode_conversations,
    encode_documents,
    fit_length,
    pack_samples,
    parse_record,
)
from lmforge.data.formats import BadRecord
from lmforge.errors import ConfigError
from lmforge.testing import make_tiny_checkpoint
from lmforge.tokenizer import Tokenizer

SHARED = next((p for p in (Path(__file__).parents[1] / ".." / "shared", Path("/work/shared")) if p.is_dir()), None)
LF = SHARED / "data" / "llamafactory" if SHARED else None
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared data directory (../shared) is absent")

SYSTEM = "You are terse."
TURNS = [("Hello, world!", "Hi. How are you today?"),
         ("What does the sampler do?", "The sampler picks one token."),
         ("And the cache?", "It keeps keys and values: 你好")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """The tiny checkpoint's real BPE tokenizer (ChatML template, bos <s>, eos <|im_end|>, pad <pad>)."""
    return Tokenizer.from_dir(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt")))


def with_template(tok: Tokenizer, template: str, specials: tuple[str, ...] = (), **tokens) -> Tokenizer:
    """A copy of ``tok`` with another chat template (and the template's special tokens registered)."""
    backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
    names = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token, **tokens}
    return Tokenizer(backend, **names, chat_template=template)


def conversation() -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}]
    for user, answer in TURNS:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return msgs


def trained_runs(tok: Tokenizer, sample) -> list[str]:
    """Decoded text of each contiguous run of trained targets (labels != -100)."""
    labels = sample["labels"] if isinstance(sample, dict) else sample.labels
    runs, cur = [], []
    for y in labels + [-100]:
        if y != -100:
            cur.append(y)
        elif cur:
            runs.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    return runs


def write(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False) if path.suffix == ".json"
                    else "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ loss masks


@pytest.mark.parametrize("template", ["chatml", "llama3", "qwen"])
def test_only_assistant_turns_are_trained(tok, template):
    end = {"chatml": "<|im_end|>", "qwen": "<|im_end|>", "llama3": "<|eot_id|>"}[template]
    t = tok if template == "chatml" else with_template(
        tok, template, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>"),
        **({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"} if template == "llama3" else {}))
    (s,), unstable = encode_conversations([Conversation(conversation())], t)
    assert unstable == 0
    assert s.tokens == t.apply_chat_template(conversation(), tokenize=True)  # the text is rendered exactly once
    assert trained_runs(t, s) == [answer + end for _, answer in TURNS]  # content + end-of-turn, nothing else
    assert s.labels[-1] == -100 and len(s.labels) == len(s.tokens)
    for i, y in enumerate(s.labels[:-1]):  # pre-shifted: every trained label is the next token
        assert y in (-100, s.tokens[i + 1])


def test_train_on_prompt_trains_every_target(tok):
    (s,), _ = encode_conversations([Conversation(conversation())], tok, train_on_prompt=True)
    assert s.labels == s.tokens[1:] + [-100]


def test_template_that_is_not_prefix_stable_falls_back_and_reports(tok, tmp_path):
    # The end-of-turn token only follows the final message, so a prefix rendering is not a prefix of the full text.
    template = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
                "{%- if loop.last %}{{- '<|im_end|>' }}{%- endif %}{{- '\\n' }}{%- endfor %}"
                "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    t = with_template(tok, template)
    (s,), unstable = encode_conversations([Conversation(conversation())], t)
    assert unstable == 1
    assert trained_runs(t, s) == [TURNS[0][1], TURNS[1][1], TURNS[2][1] + "<|im_end|>"]
    path = write(tmp_path / "chat.jsonl", [{"messages": conversation()}] * 2)
    _, _, report = build_datasets(DataConfig(path=str(path)), t)
    assert len(report.notes) == 1 and "prefix-stable for 2 conversations" in report.notes[0]


def test_template_errors_become_bad_rows(tok, tmp_path):
    t = with_template(tok, "mistral")
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]}]
    train, _, report = build_datasets(DataConfig(path=str(write(tmp_path / "m.json", rows))), t)
    assert len(train) == 1 and report.bad_row_count == 1
    assert report.bad_rows[0][1] == 2 and "roles must alternate" in report.bad_rows[0][2]


# ------------------------------------------------------------------------------------------------ formats


def test_alpaca_with_input_history_and_system(tok):
    record = {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": SYSTEM,
              "history": [["hi", "hey"], ["who are you?", "a model"]]}
    conv = parse_record(record, "alpaca")
    assert conv.messages == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hey"}, {"role": "user", "content": "who are you?"},
                             {"role": "assistant", "content": "a model"},
                             {"role": "user", "content": "Translate\nbonjour"},
                             {"role": "assistant", "content": "hello"}]
    (s,), _ = encode_conversations([conv], tok)
    assert trained_runs(tok, s) == ["hey<|im_end|>", "a model<|im_end|>", "hello<|im_end|>"]
    remapped = parse_record({"q": "Translate", "a": "hello"}, "alpaca", {"prompt": "q", "response": "a"})
    assert remapped.messages[-2:] == [{"role": "user", "content": "Translate"},
                                      {"role": "assistant", "content": "hello"}]


def test_sharegpt_function_call_observation_system_and_tools(tok):
    tools = [{"name": "search", "description": "find", "parameters": {"type": "object", "properties": {}}}]
    record = {"conversations": [{"from": "human", "value": "find cats"},
                                {"from": "function_call", "value": '{"name": "search", "arguments": {}}'},
                                {"from": "observation", "value": '{"hits": 3}'},
                                {"from": "gpt", "value": "Found 3."}],
              "system": SYSTEM, "tools": json.dumps(tools)}
    conv = parse_record(record, "sharegpt")
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert conv.tools == tools
    (s,), _ = encode_conversations([conv], with_template(tok, "qwen"))
    t = with_template(tok, "qwen")
    assert "<tools>" in t.decode(s.tokens, skip_special_tokens=False)  # tools reach the template
    assert trained_runs(t, s) == ['{"name": "search", "arguments": {}}<|im_end|>', "Found 3.<|im_end|>"]


def test_openai_messages_and_tool_calls():
    conv = parse_record({"messages": [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f",
                                                                                             "arguments": "{}"}}]},
        {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "done"}]}, "openai")
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert conv.messages[1]["content"] == "hi" and json.loads(conv.messages[2]["content"]) == {"name": "f",
                                                                                              "arguments": "{}"}


def test_format_auto_detects_each_file(tok, tmp_path):
    files = {
        "text": write(tmp_path / "t.jsonl", [{"text": "The quick brown fox."}]),
        "alpaca": write(tmp_path / "a.json", [{"instruction": "hi", "input": "", "output": "hello"}]),
        "sharegpt": write(tmp_path / "s.json", [{"conversations": [{"from": "human", "value": "hi"},
                                                                   {"from": "gpt", "value": "hello"}]}]),
        "openai": write(tmp_path / "o.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "hello"}]}]),
    }
    train, _, report = build_datasets(DataConfig(path=[str(p) for p in files.values()]), tok)
    assert report.formats == {str(p): fmt for fmt, p in files.items()}
    assert len(train) == 4 and report.bad_row_count == 0
    with pytest.raises(ConfigError, match="not a alpaca field.*did you mean 'output'"):
        build_datasets(DataConfig(path=str(files["alpaca"]), columns={"outptu": "x"}), tok)


def test_bad_rows_are_counted_with_row_numbers(tok, tmp_path):
    rows = [
        {"instruction": "ok", "output": "fine"},
        {"instruction": "no output"},
        {"instruction": "empty", "output": "  "},
        {"instruction": 3, "output": "wrong type"},
        "not an object",
        {"instruction": "ok again", "output": "fine", "history": "nope"},
        {"instruction": "last", "output": "fine"},
    ]
    train, _, report = build_datasets(DataConfig(path=str(write(tmp_path / "a.json", rows))), tok)
    assert len(train) == 2 and report.records_read == 7 and report.bad_row_count == 5
    assert [(row, why) for _, row, why in report.bad_rows] == [
        (2, "output is missing"), (3, "empty output"), (4, "instruction is int, not a string"),
        (5, "record is str, not an object"), (6, "history must be a list of [user, assistant] pairs, got str")]
    chats = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
             '{"messages": [broken',
             {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": "c"}]},
             {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    train, _, report = build_datasets(DataConfig(path=str(write(tmp_path / "c.jsonl", chats)), format="openai"), tok)
    assert len(train) == 1 and [(r, why.split(" (")[0]) for _, r, why in report.bad_rows] == [
        (1, "empty assistant turn"), (2, "invalid JSON"), (3, "conversation does not end with an assistant turn")]
    assert "3 bad" in report.summary()



def _alpaca_line(i: int) -> bytes:
    return json.dumps({"instruction": f"q{i}", "output": "fine"}).encode() + b"\n"


def test_bytes_that_are_not_utf8_are_bad_rows_with_their_line(tok, tmp_path):
    """One stray byte (a Latin-1 file, a torn write) is one bad row, reported with its line; reading goes on."""
    lines = [_alpaca_line(1), b'{"instruction": "q2", "output": "caf\xe9"}\n', _alpaca_line(3),
             b'{"instruction": "q4", "output": "\\ud800 lone"}\n', _alpaca_line(5)]
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b"".join(lines))
    train, _, report = build_datasets(DataConfig(path=str(jsonl)), tok)
    assert len(train) == 3 and report.records_read == 5
    assert [(row, why) for _, row, why in report.bad_rows] == [
        (2, "not UTF-8: byte 0xE9 at line 2, column 37"),
        (4, "a string holds the lone surrogate \\ud800 (not Unicode text)")]

    records = [{"instruction": "q1", "output": "fine"}, {"instruction": "q2", "output": "caf\u00e9"},
               {"instruction": "q3", "output": "fine"}]
    array = tmp_path / "latin1.json"
    array.write_bytes(json.dumps({"data": records}, indent=1, ensure_ascii=False).encode().replace(
        "caf\u00e9".encode(), b"caf\xe9"))
    train, _, report = build_datasets(DataConfig(path=str(array)), tok)
    assert len(train) == 2 and report.bad_rows == [(str(array), 2, "not UTF-8: byte 0xE9 at line 9, column 18")]

    text = tmp_path / "latin1.txt"
    text.write_bytes(b"first line\n\nsecond block\nwith caf\xe9\n\nthird\n")
    for mode, good, bad in (("lines", 3, (4, "not UTF-8: byte 0xE9 at line 4, column 9")),
                            ("blocks", 2, (3, "not UTF-8: byte 0xE9 at line 4, column 9"))):  # block of lines 3-4
        train, _, report = build_datasets(DataConfig(path=str(text), text_mode=mode), tok)
        assert report.examples == good and report.bad_rows == [(str(text), *bad)]


def test_unicode_line_separators_stay_inside_their_row(tok, tmp_path):
    """U+2028, U+2029 and U+0085 are valid unescaped characters in JSON strings: rows split at \\n (or \\r\\n) only, so
    such a row stays one good row and later rows keep their line numbers."""
    path = tmp_path / "seps.jsonl"
    lines = [json.dumps({"instruction": "a\u2028b", "output": "c\u0085d\u2029e"}, ensure_ascii=False), "{broken",
             json.dumps({"instruction": "f", "output": "g\x0cg"}, ensure_ascii=False), '{"instruction": "h"}']
    path.write_bytes("\r\n".join(lines).encode() + b"\r\n")
    train, _, report = build_datasets(DataConfig(path=str(path)), tok)
    assert report.records_read == 4 and len(train) == 2
    assert [(row, why.split(" (")[0]) for _, row, why in report.bad_rows] == [(2, "invalid JSON"),
                                                                             (4, "output is missing")]
    assert "c\u0085d\u2029e" in tok.decode(train[0]["tokens"])
    text = tmp_path / "seps.txt"
    text.write_text("one\u2028still one\r\ntwo\x85still two\n", encoding="utf-8")
    assert build_datasets(DataConfig(path=str(text), text_mode="lines"), tok)[2].examples == 2


def test_missing_file_is_a_one_line_config_error(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"data file not found: .*nope\.json$"):
        build_datasets(DataConfig(path=str(tmp_path / "nope.json")), tok)
    with pytest.raises(pydantic.ValidationError):
        DataConfig(path="x", val_split=0.1, val_path="y")


def test_dataset_info_by_name(tok, tmp_path):
    write(tmp_path / "qa.jsonl", [{"question": "hi", "answer": "hello"}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "qa": {"file_name": "qa.jsonl", "columns": {"prompt": "question", "response": "answer"}},
        "hub": {"hf_hub_url": "someone/data"}}))
    train, _, report = build_datasets(DataConfig(path=str(tmp_path), dataset="qa"), tok)
    assert len(train) == 1 and trained_runs(tok, train[0]) == ["hello<|im_end|>"]
    with pytest.raises(ConfigError, match="hub dataset"):
        build_datasets(DataConfig(path=str(tmp_path), dataset="hub"), tok)
    with pytest.raises(ConfigError, match="did you mean 'qa'"):
        build_datasets(DataConfig(path=str(tmp_path), dataset="qaa"), tok)


def test_text_modes(tok, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("first block\nstill first\n\n\nsecond block\n\nthird\n", encoding="utf-8")
    counts = {mode: build_datasets(DataConfig(path=str(path), text_mode=mode), tok)[2].examples
              for mode in ("blocks", "lines", "file")}
    assert counts == {"blocks": 3, "lines": 4, "file": 1}


def test_parquet(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["x", ""]}), tmp_path / "d.parquet")
    train, _, report = build_datasets(DataConfig(path=str(tmp_path / "d.parquet")), tok)
    assert len(train) == 1 and report.bad_rows[0][1:] == (2, "empty output")


# ------------------------------------------------------------------------------------------------ lengths


def test_pretraining_chunks_bos_eos_and_shifted_labels(tok):
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    (doc,) = encode_documents([Document(text)], tok)
    assert doc.tokens == [tok.bos_id] + tok.encode(text, add_special_tokens=False) + [tok.eos_id]
    assert doc.labels == doc.tokens[1:] + [-100]
    pieces, status = fit_length(doc, 16, "chunk")
    assert status == "chunked" and all(len(p.tokens) <= 16 for p in pieces)
    assert sum((p.tokens for p in pieces), []) == doc.tokens  # nothing lost, bos only first, eos only last
    assert sum((p.labels for p in pieces), []) == doc.labels  # a chunk's last label is the next chunk's first token
    assert pieces[0].tokens[0] == tok.bos_id and tok.bos_id not in sum((p.tokens for p in pieces[1:]), [])


def test_truncation_drop_and_fully_masked(tok, tmp_path):
    long_answer = {"instruction": "hi", "output": "word " * 200}
    long_prompt = {"instruction": "word " * 200, "output": "short"}
    short = {"instruction": "hi", "output": "hello"}
    path = write(tmp_path / "a.json", [long_answer, long_prompt, short])
    train, _, report = build_datasets(DataConfig(path=str(path), max_seq_len=64), tok)
    assert (report.truncated, report.dropped, len(train)) == (1, 1, 2)  # the long prompt leaves no target: dropped
    assert all(len(r["tokens"]) <= 64 for r in train)
    train, _, report = build_datasets(DataConfig(path=str(path), max_seq_len=64, truncation="drop"), tok)
    assert (report.truncated, report.dropped, len(train)) == (0, 2, 1)
    assert trained_runs(tok, train[0]) == ["hello<|im_end|>"]


# ------------------------------------------------------------------------------------------------ packing, batches


def test_packing_rows_positions_documents(tok):
    rng = random.Random(0)
    samples = []
    for i in range(60):
        n = rng.randint(1, 40)
        tokens = [rng.randrange(500) for _ in range(n)]
        samples.append(Sample(tokens, [rng.choice([t, -100]) for t in tokens[1:]] + [-100], ("f", i)))
    samples.append(Sample(list(range(70)), list(range(1, 70)) + [-100]))  # longer than a row: truncated
    rows, efficiency = pack_samples(samples, 48)
    assert 0.9 < efficiency <= 1.0
    docs = []
    for row in rows:
        assert len(row["tokens"]) <= 48 and {len(v) for v in row.values()} == {len(row["tokens"])}
        ids, pos = row["document_ids"], row["positions"]
        for t in range(len(ids)):
            new_doc = t == 0 or ids[t] != ids[t - 1]
            assert pos[t] == (0 if new_doc else pos[t - 1] + 1)
            assert ids[t] == (0 if t == 0 else ids[t - 1] + new_doc)
        for d in range(ids[-1] + 1):
            docs.append((tuple(x for x, i in zip(row["tokens"], ids) if i == d),
                         tuple(y for y, i in zip(row["labels"], ids) if i == d)))
    expected = [(tuple(s.tokens[:48]), tuple(s.labels[:48])) for s in samples]
    assert sorted(docs) == sorted(expected)  # every input sample appears exactly once


def test_build_packed_with_validation_split(tok, tmp_path):
    rows = [{"instruction": f"question {i}", "output": "answer " * (i % 7 + 1)} for i in range(40)]
    cfg = DataConfig(path=str(write(tmp_path / "a.json", rows)), packing=True, max_seq_len=128, val_split=0.25, seed=3)
    train, val, report = build_datasets(cfg, tok)
    again = build_datasets(cfg, tok)[1]
    assert [val[i] for i in range(len(val))] == [again[i] for i in range(len(again))]  # deterministic split
    assert (report.train_samples, report.val_samples) == (30, 10)
    assert "document_ids" in train[0] and report.packed_rows == len(train) < 30
    assert report.target_tokens == train.num_target_tokens == sum(
        sum(y != -100 for y in train[i]["labels"]) for i in range(len(train)))
    assert "efficiency" in report.summary()


def test_collate_shapes_and_padding(tok):
    batch = [{"tokens": [5, 6, 7], "labels": [6, 7, -100], "positions": [0, 1, 2]},
             {"tokens": [8], "labels": [-100], "positions": [0]}]
    out = collate(batch, pad_id=2)
    assert set(out) == {"tokens", "labels", "positions"}
    assert all(v.dtype == torch.int64 and v.shape == (2, 3) for v in out.values())
    assert out["tokens"][1].tolist() == [8, 2, 2] and out["labels"][1].tolist() == [-100, -100, -100]
    assert out["positions"][1].tolist() == [0, -1, -1]
    packed = [{**r, "document_ids": [0] * len(r["tokens"])} for r in batch]
    out = collate(packed, pad_id=2, pad_to_multiple_of=4)
    assert out["document_ids"].shape == (2, 4) and out["document_ids"][1].tolist() == [0, -1, -1, -1]


# ------------------------------------------------------------------------------------------------ real files


@needs_shared
@pytest.mark.parametrize("name,rows,fmt", [("alpaca_en_demo", 999, "alpaca"), ("alpaca_zh_demo", 1000, "alpaca"),
                                           ("identity", 91, "alpaca"), ("glaive_toolcall_en_demo", 300, "sharegpt")])
def test_llamafactory_files_load_as_they_are(tok, name, rows, fmt):
    # alpaca_en_demo.json holds 999 records (LLaMA-Factory commit ff6d4d12e); alpaca_zh_demo.json holds 1000.
    assert len(json.loads((LF / f"{name}.json").read_text(encoding="utf-8"))) == rows
    for cfg in (DataConfig(path=str(LF / f"{name}.json"), max_seq_len=4096), DataConfig(path=str(LF), dataset=name)):
        train, _, report = build_datasets(cfg, tok)
        assert report.records_read == report.examples == rows and report.bad_row_count == 0
        assert set(report.formats.values()) == {fmt} and train.num_target_tokens > 0


@needs_shared
def test_plain_text_files_load(tok):
    _, _, report = build_datasets(DataConfig(path=str(LF), dataset="wiki_demo", packing=True), tok)
    assert report.examples == 30 and report.formats[str(LF / "wiki_demo.txt")] == "text"  # one article per line
    train, _, report = build_datasets(DataConfig(path=str(SHARED / "data" / "text" / "tinyshakespeare.txt"),
                                                 max_seq_len=256, packing=True), tok)
    assert report.bad_row_count == 0 and report.examples > 7000 and report.packing_efficiency > 0.95
    assert max(train.lengths.tolist()) <= 256
