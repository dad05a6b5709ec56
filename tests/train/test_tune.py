"""lorafit tune: the search space and its errors, and real studies on the tiny chat model (real
training runs, one process each): products, continuing a study, the budget's end, failed trials."""

import json
import time
from pathlib import Path

import pytest
import yaml

from helpers import tiny_bert
from lorafit.cli.main import main
from lorafit.train.config import build_run_config, load_run_config
from lorafit.train.tune import (
    DEFAULT_SPACES,
    GRACE_S,
    apply,
    check_space,
    parse_duration,
    parse_space,
)
from lorafit.tuner.config import LoraConfig
from lorafit.tuner.inject import find_targets


def _raw(chat_setup, out, space=None, **train):
    model, data = chat_setup
    raw = {
        "model": {"name": str(model)},
        "data": {"train": str(data)},
        "lora": {"r": 4},
        "train": {
            "output_dir": str(out),
            "batch_size": 4,
            "max_steps": 10,
            "eval_every": 5,
            "lr": 1e-2,
            "fused_kernels": False,  # no compile per trial process: the tests stay short
            "tensorboard": False,
            **train,
        },
    }
    if space is not None:
        raw["tune"] = {"space": space, "startup_trials": 2}
    return raw


def _space_error(chat_setup, tmp_path, space, **train) -> str:
    raw = _raw(chat_setup, tmp_path / "run", space, **train)
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
def test_bad_spaces_are_one_clear_error(chat_setup, tmp_path, space, method, expected):
    assert expected in _space_error(chat_setup, tmp_path, space, method=method)


def test_metrics_the_task_does_not_report_and_bad_durations(chat_setup, tmp_path):
    raw = _raw(chat_setup, tmp_path / "run")
    raw["tune"] = {"metric": "accuracy"}
    with pytest.raises(ValueError, match="not a validation metric of task causal-lm"):
        build_run_config(raw)
    assert parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration("2.5m") == 150
    for bad in ("30", "soon", "0m", ""):
        with pytest.raises(ValueError, match="--budget"):
            parse_duration(bad)


