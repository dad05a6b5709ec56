"""Images as records {"image": ..., "label": ...}: the `image` format and its readers.

    IDX files (MNIST / Fashion-MNIST: `*-images-idx3-ubyte[.gz]` + the `*-labels-idx1-ubyte[.gz]`
        beside it)                                       -> image = (H, W) uint8 array
    a folder tree, one subfolder per class (ImageFolder)  -> image = the file's path
    CSV / JSONL rows with an image path and a label       -> image = the path, relative paths
        resolved against the data file's folder (`resolve_image`)

Decoding and resizing happen in the task (with the model's image processor), so records stay
cheap until examples are built.
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

from lorafit.data.formats import Format, _check_label, register_format
from lorafit.data.readers import Location, Rows, register_reader

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_IDX_IMAGES = re.compile(r"^(?P<stem>.*)-images[-.]idx3-ubyte(\.gz)?$")
_IDX_TYPES = {0x08: "u1"}  # the IDX element types an image file may use (unsigned bytes)


def _check_image(record: dict) -> None:
    image = record.get("image")
    if image is None:
        raise ValueError("field 'image' has no value; give an image file path")
    if isinstance(image, str):
        if not image.strip():
            raise ValueError("empty required field 'image'")
    elif not hasattr(image, "shape"):
        raise ValueError(
            f"field 'image' must be a file path or an array, got {type(image).__name__}"
        )
    _check_label(record.get("label"))


register_format(
    Format(
        "image",
        '{"image": "cats/1.png", "label": "cat"}',
        ("image", "label"),
        _check_image,
        kind="image",
    )
)


def resolve_image(image, data_file: str | None):
    """A record's image as something PIL or numpy reads: a relative path joins the data file's
    folder; arrays pass through."""
    if not isinstance(image, str):
        return image
    path = Path(image).expanduser()
    if not path.is_absolute() and data_file:
        base = Path(data_file)
        path = (base if base.is_dir() else base.parent) / path
    return path


# ------------------------------------------------------------------------------------- IDX


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path):
    """An IDX file (LeCun's MNIST format) -> a numpy array of its shape. Raises ValueError with
    the file's name for a truncated or foreign file."""
    import numpy as np

    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable IDX file ({exc})") from None
    if len(data) < 4 or data[0] or data[1] or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise ValueError(
            f"{path}: the header promises {size} bytes of data, the file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _labels_file(images: Path) -> Path:
    m = _IDX_IMAGES.match(images.name)
    stem = m.group("stem")
    for name in (
        f"{stem}-labels-idx1-ubyte.gz",
        f"{stem}-labels-idx1-ubyte",
        f"{stem}-labels.idx1-ubyte",
    ):
        if (images.parent / name).is_file():
            return images.parent / name
    raise ValueError(
        f"{images}: no labels file beside it ({stem}-labels-idx1-ubyte[.gz]); IDX images need "
        "their labels file in the same folder"
    )


@register_reader(
    "idx",
    "IDX images (*-images-idx3-ubyte[.gz], with its *-labels-idx1-ubyte[.gz])",
    lambda path: path.is_file() and bool(_IDX_IMAGES.match(path.name)),
)
def read_idx_images(path: Path, split: str = "train") -> Rows:
    images = read_idx(path)
    labels_path = _labels_file(path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{path}: {images.shape} images do not pair with {labels_path.name}'s "
            f"{labels.shape} labels"
        )
    return [
        (Location(str(path), i + 1, "row"), {"image": images[i], "label": int(labels[i])})
        for i in range(len(images))
    ]


# ----------------------------------------------------------------------------- folder tree


def _class_folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image_tree(path: Path) -> bool:
    if not path.is_dir() or (path / "dataset_info.json").exists():
        return False
    folders = _class_folders(path)
    return bool(folders) and any(
        f.suffix.lower() in IMAGE_SUFFIXES for d in folders for f in d.iterdir()
    )


@register_reader("image-folders", "a folder of class subfolders holding images", _is_image_tree)
def read_image_tree(path: Path, split: str = "train") -> Rows:
    rows: Rows = []
    for folder in _class_folders(path):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                where = Location(str(path), len(rows) + 1, "row")
                rows.append((where, {"image": str(file), "label": folder.name}))
    return rows
