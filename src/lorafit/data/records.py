"""Reading a user's data file into validated records (dicts), and splitting them.

    read_records(path, columns) -> RecordList (remembers file:line of every record)
    detect_format(record) -> "messages" | "alpaca" | "prompt_completion" | "classification" | "text"

Every malformed row fails here, before any tokenization, with the file and line in the message.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path
from typing import Sequence

FORMATS = {  # detection order matters: a record with instruction+output is alpaca even if it has "text"
    "messages": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "alpaca": '{"instruction": "...", "input": "... (optional)", "output": "..."}',
    "prompt_completion": '{"prompt": "...", "completion": "..."}',
    "classification": '{"text": "...", "label": "..."}',
    "text": '{"text": "..."}',
}
_REQUIRED = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
             "classification": ("text", "label"), "text": ("text",)}


class RecordList(list):
    """A list of record dicts that remembers its file and each record's line, so that errors found
    later (unknown label, broken chat template) can still name file:line."""

    def __init__(self, records: Sequence[dict], path: str, lines: Sequence[int]):
        super().__init__(records)
        self.path, self.lines = path, list(lines)


def record_location(records: Sequence[dict], i: int, source: str | None) -> str:
    src = source or getattr(records, "path", "<records>")
    lines = getattr(records, "lines", None)
    return f"{src}:{lines[i]}" if lines is not None and len(lines) == len(records) else f"{src} record {i + 1}"


def read_records(path: str | Path, columns: dict[str, str] | None = None) -> RecordList:
    """Read .jsonl/.json (JSON lines, or one JSON array), .csv or .tsv (header row) into dicts.
    `columns` maps the file's field names to lorafit's (e.g. {"mr": "prompt", "ref": "completion"});
    with it, only the mapped fields are kept. Every record is validated here so that a bad row fails
    before tokenization, naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        raise ValueError(f"{path}: unknown data file extension {suffix!r}; use .jsonl, .json, .csv or .tsv")
    try:
        rows = _read_json(path) if suffix in (".jsonl", ".json") else _read_delimited(path, suffix == ".tsv")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not rows:
        raise ValueError(f"{path}: file is empty (no records)")
    if columns:
        rows = [(line, _rename(record, columns, f"{path}:{line}")) for line, record in rows]
    first = None
    for line, record in rows:
        try:
            fmt = detect_format(record)
            check_fields(record, fmt)
        except ValueError as e:
            raise ValueError(f"{path}:{line}: {e}") from None
        if first is None:
            first = (fmt, line)
        elif fmt != first[0]:
            raise ValueError(f"{path}:{line}: record is {fmt!r} but line {first[1]} is {first[0]!r}; "
                             "one file must use one format")
    return RecordList([r for _, r in rows], str(path), [n for n, _ in rows])


def _read_json(path: Path) -> list[tuple[int, dict]]:
    text = path.read_text(encoding="utf-8-sig")  # -sig: editors on Windows prepend a byte-order mark
    if text.lstrip().startswith("["):
        return _json_array_items(text, path)
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # "\n" only: U+2028 is legal inside JSON strings
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
    for n, record in rows:
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
    return rows


def _json_array_items(text: str, path: Path) -> list[tuple[int, object]]:
    # Decode item by item (not json.loads) to know the line each record starts on.
    skip_ws = re.compile(r"[ \t\r\n]*").match
    decoder, rows, line, pos = json.JSONDecoder(), [], 1, 0
    i = skip_ws(text, text.index("[") + 1).end()
    while text[i:i + 1] != "]":
        line, pos = line + text.count("\n", pos, i), i
        try:  # at end of text this raises "Expecting value": an unclosed array
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{line}: expected a JSON object, got {type(item).__name__}")
        rows.append((line, item))
        i = skip_ws(text, i).end()
        if text[i:i + 1] == ",":
            i = skip_ws(text, i + 1).end()
        elif text[i:i + 1] != "]":
            raise ValueError(f"{path}:{line}: expected ',' or ']' after this item of the JSON array")
    return rows


