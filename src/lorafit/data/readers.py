"""File readers, one per kind of data source, in a registry.

    read_rows(path, split) -> [(Location, record dict)]   (records not yet validated)

A reader claims a path (by extension, or by what a folder holds) and turns it into plain Python
dicts, each with the place it came from: `file:line` for text formats, `file row N` (1-based)
for columnar ones. A new kind of source is one function decorated with `@register_reader`.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple


class Location(NamedTuple):
    """Where a record came from; str() is what error messages show."""

    file: str
    n: int  # line number (text files) or 1-based row number (columnar data)
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.file}:{self.n}" if self.unit == "line" else f"{self.file} row {self.n}"

    def short(self) -> str:  # for a second place in the same file: "line 3", "row 3"
        return f"{self.unit} {self.n}"


Rows = list[tuple[Location, dict]]


@dataclass(frozen=True)
class Reader:
    name: str
    what: str  # how the error for an unreadable path lists this reader
    accepts: Callable[[Path], bool]
    read: Callable[[Path, str], Rows]  # (path, split): split matters only for multi-split folders


READERS: dict[str, Reader] = {}  # tried in order; the first that accepts a path reads it


def register_reader(name: str, what: str, accepts: Callable[[Path], bool]):
    def add(read: Callable[[Path, str], Rows]):
        READERS[name] = Reader(name, what, accepts, read)
        return read

    return add


def read_rows(path: Path, split: str = "train") -> Rows:
    """Rows of the file or folder at `path`, by the first registered reader that accepts it."""
    reader = next((r for r in READERS.values() if r.accepts(path)), None)
    if reader is None:
        kinds = ", ".join(r.what for r in READERS.values())
        if path.is_dir():
            raise ValueError(f"{path}: a folder no reader understands; readable are: {kinds}")
        raise ValueError(
            f"{path}: unknown data file extension {path.suffix.lower()!r}; readable are: {kinds}"
        )
    return reader.read(path, split)


def _suffix(*suffixes: str) -> Callable[[Path], bool]:
    return lambda path: path.is_file() and path.suffix.lower() in suffixes


# ------------------------------------------------------------------------------- text files


@register_reader("json", ".jsonl/.json (JSON lines or one array)", _suffix(".jsonl", ".json"))
def read_json(path: Path, split: str = "train") -> Rows:
    text = _utf8(path)
    if text.lstrip().startswith("["):
        return _json_array_items(text, path)
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # "\n" only: U+2028 is legal in JSON strings
        if line.strip():
            try:
                rows.append((Location(str(path), n), json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})"
                ) from None
    for where, record in rows:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return rows


def _utf8(path: Path) -> str:
    try:  # -sig: editors on Windows prepend a byte-order mark
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_array_items(text: str, path: Path) -> Rows:
    # Decode item by item (not json.loads) to know the line each record starts on.
    skip_ws = re.compile(r"[ \t\r\n]*").match
    decoder, rows, line, pos = json.JSONDecoder(), [], 1, 0
    i = skip_ws(text, text.index("[") + 1).end()
    while text[i : i + 1] != "]":
        line, pos = line + text.count("\n", pos, i), i
        try:  # at end of text this raises "Expecting value": an unclosed array
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
            ) from None
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{line}: expected a JSON object, got {type(item).__name__}")
        rows.append((Location(str(path), line), item))
        i = skip_ws(text, i).end()
        if text[i : i + 1] == ",":
            i = skip_ws(text, i + 1).end()
        elif text[i : i + 1] != "]":
            raise ValueError(
                f"{path}:{line}: expected ',' or ']' after this item of the JSON array"
            )
    return rows


@register_reader("csv", ".csv (header row)", _suffix(".csv"))
def read_csv(path: Path, split: str = "train") -> Rows:
    return _read_delimited(path, tsv=False)


@register_reader("tsv", ".tsv (header row, unquoted)", _suffix(".tsv"))
def read_tsv(path: Path, split: str = "train") -> Rows:
    return _read_delimited(path, tsv=True)


def _read_delimited(path: Path, tsv: bool) -> Rows:
    # TSV files are conventionally unquoted, so a '"' inside a TSV field is literal text.
    quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
    header, rows, start = None, [], 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t" if tsv else ",", quoting=quoting)
            for row in reader:
                # a quoted field may span lines: report the line the row starts on
                line, start = start, reader.line_num + 1
                if not any(cell.strip() for cell in row):
                    continue
                if header is None:
                    header = [h.strip() for h in row]
                    if "" in header or len(set(header)) != len(header):
                        raise ValueError(
                            f"{path}:{line}: header has an empty or duplicate column name: {header}"
                        )
                elif len(row) != len(header):
                    raise ValueError(
                        f"{path}:{line}: expected {len(header)} columns "
                        f"({', '.join(header)}), got {len(row)}"
                    )
                else:
                    rows.append((Location(str(path), line), dict(zip(header, row))))
    except csv.Error as e:  # e.g. a NUL byte; `start` is where the unreadable row begins
        raise ValueError(f"{path}:{start}: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return rows


# --------------------------------------------------------------------------- columnar data


def plain(value):
    """Arrow / numpy values as built-in Python: lists, dicts, str, int, float, None. Float NaN
    (how pandas stores a missing value) becomes None. Inside structs a None field is dropped: a
    struct column gives every row every field, so None there means "this row has no such key"
    (e.g. a chat message without "name"), and a chat template must not see it as present."""
    if hasattr(value, "as_py"):  # a pyarrow scalar
        value = value.as_py()
    elif hasattr(value, "tolist"):  # a numpy array or scalar (np.str_ too, a str subclass)
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: v for k, v in ((k, plain(v)) for k, v in value.items()) if v is not None}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _columnar_rows(rows: list[dict], file: str) -> Rows:
    records = [{k: plain(v) for k, v in row.items()} for row in rows]
    _restore_int_columns(records)
    return [(Location(file, i, "row"), record) for i, record in enumerate(records, 1)]


def _restore_int_columns(records: list[dict]) -> None:
    """pandas stores an integer column with a missing cell as float64 (1.0, NaN, 2.0). Turn such
    a column back into ints (NaN already None), so the row to blame is the one without a value,
    not the first row for holding a float."""
    for key in records[0] if records else ():
        values = [r.get(key) for r in records]
        floats = [v for v in values if v is not None]
        if (
            len(floats) < len(values)
            and floats
            and all(type(v) is float for v in floats)
            and all(v.is_integer() for v in floats)
        ):
            for r in records:
                if r.get(key) is not None:
                    r[key] = int(r[key])


def _read_parquet_file(path: Path) -> Rows:
    import pyarrow
    import pyarrow.parquet as pq  # imported here: only parquet users pay for it

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    return _columnar_rows(table.to_pylist(), str(path))


@register_reader("parquet", ".parquet", _suffix(".parquet"))
def read_parquet(path: Path, split: str = "train") -> Rows:
    return _read_parquet_file(path)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or {"state.json", "dataset_info.json"} <= {p.name for p in path.iterdir()}
    )


@register_reader("datasets", "a folder from datasets' save_to_disk", _is_saved_dataset)
def read_saved_dataset(path: Path, split: str = "train") -> Rows:
    import datasets  # imported here: it takes about a second

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ValueError(f"{path}: cannot load this save_to_disk folder ({e})") from None
    source = path
    if isinstance(data, datasets.DatasetDict):
        name = pick_split(list(data), split, path)
        data, source = data[name], path / name  # save_to_disk puts each split in its own folder
    # to_list reads the Arrow table, so a saved with_format("numpy") does not leak numpy here
    return _columnar_rows(data.to_list(), str(source))


def pick_split(available: list[str], split: str, folder: Path) -> str:
    """`split` if the folder has it ("validation" also matches valid / val / dev); else an error
    listing the splits there are. "" stands for shards named by no split: alone, they are one
    dataset, read whichever split is asked; beside named splits they are "train", as in
    `datasets`."""
    if available == [""]:
        return ""
    aliases = {"train": ("train", ""), "validation": ("validation", "valid", "val", "dev")}
    name = next((s for s in aliases.get(split, (split,)) if s in available), None)
    if name is None:
        names = sorted(s or "train" for s in available)
        raise ValueError(
            f"{folder}: no {split!r} split; the splits there are {names}; point at "
            "one split's folder or files"
        )
    return name


_SPLIT_WORDS = ("train", "validation", "valid", "val", "dev", "test", "eval")


def hub_splits(folder: Path) -> dict[str, list[Path]]:
    """Parquet shards by split, in the layouts the Hugging Face Hub uses: `data/<split>-*.parquet`,
    `<split>/*.parquet` (also under `data/`), or `*.parquet` files named by split; files whose
    names start with no split word go under "" (see pick_split)."""
    root = folder / "data" if (folder / "data").is_dir() else folder
    splits: dict[str, list[Path]] = {}
    for file in sorted(root.glob("*.parquet")):
        word = re.split(r"[-_.]", file.name, maxsplit=1)[0].lower()
        splits.setdefault(word if word in _SPLIT_WORDS else "", []).append(file)
    for file in sorted(root.glob("*/*.parquet")):
        splits.setdefault(file.parent.name, []).append(file)
    return splits


@register_reader(
    "hub-parquet",
    "a folder of Hub-style .parquet shards (data/train-*.parquet)",
    lambda path: path.is_dir() and bool(hub_splits(path)),
)
def read_hub_parquet(path: Path, split: str = "train") -> Rows:
    splits = hub_splits(path)
    return [
        row
        for file in splits[pick_split(list(splits), split, path)]
        for row in _read_parquet_file(file)
    ]
