"""Record formats: which fields mark each form of record, what they must hold, and how a record
becomes chat messages.

    detect_format(record) -> "messages" | "sharegpt" | "alpaca" | "prompt_completion"
                             | "classification" | "text"
    FORMATS[fmt].kind -> "chat" | "document" | "labelled"   how the record is learned
    check_fields(record, fmt)          raises ValueError naming the bad field
    to_messages(record) -> messages    the whole conversation a causal LM trains on
    prompt_and_answer(record) -> (prompt messages, reference answer)   for generation scoring
    with_system(messages, system_prompt) -> messages   the one system-prompt rule

This is the one place records turn into messages, so training and generation scoring cannot
disagree about, say, how an alpaca "input" joins its instruction. A new form of record is one
`register_format(Format(...))` call; nothing else changes.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable

# "tool" is the role transformers' chat templates (Llama 3.1, Qwen2.5, Mistral, ...) give tool
# results; tool-use datasets need it. Tool turns are prompt: only assistant turns are learned.
ROLES = ("system", "user", "assistant", "tool")
# Names other tools use for the same roles: only for "did you mean", never accepted silently,
# because a template renders the role name verbatim (or raises).
_ROLE_SYNONYMS = {
    "human": "user",
    "usr": "user",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "ai": "assistant",
    "function": "tool",
}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
# What pandas / numpy / Python / JSON write for a missing value when it is turned into text. No
# dataset means these as class names; "NA" / "N/A" are left alone: they can be real classes
# ("not applicable").
_MISSING_LABELS = {"nan", "-nan", "none", "null"}


KINDS = ("chat", "document", "labelled", "image", "interaction")
"""How a form of record is learned: "chat" (a conversation: to_messages, loss on the assistant
answers), "document" (plain text in its `text` field: every token learned) or "labelled" (a
`text` and its class in `label`: a classifier's input and target, no causal-LM example), "image"
(an image and its label: images.py) or "interaction" (a user, an item, maybe a rating:
interactions.py)."""


@dataclass(frozen=True)
class Format:
    """One form of record. `fields`: the fields whose values (not None) identify the form.
    `check`: raises ValueError for a record of this form with a bad field. `to_messages`: the
    conversation to train on, ending with an assistant answer; None for forms that are not
    prompt/answer pairs (plain text, labelled text). `kind`: one of KINDS; "chat" exactly when
    there is a `to_messages`."""

    name: str
    example: str
    fields: tuple[str, ...]
    check: Callable[[dict], None]
    to_messages: Callable[[dict], list[dict]] | None = None
    kind: str = "chat"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"format {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}"
            )
        if (self.kind == "chat") != (self.to_messages is not None):
            raise ValueError(
                f"format {self.name!r}: a 'chat' format needs to_messages, and only it has one"
            )

    def matches(self, record: dict) -> bool:
        return all(record.get(k) is not None for k in self.fields)


# In detection order: a record with instruction + output is alpaca even if it also has "text".
FORMATS: dict[str, Format] = {}


def register_format(fmt: Format, before: str | None = None) -> Format:
    """Add a form of record, detected before `before` (default: after all others)."""
    items = [(k, v) for k, v in FORMATS.items() if k != fmt.name]
    at = next((i for i, (k, _) in enumerate(items) if k == before), len(items))
    items.insert(at, (fmt.name, fmt))
    FORMATS.clear()
    FORMATS.update(items)
    return fmt


def detect_format(record: dict) -> str:
    """Name the form of one record (see FORMATS), by which fields it has."""
    for fmt in FORMATS.values():
        if fmt.matches(record):
            return fmt.name
    forms = "\n".join(f"  {f.name}: {f.example}" for f in FORMATS.values())
    raise ValueError(
        f"record with keys {sorted(record)} matches no known format; accepted forms:\n{forms}"
    )


def check_fields(record: dict, fmt: str) -> None:
    FORMATS[fmt].check(record)


def to_messages(record: dict, fmt: str | None = None) -> list[dict]:
    """The conversation a record holds, as [{"role", "content", ...}] (copies: safe to change)."""
    fmt = fmt or detect_format(record)
    convert = FORMATS[fmt].to_messages
    if convert is None:
        raise ValueError(f"a {fmt!r} record cannot be trained as a prompt/answer pair")
    return convert(record)


def prompt_and_answer(record: dict, fmt: str | None = None) -> tuple[list[dict], str]:
    """(the messages a model answers, the reference answer): the conversation without its final
    assistant turn, and that turn's content."""
    fmt = fmt or detect_format(record)
    if FORMATS[fmt].to_messages is None:
        raise ValueError(f"generation scoring needs prompt/answer records, not {fmt!r} records")
    messages = to_messages(record, fmt)
    if messages[-1]["role"] != "assistant":
        raise ValueError("generation scoring needs conversations that end with an assistant answer")
    return messages[:-1], messages[-1]["content"]


def is_blank(text: str | None) -> bool:
    """The one whitespace rule for optional text (alpaca input, system prompts): blank means
    absent; anything else is used verbatim."""
    return text is None or not text.strip()


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend a system message unless there is one (templates like SmolLM2's otherwise add
    their own). A blank system prompt is none; any other is used verbatim. Returns a new list.
    The one rule for ShareGPT's `system` field and data.system_prompt alike."""
    if not is_blank(system_prompt) and (not messages or messages[0].get("role") != "system"):
        return [{"role": "system", "content": system_prompt}] + list(messages)
    return list(messages)


# ------------------------------------------------------------------------------ field checks


def _role_hint(role: str, allowed) -> str:
    guess = _ROLE_SYNONYMS.get(role.lower()) or next(
        iter(difflib.get_close_matches(role.lower(), allowed, n=1, cutoff=0.6)), None
    )
    return f" (did you mean {guess!r}?)" if guess in allowed else ""


def _check_turns(turns, field: str, role_key: str, content_key: str, roles: dict[str, str]):
    """Shared by every chat form: `roles` maps the role names this form accepts to chat roles."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(
            f"{field!r} must be a non-empty list of {{{role_key}, {content_key}}} objects"
        )
    mapped = []
    for k, turn in enumerate(turns):
        if not (
            isinstance(turn, dict)
            and isinstance(turn.get(role_key), str)
            and isinstance(turn.get(content_key), str)
        ):
            hint = ""
            if (
                isinstance(turn, dict)
                and "from" in turn
                and "value" in turn
                and field == "messages"
            ):
                hint = " (these look like ShareGPT turns: put them under 'conversations')"
            raise ValueError(
                f"{field}[{k}] must be an object with string {role_key!r} and {content_key!r}{hint}"
            )
        role = turn[role_key]
        if role not in roles:
            raise ValueError(
                f"{field}[{k}]: unknown role {role!r}{_role_hint(role, list(roles))}; "
                f"allowed roles: {', '.join(roles)}"
            )
        if roles[role] == "assistant" and not turn[content_key].strip():
            raise ValueError(
                f"{field}[{k}]: empty required field {content_key!r} of an assistant "
                "turn (a turn with only tool_calls is not supported)"
            )
        mapped.append(roles[role])
    said = [r for r in mapped if r != "system"]
    if "assistant" not in said:
        raise ValueError(f"{field!r} has no assistant turn, so there is nothing to learn")
    if said[0] == "assistant":
        raise ValueError(
            f"{field!r} starts with an assistant turn; it needs a prompt (user turn) before it"
        )


def _check_strings(record: dict, *keys: str) -> None:
    for key in keys:
        value = record.get(key)
        if value is None:
            raise ValueError(f"field {key!r} has no value (null or NaN)")
        if not isinstance(value, str):
            raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"empty required field {key!r}")


def _check_label(value) -> None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(
            "field 'label' has no value (null or NaN); give the row a label or drop it"
        )
    if isinstance(value, float):  # e.g. an int column with one empty cell, read back as float64
        raise ValueError(
            f"field 'label' must be a string or an integer, got float ({value!r}); a "
            "numeric column with a missing value is stored as floats"
        )
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(
            f"field 'label' must be a string or an integer, got {type(value).__name__}"
        )
    text = str(value).strip()
    if not text:
        raise ValueError("empty required field 'label'")
    if text.lower() in _MISSING_LABELS:
        raise ValueError(
            f"label {value!r} is how a missing value is written as text, not a class "
            "name; give the row a real label or drop it"
        )


# --------------------------------------------------------------------------------- the forms


def _check_messages(record: dict) -> None:
    _check_turns(record.get("messages"), "messages", "role", "content", {r: r for r in ROLES})


def _messages(record: dict) -> list[dict]:
    return [dict(m) for m in record["messages"]]  # extra keys (name, tool_calls) reach the template


def _check_sharegpt(record: dict) -> None:
    _check_turns(record.get("conversations"), "conversations", "from", "value", _SHAREGPT_ROLES)
    if not isinstance(record.get("system") or "", str):
        raise ValueError("field 'system' must be a string")


def _sharegpt(record: dict) -> list[dict]:
    messages = [
        {"role": _SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]
    ]
    # LLaMA-Factory's ShareGPT keeps the system prompt here.
    return with_system(messages, record.get("system") or None)


def _check_alpaca(record: dict) -> None:
    _check_strings(record, "instruction", "output")
    if not isinstance(record.get("input") or "", str):
        raise ValueError("field 'input' must be a string")


def _alpaca(record: dict) -> list[dict]:
    extra = record.get("input")
    user = record["instruction"] + ("" if is_blank(extra) else "\n\n" + extra)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _prompt_completion(record: dict) -> list[dict]:
    return [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["completion"]},
    ]


def _check_classification(record: dict) -> None:
    _check_strings(record, "text")
    _check_label(record.get("label"))


for _fmt in (
    Format(
        "messages",
        '{"messages": [{"role": "user", "content": "..."}, '
        '{"role": "assistant", "content": "..."}]}',
        ("messages",),
        _check_messages,
        _messages,
    ),
    Format(
        "sharegpt",
        '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}',
        ("conversations",),
        _check_sharegpt,
        _sharegpt,
    ),
    Format(
        "alpaca",
        '{"instruction": "...", "input": "... (optional)", "output": "..."}',
        ("instruction", "output"),
        _check_alpaca,
        _alpaca,
    ),
    Format(
        "prompt_completion",
        '{"prompt": "...", "completion": "..."}',
        ("prompt", "completion"),
        lambda r: _check_strings(r, "prompt", "completion"),
        _prompt_completion,
    ),
    Format(
        "classification",
        '{"text": "...", "label": "..."}',
        ("text", "label"),
        _check_classification,
        kind="labelled",
    ),
    Format(
        "text",
        '{"text": "..."}',
        ("text",),
        lambda r: _check_strings(r, "text"),
        kind="document",
    ),
):
    register_format(_fmt)