def test_default_spaces_and_derived_keys(chat_setup, tmp_path):
    raw = _raw(chat_setup, tmp_path / "run")
    cfg = build_run_config(raw)
    params = parse_space(raw, cfg)
    assert [p.key for p in params] == list(DEFAULT_SPACES["lora"])
    check_space(raw, params, cfg, "config")  # every default bound is a valid config
    r = next(p for p in params if p.key == "lora.r")
    assert r.integer and r.log and (r.low, r.high) == (4, 64)
    full_raw = _raw(chat_setup, tmp_path / "run", method="full")
    full = parse_space(full_raw, build_run_config(full_raw))
    assert [p.key for p in full] == ["train.lr"]
    # lora.alpha_ratio sets lora_alpha = ratio x r; lora.targets the model's module names
    out = apply(raw, {"lora.r": 8, "lora.alpha_ratio": 2, "lora.targets": "attention"}, cfg)
    assert out["lora"]["lora_alpha"] == 16 and out["lora"]["r"] == 8
    assert out["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert "lora_alpha" not in raw["lora"]  # the raw config is not changed


def test_bert_target_sets_select_attention_and_mlp():
    import lorafit.train.tune as tune

    model = tiny_bert()
    sets = tune.TARGET_SETS["bert"]
    attn = {p for p, _ in find_targets(model, LoraConfig(target_modules=sets["attention"]))}
    mlp = {p for p, _ in find_targets(model, LoraConfig(target_modules=sets["mlp"]))}
    assert len(attn) == 8 and all(".attention." in p for p in attn)  # q, k, v, out x 2 layers
    assert len(mlp) == 4 and not attn & mlp
    every = {p for p, _ in find_targets(model, LoraConfig(target_modules="all-linear"))}
    assert attn | mlp == {p for p in every if ".layer." in p}  # every linear layer of the encoder


def _trials(study: Path) -> list[dict]:
    return [
        json.loads((d / "trial.json").read_text()) for d in sorted((study / "trials").iterdir())
    ]


def test_a_study_writes_best_config_and_report_and_continues(chat_setup, tmp_path, capsys):
    space = {"lora.r": {"low": 2, "high": 8, "log": True}, "train.lr": [3e-3, 1e-2]}
    raw = _raw(chat_setup, tmp_path / "run", space)
    raw["tune"]["metric"] = "token_accuracy"  # maximised; not the default (loss)
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(raw))
    study = tmp_path / "study"
    assert main(["tune", str(config), "--trials", "2", "--study", str(study)]) == 0
    out = capsys.readouterr().out
    assert "trial 1/2" in out and "trial 2/2" in out and "best" in out
    for name in ("study.db", "best.yaml", "report.md", "history.png"):
        assert (study / name).is_file(), name
    rows = [ln for ln in (study / "report.md").read_text().splitlines() if ln.startswith("| ")]
    assert len(rows) == 1 + 2  # header + one row per trial
    # best.yaml is a config lorafit train runs as is: the best trial's values, the original output_dir
    best = load_run_config(str(study / "best.yaml"))
    report = (study / "report.md").read_text()
    assert f"lora.r`={best.lora.r}" in report and best.train.output_dir == str(tmp_path / "run")
    values = [json.loads((study / f"trials/{i:04d}/trial_result.json").read_text()) for i in (0, 1)]
    best_value = max(v["value"] for v in values)
    assert all(v["value"] == v["final"]["val_token_accuracy"] for v in values)
    assert f"{best_value:.4f}" in report.split("**Best")[1].split("\n")[0]
    # each trial trained the config the sampler chose (its spec is what ran)
    for spec in _trials(study):
        assert (
            spec["config"]["train"]["lr"] in (3e-3, 1e-2) and 2 <= spec["config"]["lora"]["r"] <= 8
        )
    # continuing: the same command with more trials keeps the first two and adds one, + seeds
    assert main(["tune", str(config), "--trials", "3", "--study", str(study), "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "continuing the study" in out and "trial 3/3" in out and "trial 1/" not in out
    assert len(_trials(study)) == 3
    seeds = json.loads((study / "seeds.json").read_text())
    assert [s["seed"] for s in seeds] == [1, 2] and all(s["steps"] == 10 for s in seeds)
    for s in seeds:  # each seed's number is its run's final tune.metric
        summary = json.loads((Path(s["dir"]) / "run" / "summary.json").read_text())
        assert s["value"] == summary["final"]["val_token_accuracy"]
    assert "mean +- std of 2" in (study / "report.md").read_text()
    # a study is only continued with the config and space it searches
    raw["tune"]["space"]["train.lr"] = [1e-3]
    config.write_text(yaml.safe_dump(raw))
    assert main(["tune", str(config), "--trials", "4", "--study", str(study)]) == 2
    assert "searches another config or space" in capsys.readouterr().err


def test_an_interrupted_trial_is_recorded_failed_when_the_study_continues(
    chat_setup, tmp_path, capsys
):
    import optuna

    from lorafit.train.tune import STUDY_NAME, storage_url

    raw = _raw(chat_setup, tmp_path / "run", {"train.lr": [1e-2]})
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(raw))
    study_dir = tmp_path / "study"
    assert main(["tune", str(config), "--trials", "1", "--study", str(study_dir)]) == 0
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage_url(study_dir))
    study.ask()  # as a tune killed mid-trial leaves it: RUNNING, no process behind it
    capsys.readouterr()
    assert main(["tune", str(config), "--trials", "3", "--study", str(study_dir)]) == 0
    assert "recorded as failed" in capsys.readouterr().out
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage_url(study_dir))
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[1].user_attrs["error"].startswith("interrupted")


def test_the_budget_stops_a_running_trial_and_a_too_short_budget_is_an_error(
    chat_setup, tmp_path, capsys
):
    raw = _raw(chat_setup, tmp_path / "run", {"train.lr": [1e-2]}, max_steps=100000)
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(raw))
    study = tmp_path / "study"
    started = time.perf_counter()
    code = main(["tune", str(config), "--budget", "8s", "--study", str(study)])
    took = time.perf_counter() - started
    assert code == 2
    err = capsys.readouterr().err
    assert "is shorter than one trial" in err and "raise --budget" in err
    assert took < 8 + GRACE_S + 15  # killed at the deadline (+ this process's own start-up)
    result = study / "trials" / "0000" / "trial_result.json"
    assert not result.exists()  # the trial never finished: it was stopped, not waited for


def test_a_crashing_trial_is_recorded_and_the_search_goes_on(chat_setup, tmp_path, capsys):
    import optuna

    from lorafit.train.tune import STUDY_NAME, storage_url

    # an lr of 1e30 passes the config's checks and blows the loss up: NanGuard raises in training
    raw = _raw(chat_setup, tmp_path / "run", {"train.lr": [1e30], "lora.r": [2, 4]})
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(raw))
    study_dir = tmp_path / "study"
    assert main(["tune", str(config), "--trials", "2", "--study", str(study_dir)]) == 2
    err = capsys.readouterr().err
    assert "no trial completed (2 failed)" in err and "not finite" in err
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage_url(study_dir))
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
