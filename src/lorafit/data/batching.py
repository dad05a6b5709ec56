"""Training data: render records the way the model will see them, mask the loss, pack, batch.

    read_records -> build_causal_lm_examples | build_classification_examples
        -> (pack_examples) -> batches(..., CausalLMCollator | ClassificationCollator)

Causal-LM labels are NOT shifted here: labels[t] is the token at t, or IGNORE_INDEX where no loss is
wanted. transformers models shift internally (logits at t-1 predict labels[t]).
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Callable, Iterator, Sequence

import torch

from lorafit.data.chat import ChatRenderer
from lorafit.data.formats import FORMATS, check_fields, detect_format, to_messages, with_system
from lorafit.data.records import record_location

IGNORE_INDEX = -100  # the label value torch.nn.functional.cross_entropy skips by default


def build_causal_lm_examples(
    records: Sequence[dict],
    tokenizer,
    max_length: int = 512,
    source: str | None = None,
    train_on_prompt: bool = False,
    system_prompt: str | None = None,
) -> list[dict]:
    """Records -> [{"input_ids": [...], "labels": [...]}]: loss only on assistant answers (each ending in
    its end token) unless train_on_prompt; records of a "document" format (plain text) learn every
    token. Sequences keep their first max_length tokens; examples left with no answer token are
    dropped with a warning."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no eos_token; causal-LM training needs one so the model learns to stop"
        )
    chat = ChatRenderer(tokenizer)
    examples, dropped = [], 0
    for i, record in enumerate(records):
        try:
            fmt = detect_format(record)
            kind = FORMATS[fmt].kind
            if kind == "labelled":
                raise ValueError(
                    f"a {fmt} record (text + label); use build_classification_examples"
                )
            if kind not in ("chat", "document"):
                raise ValueError(f"a {fmt} record is not text to learn; set model.task for it")
            check_fields(record, fmt)  # records may come from code, not only from read_records
            if kind == "document":
                ids = chat.encode_text(record["text"])
                labels = list(ids)
            else:  # "chat"
                ids, spans = chat.tokenize(with_system(to_messages(record, fmt), system_prompt))
                labels = [IGNORE_INDEX] * len(ids)
                for start, end in spans:
                    labels[start:end] = ids[start:end]
        except ValueError as e:
            raise ValueError(f"{record_location(records, i, source)}: {e}") from None
        if train_on_prompt:
            labels = list(ids)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(
            label == IGNORE_INDEX for label in labels[1:]
        ):  # labels[0] is never a target after the shift
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if dropped:
        warnings.warn(
            f"{source or getattr(records, 'path', '<records>')}: dropped {dropped} of {len(records)} "
            f"examples with no answer tokens left within max_length={max_length}",
            stacklevel=2,
        )
    return examples


def build_classification_examples(
    records: Sequence[dict],
    tokenizer,
    max_length: int = 128,
    labels: list[str] | None = None,
    source: str | None = None,
) -> tuple[list[dict], list[str]]:
    """text,label records -> ([{"input_ids", "label": int}], label names). Without `labels`, names are
    the sorted distinct labels (numerically if all are numbers, so "2" < "10")."""
    names = []
    for i, record in enumerate(records):
        try:
            fmt = detect_format(record)
            if FORMATS[fmt].kind != "labelled":
                if not {"text", "label"} <= set(record):
                    raise ValueError(f"expected a text + label record, got {fmt!r}")
                fmt = "classification"  # a label without value: its check says so
            check_fields(record, fmt)
        except ValueError as e:
            raise ValueError(f"{record_location(records, i, source)}: {e}") from None
        names.append(str(record["label"]).strip())
    labels = label_set(names, labels)
    index = {name: k for k, name in enumerate(labels)}
    examples = []
    for i, (record, name) in enumerate(zip(records, names)):
        if name not in index:
            raise ValueError(
                f"{record_location(records, i, source)}: unknown label {name!r}; known labels: {labels}"
            )
        ids = tokenizer(record["text"], truncation=True, max_length=max_length)["input_ids"]
        examples.append({"input_ids": list(ids), "label": index[name]})
    return examples, labels


