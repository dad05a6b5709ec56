"""Tests for lorafit.data.readers: every reader on a real file or folder written here, its error
locations, and the conversion of columnar values (Arrow, numpy) to plain Python."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import write_text
from lorafit.data import READERS, read_records
from lorafit.data.readers import hub_splits, plain

CHAT = [
    {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "name": "bot"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def assert_plain(value):
    """Only built-in Python types, all the way down."""
    if isinstance(value, dict):
        assert type(value) is dict
        for v in value.values():
            assert_plain(v)
    elif isinstance(value, list):
        assert type(value) is list
        for v in value:
            assert_plain(v)
    else:
        assert value is None or type(value) in (str, int, float, bool), type(value)


def test_registry_has_one_reader_per_kind():
    assert list(READERS) == [
        "json",
        "csv",
        "tsv",
        "parquet",
        "datasets",
        "hub-parquet",
        "idx",
        "image-folders",
    ]


# --------------------------------------------------------------------------------- text files


def test_read_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = write_text(
        tmp_path,
        "d.jsonl",
        '{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n',
    )
    records = read_records(path)
    assert records == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    assert [str(w) for w in records.locations] == [f"{path}:1", f"{path}:3"]


def test_malformed_jsonl_line_is_reported_by_its_line_number(tmp_path):
    path = write_text(
        tmp_path, "d.jsonl", '{"text": "a"}\n{"text": "b"}\n\n{"text": "c"\n{"text": "d"}\n'
    )
    with pytest.raises(ValueError, match=r"d\.jsonl:4: invalid JSON"):
        read_records(path)
    with pytest.raises(ValueError, match=r"e\.jsonl:2: expected a JSON object, got list"):
        read_records(write_text(tmp_path, "e.jsonl", '{"text": "a"}\n[1, 2]\n'))


def test_json_array_file_reports_line_of_bad_item(tmp_path):
    good = write_text(
        tmp_path,
        "a.json",
        '[\n  {"instruction": "i", "output": "o"},\n  {"instruction": "j", "output": "p"}\n]',
    )
    assert [w.n for w in read_records(good).locations] == [2, 3]
    bad = write_text(
        tmp_path,
        "b.json",
        '[\n  {"instruction": "i", "output": "o"},\n  {"instruction": "j", "output": ""}\n]',
    )
    with pytest.raises(ValueError, match=r"b\.json:3: empty required field 'output'"):
        read_records(bad)
    with pytest.raises(ValueError, match=r"c\.json:2: expected ',' or '\]'"):
        read_records(write_text(tmp_path, "c.json", '[\n {"text": "a"} {"text": "b"}\n]'))


def test_csv_reads_rows_and_reports_bad_row_after_multiline_field(tmp_path):
    path = write_text(tmp_path, "d.csv", 'text,label\n"two\nlines",pos\nok,neg\nthree,cols,here\n')
    with pytest.raises(ValueError, match=r"d\.csv:5: expected 2 columns \(text, label\), got 3"):
        read_records(path)
    path = write_text(tmp_path, "e.csv", '\ufefftext,label\n"two\nlines",pos\nok,\n')
    with pytest.raises(ValueError, match=r"e\.csv:4: empty required field 'label'"):
        read_records(path)
    records = read_records(write_text(tmp_path, "f.csv", 'text,label\n"two\nlines",pos\nok,neg\n'))
    assert records == [{"text": "two\nlines", "label": "pos"}, {"text": "ok", "label": "neg"}]
    assert [w.n for w in records.locations] == [2, 4]
    with pytest.raises(ValueError, match=r"g\.csv:1: header has an empty or duplicate column"):
        read_records(write_text(tmp_path, "g.csv", "text,text\na,b\n"))


def test_tsv_keeps_quotes_literal(tmp_path):
    records = read_records(write_text(tmp_path, "d.tsv", 'prompt\tcompletion\nsay "hi"\t"hi"\n'))
    assert records == [{"prompt": 'say "hi"', "completion": '"hi"'}]


def test_not_utf8_and_unknown_kinds_are_named(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl: not UTF-8 text"):
        read_records(tmp_path / "latin1.jsonl")
    with pytest.raises(
        ValueError, match=r"unknown data file extension '\.txt'; readable are: .*\.parquet"
    ):
        read_records(write_text(tmp_path, "d.txt", "hello"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="a folder no reader understands.*save_to_disk"):
        read_records(tmp_path / "empty_dir")


# ------------------------------------------------------------------------------------ parquet


def test_parquet_chat_messages_become_plain_python(tmp_path):
    records = read_records(write_parquet(tmp_path / "chat.parquet", CHAT))
    # The struct column gives every message a "name" field; only the one that had it keeps it.
    assert records == CHAT
    assert_plain(list(records))
    assert str(records.locations[1]) == f"{tmp_path / 'chat.parquet'} row 2"


def test_parquet_errors_name_file_and_row(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": " "}]
    with pytest.raises(ValueError, match=r"d\.parquet row 2: empty required field 'completion'"):
        read_records(write_parquet(tmp_path / "d.parquet", rows))
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": None, "completion": "d"}]
    with pytest.raises(ValueError, match=r"n\.parquet row 2: field 'prompt' has no value"):
        read_records(write_parquet(tmp_path / "n.parquet", rows))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"broken\.parquet: not a readable Parquet file"):
        read_records(tmp_path / "broken.parquet")
    with pytest.raises(ValueError, match=r"empty\.parquet: file is empty"):
        read_records(write_parquet(tmp_path / "empty.parquet", []))


def test_parquet_written_by_pandas_with_a_missing_int_label(tmp_path):
    # pandas turns an int column with one empty cell into float64 (1.0, NaN, 2.0): the row without
    # a label is the one to blame, and the others keep their integer labels.
    table = pa.table({"text": ["a", "b", "c"], "label": pa.array([1.0, math.nan, 2.0])})
    pq.write_table(table, tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p\.parquet row 2: field 'label' has no value"):
        read_records(tmp_path / "p.parquet")
    pq.write_table(table.slice(0, 1), tmp_path / "one.parquet")  # no missing value: floats stay
    with pytest.raises(
        ValueError, match=r"row 1: field 'label' must be a string or an integer, got float"
    ):
        read_records(tmp_path / "one.parquet")


def test_plain_converts_numpy_and_arrow_values():
    value = {
        "a": np.int64(3),
        "b": np.array([1.5, np.nan]),
        "c": pa.scalar("x"),
        "d": (np.str_("y"),),
    }
    out = plain(value)
    assert out == {"a": 3, "b": [1.5, None], "c": "x", "d": ["y"]}
    assert_plain(out)
    assert plain({"keep": "x", "gone": None}) == {"keep": "x"} and plain(float("nan")) is None


# ------------------------------------------------------------------------- datasets folders


def test_save_to_disk_dataset_folder_even_with_numpy_format(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(CHAT).with_format("numpy")  # the format is saved with it
    ds.save_to_disk(str(tmp_path / "ds"))
    records = read_records(tmp_path / "ds")
    assert records == CHAT
    assert_plain(list(records))
    assert str(records.locations[0]) == f"{tmp_path / 'ds'} row 1"


def test_save_to_disk_dataset_dict_picks_train_or_names_the_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(4)]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:3]),
            "validation": datasets.Dataset.from_list(rows[3:]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_records(tmp_path / "dd") == rows[:3]
    validation = read_records(tmp_path / "dd", split="validation")
    assert validation == rows[3:]
    assert str(validation.locations[0]) == f"{tmp_path / 'dd' / 'validation'} row 1"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "t")
    )
    with pytest.raises(ValueError, match=r"no 'train' split; the splits there are \['test'\]"):
        read_records(tmp_path / "t")
    bad = datasets.Dataset.from_list([{"text": "a", "label": "x"}, {"text": "b", "label": "nan"}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"bad row 2: label 'nan' is how a missing value"):
        read_records(tmp_path / "bad")


# ------------------------------------------------------------------------ Hub parquet layout


def test_hub_layout_reads_train_shards_in_order_and_names_the_shard(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", rows[:2])
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", rows[2:4])
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows[4:])
    assert sorted(hub_splits(tmp_path)) == ["test", "train"]
    records = read_records(tmp_path)
    assert records == rows[:4]
    assert (
        str(records.locations[2]) == f"{tmp_path / 'data' / 'train-00001-of-00002.parquet'} row 1"
    )
    assert read_records(tmp_path, split="test") == rows[4:]
    with pytest.raises(
        ValueError, match=r"no 'validation' split; the splits there are \['test', 'train'\]"
    ):
        read_records(tmp_path, split="validation")
    write_parquet(
        tmp_path / "data" / "train-00002-of-00003.parquet", [{"prompt": "p", "completion": ""}]
    )
    with pytest.raises(
        ValueError, match=r"train-00002-of-00003\.parquet row 1: empty required field"
    ):
        read_records(tmp_path)


def test_hub_split_folders_and_unsplit_top_level_files(tmp_path):
    rows = [{"text": f"doc {i}"} for i in range(3)]
    write_parquet(tmp_path / "a" / "train" / "0000.parquet", rows[:2])
    write_parquet(tmp_path / "a" / "validation" / "0000.parquet", rows[2:])
    assert read_records(tmp_path / "a") == rows[:2]
    assert read_records(tmp_path / "a", split="validation") == rows[2:]
    write_parquet(tmp_path / "b" / "part-0.parquet", rows)  # no split word: one dataset
    assert read_records(tmp_path / "b") == rows == read_records(tmp_path / "b", split="validation")
