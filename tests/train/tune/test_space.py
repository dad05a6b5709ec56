"""lorafit tune's search space: bad spaces are one clear error, the default spaces are valid at
every bound, derived keys (alpha_ratio, targets) become the options they set."""

import pytest

from helpers import tiny_bert
from lorafit.train.config import build_run_config
from lorafit.train.tune import parse_duration
from lorafit.train.tune.space import (
    DEFAULT_SPACES,
    TARGET_SETS,
    apply,
    check_space,
    parse_space,
)
from lorafit.tuner.config import LoraConfig
from lorafit.tuner.inject import find_targets


def _space_error(tune_raw, tmp_path, space, **train) -> str:
    raw = tune_raw(tmp_path / "run", space, **train)
    cfg = build_run_config(raw)
    with pytest.raises(ValueError) as err:
        params = parse_space(raw, cfg)
        check_space(raw, params, cfg, "config")
    return str(err.value)


@pytest.mark.parametrize(
    "space, method, expected",
    [
        ({}, "lora", "tune.space is empty"),
        ({"train.lrr": [1e-3]}, "lora", "did you mean 'lr'"),
        ({"optim.lr": [1e-3]}, "lora", "search keys are section.option"),
        ({"train.method": ["lora", "full"]}, "lora", "cannot be searched"),
        ({"lora.r": [4, 8]}, "full", "train.method is full"),
        ({"lora.alpha_ratio": [1, 2], "lora.lora_alpha": [8, 16]}, "lora", "keep one"),
        ({"train.lr": {"low": 1e-2, "high": 1e-3}}, "lora", "must be below high"),
        ({"train.lr": {"low": 0, "high": 1e-3, "log": True}}, "lora", "log range needs low > 0"),
        ({"lora.r": {"low": 2.5, "high": 8}}, "lora", "integer option"),
        ({"lora.r": 8}, "lora", "a fixed value belongs in its own section"),
        ({"lora.r": []}, "lora", "choices is empty"),
        ({"lora.targets": ["attention", "heads"]}, "lora", "attention, mlp and all-linear"),
        ({"train.lr": {"low": -1.0, "high": 1e-3}}, "lora", "tune.space.train.lr = -1"),
        ({"lora.lora_dropout": [0.0, 2.0]}, "lora", "tune.space.lora.lora_dropout = 2"),
    ],
)
def test_bad_spaces_are_one_clear_error(tune_raw, tmp_path, space, method, expected):
    assert expected in _space_error(tune_raw, tmp_path, space, method=method)


def test_metrics_the_task_does_not_report_and_bad_durations(tune_raw, tmp_path):
    raw = tune_raw(tmp_path / "run")
    raw["tune"] = {"metric": "accuracy"}
    with pytest.raises(ValueError, match="not a validation metric of task causal-lm"):
        build_run_config(raw)
    assert parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration("2.5m") == 150
    for bad in ("30", "soon", "0m", ""):
        with pytest.raises(ValueError, match="--budget"):
            parse_duration(bad)


def test_default_spaces_and_derived_keys(tune_raw, tmp_path):
    raw = tune_raw(tmp_path / "run")
    cfg = build_run_config(raw)
    params = parse_space(raw, cfg)
    assert [p.key for p in params] == list(DEFAULT_SPACES["lora"])
    check_space(raw, params, cfg, "config")  # every default bound is a valid config
    r = next(p for p in params if p.key == "lora.r")
    assert r.integer and r.log and (r.low, r.high) == (4, 64)
    full_raw = tune_raw(tmp_path / "run", method="full")
    full = parse_space(full_raw, build_run_config(full_raw))
    assert [p.key for p in full] == ["train.lr"]
    # lora.alpha_ratio sets lora_alpha = ratio x r; lora.targets the model's module names
    out = apply(raw, {"lora.r": 8, "lora.alpha_ratio": 2, "lora.targets": "attention"}, cfg)
    assert out["lora"]["lora_alpha"] == 16 and out["lora"]["r"] == 8
    assert out["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert "lora_alpha" not in raw["lora"]  # the raw config is not changed


def test_bert_target_sets_select_attention_and_mlp():
    model = tiny_bert()
    sets = TARGET_SETS["bert"]
    attn = {p for p, _ in find_targets(model, LoraConfig(target_modules=sets["attention"]))}
    mlp = {p for p, _ in find_targets(model, LoraConfig(target_modules=sets["mlp"]))}
    assert len(attn) == 8 and all(".attention." in p for p in attn)  # q, k, v, out x 2 layers
    assert len(mlp) == 4 and not attn & mlp
    every = {p for p, _ in find_targets(model, LoraConfig(target_modules="all-linear"))}
    assert attn | mlp == {p for p in every if ".layer." in p}  # every linear layer of the encoder
