"""The whole recipe on a tiny chat model: what a run writes, no-validation runs, unwritable output
folders, atomic final saves, NaN stops, packing, classification and full fine-tuning."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorafit.train.setup as setup_mod
import lorafit.train.trainer as trainer_mod
from helpers import write_tiny_classifier_base
from lorafit import atomic
from lorafit.models import heap
from lorafit.tasks import get_task
from lorafit.train import checkpoints as ckpt
from lorafit.train.config import load_run_config
from lorafit.train.setup import prepare
from lorafit.train.trainer import Trainer, TrainingStopped, train


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_training_lowers_validation_loss_and_writes_everything(make_cfg, tmp_path):
    result = train(make_cfg(tmp_path / "run", "train.max_steps=20"), progress=False)
    rows = _rows(tmp_path / "run")
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 4 and val[-1] < val[0] - 0.1
    assert result.losses[-1] < result.losses[0]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 20 and all(r["tokens_per_s"] > 0 for r in train_rows)
    for name in (
        "adapter/adapter_model.safetensors",
        "best_adapter/adapter_config.json",
        "loss.png",
        "summary.json",
        "config.json",
    ):
        assert (tmp_path / "run" / name).is_file(), name
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run")]
    assert names == ["step-000015", "step-000020"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["trainable_params"] > 0
    assert summary["peak_memory_mb"] > 0 and summary["validation_examples"] > 0
    assert summary["final"]["val_loss"] == pytest.approx(val[-1])
    assert "no_validation" not in summary
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    leftovers = [p.name for p in (tmp_path / "run").rglob(".*")]
    assert not leftovers  # every write went through a temp sibling that was renamed


def test_no_validation_data_trains_and_saves_the_final_adapter(make_cfg, tmp_path):
    # D1: data.val_fraction 0 and no validation file used to train every step, then fail with
    # KeyError 'loss' at the first evaluation, leaving no adapter.
    cfg = make_cfg(
        tmp_path / "run", "train.max_steps=6", "data.val_fraction=0", "train.eval_every=2"
    )
    logged = []
    result = train(cfg, progress=False, log=logged.append)
    assert result.steps == 6 and result.stopped == "completed"
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert result.best_adapter_dir is None and not (tmp_path / "run" / "best_adapter").exists()
    assert result.final == {}
    assert not [r for r in _rows(tmp_path / "run") if "val_loss" in r]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["validation_examples"] == 0 and summary["final"] == {}
    assert "val_fraction is 0" in summary["no_validation"]
    assert any("no validation data" in line for line in logged)


@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_unwritable_output_dir_fails_before_the_model_loads(make_cfg, tmp_path, monkeypatch, where):
    # D3: a read-only output_dir gave a raw traceback after the (slow) model load. Tests run as
    # root, which chmod cannot stop, so the folder sits under /proc or under a plain file.
    if where == "proc":
        out = Path("/proc/lorafit-test/run")
        reason = "No such file or directory"
    else:
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "run"
        reason = "Not a directory"

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(setup_mod, "load_model", no_load)
    monkeypatch.setattr(setup_mod, "load_tokenizer", no_load)
    with pytest.raises(atomic.WriteError) as info:
        train(make_cfg(out, "train.max_steps=2"), progress=False)
    message = str(info.value)
    assert str(out) in message and reason in message and "\n" not in message
    assert not Path("/proc/lorafit-test").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["a_file"] if where != "proc" else [])


def test_final_and_best_adapters_are_built_beside_their_target(make_cfg, tmp_path, monkeypatch):
    # The final save used to write into adapter/ in place (and, for full models, delete it
    # before renaming the new one in): a crash then left a broken or missing product.
    real, folders = trainer_mod.save_adapter, []

    def spy(model, folder, name="default", edit=None):
        folders.append(Path(folder))
        return real(model, folder, name, edit)

    monkeypatch.setattr(trainer_mod, "save_adapter", spy)
    train(make_cfg(tmp_path / "run", "train.max_steps=5", "train.save_every=0"), progress=False)
    assert all(f.parent == tmp_path / "run" and f.name.startswith(".") for f in folders), folders
    assert {f.name.split(".")[1] for f in folders} == {"adapter", "best_adapter"}


def test_full_model_final_save_never_deletes_the_previous_model(make_cfg, tmp_path, monkeypatch):
    extra = ("train.method=full", "train.lr=1e-3", "train.save_every=0", "train.eval_every=0")
    train(make_cfg(tmp_path / "run", "train.max_steps=2", *extra), progress=False)
    model_dir = tmp_path / "run" / "model"
    before = _tree(model_dir)

    def failing(real):
        def move(src, dst, *args, **kwargs):  # the disk fails as the new folder moves into place
            new = Path(src).name.startswith(".model") and ".old-" not in Path(src).name
            if Path(dst) == model_dir and new:
                raise OSError(5, "Input/output error")
            return real(src, dst, *args, **kwargs)

        return move

    monkeypatch.setattr(os, "rename", failing(os.rename))
    monkeypatch.setattr(os, "replace", failing(os.replace))
    with pytest.raises(OSError, match="Input/output error"):
        train(make_cfg(tmp_path / "run", "train.max_steps=4", *extra), resume=True, progress=False)
    assert _tree(model_dir) == before
    assert not [p.name for p in (tmp_path / "run").glob(".model*")]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(make_cfg, tmp_path, monkeypatch):
    task_class = type(get_task("causal-lm"))
    real, calls = task_class.loss, {"n": 0}

    def poisoned(self, model, batch, chunk):
        calls["n"] += 1
        loss = real(self, model, batch, chunk)
        return loss * float("nan") if calls["n"] > 7 else loss

    monkeypatch.setattr(task_class, "loss", poisoned)
    cfg = make_cfg(tmp_path / "run", "train.max_steps=20", "train.eval_every=0")
    with pytest.raises(TrainingStopped, match=r"step 8: .*not finite.*step-000005"):
        train(cfg, progress=False)
    good = ckpt.list_checkpoints(tmp_path / "run")
    assert [p.name for p in good] == ["step-000005"]
    assert ckpt.load_trainer_state(good[0])["progress"]["step"] == 5
    assert max(r["step"] for r in _rows(tmp_path / "run")) == 7  # the bad step was not logged
    assert not (tmp_path / "run" / "adapter").exists()


def test_packing_packs_the_training_examples_and_trains(make_cfg, tmp_path):
    plain = prepare(make_cfg(tmp_path / "a", "data.max_length=128"), get_task("causal-lm"))
    packed = prepare(
        make_cfg(tmp_path / "b", "data.packing=true", "data.max_length=128"), get_task("causal-lm")
    )
    tokens = sum(len(e["input_ids"]) for e in plain.train)
    assert len(packed.train) < 0.6 * len(plain.train)
    assert sum(len(e["input_ids"]) for e in packed.train) == tokens
    assert all(len(e["input_ids"]) <= 128 for e in packed.train)
    result = train(
        make_cfg(tmp_path / "run", "train.max_steps=6", "data.packing=true", "data.max_length=128"),
        progress=False,
    )
    assert result.losses[-1] < result.losses[0]


def test_classification_with_head(tmp_path):
    base = write_tiny_classifier_base(tmp_path / "bert")
    words = ["great", "awful", "fine", "bad", "lovely", "terrible"] * 8
    rows = ["text,label"] + [
        f"{w} movie,{'pos' if w in ('great', 'fine', 'lovely') else 'neg'}" for w in words
    ]
    (tmp_path / "cls.csv").write_text("\n".join(rows) + "\n")
    cfg = load_run_config(
        None,
        [
            f"model.name={base}",
            "model.task=classification",
            f"data.train={tmp_path / 'cls.csv'}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=40",
            "train.lr=3e-2",
            "train.eval_every=0",
            "lora.target_modules=[query, value]",
            "train.tensorboard=false",
        ],
    )
    result = train(cfg, progress=False)
    assert result.final["val_accuracy"] == 1.0
    labels = json.loads((tmp_path / "run" / "adapter" / "labels.json").read_text())
    assert labels == ["neg", "pos"]
    keys = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in keys
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]


def test_full_finetuning_baseline_saves_a_loadable_model(make_cfg, tmp_path):
    from transformers import AutoModelForCausalLM

    extra = ("train.method=full", "train.lr=1e-3")
    result = train(make_cfg(tmp_path / "run", "train.max_steps=6", *extra), progress=False)
    assert result.trainable_params == result.total_params
    assert result.losses[-1] < result.losses[0]
    assert result.adapter_dir == tmp_path / "run" / "model"
    assert (tmp_path / "run" / "best_model" / "model.safetensors").is_file()
    assert ckpt.list_checkpoints(tmp_path / "run")  # full-model checkpoint, resumable
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    with torch.no_grad():
        assert torch.isfinite(tuned(torch.tensor([[5, 6, 7]])).logits).all()
    again = train(
        make_cfg(tmp_path / "run", "train.max_steps=8", *extra), resume=True, progress=False
    )
    assert again.steps == 8


def test_the_package_exports_the_recipe():
    import lorafit.train as package

    assert package.train is train and package.TrainingStopped is TrainingStopped
    assert {"train", "TrainResult", "TrainingStopped", "RunConfig", "load_run_config"} <= set(
        package.__all__
    )


def test_training_keeps_large_blocks_only_while_its_steps_run(
    make_cfg, tmp_path, libc, monkeypatch
):
    """Steps whose activations reach glibc's mmap cap keep large freed blocks for the next step
    (train/step.py); the trainer hands the cap back before saving, so a process that goes on
    (merging, generating) runs with the loader's cap again."""
    monkeypatch.setattr(heap, "MMAP_THRESHOLD_BYTES", 1)  # every tiny step reaches it
    seen = []
    monkeypatch.setattr(Trainer, "save", _recording(Trainer.save, seen))
    train(make_cfg(tmp_path / "run", "train.max_steps=2"), progress=False)
    assert (heap.M_MMAP_THRESHOLD, heap.KEEP_MMAP_THRESHOLD_BYTES) in libc.calls
    assert seen == ["capped"] and heap.mode() == "capped"
    assert libc.calls[-1] == (heap.M_TRIM_THRESHOLD, heap.DEFAULT_TRIM_THRESHOLD_BYTES)


def _recording(method, seen):
    def wrapper(self, *args, **kwargs):
        seen.append(heap.mode())
        return method(self, *args, **kwargs)

    return wrapper
