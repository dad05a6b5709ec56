"""Preparing a run's inputs: splits, the no-validation reason, the adapter the task needs."""

import json

import pytest

import lorafit.train.setup as setup_mod
from lorafit.tasks import get_task
from lorafit.train.setup import prepare, read_splits


def test_read_splits_says_why_there_is_no_validation(make_cfg, tmp_path, chat_setup):
    _, data = chat_setup
    train, val, reason = read_splits(make_cfg(tmp_path, "data.val_fraction=0"))
    assert (
        len(train) == 48
        and val == []
        and reason == ("no data.validation file and data.val_fraction is 0")
    )
    train, val, reason = read_splits(make_cfg(tmp_path))
    assert len(train) + len(val) == 48 and val and reason == ""
    one = tmp_path / "one.jsonl"
    one.write_text(data.read_text().splitlines()[0] + "\n")
    _, val, reason = read_splits(make_cfg(tmp_path, f"data.train={one}"))
    assert val == [] and "leaves no example" in reason


def test_early_stopping_with_an_empty_split_fails_before_the_model_loads(
    make_cfg, tmp_path, chat_setup, monkeypatch
):
    _, data = chat_setup
    one = tmp_path / "one.jsonl"
    one.write_text(data.read_text().splitlines()[0] + "\n")
    monkeypatch.setattr(setup_mod, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    cfg = make_cfg(tmp_path, f"data.train={one}", "train.early_stopping_patience=1")
    with pytest.raises(ValueError, match="early_stopping_patience needs validation data"):
        prepare(cfg, get_task("causal-lm"))


def test_prepare_adds_a_trainable_adapter_for_the_task(make_cfg, tmp_path):
    prep = prepare(make_cfg(tmp_path, "train.precision=fp32"), get_task("causal-lm"))
    assert prep.adapter == "default" and prep.precision == "fp32" and prep.label_names is None
    trainable = [n for n, p in prep.model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters." in n for n in trainable)
    batch = prep.collator(prep.train[:2])  # padding-free by default: one row, two documents
    n = sum(len(e["input_ids"]) for e in prep.train[:2])
    assert batch["input_ids"].shape == (1, -(-n // 64) * 64)  # + a pad document to a multiple
    assert batch["doc_lens"][:2].tolist() == [len(e["input_ids"]) for e in prep.train[:2]]
    assert prep.model.config._attn_implementation == "lorafit"


def test_padding_free_off_pads_to_the_longest(make_cfg, tmp_path):
    prep = prepare(
        make_cfg(tmp_path, "train.precision=fp32", "data.padding_free=false"), get_task("causal-lm")
    )
    batch = prep.collator(prep.train[:2])
    assert batch["input_ids"].shape[0] == 2 and "attention_mask" in batch


def test_prepare_with_checkpoint_weights(make_cfg, tmp_path):
    from lorafit.train.trainer import train

    run = tmp_path / "run"
    train(make_cfg(run, "train.max_steps=2", "train.eval_every=0"), progress=False)
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    prep = prepare(make_cfg(run), get_task("causal-lm"), run / "checkpoints" / "step-000002")
    fresh = prepare(make_cfg(run), get_task("causal-lm"))
    trained = dict(prep.model.named_parameters())
    differs = [n for n, p in fresh.model.named_parameters() if not p.equal(trained[n])]
    assert differs and all(".adapters." in n for n in differs) and saved["r"] == 4