def _rename(record: dict, columns: dict[str, str], where: str) -> dict:
    missing = [c for c in columns if c not in record]
    if missing:
        raise ValueError(f"{where}: no field {missing[0]!r} (data.columns maps it); the record has {sorted(record)}")
    return {new: record[old] for old, new in columns.items()}


def _read_delimited(path: Path, tsv: bool) -> list[tuple[int, dict]]:
    # TSV files are conventionally unquoted, so a '"' inside a TSV field is literal text.
    quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
    header, rows, start = None, [], 1
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t" if tsv else ",", quoting=quoting)
        try:
            for row in reader:
                line, start = start, reader.line_num + 1  # a quoted field may span lines: report where it starts
                if not any(cell.strip() for cell in row):
                    continue
                if header is None:
                    header = [h.strip() for h in row]
                    if "" in header or len(set(header)) != len(header):
                        raise ValueError(f"{path}:{line}: header has an empty or duplicate column name: {header}")
                elif len(row) != len(header):
                    raise ValueError(f"{path}:{line}: expected {len(header)} columns ({', '.join(header)}), "
                                     f"got {len(row)}")
                else:
                    rows.append((line, dict(zip(header, row))))
        except csv.Error as e:  # e.g. a NUL byte; `start` is where the unreadable row begins
            raise ValueError(f"{path}:{start}: {e}") from None
    return rows


def detect_format(record: dict) -> str:
    """Name the form of one record (see FORMATS), by which keys it has."""
    has = lambda *keys: all(record.get(k) is not None for k in keys)
    if has("messages"):
        return "messages"
    for fmt in ("alpaca", "prompt_completion", "classification", "text"):
        if has(*_REQUIRED[fmt]):
            return fmt
    forms = "\n".join(f"  {name}: {example}" for name, example in FORMATS.items())
    raise ValueError(f"record with keys {sorted(record)} matches no known format; accepted forms:\n{forms}")


def check_fields(record: dict, fmt: str) -> None:
    if fmt == "messages":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{k}] must be an object with string 'role' and 'content'")
            if m["role"] == "assistant" and not m["content"].strip():
                raise ValueError(f"messages[{k}]: empty required field 'content' of an assistant turn")
        roles = [m["role"] for m in messages if m["role"] != "system"]
        if "assistant" not in roles:
            raise ValueError("'messages' has no assistant turn, so there is nothing to learn")
        if roles[0] == "assistant":
            raise ValueError("'messages' starts with an assistant turn; it needs a prompt (user turn) before it")
        return
    for key in _REQUIRED[fmt]:
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (str, int) if key == "label" else str):
            raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
        if not str(value).strip():
            raise ValueError(f"empty required field {key!r}")
    if fmt == "alpaca" and not isinstance(record.get("input") or "", str):
        raise ValueError("field 'input' must be a string")


def split_train_val(examples: Sequence, val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Deterministic split from `seed` alone (a private RNG, not the global one); both parts keep the
    input order. At least one validation example whenever val_fraction > 0 and there are two or more."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(examples)
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


def load_split_records(train_path: str | Path, validation_path: str | Path | None = None, val_fraction: float = 0.1,
                       seed: int = 0, max_examples: int | None = None,
                       columns: dict[str, str] | None = None) -> tuple[RecordList, RecordList]:
    """(train, validation) records: the validation file when given, else a deterministic share of train.
    Splitting records (not tokens) keeps each validation row's text for generation metrics."""
    records = read_records(train_path, columns)
    if max_examples:
        records = RecordList(records[:max_examples], records.path, records.lines[:max_examples])
    if validation_path:
        return records, read_records(validation_path, columns)
    idx_train, idx_val = split_train_val(list(range(len(records))), val_fraction, seed)
    pick = lambda idx: RecordList([records[i] for i in idx], records.path, [records.lines[i] for i in idx])  # noqa: E731
    return pick(idx_train), pick(idx_val)
