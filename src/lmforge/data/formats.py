"""Reading training data: local files (JSON, JSONL, Parquet, text) in the record formats users already have.

Every good record becomes a :class:`Document` (plain text, for pretraining) or a :class:`Conversation` (messages with
the roles chat templates expect: ``system | user | assistant | tool``). Bad records never stop loading: each one is
reported as ``(file, row, reason)`` with a 1-based row number (in JSONL and text files, the line number).

Record formats (LLaMA-Factory's names, so its ``dataset_info.json`` files work as they are):

- ``text``:     ``{"text": ...}``; ``.txt`` files are always text.
- ``alpaca``:   ``instruction`` / ``input`` / ``output``, optional ``system`` and ``history`` ([[user, answer], ...]).
- ``sharegpt``: ``conversations`` = ``[{"from": human|gpt|system|function_call|observation, "value": ...}]``, optional
  ``system`` and ``tools`` columns; ``function_call`` becomes an assistant turn and ``observation`` a tool turn.
- ``openai``:   ``messages`` = ``[{"role", "content"}]``, optional ``tools``.

``columns`` maps a format's field to the column that holds it (``{"output": "answer"}``); LLaMA-Factory's field names
``prompt``/``query``/``response`` (alpaca), ``messages`` (sharegpt) and ``prompt`` (text) are accepted as aliases.
"""
from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, did_you_mean

__all__ = ["Document", "Conversation", "Source", "FORMATS", "resolve_sources", "read_rows", "detect_format",
           "parse_record", "load_examples", "BadRecord", "read_text", "split_lines", "not_utf8"]

FORMATS = ("text", "alpaca", "sharegpt", "openai")
FIELDS = {
    "text": ("text",),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "sharegpt": ("conversations", "system", "tools"),
    "openai": ("messages", "tools"),
}
# LLaMA-Factory's column names -> ours, per format.
_ALIASES = {
    "text": {"prompt": "text"},
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
    "openai": {},
}
# LLaMA-Factory's sharegpt role names (and common variants) -> chat-template roles.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                   "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}
_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool",
                 "function": "tool"}
_TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system",
              "function_tag": "assistant", "observation_tag": "tool"}
_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".txt", ".text")
_UNSUPPORTED_COLUMNS = ("images", "videos", "audios", "chosen", "rejected", "kto_tag")


@dataclass
class Document:
    """One pretraining document; ``source`` is ``(file, row)``."""

    text: str
    source: tuple[str, int] = ("", 0)


@dataclass
class Conversation:
    """One SFT sample: ``messages`` are ``{"role": system|user|assistant|tool, "content": str}`` ending with an
    assistant turn; ``tools`` (JSON schemas) is passed to the chat template."""

    messages: list[dict[str, str]]
    tools: list[Any] | None = None
    source: tuple[str, int] = ("", 0)


@dataclass
class Source:
    """One file to read and how: ``format`` may be ``auto``; ``tags`` are LLaMA-Factory's sharegpt role/key names."""

    path: Path
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    text_mode: str | None = None
    """How this source's .txt files split into documents, when the config does not say (dataset_info: ``lines``)."""


class BadRecord(Exception):
    """A record that cannot become a sample; the message is the reason shown in the data report."""


class _Unreadable:
    """A row that could not even be parsed (a bad JSONL line)."""

    def __init__(self, reason: str):
        self.reason = reason


# ------------------------------------------------------------------------------------------------ finding files


def resolve_sources(path: str | list[str], dataset: str | None = None, format: str = "auto",
                    columns: dict[str, str] | None = None) -> list[Source]:
    """The files behind ``data.path`` (one or many; a directory means all its data files), or, with ``dataset``
    (comma-separated names), the entries of ``<path>/dataset_info.json``. A missing path is a one-line ConfigError."""
    columns = dict(columns or {})
    paths = [path] if isinstance(path, str) else list(path)
    if not paths:
        raise ConfigError("data.path is empty; give a data file, a list of files or a directory")
    if dataset is not None:
        if len(paths) != 1:
            raise ConfigError("data.dataset names entries of one dataset_info.json: data.path must be one directory")
        return _from_dataset_info(Path(paths[0]), dataset, format, columns)
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise ConfigError(f"data file not found: {p}")
        if p.is_dir():
            if (p / "dataset_info.json").is_file():
                raise ConfigError(f"{p} holds a dataset_info.json: set data.dataset to one of its names "
                                  f"({', '.join(sorted(_read_json_file(p / 'dataset_info.json'))[:8])}, ...)")
            out += [Source(f, format, columns) for f in _data_files(p)]
        else:
            out.append(Source(p, format, columns))
    return out


