"""Training data: read a user's file, render it the way the model will see it, mask the loss, batch it.

    read_records -> build_causal_lm_examples | build_classification_examples
        -> split_train_val -> (pack_examples) -> batches(..., CausalLMCollator | ClassificationCollator)

Causal-LM labels are NOT shifted here: labels[t] is the token at t, or IGNORE_INDEX where no loss is
wanted. transformers models shift internally (logits at t-1 predict labels[t]).
"""
from __future__ import annotations

import csv
import json
import math
import random
import re
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

IGNORE_INDEX = -100  # the label value torch.nn.functional.cross_entropy skips by default

FORMATS = {  # detection order matters: a record with instruction+output is alpaca even if it has "text"
    "messages": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "alpaca": '{"instruction": "...", "input": "... (optional)", "output": "..."}',
    "prompt_completion": '{"prompt": "...", "completion": "..."}',
    "classification": '{"text": "...", "label": "..."}',
    "text": '{"text": "..."}',
}
_REQUIRED = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
             "classification": ("text", "label"), "text": ("text",)}
# Chat templates often end an assistant turn with a turn-end token rather than tokenizer.eos_token
# (ChatML, Llama 3, Gemma, Phi-3); generation stops on these too, so they count as "the end token".
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


class RecordList(list):
    """A list of record dicts that remembers its file and each record's line, so that errors found
    later (unknown label, broken chat template) can still name file:line."""

    def __init__(self, records: Sequence[dict], path: str, lines: Sequence[int]):
        super().__init__(records)
        self.path, self.lines = path, list(lines)


def _where(records: Sequence[dict], i: int, source: str | None) -> str:
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
            _check_fields(record, fmt)
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


