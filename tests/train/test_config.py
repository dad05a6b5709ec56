"""The run config: sections, types, did-you-mean, and the checks that need no model."""

import pytest
import torch

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
        ({"train": {"method": "qlora"}}, "train.method must be lora, full or head"),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction must be in [0, 1)"),
        ({"model": {"quantize": "fp4"}}, "model.quantize must be none, nf4 or int8"),
        (
            {"model": {"quantize": "nf4"}, "train": {"method": "full"}},
            "a nf4-quantized base cannot be fully fine-tuned",
        ),
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


def test_set_with_invalid_yaml_is_a_value_error():
    # `--set train.lr=[1` raised yaml's ParserError: a traceback instead of a one-line error.
    from lorafit.train.config import parse_override

    with pytest.raises(ValueError, match=r"^--set train.lr=\[1: not valid YAML \(.+\)$"):
        parse_override("train.lr=[1")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_run_config(None, ["data.columns={a: b"])


def test_a_section_with_no_body_takes_overrides(tmp_path):
    # `lora:` with nothing under it loads as None; `--set lora.r=4` then said the section
    # "must be a mapping".
    path = tmp_path / "run.yaml"
    path.write_text("lora:\ntrain:\n  max_steps: 3\n")
    assert load_run_config(str(path)).lora.r == 16
    cfg = load_run_config(str(path), ["lora.r=4", "model.dtype=float32"])
    assert cfg.lora.r == 4 and cfg.train.max_steps == 3 and cfg.model.dtype == "float32"
    with pytest.raises(ValueError, match="section 'lora' must be a mapping"):
        build_run_config({"lora": []})  # only null means "no options"; other values are errors


def test_a_type_error_from_a_section_is_a_value_error_naming_it(monkeypatch):
    # A TypeError from a section's constructor escaped as a traceback; errors from every
    # section were also all labelled "lora".
    import dataclasses

    from lorafit.train import config

    @dataclasses.dataclass
    class Strict(config.TrainOptions):
        def __post_init__(self):
            raise TypeError("lr must be a number, got a list")

    monkeypatch.setitem(config.SECTIONS, "train", Strict)
    with pytest.raises(ValueError) as info:
        build_run_config({"train": {"lr": 1e-4}}, "run.yaml")
    assert str(info.value) == "run.yaml: train: lr must be a number, got a list"
    assert info.value.__cause__ is None
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"^run.yaml: lora: .*target_modules"):
        build_run_config({"lora": {"target_modules": [["q_proj"]]}}, "run.yaml")


def test_schedule_and_precision_choices_are_one_list_each():
    from lorafit.ops.precision import PRECISIONS, resolve_precision
    from lorafit.train import config, optim
    from lorafit.train.config import checks

    assert optim.SCHEDULES is config.SCHEDULES
    for name in config.SCHEDULES:
        assert build_run_config({"train": {"schedule": name}}).train.schedule == name
        assert optim.lr_factor(5, 10, 1, name) >= 0
    assert checks.PRECISIONS is PRECISIONS
    for name in PRECISIONS:
        assert build_run_config({"train": {"precision": name}}).train.precision == name
        resolve_precision(name, torch.device("cpu"))
    with pytest.raises(ValueError, match="train.precision must be auto, fp32 or bf16"):
        build_run_config({"train": {"precision": "fp16"}})
    with pytest.raises(ValueError, match="precision must be auto, fp32 or bf16"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="choose cosine, linear or constant"):
        optim.lr_factor(0, 10, 1, "exp")


def test_early_stopping_without_validation_has_one_message():
    from lorafit.train.config import NO_VALIDATION_FILE, early_stopping_needs_validation
    from lorafit.train.setup import _no_validation_reason

    no_val = {"data": {"val_fraction": 0}, "train": {"early_stopping_patience": 2}}
    with pytest.raises(ValueError) as info:
        build_run_config(no_val, "run.yaml")
    assert str(info.value) == "run.yaml: " + early_stopping_needs_validation(NO_VALIDATION_FILE)
    assert _no_validation_reason(build_run_config({"data": {"val_fraction": 0}}), 10) == (
        NO_VALIDATION_FILE
    )
