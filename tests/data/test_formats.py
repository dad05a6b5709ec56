"""Tests for lorafit.data.formats: detection, field checks (roles, missing labels), the one
conversion of records into messages, and the format registry."""

import json
import math

import pytest

from helpers import write_text
from lorafit.data import (
    FORMATS,
    Format,
    build_causal_lm_examples,
    build_classification_examples,
    check_fields,
    detect_format,
    prompt_and_answer,
    read_records,
    register_format,
    to_messages,
)

RECORDS = {  # one record of each prompt/answer form, all meaning the same exchange
    "messages": {
        "messages": [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "how are you today?"},
        ]
    },
    "sharegpt": {
        "conversations": [
            {"from": "human", "value": "hello there"},
            {"from": "gpt", "value": "how are you today?"},
        ]
    },
    "alpaca": {"instruction": "hello there", "input": "", "output": "how are you today?"},
    "prompt_completion": {"prompt": "hello there", "completion": "how are you today?"},
}


def chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def test_detect_format_each_form_and_error_lists_forms():
    assert list(FORMATS) == [
        "messages",
        "sharegpt",
        "alpaca",
        "prompt_completion",
        "classification",
        "text",
        "image",
        "interaction",
    ]
    for name, record in RECORDS.items():
        assert detect_format(record) == name
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"instruction": "a", "input": "", "output": "b", "text": "t"}) == "alpaca"
    assert detect_format({"text": "a", "label": 1}) == "classification"
    assert detect_format({"text": "a", "label": None}) == "text"
    assert detect_format({"text": "a"}) == "text"
    with pytest.raises(
        ValueError,
        match=r"(?s)accepted forms.*messages.*sharegpt.*alpaca"
        r".*prompt_completion.*classification.*text",
    ):
        detect_format({"question": "q", "answer": "a"})


def test_every_form_gives_the_same_messages_and_prompt_answer():
    for record in RECORDS.values():
        assert to_messages(record) == RECORDS["messages"]["messages"]
        assert prompt_and_answer(record) == (
            [{"role": "user", "content": "hello there"}],
            "how are you today?",
        )


@pytest.mark.parametrize(
    "extra, user",
    [
        ("good morning", "translate to German:\n\ngood morning"),
        ("  ", "translate to German:"),  # blank input is no input, for training AND for scoring
        (None, "translate to German:"),
    ],
)
def test_alpaca_input_one_whitespace_rule(extra, user):
    record = {"instruction": "translate to German:", "input": extra, "output": "Guten Morgen"}
    assert to_messages(record)[0] == {"role": "user", "content": user}
    assert prompt_and_answer(record)[0] == [{"role": "user", "content": user}]


def test_prompt_and_answer_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="not 'text' records"):
        prompt_and_answer({"text": "a"})
    with pytest.raises(ValueError, match="not 'classification' records"):
        prompt_and_answer({"text": "a", "label": "x"})
    with pytest.raises(ValueError, match="end with an assistant answer"):
        prompt_and_answer(chat(("user", "a"), ("assistant", "b"), ("user", "c")))
    with pytest.raises(ValueError, match="cannot be trained as a prompt/answer pair"):
        to_messages({"text": "a"})


# ------------------------------------------------------------------------------------- roles


@pytest.mark.parametrize(
    "role, hint",
    [
        ("usr", " \\(did you mean 'user'\\?\\)"),
        ("Assistant", " \\(did you mean 'assistant'\\?\\)"),
        ("human", " \\(did you mean 'user'\\?\\)"),
        ("narrator", ""),
    ],
)
def test_unknown_chat_role_is_refused_with_location_and_suggestion(tmp_path, role, hint):
    lines = [chat(("user", "a"), ("assistant", "b")), chat((role, "hi"), ("assistant", "yo"))]
    path = write_text(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(
        ValueError,
        match=rf"d\.jsonl:2: messages\[0\]: unknown role '{role}'{hint}; "
        "allowed roles: system, user, assistant, tool$",
    ):
        read_records(path)


def test_unknown_role_in_code_built_records_is_refused_before_rendering(chat_tok):
    with pytest.raises(
        ValueError, match=r"<records> record 1: messages\[1\]: unknown role 'asistant'"
    ):
        build_causal_lm_examples([chat(("user", "a"), ("asistant", "b"))], chat_tok)


def test_tool_turns_are_accepted_as_prompt(chat_tok):
    record = chat(
        ("user", "what is the answer?"),
        ("assistant", "the answer is"),
        ("tool", "forty two"),
        ("assistant", "forty two."),
    )
    check_fields(record, "messages")
    [ex] = build_causal_lm_examples([record], chat_tok)
    learned = chat_tok.decode(
        [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != -100]
    )
    assert learned == "the answer is<|im_end|>forty two.<|im_end|>"
    assert "<|im_start|>tool\nforty two<|im_end|>" in chat_tok.decode(ex["input_ids"])


def test_sharegpt_roles_system_field_and_errors():
    record = {
        "system": "Be brief.",
        "conversations": [
            {"from": "user", "value": "hi"},
            {"from": "assistant", "value": "hello"},
            {"from": "human", "value": "bye"},
            {"from": "gpt", "value": "goodbye"},
        ],
    }
    check_fields(record, "sharegpt")
    assert [(m["role"], m["content"]) for m in to_messages(record)] == [
        ("system", "Be brief."),
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "bye"),
        ("assistant", "goodbye"),
    ]
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}
    with pytest.raises(
        ValueError,
        match=r"conversations\[1\]: unknown role 'bot' \(did you mean "
        r"'assistant'\?\); allowed roles: system, human, user, gpt",
    ):
        check_fields(bad, "sharegpt")
    empty = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]}
    with pytest.raises(ValueError, match=r"conversations\[1\]: empty required field 'value'"):
        check_fields(empty, "sharegpt")
    misplaced = {"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    with pytest.raises(
        ValueError, match="look like ShareGPT turns: put them under 'conversations'"
    ):
        check_fields(misplaced, "messages")


