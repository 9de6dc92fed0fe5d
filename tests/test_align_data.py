"""Preference data: every record form, rankings -> K(K-1)/2 pairs, bad rows with row numbers, encoding (labels on the
final reply only, sequences ending at the reply's end token), truncation, batching, LLaMA-Factory's DPO demo file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.align.data import (
    BadRecord,
    build_preference_datasets,
    build_prompt_datasets,
    collate_pairs,
    encode_reply,
    fit_reply,
    parse_preference,
    parse_prompt,
)
from lmforge.data import DataConfig
from lmforge.data.encode import IGNORE
from lmforge.errors import ConfigError
from lmforge.testing import make_tiny_checkpoint
from lmforge.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llamafactory"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_dir(make_tiny_checkpoint(tmp_path_factory.mktemp("align_data") / "tiny"))


USER = [{"role": "user", "content": "Name a colour."}]


@pytest.mark.parametrize("record, prompt", [
    ({"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}, USER),
    ({"prompt": "Name a colour.", "system": "Be brief.", "chosen": "Blue.", "rejected": "Seven."},
     [{"role": "system", "content": "Be brief."}, *USER]),
    ({"instruction": "Name a colour.", "input": "Any one.", "chosen": "Blue.", "rejected": "Seven."},
     [{"role": "user", "content": "Name a colour.\nAny one."}]),
    ({"instruction": "And another?", "history": [["Name a colour.", "Red."]], "chosen": "Blue.", "rejected": "Seven."},
     [*USER, {"role": "assistant", "content": "Red."}, {"role": "user", "content": "And another?"}]),
    ({"messages": USER, "chosen": "Blue.", "rejected": "Seven."}, USER),  # openai-style prompt, string replies
    ({"prompt": USER, "chosen": [{"role": "assistant", "content": "Blue."}],  # TRL conversational
      "rejected": [{"role": "assistant", "content": "Seven."}]}, USER),
    ({"conversations": [{"from": "human", "value": "Name a colour."}], "chosen": {"from": "gpt", "value": "Blue."},
      "rejected": {"from": "gpt", "value": "Seven."}}, USER),  # LLaMA-Factory sharegpt
    ({"chosen": [*USER, {"role": "assistant", "content": "Blue."}],  # implicit prompt: the shared first turns
      "rejected": [*USER, {"role": "assistant", "content": "Seven."}]}, USER),
])
def test_every_pair_form_gives_the_same_pair(record, prompt):
    (pair,) = parse_preference(record)
    assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, "Blue.", "Seven.")


def test_rankings_expand_into_all_ordered_pairs_and_ties_give_none():
    best_first = parse_preference({"prompt": "q", "responses": ["a", "b", "c", "d"]})
    assert len(best_first) == 6  # K(K-1)/2
    assert {(p.chosen, p.rejected) for p in best_first} == {("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"),
                                                            ("b", "d"), ("c", "d")}
    by_rank = parse_preference({"prompt": "q", "responses": ["a", "b", "c"], "ranks": [3, 1, 2]})
    assert {(p.chosen, p.rejected) for p in by_rank} == {("b", "c"), ("b", "a"), ("c", "a")}
    with_tie = parse_preference({"prompt": "q", "responses": ["a", "b", "c"], "scores": [0.5, 0.9, 0.5]})
    assert {(p.chosen, p.rejected) for p in with_tie} == {("b", "a"), ("b", "c")}


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "q", "chosen": "a"}, "no rejected"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical"),
    ({"messages": [*USER, {"role": "assistant", "content": "Red."}], "chosen": "a", "rejected": "b"}, "user turn"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [1]}, "one per response"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1, 1]}, "ranked equal"),
    ({"chosen": "a", "rejected": "b"}, "no prompt"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen is int"),
    (["not", "a", "record"], "not an object"),
])
def test_bad_records_say_why(record, reason):
    with pytest.raises(BadRecord, match=reason):
        parse_preference(record)


def test_bad_rows_are_counted_with_their_line_numbers(tok, tmp_path):
    rows = [{"prompt": "q1", "chosen": "good", "rejected": "bad"}, {"prompt": "q2", "chosen": "x"},
            {"prompt": "q3", "responses": ["best", "mid", "worst"]}, "oops"]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    train, val, report = build_preference_datasets(DataConfig(path=str(path), max_seq_len=64), tok)
    assert (len(train), val, report.records_read, report.bad_row_count, report.rankings) == (4, None, 5, 3, 1)
    assert [(row, why.split(" ")[0]) for _, row, why in report.bad_rows] == [(2, "no"), (4, "record"), (5, "invalid")]
    assert "3 bad" in report.summary() and f"{path}:2" in report.summary()



def test_separators_stay_in_their_row_and_bytes_that_are_not_utf8_are_bad_rows(tok, tmp_path):
    first = {"prompt": "q1\u2028more", "chosen": "good\x85", "rejected": "bad"}
    rows = [json.dumps(first, ensure_ascii=False).encode(),
            b'{"prompt": "q2", "chosen": "caf\xe9", "rejected": "bad"}',
            json.dumps({"prompt": "q3", "chosen": "good", "rejected": "bad"}).encode()]
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(b"\r\n".join(rows) + b"\r\n")
    train, _, report = build_preference_datasets(DataConfig(path=str(path), max_seq_len=64), tok)
    assert (len(train), report.records_read) == (2, 3)
    assert report.bad_rows == [(str(path), 2, "not UTF-8: byte 0xE9 at line 2, column 32")]

def test_unknown_column_is_a_config_error(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"q": "x", "good": "a", "bad": "b"}) + "\n")
    with pytest.raises(ConfigError, match="'choosen'.*did you mean 'chosen'"):
        build_preference_datasets(DataConfig(path=str(path), columns={"choosen": "good"}), tok)
    train, _, _ = build_preference_datasets(
        DataConfig(path=str(path), columns={"prompt": "q", "chosen": "good", "rejected": "bad"}), tok)
    assert len(train) == 1


def test_only_the_final_reply_is_labelled_and_the_sequence_ends_with_its_end_token(tok):
    prompt = [*USER, {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"}]
    tokens, labels = encode_reply(tok, prompt, "Blue.")
    assert tokens[-1] == tok.eos_id  # <|im_end|>: where a generated reply stops, so a reward model scores alike
    targets = [y for y in labels if y != IGNORE]
    assert tok.decode(targets, skip_special_tokens=False) == "Blue.<|im_end|>"
    assert labels[-1] == IGNORE and labels[-2] == tok.eos_id  # pre-shifted


def test_fit_reply_trims_the_prompt_start_then_the_reply_end():
    tokens = list(range(100, 120))  # 12 prompt tokens, 8 reply tokens
    labels = [IGNORE] * 11 + tokens[12:] + [IGNORE]
    t, y, status = fit_reply(tokens, labels, max_len=10, max_prompt_len=4, mode="right")
    assert status == "truncated" and t == tokens[8:18] and y == labels[8:18]
    assert t[:4] == tokens[8:12]  # the prompt's last 4 tokens survive
    assert fit_reply(tokens, labels, 10, 4, "drop")[2] == "dropped"
    assert fit_reply(tokens, labels, 30, 4, "right") == (tokens, labels, "ok")
    assert fit_reply(tokens, labels, 10, 12, "right")[2] == "empty"  # no reply token would be left


def test_collate_pairs_stacks_chosen_then_rejected(tok):
    rows = []
    for reply_good, reply_bad in (("Blue.", "Seven."), ("Green, like grass.", "No.")):
        (ct, cl), (rt, rl) = encode_reply(tok, USER, reply_good), encode_reply(tok, USER, reply_bad)
        rows.append({"chosen_tokens": ct, "chosen_labels": cl, "rejected_tokens": rt, "rejected_labels": rl,
                     "ref_logps": [-1.0 - len(rows), -5.0]})
    b = collate_pairs(rows, tok.pad_id)
    T = max(len(r[k]) for r in rows for k in ("chosen_tokens", "rejected_tokens"))
    assert b["tokens"].shape == b["labels"].shape == b["positions"].shape == (4, T)
    assert b["tokens"][0, :len(rows[0]["chosen_tokens"])].tolist() == rows[0]["chosen_tokens"]
    assert b["tokens"][3, :len(rows[1]["rejected_tokens"])].tolist() == rows[1]["rejected_tokens"]
    assert torch.equal(b["ref_logps"], torch.tensor([-1.0, -2.0, -5.0, -5.0]))


def test_ppo_prompts_come_from_any_record_with_a_prompt_side(tok, tmp_path):
    sft = {"messages": [*USER, {"role": "assistant", "content": "Red."}]}
    assert parse_prompt(sft).prompt == USER
    assert parse_prompt({"prompt": "Name a colour.", "chosen": "a", "rejected": "b"}).prompt == USER
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [sft, {"prompt": "Hi"}, {"text": "no prompt"}]))
    full = tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=True)
    short = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)
    assert len(short) < len(full)
    train, _, report = build_prompt_datasets(DataConfig(path=str(path)), tok, max_prompt_len=len(short))
    assert len(train) == 2 and report.bad_row_count == 1 and report.truncated == 1
    assert train[0]["tokens"] == full[-len(short):] and train[0]["messages"] == USER  # kept its end
    assert train[1]["tokens"] == short


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs /work/shared/data")
def test_llamafactory_dpo_demo_loads_as_it_is(tok):
    train, _, report = build_preference_datasets(DataConfig(path=str(SHARED), dataset="dpo_en_demo",
                                                            max_seq_len=4096), tok)  # via dataset_info.json
    assert (report.records_read, report.bad_row_count, len(train)) == (300, 0, 300)
    multi_turn = next(p for p in train.pairs if sum(m["role"] == "assistant" for m in p.prompt) >= 2)
    assert multi_turn.prompt[-1]["role"] == "user"
    assert sum(p.prompt[0]["role"] == "system" for p in train.pairs) == 80
    short, _, report = build_preference_datasets(DataConfig(path=str(SHARED / "dpo_en_demo.json"), max_seq_len=128),
                                                 tok)  # the file alone, cut to 128 tokens
    assert len(short) == 300 and report.truncated > 0 and report.dropped == 0
    assert max(len(r[k]) for r in short.rows for k in ("chosen_tokens", "rejected_tokens")) == 128
