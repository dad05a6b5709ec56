"""Image records: IDX files, class folders, CSV rows of paths; interactions."""

import gzip

import numpy as np
import pytest

from helpers import write_idx
from lorafit.data import read_records, resolve_image


def test_idx_images_pair_with_their_labels_file(tmp_path):
    images = np.arange(3 * 4 * 5).reshape(3, 4, 5) % 256
    path = write_idx(tmp_path, "train", images, [2, 0, 1])
    records = read_records(path)
    assert [r["label"] for r in records] == [2, 0, 1]
    assert np.array_equal(records[1]["image"], images[1])
    assert str(records.locations[2]) == f"{path} row 3"


def test_idx_without_labels_file_names_what_is_missing(tmp_path):
    path = write_idx(tmp_path, "t10k", np.zeros((2, 3, 3)), [0, 1])
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        read_records(path)


def test_truncated_idx_file_is_refused_with_its_name(tmp_path):
    path = write_idx(tmp_path, "train", np.zeros((4, 3, 3)), [0, 1, 0, 1])
    data = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-5])
    with pytest.raises(ValueError, match="header promises 36 bytes"):
        read_records(path)


def test_idx_labels_that_do_not_pair_are_refused(tmp_path):
    path = write_idx(tmp_path, "train", np.zeros((3, 2, 2)), [0, 1])
    with pytest.raises(ValueError, match="do not pair"):
        read_records(path)


def test_class_folders_become_labelled_paths(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        Image.new("RGB", (5, 5)).save(tmp_path / "imgs" / label / "1.png")
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("not an image")
    records = read_records(tmp_path / "imgs")
    assert [(r["label"], r["image"].endswith("1.png")) for r in records] == [
        ("cat", True),
        ("dog", True),
    ]


def test_csv_image_paths_resolve_against_the_data_file(tmp_path):
    (tmp_path / "data").mkdir()
    csv = tmp_path / "data" / "train.csv"
    csv.write_text("path,label\nimgs/a.png,cat\n")
    records = read_records(csv, {"path": "image", "label": "label"})
    assert resolve_image(records[0]["image"], records.path) == tmp_path / "data" / "imgs" / "a.png"


def test_image_record_without_label_value_is_refused(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"image": "a.png", "label": null}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1: field 'label' has no value"):
        read_records(path)


def test_interaction_with_a_non_numeric_rating_names_the_row(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("user,item,rating\n1,2,4.5\n1,3,great\n")
    with pytest.raises(ValueError, match=r"r.csv:3: field 'rating' must be a number"):
        read_records(path)
    path.write_text("user,item\n1,2\n")  # implicit feedback: no rating
    assert read_records(path)[0] == {"user": "1", "item": "2"}
