"""Real studies on the tiny chat model (real training runs, one process each): best.yaml and
report.md, continuing a study, the budget's end, interrupted and failed trials."""

import json
import time
from pathlib import Path

import yaml

from lorafit.cli.main import main
from lorafit.train.config import load_run_config
from lorafit.train.tune.trial import GRACE_S


def _trials(study: Path) -> list[dict]:
    return [
        json.loads((d / "trial.json").read_text()) for d in sorted((study / "trials").iterdir())
    ]


def test_a_study_writes_best_config_and_report_and_continues(tune_raw, tmp_path, capsys):
    space = {"lora.r": {"low": 2, "high": 8, "log": True}, "train.lr": [3e-3, 1e-2]}
    raw = tune_raw(tmp_path / "run", space)
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
    # best.yaml runs as is in lorafit train: the best trial's values, the original output_dir
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
    tune_raw, tmp_path, capsys
):
    import optuna

    from lorafit.train.tune.search import STUDY_NAME, storage_url

    raw = tune_raw(tmp_path / "run", {"train.lr": [1e-2]})
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
    tune_raw, tmp_path, capsys
):
    raw = tune_raw(tmp_path / "run", {"train.lr": [1e-2]}, max_steps=100000)
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


def test_a_crashing_trial_is_recorded_and_the_search_goes_on(tune_raw, tmp_path, capsys):
    import optuna

    from lorafit.train.tune.search import STUDY_NAME, storage_url

    # an lr of 1e30 passes the config's checks and blows the loss up: NanGuard raises in training
    raw = tune_raw(tmp_path / "run", {"train.lr": [1e30], "lora.r": [2, 4]})
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(raw))
    study_dir = tmp_path / "study"
    assert main(["tune", str(config), "--trials", "2", "--study", str(study_dir)]) == 2
    err = capsys.readouterr().err
    assert "no trial completed (2 failed)" in err and "not finite" in err
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage_url(study_dir))
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