def _data_files(folder: Path) -> list[Path]:
    files = sorted(f for f in folder.iterdir() if f.is_file() and _suffix(f) in _SUFFIXES)
    if not files:
        raise ConfigError(f"data directory {folder} has no data files ({', '.join(_SUFFIXES)})")
    return files


def _suffix(p: Path) -> str:
    """The data suffix, looking through ``.gz``."""
    suffixes = [s.lower() for s in p.suffixes]
    return suffixes[-2] if suffixes[-1:] == [".gz"] and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")


def _read_json_file(p: Path) -> Any:
    text = read_text(p)
    if why := not_utf8(text):
        raise ConfigError(f"{p}: {why}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None


def _from_dataset_info(folder: Path, names: str, format: str, columns: dict[str, str]) -> list[Source]:
    """Sources for LLaMA-Factory ``dataset_info.json`` entries: ``file_name``, ``formatting``, ``columns``, ``tags``."""
    info_path = folder / "dataset_info.json"
    if not info_path.is_file():
        raise ConfigError(f"data.dataset is set but {info_path} does not exist")
    info = _read_json_file(info_path)
    out = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in info:
            raise ConfigError(f"dataset {name!r} is not in {info_path}{did_you_mean(name, info)}")
        entry = info[name]
        if "file_name" not in entry:
            hub = entry.get("hf_hub_url") or entry.get("ms_hub_url") or entry.get("om_hub_url")
            raise ConfigError(f"dataset {name!r} in {info_path} is a hub dataset ({hub}); lmforge reads local files "
                              "only: download it and point data.path at the files")
        if entry.get("ranking"):
            raise ConfigError(f"dataset {name!r} is preference data (ranking: true); it needs a preference stage, "
                              "not pretraining/SFT")
        entry_columns = dict(entry.get("columns", {}))
        bad = [c for c in _UNSUPPORTED_COLUMNS if c in entry_columns]
        if bad:
            raise ConfigError(f"dataset {name!r} has {', '.join(bad)} columns, which lmforge's text datasets do not "
                              "support")
        fmt = entry.get("formatting", "alpaca")
        # LLaMA-Factory pretraining entries are alpaca entries with only a prompt column (or plain-text files).
        if fmt == "alpaca" and set(entry_columns) <= {"prompt"} and (entry_columns or
                                                                      _suffix(Path(entry["file_name"])) == ".txt"):
            fmt = "text"
        fmt = format if format != "auto" else fmt
        cols = {**entry_columns, **columns}
        target = folder / entry["file_name"]
        if not target.exists():
            raise ConfigError(f"data file not found: {target} (dataset {name!r} in {info_path})")
        files = _data_files(target) if target.is_dir() else [target]
        # LLaMA-Factory reads text files line by line (wiki_demo.txt is one article per line).
        out += [Source(f, fmt, cols, dict(entry.get("tags", {})), "lines") for f in files]
    if not out:
        raise ConfigError(f"data.dataset={names!r} names no dataset")
    return out


# ------------------------------------------------------------------------------------------------ reading rows


def read_text(p: Path) -> str:
    """The file as text. A leading UTF-8 BOM is dropped; bytes that are not UTF-8 are kept as surrogate escapes
    (U+DC80-U+DCFF, ``errors="surrogateescape"``) so that the rows holding them become bad rows instead of one byte
    aborting the whole file."""
    data = gzip.open(p, "rb").read() if p.suffix.lower() == ".gz" else p.read_bytes()
    return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


_NOT_TEXT = re.compile("[\ud800-\udfff]")  # a byte that is not UTF-8 (surrogate escape), or a lone surrogate
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")  # JSON's \ud800-\udfff: a pair, or a lone surrogate


def not_utf8(text: str, line: int = 1) -> str | None:
    """Why ``text`` (read with :func:`read_text`, starting at file line ``line``) is not UTF-8, or None."""
    m = _NOT_TEXT.search(text)
    if m is None:
        return None
    at = m.start()
    return _bad_char(m.group(), line + text.count("\n", 0, at), at - text.rfind("\n", 0, at))


def _bad_char(char: str, line: int, column: int) -> str:
    code = ord(char)
    what = f"byte 0x{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
    return f"not UTF-8: {what} at line {line}, column {column}"


def _lone_surrogate(record: Any) -> str | None:
    """Why a parsed JSON record is not Unicode text (a JSON escape such as ``"\\ud800"`` left a lone surrogate, which
    no tokenizer can encode), or None."""
    if isinstance(record, str):
        m = _NOT_TEXT.search(record)
        return None if m is None else f"a string holds the lone surrogate \\u{ord(m.group()):04x} (not Unicode text)"
    if isinstance(record, dict):
        record = [*record.keys(), *record.values()]
    if isinstance(record, list):
        return next((why for item in record if (why := _lone_surrogate(item))), None)
    return None


def split_lines(text: str) -> list[str]:
    """Lines split on ``\\n`` only (a trailing ``\\r`` dropped): ``str.splitlines`` would also split inside a row at
    U+2028, U+0085 and other separators that are valid, unescaped characters in JSON strings and in text."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_rows(path: Path, text_mode: str = "blocks") -> Iterator[tuple[int, Any]]:
    """Yield ``(row_number, record)`` for every row of ``path`` (1-based; JSONL and text: the line number).

    ``.txt``: ``text_mode`` ``blocks`` (blank-line-separated blocks), ``lines`` (each non-empty line) or ``file``
    (the whole file) give ``{"text": ...}`` records. A row that is not JSON (JSONL) or not UTF-8 (any text file)
    yields an ``_Unreadable`` with the reason; lines end at ``\\n`` (or ``\\r\\n``) only.
    """
    suffix = _suffix(path)
    if suffix not in _SUFFIXES:
        raise ConfigError(f"{path}: unsupported data file type {suffix or '(none)'!r}; "
                          f"use one of {', '.join(_SUFFIXES)}")
    if suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    text = read_text(path)
    if suffix in (".txt", ".text"):
        yield from _text_rows(text, text_mode)
    elif suffix == ".json":
        yield from _json_rows(path, text)
    else:
        yield from _jsonl_rows(text)


def _json_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """The records of a ``.json`` file: a list, a one-key ``{"data": [...]}``, or JSON lines named ``.json``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # more after the first value: the file is really JSON lines
            yield from _jsonl_rows(text)
            return
        bad = _NOT_TEXT.match(text, e.pos)  # a byte that is not UTF-8 outside any string
        why = _bad_char(bad.group(), e.lineno, e.colno) if bad else f"invalid JSON ({e.msg})"
        raise ConfigError(f"{path}:{e.lineno}: {why}") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise ConfigError(f"{path}: a .json data file must hold a list of records, got {type(data).__name__}")
    if not (_NOT_TEXT.search(text) or _SURROGATE_ESCAPE.search(text)):  # the common case: every record is clean
        yield from enumerate(data, start=1)
        return
    line, seen = 1, 0
    for row, (record, (a, b)) in enumerate(zip(data, _element_spans(text)), start=1):
        line, seen = line + text.count("\n", seen, a), a
        why = not_utf8(text[a:b], line) or _lone_surrogate(record)
        yield row, (record if why is None else _Unreadable(why))


def _element_spans(text: str) -> Iterator[tuple[int, int]]:
    """``(start, end)`` offsets of each record of a ``.json`` file that parses (a list, or a one-key object holding
    one): where a bad record's bad byte is, as a line number."""
    decoder, ws = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    i = ws.match(text).end()
    if text[i] == "{":  # {"key": [...]}: skip the key and the colon
        _, i = decoder.raw_decode(text, ws.match(text, i + 1).end())
        i = ws.match(text, ws.match(text, i).end() + 1).end()
    i = ws.match(text, i + 1).end()  # past "["
    while text[i] != "]":
        _, end = decoder.raw_decode(text, i)
        yield i, end
        i = ws.match(text, end).end()
        i = ws.match(text, i + 1).end() if text[i] == "," else i


def _jsonl_rows(text: str) -> Iterator[tuple[int, Any]]:
    clean = not (_NOT_TEXT.search(text) or _SURROGATE_ESCAPE.search(text))
    for lineno, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        why = None if clean else not_utf8(line, lineno)
        if why is not None:
            yield lineno, _Unreadable(why)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, _Unreadable(f"invalid JSON ({e.msg})")
            continue
        why = None if clean or not _SURROGATE_ESCAPE.search(line) else _lone_surrogate(record)
        yield lineno, (record if why is None else _Unreadable(why))


def _text_rows(text: str, mode: str) -> Iterator[tuple[int, Any]]:
    clean = _NOT_TEXT.search(text) is None

    def row(start: int, body: str) -> tuple[int, Any]:
        why = None if clean else not_utf8(body, start)
        return start, ({"text": body} if why is None else _Unreadable(why))

    if mode == "file":
        yield row(1, text)
        return
    block: list[str] = []
    start = 0
    for lineno, line in enumerate(split_lines(text), start=1):
        if mode == "lines":
            if line.strip():
                yield row(lineno, line)
        elif line.strip():
            start = start or lineno
            block.append(line)
        elif block:
            yield row(start, "\n".join(block))
            block, start = [], 0
    if block:
        yield row(start, "\n".join(block))


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    row = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for record in batch.to_pylist():
            row += 1
            yield row, record


# ------------------------------------------------------------------------------------------------ record formats


def _field_getter(record: dict, fmt: str, columns: dict[str, str]) -> Callable[[str], Any]:
    """``get(field)`` reads ``record[columns.get(field, field)]`` after resolving LLaMA-Factory aliases."""
    cols = {_ALIASES[fmt].get(k, k): v for k, v in columns.items()}
    return lambda name: record.get(cols.get(name, name))


def detect_format(record: Any, columns: dict[str, str]) -> str | None:
    """The format a record looks like (``openai`` > ``sharegpt`` > ``alpaca`` > ``text``), or None."""
    if not isinstance(record, dict):
        return None
    for fmt in ("openai", "sharegpt", "alpaca", "text"):
        get = _field_getter(record, fmt, columns)
        if fmt == "openai":
            msgs = get("messages")
            if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and "role" in msgs[0]:
                return fmt
        elif fmt == "sharegpt":
            conv = get("conversations") or (record.get("messages") if "conversations" not in columns else None)
            if isinstance(conv, list) and conv and isinstance(conv[0], dict):
                return fmt
        elif fmt == "alpaca":
            if get("output") is not None and (get("instruction") is not None or get("input") is not None):
                return fmt
        elif isinstance(get("text"), str):
            return fmt
    return None


def _check_columns(fmt: str, columns: dict[str, str], where: str) -> None:
    known = set(FIELDS[fmt]) | set(_ALIASES[fmt])
    for key in columns:
        if key not in known:
            raise ConfigError(f"{where}: data.columns key {key!r} is not a {fmt} field{did_you_mean(key, known)}; "
                              f"{fmt} fields: {', '.join(FIELDS[fmt])}")


def _text(value: Any, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{what} is {'missing' if value is None else type(value).__name__ + ', not a string'}")
    if not allow_empty and not value.strip():
        raise BadRecord(f"empty {what}")
    return value


def _optional_text(value: Any, what: str) -> str:
    return "" if value is None else _text(value, what, allow_empty=True)


def _tools(value: Any) -> list | None:
    """Tools as a list of JSON schemas: a JSON string (LLaMA-Factory) or a list/dict; empty -> None."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRecord(f"tools is not valid JSON ({e.msg})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise BadRecord(f"tools must be a list of JSON schemas, got {type(value).__name__}")
    return value or None


def _check_conversation(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    if not messages:
        raise BadRecord("empty conversation")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadRecord(f"empty assistant turn (message {i})")
    if messages[-1]["role"] != "assistant":
        raise BadRecord(f"conversation does not end with an assistant turn (last role: {messages[-1]['role']})")
    return messages


def _alpaca(get: Callable[[str], Any]) -> Conversation:
    instruction = _optional_text(get("instruction"), "instruction")
    query = _optional_text(get("input"), "input")
    prompt = "\n".join(p for p in (instruction, query) if p)
    if not prompt.strip():
        raise BadRecord("empty instruction and input")
    output = _text(get("output"), "output")
    messages = []
    system = _optional_text(get("system"), "system")
    if system:
        messages.append({"role": "system", "content": system})
    history = get("history") or []
    if not isinstance(history, list):
        raise BadRecord(f"history must be a list of [user, assistant] pairs, got {type(history).__name__}")
    for turn in history:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise BadRecord("history must be a list of [user, assistant] string pairs")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Conversation(_check_conversation(messages))


def _sharegpt(get: Callable[[str], Any], record: dict, columns: dict, tags: dict[str, str]) -> Conversation:
    conv = get("conversations")
    if conv is None and "conversations" not in columns and "messages" not in columns:
        conv = record.get("messages")
    if not isinstance(conv, list):
        raise BadRecord("conversations is " + ("missing" if conv is None else f"{type(conv).__name__}, not a list"))
    role_key, content_key = tags.get("role_tag", "from"), tags.get("content_tag", "value")
    roles = {**_SHAREGPT_ROLES, **{tags[t]: r for t, r in _TAG_ROLES.items() if t in tags}}
    messages = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict):
            raise BadRecord(f"message {i} is {type(m).__name__}, not an object")
        rk, ck = (role_key, content_key) if role_key in m else ("role", "content")  # accept role/content too
        role = m.get(rk)
        if role not in roles:
            raise BadRecord(f"message {i} has unknown role {role!r}")
        messages.append({"role": roles[role], "content": _text(m.get(ck), f"message {i} content", allow_empty=True)})
    system = _optional_text(get("system"), "system")
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return Conversation(_check_conversation(messages), _tools(get("tools")))


def _openai_content(content: Any, i: int) -> str:
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise BadRecord(f"message {i} has non-text content parts")
        return "".join(p["text"] for p in content)
    return _text(content, f"message {i} content", allow_empty=True)


def _openai(get: Callable[[str], Any]) -> Conversation:
    msgs = get("messages")
    if not isinstance(msgs, list):
        raise BadRecord("messages is " + ("missing" if msgs is None else f"{type(msgs).__name__}, not a list"))
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRecord(f"message {i} is {type(m).__name__}, not an object")
        if m.get("role") not in _OPENAI_ROLES:
            raise BadRecord(f"message {i} has unknown role {m.get('role')!r}")
        content = m.get("content")
        if m["role"] == "assistant" and not content and m.get("tool_calls"):  # tool calls as JSON, like function_call
            calls = [c.get("function", c) if isinstance(c, dict) else c for c in m["tool_calls"]]
            content = "\n".join(json.dumps(c, ensure_ascii=False) for c in calls)
        messages.append({"role": _OPENAI_ROLES[m["role"]], "content": _openai_content(content, i)})
    return Conversation(_check_conversation(messages), _tools(get("tools")))


def parse_record(record: Any, fmt: str, columns: dict[str, str] | None = None,
                 tags: dict[str, str] | None = None) -> Document | Conversation:
    """Turn one raw record into a Document or Conversation; raise :class:`BadRecord` with the reason otherwise."""
    columns = columns or {}
    if isinstance(record, _Unreadable):
        raise BadRecord(record.reason)
    if not isinstance(record, dict):
        raise BadRecord(f"record is {type(record).__name__}, not an object")
    get = _field_getter(record, fmt, columns)
    if fmt == "text":
        return Document(_text(get("text"), "text"))
    if fmt == "alpaca":
        return _alpaca(get)
    if fmt == "sharegpt":
        return _sharegpt(get, record, columns, tags or {})
    return _openai(get)


def load_examples(source: Source, text_mode: str = "blocks", on_bad: Callable[[str, int, str], None] | None = None
                  ) -> tuple[list[Document | Conversation], int, str]:
    """Read and parse every row of one source. Returns ``(examples, rows_read, format)``; each bad row goes to
    ``on_bad(file, row, reason)``. ``format: auto`` is decided by the first record that looks like a known format."""
    name = str(source.path)
    rows = list(read_rows(source.path, text_mode))
    fmt = "text" if _suffix(source.path) in (".txt", ".text") else source.format
    columns = {} if fmt == "text" and _suffix(source.path) in (".txt", ".text") else source.columns
    if fmt == "auto":
        fmt = next((f for _, r in rows if (f := detect_format(r, columns))), None)
        if fmt is None:
            first = next((r for _, r in rows if isinstance(r, dict)), None)
            keys = sorted(first)[:10] if first else []
            raise ConfigError(f"{name}: cannot detect the record format (first record keys: {keys}); set data.format "
                              f"to one of {', '.join(FORMATS)} and map fields with data.columns")
    if fmt not in FORMATS:
        raise ConfigError(f"{name}: unknown data format {fmt!r}{did_you_mean(fmt, FORMATS)}")
    _check_columns(fmt, columns, name)
    out: list[Document | Conversation] = []
    for row, record in rows:
        try:
            example = parse_record(record, fmt, columns, source.tags)
        except BadRecord as e:
            if on_bad is not None:
                on_bad(name, row, str(e))
            continue
        example.source = (name, row)
        out.append(example)
    return out, len(rows), fmt
