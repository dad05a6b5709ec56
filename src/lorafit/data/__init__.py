"""Data: read records from files and folders, turn them into chat messages, render and tokenize
them the one way training, evaluation and generation share, then pack and batch.

    readers.py   a registry of file/folder readers (jsonl/json, csv, tsv, parquet, datasets'
                 save_to_disk folders, Hub parquet shards)
    formats.py   a registry of record forms (messages, sharegpt, alpaca, prompt_completion,
                 classification, text) and the one conversion of records into messages
    records.py   read_records / load_split_records: validated records that know their file:line
    chat.py      the one chat/prompt renderer (render_prompt, ChatRenderer; with_system from
                 formats.py, whose ShareGPT `system` field uses the same rule)
    batching.py  examples with loss masks, packing, collators, the deterministic batch order
    images.py    the image format; IDX and class-folder readers
    interactions.py  the user-item interaction format (recommendation)

Import from here (`from lorafit.data import render_prompt`); the modules are the implementation.
"""

from lorafit.data.batching import (
    IGNORE_INDEX,
    CausalLMCollator,
    ClassificationCollator,
    batches,
    build_causal_lm_examples,
    build_classification_examples,
    label_set,
    num_batches,
    pack_examples,
)
from lorafit.data.chat import ChatRenderer, render_prompt
from lorafit.data.formats import (
    FORMATS,
    KINDS,
    ROLES,
    Format,
    check_fields,
    detect_format,
    prompt_and_answer,
    register_format,
    to_messages,
    with_system,
)
from lorafit.data.readers import READERS, Location, Reader, read_rows, register_reader
from lorafit.data import images, interactions  # noqa: E402,F401  (register their formats, readers)
from lorafit.data.images import resolve_image
from lorafit.data.interactions import rating_of
from lorafit.data.records import (
    RecordList,
    load_split_records,
    read_records,
    record_location,
    split_train_val,
)

__all__ = [
    "IGNORE_INDEX",
    "CausalLMCollator",
    "ClassificationCollator",
    "batches",
    "build_causal_lm_examples",
    "build_classification_examples",
    "label_set",
    "rating_of",
    "resolve_image",
    "num_batches",
    "pack_examples",
    "ChatRenderer",
    "render_prompt",
    "with_system",
    "FORMATS",
    "KINDS",
    "ROLES",
    "Format",
    "check_fields",
    "detect_format",
    "prompt_and_answer",
    "register_format",
    "to_messages",
    "READERS",
    "Location",
    "Reader",
    "read_rows",
    "register_reader",
    "RecordList",
    "load_split_records",
    "read_records",
    "record_location",
    "split_train_val",
]
