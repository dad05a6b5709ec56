"""Tests for lorafit.data.chat: the one renderer. What a model is asked to continue at generation
time must be, token for token, what preceded each answer in training, with or without a chat
template, with or without a BOS the tokenizer adds."""

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from helpers import write_tiny_chat_model
from lorafit.data import (
    IGNORE_INDEX,
    ChatRenderer,
    build_causal_lm_examples,
    prompt_and_answer,
    render_prompt,
    with_system,
)

# A template whose assistant turns end with a plain newline, not an end token.
NO_END_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
TOKENIZERS = ["chat_tok", "plain_tok", "bos_plain_tok"]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "how are you today?"},
    {"role": "user", "content": "what is the answer?"},
    {"role": "assistant", "content": "forty two."},
]


def answer_starts(example: dict) -> list[int]:
    """Positions where a run of learned labels begins."""
    labels = example["labels"]
    return [
        t
        for t in range(len(labels))
        if labels[t] != IGNORE_INDEX and (t == 0 or labels[t - 1] == IGNORE_INDEX)
    ]


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def saved_tokenizers(tmp_path_factory):
    """The tiny model folder the training tests use, its ChatML tokenizer, and the same tokenizer
    with the template removed (a base model's)."""
    folder = write_tiny_chat_model(tmp_path_factory.mktemp("tiny"))
    templated = AutoTokenizer.from_pretrained(folder)
    templateless = AutoTokenizer.from_pretrained(folder)
    templateless.chat_template = None
    return {"saved_chat": templated, "saved_plain": templateless}


@pytest.mark.parametrize("name", TOKENIZERS + ["saved_chat", "saved_plain"])
def test_training_tokens_before_each_answer_are_the_render_prompt_tokens(
    request, saved_tokenizers, name
):
    tok = saved_tokenizers.get(name) or request.getfixturevalue(name)
    [ex] = build_causal_lm_examples([{"messages": CONVERSATION}], tok)
    turns = [k for k, m in enumerate(CONVERSATION) if m["role"] == "assistant"]
    starts = answer_starts(ex)
    assert len(starts) == len(turns)
    for k, start in zip(turns, starts):
        assert ex["input_ids"][:start] == encode(tok, render_prompt(tok, CONVERSATION[:k]))


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "what is the capital of France?", "completion": "Paris."},
        {"instruction": "translate to German:", "input": "  ", "output": "Guten Morgen"},
        {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "there"}]},
    ],
)
def test_scoring_prompt_from_a_record_is_the_training_prefix(request, name, record):
    # The path evaluation takes (prompt_and_answer -> with_system -> render_prompt) must give the
    # tokens training put before the answer, system prompt included.
    tok = request.getfixturevalue(name)
    [ex] = build_causal_lm_examples([record], tok, system_prompt="Be brief.")
    prompt, answer = prompt_and_answer(record)
    text = render_prompt(tok, with_system(prompt, "Be brief."))
    start = answer_starts(ex)[0]
    assert ex["input_ids"][:start] == encode(tok, text)
    assert tok.decode(ex["input_ids"][start:]).startswith(answer)


def test_bos_only_where_the_tokenizer_adds_one(plain_tok, bos_plain_tok, chat_tok):
    messages = [{"role": "user", "content": "hello"}]
    assert render_prompt(plain_tok, messages) == "hello\n"
    assert render_prompt(bos_plain_tok, messages) == "<s>hello\n"
    assert (
        encode(bos_plain_tok, render_prompt(bos_plain_tok, messages))
        == bos_plain_tok("hello\n")["input_ids"]
    )
    assert (
        render_prompt(chat_tok, messages)
        == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    [ex] = build_causal_lm_examples([{"text": "hello there"}], bos_plain_tok)
    assert ex["input_ids"][0] == bos_plain_tok.bos_token_id
    assert ex["input_ids"][-1] == bos_plain_tok.eos_token_id


def test_templateless_multi_turn_layout(plain_tok):
    prompt = render_prompt(plain_tok, CONVERSATION[:4])
    assert prompt == (
        "You are a helpful assistant.\nhello there\nhow are you today?<|endoftext|>"
        "what is the answer?\n"
    )


def test_with_system_one_rule():
    user = [{"role": "user", "content": "hi"}]
    assert with_system(user, "Be brief.") == [{"role": "system", "content": "Be brief."}] + user
    assert with_system(user, " Be brief. ")[0]["content"] == " Be brief. "  # verbatim
    for blank in (None, "", "  \n"):
        assert with_system(user, blank) == user
    own = [{"role": "system", "content": "Mine."}] + user
    assert with_system(own, "Be brief.") == own
    assert with_system([], "Be brief.") == [{"role": "system", "content": "Be brief."}]
    out = with_system(user, None)
    assert out == user and out is not user  # callers may append to it


def test_template_errors_and_end_ids(chat_tok):
    renderer = ChatRenderer(chat_tok)
    assert chat_tok.convert_tokens_to_ids("<|im_end|>") in renderer.end_ids
    bad = ChatRenderer(
        type(chat_tok)(
            tokenizer_object=chat_tok.backend_tokenizer,
            eos_token="<|im_end|>",
            chat_template="{{ raise_exception('roles must alternate') }}",
        )
    )
    with pytest.raises(
        ValueError, match="the chat template rejected this conversation: roles must"
    ):
        bad.prompt([{"role": "user", "content": "a"}])


def with_template(tok, template: str, eos: str):
    return PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer,
        eos_token=eos,
        pad_token="<pad>",
        chat_template=template,
    )


def test_tokenize_adds_eos_when_the_template_has_no_end_token(chat_tok):
    tok = with_template(chat_tok, NO_END_TEMPLATE, "<|endoftext|>")
    ids, [(start, end)] = ChatRenderer(tok).tokenize(
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "forty two"}]
    )
    assert ids[end - 1] == tok.eos_token_id and end == len(ids)
    # The prompt ends "assistant: " but byte-level BPE merges that space into " forty", so the
    # prompt's own last token is not in the conversation; the merged token is learned as answer.
    assert tok.decode(ids[start:end]) == " forty two\n<|endoftext|>"
    assert tok.decode(ids).startswith("user: hello\nassistant: ")


def test_tokenize_without_a_template(plain_tok):
    ids, [(start, end)] = ChatRenderer(plain_tok).tokenize(
        [
            {"role": "user", "content": "what is the answer?"},
            {"role": "assistant", "content": "forty two"},
        ]
    )
    assert plain_tok.decode(ids) == "what is the answer?\nforty two<|endoftext|>"
    assert plain_tok.decode(ids[start:end]) == "forty two<|endoftext|>"


def test_history_rewriting_template_is_rejected(chat_tok):
    rewriting = chat_tok.chat_template.replace(
        "message['content']", "(message['content'] if loop.last else '...')"
    )
    tok = with_template(chat_tok, rewriting, "<|im_end|>")
    messages = [
        {"role": r, "content": c}
        for r, c in [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
    ]
    with pytest.raises(
        ValueError, match="record 1: the chat template does not render earlier turns"
    ):
        build_causal_lm_examples([{"messages": messages}], tok)