def _check_fields(record: dict, fmt: str) -> None:
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


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend a system message unless there is one (templates like SmolLM2's otherwise add their own)."""
    if system_prompt and (not messages or messages[0].get("role") != "system"):
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def _to_messages(record: dict, fmt: str) -> list[dict]:
    if fmt == "messages":
        return [dict(m) for m in record["messages"]]  # extra keys (name, tool_calls) reach the template
    if fmt == "alpaca":
        extra = record.get("input") or ""
        user = record["instruction"] + ("\n\n" + extra if extra.strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    if fmt == "prompt_completion":
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    raise ValueError(f"a {fmt!r} record cannot be trained as a prompt/answer pair")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, bos: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja2 errors (e.g. "roles must alternate") are not ValueErrors
            raise ValueError(f"the chat template rejected this conversation: {e}") from e
    # No template (a base model): "prompt\n" + answer + EOS text, so the model still learns to stop.
    return bos + "".join(m["content"] + (tokenizer.eos_token if m["role"] == "assistant" else "\n") for m in messages)


def _encode(tokenizer, text: str) -> list[int]:
    # Rendered text already holds the template's special tokens (BOS included where it wants one).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokenize_chat(tokenizer, messages: list[dict], end_ids: set[int], bos: str) -> tuple[list[int], list[int]]:
    """Tokenize the conversation once; locate each assistant answer by tokenizing the rendered text
    just before it (with the generation prompt) and just after it. A BPE merge across a boundary can
    make those token lists diverge from the full one by a token, so the longest common prefix is the
    boundary rather than len(prefix tokens)."""
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    full = _render(tokenizer, messages[: turns[-1] + 1], False, bos)
    ids = _encode(tokenizer, full)
    spans, prev_end = [], 0
    for k in turns:
        prompt = _render(tokenizer, messages[:k], True, bos)
        whole = _render(tokenizer, messages[: k + 1], False, bos)
        if not (full.startswith(whole) and whole.startswith(prompt) and len(prompt) >= prev_end):
            raise ValueError("the chat template does not render earlier turns as a prefix of later ones (it "
                             "rewrites history, e.g. drops past reasoning), so answer tokens cannot be located; "
                             "split the conversation into one record per assistant turn")
        prev_end = len(whole)
        start = _common_prefix(_encode(tokenizer, prompt), ids)
        spans.append((start, max(start, _common_prefix(_encode(tokenizer, whole), ids))))
    out_ids, labels, pos = [], [], 0
    for start, end in spans:
        out_ids += ids[pos:start]
        labels += [IGNORE_INDEX] * (start - pos)
        answer = ids[start:end]
        stop = next((j for j, t in enumerate(answer) if t in end_ids), None)
        if stop is None:  # the template does not end the turn with an end token: add EOS ourselves
            answer, tail = answer + [tokenizer.eos_token_id], []
        else:  # learn the answer through its end token; template text after it (e.g. "\n") is prompt
            answer, tail = answer[: stop + 1], answer[stop + 1:]
        out_ids += answer + tail
        labels += answer + [IGNORE_INDEX] * len(tail)
        pos = end
    return out_ids + ids[pos:], labels + [IGNORE_INDEX] * (len(ids) - pos)


def build_causal_lm_examples(records: Sequence[dict], tokenizer, max_length: int = 512, source: str | None = None,
                             train_on_prompt: bool = False, system_prompt: str | None = None) -> list[dict]:
    """Records -> [{"input_ids": [...], "labels": [...]}]: loss only on assistant answers (each ending in
    its end token) unless train_on_prompt; "text" records learn every token. Sequences keep their
    first max_length tokens; examples left with no answer token are dropped with a warning."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; causal-LM training needs one so the model learns to stop")
    vocab = tokenizer.get_vocab()
    end_ids = {tokenizer.eos_token_id} | {vocab[t] for t in _TURN_END_TOKENS if t in vocab}
    bos_id = tokenizer.bos_token_id  # only templateless rendering adds it, and only if the tokenizer would
    bos = tokenizer.bos_token if bos_id is not None and tokenizer("x")["input_ids"][:1] == [bos_id] else ""
    examples, dropped = [], 0
    for i, record in enumerate(records):
        try:
            fmt = detect_format(record)
            if fmt == "classification":
                raise ValueError("a classification record (text + label); use build_classification_examples")
            _check_fields(record, fmt)  # records may come from code, not only from read_records
            if fmt == "text":
                ids = _encode(tokenizer, bos + record["text"]) + [tokenizer.eos_token_id]
                labels = list(ids)
            else:
                ids, labels = _tokenize_chat(tokenizer, with_system(_to_messages(record, fmt), system_prompt),
                                             end_ids, bos)
        except ValueError as e:
            raise ValueError(f"{_where(records, i, source)}: {e}") from None
        if train_on_prompt:
            labels = list(ids)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):  # labels[0] is never a target after the shift
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if dropped:
        warnings.warn(f"{source or getattr(records, 'path', '<records>')}: dropped {dropped} of {len(records)} "
                      f"examples with no answer tokens left within max_length={max_length}", stacklevel=2)
    return examples


def build_classification_examples(records: Sequence[dict], tokenizer, max_length: int = 128,
                                  labels: list[str] | None = None,
                                  source: str | None = None) -> tuple[list[dict], list[str]]:
    """text,label records -> ([{"input_ids", "label": int}], label names). Without `labels`, names are
    the sorted distinct labels (numerically if all are numbers, so "2" < "10")."""
    names = []
    for i, record in enumerate(records):
        try:
            fmt = detect_format(record)
            if fmt != "classification":
                raise ValueError(f"expected a text + label record, got {fmt!r}")
            _check_fields(record, fmt)
        except ValueError as e:
            raise ValueError(f"{_where(records, i, source)}: {e}") from None
        names.append(str(record["label"]).strip())
    if labels is None:
        try:
            labels = sorted(set(names), key=float)
        except ValueError:
            labels = sorted(set(names))
    labels = [str(name) for name in labels]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate label names in {labels}")
    index = {name: k for k, name in enumerate(labels)}
    examples = []
    for i, (record, name) in enumerate(zip(records, names)):
        if name not in index:
            raise ValueError(f"{_where(records, i, source)}: unknown label {name!r}; known labels: {labels}")
        ids = tokenizer(record["text"], truncation=True, max_length=max_length)["input_ids"]
        examples.append({"input_ids": list(ids), "label": index[name]})
    return examples, labels


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


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Concatenate consecutive causal-LM examples into sequences of <= max_length tokens (next-fit:
    O(n), order kept). position_ids restart at 0 per document and seq_lens records document lengths,
    so the model can keep documents from attending to each other (see CausalLMCollator)."""
    packs: list[dict] = []
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens > max_length={max_length}; "
                             "build examples with max_length no larger than the packing length")
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


class _PaddingCollator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; a tokenizer without a pad token can pad with eos_token_id")
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def _length(self, examples: Sequence[dict]) -> int:
        longest, multiple = max(len(e["input_ids"]) for e in examples), self.pad_to_multiple_of
        return math.ceil(longest / multiple) * multiple if multiple else longest


class CausalLMCollator(_PaddingCollator):
    """Right-pads examples: input_ids with pad_token_id, labels with IGNORE_INDEX.

    Plain examples get attention_mask (B, T). Packed examples get position_ids (B, T) and NO
    attention_mask: transformers models build a per-document causal mask from position_ids only when
    attention_mask is None and there is no KV cache, so call the model with use_cache=False (its
    config default is True, even in train mode); otherwise documents in one pack attend to each other.
    Padding gets its own position run 0, 1, ... so it reads as one more (loss-free) document."""

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        packed = "position_ids" in examples[0]
        if any(("position_ids" in e) != packed for e in examples):
            raise ValueError("cannot mix packed and unpacked examples in one batch")
        T = self._length(examples)
        batch = {"input_ids": _pad([e["input_ids"] for e in examples], self.pad_token_id, T),  # (B, T)
                 "labels": _pad([e["labels"] for e in examples], IGNORE_INDEX, T)}  # (B, T)
        if packed:
            rows = [list(e["position_ids"]) + list(range(T - len(e["input_ids"]))) for e in examples]
            batch["position_ids"] = _pad(rows, 0, T)  # (B, T)
        else:
            batch["attention_mask"] = _pad([[1] * len(e["input_ids"]) for e in examples], 0, T)  # (B, T)
        return batch


class ClassificationCollator(_PaddingCollator):
    """Right-pads input_ids; returns input_ids (B, T), attention_mask (B, T), labels (B,)."""

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        T = self._length(examples)
        return {"input_ids": _pad([e["input_ids"] for e in examples], self.pad_token_id, T),  # (B, T)
                "attention_mask": _pad([[1] * len(e["input_ids"]) for e in examples], 0, T),  # (B, T)
                "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long)}  # (B,)


def num_batches(n_examples: int, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
    """How many batches `batches` yields per epoch (per rank), e.g. for a learning-rate schedule."""
    step = batch_size * world_size
    full, rest = divmod(n_examples, step)
    # A last partial batch is kept only if every rank gets an example: ranks must take equal step counts.
    return full + (1 if rest and not drop_last and rest >= world_size else 0)


def batches(examples: Sequence[dict], batch_size: int, collator: Callable[[list[dict]], dict], seed: int,
            epoch: int, shuffle: bool = True, start: int = 0, drop_last: bool = False, rank: int = 0,
            world_size: int = 1) -> Iterator[dict]:
    """Yield collated batches in an order fixed by (seed, epoch) alone, so a resumed run replays it;
    start=k skips the first k batches without collating them. With world_size > 1, each global batch
    of batch_size * world_size examples is split between ranks (rank r takes every world_size-th)."""
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    order = list(range(len(examples)))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)  # str seeds hash with sha512: stable across processes
    step = batch_size * world_size
    for k in range(start, num_batches(len(examples), batch_size, drop_last, world_size)):
        chunk = order[k * step: (k + 1) * step][rank::world_size]
        yield collator([examples[i] for i in chunk])


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
