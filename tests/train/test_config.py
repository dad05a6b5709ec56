"""The run config: sections, types, did-you-mean, and the checks that need no model."""

import pytest

from lorafit.tasks import task_names
from lorafit.train.config import RunConfig, build_run_config, field_docs, load_run_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 2e-4\n  max_steps: 3\nlora:\n  r: 4\n")
    cfg = load_run_config(str(path), ["train.batch_size=2", "data.columns={a: prompt}"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 2e-4 and cfg.train.max_steps == 3 and cfg.train.batch_size == 2
    assert cfg.lora.r == 4 and cfg.lora.lora_alpha == 32  # the run's LoRA defaults fill the rest
    assert cfg.data.columns == {"a": "prompt"}
    assert cfg.to_dict()["lora"]["r"] == 4 and "extra" not in cfg.to_dict()["lora"]


def test_model_task_is_one_of_the_registered_tasks():
    for name in task_names():
        assert build_run_config({"model": {"task": name}}).model.task == name
    with pytest.raises(ValueError, match=r"model.task must be one of .*causal-lm.*'translation'"):
        build_run_config({"model": {"task": "translation"}})


def test_early_stopping_without_validation_is_refused():
    # D1: early stopping can never trigger without validation data; say so before any work.
    no_val = {"data": {"val_fraction": 0}, "train": {"early_stopping_patience": 2}}
    with pytest.raises(ValueError, match="early_stopping_patience needs validation data"):
        build_run_config(no_val)
    with_file = {**no_val, "data": {"val_fraction": 0, "validation": "dev.jsonl"}}
    assert build_run_config(with_file).train.early_stopping_patience == 2
    assert build_run_config({"data": {"val_fraction": 0}}).data.val_fraction == 0


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"trian": {}}, "unknown section 'trian' (did you mean 'train'?)"),
        ({"train": {"warmup_ration": 1}}, "train.warmup_ration (did you mean 'warmup_ratio'?)"),
        ({"train": {"batch_size": "big"}}, "train.batch_size must be int"),
        ({"train": {"schedule": "exp"}}, "train.schedule must be cosine, linear or constant"),
        ({"train": {"method": "qlora"}}, "train.method must be 'lora' or 'full'"),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction must be in [0, 1)"),
    ],
)
def test_bad_values_are_named(raw, message):
    with pytest.raises(ValueError) as info:
        build_run_config(raw, "run.yaml")
    assert str(info.value).startswith("run.yaml: ") and message in str(info.value)


def test_every_option_has_a_docstring():
    from lorafit.train.config import SECTIONS

    for name, cls in SECTIONS.items():
        if name == "lora":
            continue
        docs = field_docs(cls)
        fields = [f for f in cls.__dataclass_fields__]
        assert set(docs) == set(fields), name