def label_set(names: Sequence[str], labels: Sequence[str] | None = None) -> list[str]:
    """The label names in head order: `labels` when given (a trained head's), else the sorted
    distinct `names` (numerically if all are numbers, so "2" < "10")."""
    if labels is None:
        try:
            labels = sorted(set(names), key=float)
        except ValueError:
            labels = sorted(set(names))
    labels = [str(name) for name in labels]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate label names in {labels}")
    return labels


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Concatenate consecutive causal-LM examples into sequences of <= max_length tokens (next-fit:
    O(n), order kept). position_ids restart at 0 per document and seq_lens records document lengths,
    so the model can keep documents from attending to each other (see CausalLMCollator)."""
    packs: list[dict] = []
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n > max_length:
            raise ValueError(
                f"example {i} has {n} tokens > max_length={max_length}; "
                "build examples with max_length no larger than the packing length"
            )
        if not packs or len(packs[-1]["input_ids"]) + n > max_length:
            packs.append({"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []})
        pack = packs[-1]
        pack["input_ids"] += ex["input_ids"]
        pack["labels"] += ex["labels"]
        pack["position_ids"] += range(n)
        pack["seq_lens"].append(n)
    return packs


def _pad(rows: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _row(tokens) -> torch.Tensor:
    return torch.tensor([list(tokens)], dtype=torch.long)  # (1, N)


class _PaddingCollator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError(
                "pad_token_id is None; a tokenizer without a pad token can pad with eos_token_id"
            )
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def _length(self, examples: Sequence[dict]) -> int:
        longest, multiple = max(len(e["input_ids"]) for e in examples), self.pad_to_multiple_of
        return math.ceil(longest / multiple) * multiple if multiple else longest


class CausalLMCollator(_PaddingCollator):
    """Causal-LM batches, in one of two layouts.

    Padded (default): right-pads examples, input_ids with pad_token_id and labels with
    IGNORE_INDEX. Plain examples get attention_mask (B, T). Packed examples get position_ids (B, T)
    and NO attention_mask: transformers models build a per-document causal mask from position_ids
    only when attention_mask is None and there is no KV cache, so call the model with
    use_cache=False (its config default is True, even in train mode); otherwise documents in one
    pack attend to each other. Padding gets its own position run 0, 1, ... so it reads as one more
    (loss-free) document.

    padding_free: every document of the batch laid end to end in ONE row, no padding at all:
    input_ids, labels, position_ids (1, N) and doc_lens (D,), the documents' lengths (what
    `ops.attention.Documents` is built from). Compute on pad tokens is what this saves: 22% of a
    batch of 8 E2E chat examples padded to the longest. With pad_to_multiple_of, the row ends in
    one loss-free document of padding up to a multiple of it: a few distinct row lengths rather
    than one per batch, so the kernels' per-shape caches (oneDNN's primitives, compiled graphs)
    are reused instead of growing.

    In both, the first token of a document after the first in a row is never a target
    (IGNORE_INDEX): the previous document's last token does not learn to predict it."""

    def __init__(
        self, pad_token_id: int, pad_to_multiple_of: int | None = None, padding_free: bool = False
    ):
        super().__init__(pad_token_id, pad_to_multiple_of)
        self.padding_free = padding_free

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        packed = "position_ids" in examples[0]
        if any(("position_ids" in e) != packed for e in examples):
            raise ValueError("cannot mix packed and unpacked examples in one batch")
        doc_lens = [_document_lengths(e) for e in examples]
        if self.padding_free:
            lens = [n for row in doc_lens for n in row]
            ids = [t for e in examples for t in e["input_ids"]]
            labels = _mask_document_starts([t for e in examples for t in e["labels"]], lens)
            pad = -len(ids) % (self.pad_to_multiple_of or 1)
            if pad:  # one loss-free document of padding: few distinct row lengths
                lens.append(pad)
                ids += [self.pad_token_id] * pad
                labels += [IGNORE_INDEX] * pad
            return {
                "input_ids": _row(ids),  # (1, N)
                "labels": _row(labels),  # (1, N)
                "position_ids": _row(t for n in lens for t in range(n)),  # (1, N)
                "doc_lens": torch.tensor(lens, dtype=torch.long),  # (D,)
            }
        labels = [_mask_document_starts(e["labels"], n) for e, n in zip(examples, doc_lens)]
        T = self._length(examples)
        batch = {
            "input_ids": _pad([e["input_ids"] for e in examples], self.pad_token_id, T),  # (B, T)
            "labels": _pad(labels, IGNORE_INDEX, T),
        }  # (B, T)
        if packed:
            rows = [
                list(e["position_ids"]) + list(range(T - len(e["input_ids"]))) for e in examples
            ]
            batch["position_ids"] = _pad(rows, 0, T)  # (B, T)
        else:
            batch["attention_mask"] = _pad(
                [[1] * len(e["input_ids"]) for e in examples], 0, T
            )  # (B, T)
        return batch


def _document_lengths(example: dict) -> list[int]:
    """Lengths of the documents in an example: one, or a pack's (its position ids restart at 0)."""
    if "position_ids" not in example:
        return [len(example["input_ids"])]
    starts = [i for i, p in enumerate(example["position_ids"]) if p == 0 or i == 0]
    return [b - a for a, b in zip(starts, starts[1:] + [len(example["position_ids"])])]


def _mask_document_starts(labels: Sequence[int], lens: Sequence[int]) -> list[int]:
    """`labels` of a row of documents of `lens` tokens, with IGNORE_INDEX at the first token of
    each document but the row's first (whose position 0 is never a target anyway)."""
    labels, start = list(labels), 0
    for n in lens[:-1]:
        start += n
        labels[start] = IGNORE_INDEX
    return labels


class ClassificationCollator(_PaddingCollator):
    """Right-pads input_ids; returns input_ids (B, T), attention_mask (B, T), labels (B,)."""

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        T = self._length(examples)
        return {
            "input_ids": _pad([e["input_ids"] for e in examples], self.pad_token_id, T),  # (B, T)
            "attention_mask": _pad([[1] * len(e["input_ids"]) for e in examples], 0, T),  # (B, T)
            "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long),
        }  # (B,)


def num_batches(
    n_examples: int, batch_size: int, drop_last: bool = False, world_size: int = 1
) -> int:
    """How many batches `batches` yields per epoch (per rank), e.g. for a learning-rate schedule."""
    step = batch_size * world_size
    full, rest = divmod(n_examples, step)
    # A last partial batch is kept only if every rank gets an example: ranks must take equal step counts.
    return full + (1 if rest and not drop_last and rest >= world_size else 0)


def batches(
    examples: Sequence[dict],
    batch_size: int,
    collator: Callable[[list[dict]], dict],
    seed: int,
    epoch: int,
    shuffle: bool = True,
    start: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict]:
    """Yield collated batches in an order fixed by (seed, epoch) alone, so a resumed run replays it;
    start=k skips the first k batches without collating them. With world_size > 1, each global batch
    of batch_size * world_size examples is split between ranks (rank r takes every world_size-th)."""
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}"
        )
    order = list(range(len(examples)))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(
            order
        )  # str seeds hash with sha512: stable across processes
    step = batch_size * world_size
    for k in range(start, num_batches(len(examples), batch_size, drop_last, world_size)):
        chunk = order[k * step : (k + 1) * step][rank::world_size]
        yield collator([examples[i] for i in chunk])
