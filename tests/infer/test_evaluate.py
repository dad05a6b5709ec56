"""`lorafit eval` scores the adapter it is given, not the base model."""

import pytest

from helpers import write_chat_data, write_random_adapter, write_tiny_chat_model
from lorafit.data import read_records
from lorafit.infer import evaluate_run, load_for_inference, prompts_and_references
from lorafit.tasks import get_task
from lorafit.train.config import load_run_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = write_tiny_chat_model(root / "model")
    data = write_chat_data(root / "data.jsonl", n=12)
    cfg = load_run_config(
        None,
        [
            f"model.name={model}",
            f"data.train={data}",
            f"train.output_dir={root / 'run'}",
            "train.precision=fp32",
        ],
    )
    return cfg, write_random_adapter(model, root / "adapter"), data


def test_eval_scores_the_given_adapter(setup):
    cfg, adapter, data = setup
    with_adapter = evaluate_run(cfg, adapter=str(adapter), data=str(data))
    base = evaluate_run(cfg, adapter="none", data=str(data))
    assert with_adapter["loss"] != pytest.approx(base["loss"], rel=1e-3)
    # ... and equals what the task computes on a model that has the adapter loaded.
    task = get_task("causal-lm")
    model, tok = load_for_inference(adapter=str(adapter))
    examples, _ = task.build_examples(read_records(data), tok, cfg.data)
    expected = task.evaluate(model, examples, task.collator(tok), cfg.train.batch_size)
    assert with_adapter["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_eval_refuses_missing_adapter(setup, tmp_path):
    cfg, _, data = setup
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_run(cfg, adapter=str(tmp_path / "nope"), data=str(data))


def test_references_are_grouped_per_prompt():
    records = [
        {"prompt": "a", "completion": "x"},
        {"prompt": "b", "completion": "y"},
        {"prompt": "a", "completion": "z"},
    ]
    prompts, refs = prompts_and_references(records)
    assert [p[-1]["content"] for p in prompts] == ["a", "b"] and refs == [["x", "z"], ["y"]]


def test_eval_of_a_full_fine_tuning_run_scores_its_model_folder(tmp_path):
    from lorafit.train import train

    model = write_tiny_chat_model(tmp_path / "model")
    data = write_chat_data(tmp_path / "data.jsonl", n=12)
    sets = [
        f"model.name={model}",
        f"data.train={data}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.method=full",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.lr=0.05",
        "train.precision=fp32",
        "train.tensorboard=false",
        "train.eval_every=0",
    ]
    cfg = load_run_config(None, sets)
    result = train(cfg, progress=False)
    tuned = evaluate_run(cfg)  # default: <output_dir>/model for a full run, on its val split
    base = evaluate_run(cfg, adapter="none")
    assert result.adapter_dir.name == "model"
    assert tuned["loss"] == pytest.approx(result.final["val_loss"], rel=1e-4)
    assert tuned["loss"] != pytest.approx(base["loss"], rel=1e-3)
