"""Tests for lorafit.records: reading JSONL/JSON/CSV/TSV, format detection, error locations, splitting."""
import random

import pytest

from helpers import write_text
from lorafit.data.records import detect_format, read_records, split_train_val


# ------------------------------------------------------------------------------------ reading

def test_read_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = write_text(tmp_path, "d.jsonl", '{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n')
    records = read_records(path)
    assert records == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    assert records.lines == [1, 3]


def test_malformed_jsonl_line_is_reported_by_its_line_number(tmp_path):
    path = write_text(tmp_path, "d.jsonl", '{"text": "a"}\n{"text": "b"}\n\n{"text": "c"\n{"text": "d"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:4: invalid JSON"):
        read_records(path)


@pytest.mark.parametrize("line, message", [
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "a", "completion": ""}', "empty required field 'completion'"),
    ('{"question": "a"}', "matches no known format"),
    ('{"text": "a", "label": "x"}', r"is 'classification' but line 1 is 'prompt_completion'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "starts with an assistant turn"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', r"messages\[0\]"),
])
def test_bad_record_names_file_line_and_problem(tmp_path, line, message):
    path = write_text(tmp_path, "d.jsonl", '{"prompt": "a", "completion": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: .*" + message):
        read_records(path)


def test_json_array_file_reports_line_of_bad_item(tmp_path):
    good = write_text(tmp_path, "a.json", '[\n  {"instruction": "i", "output": "o"},\n  {"instruction": "j", "output": "p"}\n]')
    assert read_records(good).lines == [2, 3]
    bad = write_text(tmp_path, "b.json", '[\n  {"instruction": "i", "output": "o"},\n  {"instruction": "j", "output": ""}\n]')
    with pytest.raises(ValueError, match=r"b\.json:3: empty required field 'output'"):
        read_records(bad)


def test_csv_reads_rows_and_reports_bad_row_after_multiline_field(tmp_path):
    path = write_text(tmp_path, "d.csv", 'text,label\n"two\nlines",pos\nok,neg\nthree,cols,here\n')
    with pytest.raises(ValueError, match=r"d\.csv:5: expected 2 columns \(text, label\), got 3"):
        read_records(path)
    path = write_text(tmp_path, "e.csv", '\ufefftext,label\n"two\nlines",pos\nok,\n')
    with pytest.raises(ValueError, match=r"e\.csv:4: empty required field 'label'"):
        read_records(path)
    records = read_records(write_text(tmp_path, "f.csv", 'text,label\n"two\nlines",pos\nok,neg\n'))
    assert records == [{"text": "two\nlines", "label": "pos"}, {"text": "ok", "label": "neg"}]
    assert records.lines == [2, 4]


def test_tsv_keeps_quotes_literal(tmp_path):
    records = read_records(write_text(tmp_path, "d.tsv", 'prompt\tcompletion\nsay "hi"\t"hi"\n'))
    assert records == [{"prompt": 'say "hi"', "completion": '"hi"'}]


def test_missing_unknown_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown data file extension '.txt'"):
        read_records(write_text(tmp_path, "d.txt", "hello"))
    for name in ("e.jsonl", "e.csv", "f.csv"):
        with pytest.raises(ValueError, match="empty"):
            read_records(write_text(tmp_path, name, "text\n" if name == "f.csv" else "\n"))


def test_detect_format_each_form_and_error_lists_forms():
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    assert detect_format({"instruction": "a", "input": "", "output": "b", "text": "t"}) == "alpaca"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"text": "a", "label": 1}) == "classification"
    assert detect_format({"text": "a"}) == "text"
    with pytest.raises(ValueError, match=r"(?s)accepted forms.*messages.*alpaca.*prompt_completion.*classification.*text"):
        detect_format({"question": "q", "answer": "a"})


# ------------------------------------------------------------------------------------ split

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
