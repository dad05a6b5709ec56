"""Tests for lorafit.data.records: validating what a reader returns (one format per file, errors at
file:line), column mapping, locations that survive slicing and splitting, train/validation splits."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import write_text
from lorafit.data import load_split_records, read_records, record_location, split_train_val


@pytest.mark.parametrize(
    "line, message",
    [
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "a", "completion": ""}', "empty required field 'completion'"),
        ('{"question": "a"}', "matches no known format"),
        ('{"text": "a", "label": "x"}', r"is 'classification' but line 1 is 'prompt_completion'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}', "starts with an assistant turn"),
        (
            '{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}',
            r"messages\[0\]",
        ),
        ('{"prompt": null, "completion": "b"}', "field 'prompt' has no value"),
    ],
)
def test_bad_record_names_file_line_and_problem(tmp_path, line, message):
    path = write_text(tmp_path, "d.jsonl", '{"prompt": "a", "completion": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: .*" + message):
        read_records(path)


def test_columnar_row_without_label_is_a_missing_label_not_a_format_switch(tmp_path):
    # In a columnar file every row has every column: an empty label cell in the FIRST row must not
    # make the file a "text" file whose later rows are "classification".
    pq.write_table(pa.table({"text": ["a", "b"], "label": [None, "pos"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"d\.parquet row 1: field 'label' has no value"):
        read_records(tmp_path / "d.parquet")


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_records(tmp_path / "nope.jsonl")
    for name in ("e.jsonl", "e.csv", "f.csv"):
        with pytest.raises(ValueError, match="file is empty"):
            read_records(write_text(tmp_path, name, "text\n" if name == "f.csv" else "\n"))


def test_columns_mapping_keeps_only_mapped_fields_and_names_missing_ones(tmp_path):
    path = write_text(tmp_path, "d.csv", "mr,ref,id\nname[x],X is a pub.,1\n")
    assert read_records(path, {"mr": "prompt", "ref": "completion"}) == [
        {"prompt": "name[x]", "completion": "X is a pub."}
    ]
    with pytest.raises(
        ValueError, match=r"d\.csv:2: no field 'reference' \(data\.columns maps it\)"
    ):
        read_records(path, {"mr": "prompt", "reference": "completion"})


def test_locations_survive_slicing_and_name_later_errors(tmp_path):
    path = write_text(
        tmp_path, "d.jsonl", "".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(4))
    )
    records = read_records(path)
    tail = records[2:]
    assert tail == [{"text": "t2"}, {"text": "t3"}] and record_location(tail, 0) == f"{path}:3"
    assert record_location(tail, 1, source="other.jsonl") == "other.jsonl:4"
    assert record_location([{"text": "a"}], 0) == "<records> record 1"


def test_load_split_records_keeps_locations_and_reads_the_validation_split(tmp_path):
    path = write_text(
        tmp_path, "d.jsonl", "".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(10))
    )
    train, val = load_split_records(path, val_fraction=0.2, seed=1, max_examples=8)
    assert len(train) == 6 and len(val) == 2
    assert {r["text"] for r in train + val} == {f"t{i}" for i in range(8)}
    assert [record_location(val, i) for i in range(2)] == [
        f"{path}:{int(r['text'][1:]) + 1}" for r in val
    ]
    # A validation folder holding several splits gives its validation split.
    for split, n in (("train", 3), ("validation", 2)):
        (tmp_path / "hub" / split).mkdir(parents=True)
        pq.write_table(
            pa.Table.from_pylist([{"text": f"{split}{i}"} for i in range(n)]),
            tmp_path / "hub" / split / "0000.parquet",
        )
    train, val = load_split_records(tmp_path / "hub", tmp_path / "hub")
    assert [r["text"] for r in train] == ["train0", "train1", "train2"]
    assert [r["text"] for r in val] == ["validation0", "validation1"]


def test_split_is_deterministic_disjoint_and_ignores_global_rng():
    items = list(range(50))
    random.seed(1)
    train, val = split_train_val(items, 0.2, seed=3)
    random.seed(2)
    assert split_train_val(items, 0.2, seed=3) == (train, val)
    assert len(val) == 10 and sorted(train + val) == items and not set(train) & set(val)
    assert split_train_val(items, 0.2, seed=4) != (train, val)
    assert [len(part) for part in split_train_val([1, 2], 0.01)] == [1, 1]
    assert split_train_val([1, 2, 3], 0.0) == ([1, 2, 3], [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(items, 1.0)
