import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import write_chat_data, write_tiny_chat_model, write_tiny_classifier_base
from lorafit.train import checkpoints as ckpt
from lorafit.train.config import load_run_config
from lorafit.train.trainer import TrainingStopped, _optimizer, train


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return write_tiny_chat_model(root / "model"), write_chat_data(root / "data.jsonl")


def _cfg(model, data, out, *extra):
    return load_run_config(None, [f"model.name={model}", f"data.train={data}", f"train.output_dir={out}",
                                  "train.batch_size=4", "train.lr=1e-2", "lora.r=4", "train.eval_every=5",
                                  "train.save_every=5", "train.tensorboard=false", *extra])


def test_training_lowers_validation_loss_and_writes_everything(chat_setup, tmp_path):
    model, data = chat_setup
    result = train(_cfg(model, data, tmp_path / "run", "train.max_steps=20"), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 4 and val[-1] < val[0] - 0.1
    assert result.losses[-1] < result.losses[0]
    assert all("tokens_per_s" in r for r in rows if "loss" in r)
    for name in ("adapter/adapter_model.safetensors", "best_adapter/adapter_config.json", "loss.png",
                 "summary.json", "config.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-000015", "step-000020"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["trainable_params"] > 0 and summary["peak_memory_mb"] > 0
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4


def test_existing_run_needs_resume(chat_setup, tmp_path):
    model, data = chat_setup
    train(_cfg(model, data, tmp_path / "run", "train.max_steps=2"), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(model, data, tmp_path / "run", "train.max_steps=2"), progress=False)
    with pytest.raises(ValueError, match="lora options changed"):
        train(_cfg(model, data, tmp_path / "run", "train.max_steps=4", "lora.r=8"), resume=True, progress=False)


def _cli_train(config_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lorafit", "train", str(config_path), "--no-progress",
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_sigkill_then_resume_is_bit_identical(chat_setup, tmp_path):
    model, data = chat_setup
    base = {"model": {"name": str(model)}, "data": {"train": str(data)}, "lora": {"r": 4, "lora_dropout": 0.1},
            "train": {"batch_size": 4, "lr": 1e-2, "max_steps": 60, "save_every": 5, "eval_every": 10,
                      "tensorboard": False, "threads": 1}}
    for name in ("straight", "killed"):
        cfg = {**base, "train": {**base["train"], "output_dir": str(tmp_path / name)}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    straight = _cli_train(tmp_path / "straight.yaml")
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    victim = _cli_train(tmp_path / "killed.yaml")
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "killed" / "checkpoints" / "step-000010").exists():
        time.sleep(0.005)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = ckpt.list_checkpoints(tmp_path / "killed")
    assert done and int(done[-1].name.split("-")[1]) < 60
    resumed = _cli_train(tmp_path / "killed.yaml", "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output

    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")  # every step, bit for bit
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(chat_setup, tmp_path, monkeypatch):
    model, data = chat_setup
    import lorafit.train.trainer as train_mod

    real, calls = train_mod.causal_lm_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, n, c = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] > 7 else loss), n, c

    monkeypatch.setattr(train_mod, "causal_lm_loss", poisoned)
    with pytest.raises(TrainingStopped, match=r"not finite.*step-000005"):
        train(_cfg(model, data, tmp_path / "run", "train.max_steps=20", "train.eval_every=0"), progress=False)
    good = ckpt.list_checkpoints(tmp_path / "run")
    assert [p.name for p in good] == ["step-000005"]
    state = ckpt.load_trainer_state(good[0])
    assert state["progress"]["step"] == 5


def test_checkpoint_write_failure_leaves_previous_intact(chat_setup, tmp_path, monkeypatch):
    model, data = chat_setup
    train(_cfg(model, data, tmp_path / "run", "train.max_steps=5"), progress=False)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    real_save = torch.save

    def full_disk(obj, path, *a, **k):
        if str(path).endswith("trainer_state.pt"):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        train(_cfg(model, data, tmp_path / "run", "train.max_steps=10"), resume=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    assert ckpt.load_trainer_state(tmp_path / "run" / "checkpoints" / "step-000005")["progress"]["step"] == 5


def test_lora_plus_gives_b_a_larger_learning_rate(chat_setup, tmp_path):
    from lorafit.train.trainer import prepare

    model, data = chat_setup
    cfg = _cfg(model, data, tmp_path / "run", "train.lora_plus_ratio=16")
    prep = prepare(cfg)
    opt = _optimizer(prep.model, cfg)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == [pytest.approx(1e-2), pytest.approx(0.16)]
    b_params = {id(p) for n, p in prep.model.named_parameters() if n.endswith(".B")}
    fast = max(opt.param_groups, key=lambda g: g["lr"])
    assert {id(p) for p in fast["params"]} == b_params


def test_packing_trains(chat_setup, tmp_path):
    model, data = chat_setup
    result = train(_cfg(model, data, tmp_path / "run", "train.max_steps=6", "data.packing=true",
                        "data.max_length=128"), progress=False)
    assert result.losses[-1] < result.losses[0]


def test_classification_with_head(tmp_path):
    base = write_tiny_classifier_base(tmp_path / "bert")
    rows = ["text,label"] + [f"{w} movie,{'pos' if w in ('great', 'fine', 'lovely') else 'neg'}"
                             for w in ["great", "awful", "fine", "bad", "lovely", "terrible"] * 8]
    (tmp_path / "cls.csv").write_text("\n".join(rows) + "\n")
    cfg = load_run_config(None, [f"model.name={base}", "model.task=classification", f"data.train={tmp_path / 'cls.csv'}",
                                 f"train.output_dir={tmp_path / 'run'}", "train.max_steps=40", "train.lr=3e-2",
                                 "train.eval_every=0", "lora.target_modules=[query, value]", "train.tensorboard=false"])
    result = train(cfg, progress=False)
    assert result.final["val_accuracy"] == 1.0
    assert json.loads((tmp_path / "run" / "adapter" / "labels.json").read_text()) == ["neg", "pos"]
    keys = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in keys


def test_full_finetuning_baseline_saves_a_loadable_model(chat_setup, tmp_path):
    from lorafit.infer.generate import load_for_inference

    model, data = chat_setup
    result = train(_cfg(model, data, tmp_path / "run", "train.max_steps=6", "train.method=full", "train.lr=1e-3"),
                   progress=False)
    assert result.trainable_params == result.total_params
    assert result.losses[-1] < result.losses[0]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert ckpt.list_checkpoints(tmp_path / "run")  # full-model checkpoint, resumable
    tuned, _ = load_for_inference(adapter=str(tmp_path / "run" / "model"))
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.isfinite(tuned(ids).logits).all()
    result2 = train(_cfg(model, data, tmp_path / "run", "train.max_steps=8", "train.method=full", "train.lr=1e-3"),
                    resume=True, progress=False)
    assert result2.steps == 8