def test_sharegpt_trains_exactly_like_the_same_messages(chat_tok):
    sharegpt, messages = build_causal_lm_examples(
        [RECORDS["sharegpt"], RECORDS["messages"]], chat_tok
    )
    assert sharegpt == messages


# ---------------------------------------------------------------------- classification labels


@pytest.mark.parametrize("cell", ["nan", "NaN", "None", "null", "NULL", "-nan"])
def test_missing_value_labels_in_csv_are_refused(tmp_path, cell, minilm_tok):
    path = write_text(tmp_path, "d.csv", f"text,label\na,pos\nb,{cell}\nc,neg\n")
    with pytest.raises(
        ValueError,
        match=rf"d\.csv:3: label '{cell}' is how a missing value is "
        "written as text",
    ):
        read_records(path)
    records = [{"text": "a", "label": "pos"}, {"text": "b", "label": cell}]
    with pytest.raises(ValueError, match=r"<records> record 2: label"):
        build_classification_examples(records, minilm_tok)


def test_empty_and_null_labels_are_refused_and_na_is_a_class(tmp_path, minilm_tok):
    with pytest.raises(ValueError, match=r"e\.csv:3: empty required field 'label'"):
        read_records(write_text(tmp_path, "e.csv", "text,label\na,pos\nb, \n"))
    for value in (None, math.nan):
        with pytest.raises(ValueError, match=r"record 1: field 'label' has no value"):
            build_classification_examples([{"text": "a", "label": value}], minilm_tok)
    with pytest.raises(ValueError, match=r"n\.jsonl:2: field 'label' has no value"):
        read_records(
            write_text(
                tmp_path, "n.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n'
            )
        )
    # "NA" / "N/A" are real class names in some data sets ("not applicable"): kept.
    _, names = build_classification_examples(
        [
            {"text": "a", "label": "NA"},
            {"text": "b", "label": "N/A"},
            {"text": "c", "label": "yes"},
        ],
        minilm_tok,
    )
    assert names == ["N/A", "NA", "yes"]


# ---------------------------------------------------------------------------------- registry


@pytest.fixture
def restore_formats():
    saved = dict(FORMATS)
    yield
    FORMATS.clear()
    FORMATS.update(saved)


def test_a_new_format_is_one_registration(restore_formats, chat_tok):
    def check(record):
        if not record["question"].strip():
            raise ValueError("empty required field 'question'")

    register_format(
        Format(
            "qa",
            '{"question": "...", "answer": "..."}',
            ("question", "answer"),
            check,
            lambda r: [
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]},
            ],
        ),
        before="text",
    )
    assert list(FORMATS)[-4:] == ["qa", "text", "image", "interaction"]
    record = {"question": "hello there", "answer": "how are you today?"}
    assert detect_format(record) == "qa" and prompt_and_answer(record) == prompt_and_answer(
        RECORDS["prompt_completion"]
    )
    assert build_causal_lm_examples([record], chat_tok) == build_causal_lm_examples(
        [RECORDS["prompt_completion"]], chat_tok
    )


def test_each_format_says_how_it_is_learned(restore_formats, chat_tok):
    # batching.py tested format names ("classification", "text"); the kind is now the plug-in's.
    from lorafit.data import KINDS

    assert {name: f.kind for name, f in FORMATS.items()} == {
        "messages": "chat",
        "sharegpt": "chat",
        "alpaca": "chat",
        "prompt_completion": "chat",
        "classification": "labelled",
        "text": "document",
        "image": "image",
        "interaction": "interaction",
    }
    assert set(KINDS) == {"chat", "document", "labelled", "image", "interaction"}
    register_format(
        Format(
            "sourced_text",
            '{"text": "...", "source": "..."}',
            ("text", "source"),
            lambda r: None,
            kind="document",
        ),
        before="classification",
    )
    record = {"text": "hello there", "source": "wiki"}
    assert detect_format(record) == "sourced_text"
    (example,) = build_causal_lm_examples([record], chat_tok)
    assert example == build_causal_lm_examples([{"text": "hello there"}], chat_tok)[0]
    assert example["labels"] == example["input_ids"]  # a document learns every token
    with pytest.raises(ValueError, match="kind must be one of"):
        Format("x", "{}", ("x",), lambda r: None, kind="table")
    with pytest.raises(ValueError, match="a 'chat' format needs to_messages"):
        Format("x", "{}", ("x",), lambda r: None)


def test_with_system_has_one_definition_used_by_sharegpt():
    import lorafit.data
    from lorafit.data import chat, formats

    assert chat.with_system is formats.with_system is lorafit.data.with_system
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    for system in (None, "", "  "):
        record = {"conversations": turns, "system": system}
        assert to_messages(record) == formats.with_system(
            to_messages({"conversations": turns}), system
        )
    record = {"conversations": turns, "system": "Be brief."}
    assert to_messages(record)[0] == {"role": "system", "content": "Be brief."}
