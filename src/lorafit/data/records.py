"""Reading a user's data into validated records (dicts), and splitting them.

    read_records(path, columns) -> RecordList (remembers where every record came from)

Every malformed row fails here, before any tokenization, with its file:line (or `file row N`) in
the message. Which reader reads a path: readers.py; what a record must hold: formats.py.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from lorafit.data.formats import FORMATS, check_fields, detect_format
from lorafit.data.readers import Location, Rows, read_rows


class RecordList(list):
    """A list of record dicts that remembers its source and each record's Location, so that
    errors found later (unknown label, broken chat template) can still name file:line. Slicing
    keeps the locations."""

    def __init__(self, records: Sequence[dict], path: str, locations: Sequence[Location]):
        super().__init__(records)
        self.path, self.locations = path, list(locations)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return RecordList(super().__getitem__(i), self.path, self.locations[i])
        return super().__getitem__(i)

    def pick(self, indices: Sequence[int]) -> RecordList:
        return RecordList(
            [self[i] for i in indices], self.path, [self.locations[i] for i in indices]
        )


def record_location(records: Sequence[dict], i: int, source: str | None = None) -> str:
    """Where records[i] came from; `source` names the file when the records do not know it."""
    locations = getattr(records, "locations", None)
    if locations is not None and len(locations) == len(records):
        where = locations[i]
        return str(where if source is None else where._replace(file=source))
    return f"{source or getattr(records, 'path', '<records>')} record {i + 1}"


def read_records(
    path: str | Path, columns: dict[str, str] | None = None, split: str = "train"
) -> RecordList:
    """Read a data file (.jsonl/.json, .csv, .tsv, .parquet) or folder (datasets' save_to_disk,
    Hub parquet shards; `split` picks one split there) into validated dicts.
    `columns` maps the source's field names to lorafit's (e.g. {"mr": "prompt", "ref":
    "completion"}); with it, only the mapped fields are kept."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    rows = read_rows(path, split)
    if not rows:
        raise ValueError(f"{path}: {'folder' if path.is_dir() else 'file'} is empty (no records)")
    if columns:
        rows = [(where, _rename(record, columns, where)) for where, record in rows]
    _validate(rows)
    return RecordList([r for _, r in rows], str(path), [where for where, _ in rows])


def _rename(record: dict, columns: dict[str, str], where: Location) -> dict:
    missing = [c for c in columns if c not in record]
    if missing:
        raise ValueError(
            f"{where}: no field {missing[0]!r} (data.columns maps it); the record has "
            f"{sorted(record)}"
        )
    return {new: record[old] for old, new in columns.items()}


def _validate(rows: Rows) -> None:
    """One format per file (the first record's), every record's fields checked, in file order.
    The format is read from which fields the first record HAS, values or not, so that in a
    columnar file (every row has every column) a row with an empty "label" cell is reported as a
    label without value, not as a switch to the "text" format."""
    first = rows[0][0]
    fmt = next((f.name for f in FORMATS.values() if set(f.fields) <= set(rows[0][1])), None)
    for where, record in rows:
        try:
            if fmt and set(FORMATS[fmt].fields) <= set(record) and not FORMATS[fmt].matches(record):
                check_fields(record, fmt)  # names the field without a value
            got = detect_format(record)
            check_fields(record, got)
            if got != (fmt := fmt or got):
                raise ValueError(
                    f"record is {got!r} but {first.short()} is {fmt!r}; one file must "
                    "use one format"
                )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def split_train_val(
    examples: Sequence, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list, list]:
    """Deterministic split from `seed` alone (a private RNG, not the global one); both parts keep
    the input order. At least one validation example whenever val_fraction > 0 and there are two
    or more."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(examples)
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


def load_split_records(
    train_path: str | Path,
    validation_path: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_examples: int | None = None,
    columns: dict[str, str] | None = None,
) -> tuple[RecordList, RecordList]:
    """(train, validation) records: the validation file when given, else a deterministic share of
    train. Splitting records (not tokens) keeps each validation row's text for generation
    metrics. From a folder with several splits, train reads "train" and validation "validation"."""
    records = read_records(train_path, columns)
    if max_examples:
        records = records[:max_examples]
    if validation_path:
        return records, read_records(validation_path, columns, "validation")
    idx_train, idx_val = split_train_val(list(range(len(records))), val_fraction, seed)
    return records.pick(idx_train), records.pick(idx_val)
