"""Starting and continuing runs: a previous run is never overwritten, resuming replays the run bit
for bit, damaged checkpoints are named and an older good one offered, a run killed after its last
checkpoint still gets its final evaluation and save."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lorafit.train.setup as setup_mod
from lorafit.train import checkpoints as ckpt
from lorafit.train.callbacks import Callback, default_callbacks
from lorafit.train.resume import check_fresh_start, find_checkpoint, load_checkpoint
from lorafit.train.trainer import Trainer, train


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
        for p in root.rglob("*")
    }


def _no_model_load(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(setup_mod, "load_model", no_load)
    monkeypatch.setattr(setup_mod, "load_tokenizer", no_load)


def test_existing_run_needs_resume_and_the_same_config(make_cfg, tmp_path):
    train(make_cfg(tmp_path / "run", "train.max_steps=2"), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(make_cfg(tmp_path / "run", "train.max_steps=2"), progress=False)
    with pytest.raises(ValueError, match=r"lora options changed \(r\)"):
        cfg = make_cfg(tmp_path / "run", "train.max_steps=4", "lora.r=8")
        train(cfg, resume=True, progress=False)
    with pytest.raises(ValueError, match="train.batch_size changed"):
        cfg = make_cfg(tmp_path / "run", "train.max_steps=4", "train.batch_size=2")
        train(cfg, resume=True, progress=False)


def test_run_without_metrics_is_not_overwritten(make_cfg, tmp_path, monkeypatch):
    # D2: the guard looked only at metrics.jsonl, so a folder with checkpoints/ and adapter/ but
    # no metrics.jsonl was silently trained over.
    run = tmp_path / "run"
    train(make_cfg(run, "train.max_steps=5"), progress=False)
    (run / "metrics.jsonl").unlink()
    before = _snapshot(run)
    _no_model_load(monkeypatch)
    with pytest.raises(FileExistsError) as info:
        train(make_cfg(run, "train.max_steps=5"), progress=False)
    message = str(info.value)
    assert "--resume" in message and "train.output_dir" in message and "\n" not in message
    assert "checkpoints/" in message and "adapter" in message
    assert _snapshot(run) == before


@pytest.mark.parametrize(
    "sign",
    ["metrics.jsonl", "summary.json", "adapter/", "model/", "best_adapter/", "best_model/", "ckpt"],
)
def test_any_sign_of_a_previous_run_refuses_a_fresh_start(make_cfg, tmp_path, monkeypatch, sign):
    run = tmp_path / "run"
    run.mkdir()
    if sign == "ckpt":
        (run / "checkpoints" / "step-000003").mkdir(parents=True)
        (run / "checkpoints" / "step-000003" / "trainer_state.pt").write_bytes(b"x")
    elif sign.endswith("/"):
        (run / sign).mkdir()
    else:
        (run / sign).write_text("{}\n")
    before = _snapshot(run)
    _no_model_load(monkeypatch)
    with pytest.raises(
        FileExistsError, match="pass --resume .* or choose another train.output_dir"
    ):
        train(make_cfg(run, "train.max_steps=2"), progress=False)
    assert _snapshot(run) == before


def test_a_folder_without_a_finished_step_may_be_reused(make_cfg, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".step-000005.tmp-1-abcd").mkdir(parents=True)  # a save killed midway
    (run / "config.json").write_text("{}\n")  # a run that failed before its first step
    check_fresh_start(run)
    train(make_cfg(run, "train.max_steps=2"), progress=False)
    assert not list((run / "checkpoints").glob(".*"))


def _cli_train(config_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lorafit", "train", str(config_path), "--no-progress", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


QLORA = {  # an NF4 base with everything that must work on it: DoRA, LoRA+, checkpointing
    "model": {"quantize": "nf4"},
    "lora": {"use_dora": True, "target_modules": "all-linear"},
    "train": {"lora_plus_ratio": 4.0, "gradient_checkpointing": True},
}


@pytest.mark.parametrize("variant", ["lora", "qlora"])
def test_sigkill_then_resume_is_bit_identical(chat_setup, tmp_path, variant):
    model, data = chat_setup
    extra = QLORA if variant == "qlora" else {}
    base = {
        "model": {"name": str(model), **extra.get("model", {})},
        "data": {"train": str(data)},
        "lora": {"r": 4, "lora_dropout": 0.1, **extra.get("lora", {})},
        "train": {
            **extra.get("train", {}),
            "batch_size": 4,
            "lr": 1e-2,
            "max_steps": 60,
            "save_every": 5,
            "eval_every": 10,
            "tensorboard": False,
            "threads": 1,
        },
    }
    for name in ("straight", "killed"):
        cfg = {**base, "train": {**base["train"], "output_dir": str(tmp_path / name)}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    straight = _cli_train(tmp_path / "straight.yaml")
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    victim = _cli_train(tmp_path / "killed.yaml")
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "killed/checkpoints/step-000010").exists():
        time.sleep(0.005)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = ckpt.list_checkpoints(tmp_path / "killed")
    assert done and ckpt.checkpoint_step(done[-1]) < 60
    resumed = _cli_train(tmp_path / "killed.yaml", "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output

    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")  # every step, bit for bit
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if variant == "qlora":  # the checkpoint holds the adapter only, never the (quantized) base
        step = ckpt.list_checkpoints(tmp_path / "killed")[-1]
        saved = {k for f in step.rglob("*.safetensors") for k in load_file(f)}
        assert saved and all("lora_" in k for k in saved), saved
        assert any("lora_magnitude_vector" in k for k in saved)  # DoRA
    summaries = [
        json.loads((tmp_path / n / "summary.json").read_text()) for n in ("straight", "killed")
    ]
    assert summaries[0]["final"] == summaries[1]["final"] != {}


@pytest.fixture
def two_checkpoints(make_cfg, tmp_path):
    """A finished 10-step run with checkpoints at steps 5 and 10."""
    run = tmp_path / "run"
    train(make_cfg(run, "train.max_steps=10", "train.eval_every=0"), progress=False)
    found = ckpt.list_checkpoints(run)
    assert [p.name for p in found] == ["step-000005", "step-000010"]
    return run, found[0], found[1]


def test_corrupt_trainer_state_names_the_file_and_offers_the_older_checkpoint(
    make_cfg, two_checkpoints, monkeypatch
):
    # D4: a damaged trainer_state.pt gave PyTorch's zip-reader message, naming neither the file
    # nor the checkpoint, and not the older checkpoint that still loads.
    run, older, newest = two_checkpoints
    state_file = newest / "trainer_state.pt"
    state_file.write_bytes(state_file.read_bytes()[:100])  # a truncated write
    cfg = make_cfg(run, "train.max_steps=12", "train.eval_every=0")
    with monkeypatch.context() as m:
        _no_model_load(m)
        with pytest.raises(ValueError) as info:
            train(cfg, resume=True, progress=False)
    message = str(info.value)
    assert str(state_file) in message and "corrupt" in message
    assert f"--resume {older}" in message and "\n" not in message
    result = train(cfg, resume=str(older), progress=False)  # the offered checkpoint works
    assert result.steps == 12


def test_corrupt_adapter_in_a_checkpoint_is_named(two_checkpoints):
    run, older, newest = two_checkpoints
    (newest / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError) as info:
        load_checkpoint(find_checkpoint(run, True), full_model=False)
    message = str(info.value)
    assert str(newest / "adapter_model.safetensors") in message and "corrupt" in message
    assert f"--resume {older}" in message


def test_no_loadable_checkpoint_says_so(two_checkpoints):
    run, older, newest = two_checkpoints
    for folder in (older, newest):
        (folder / "trainer_state.pt").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="no older checkpoint loads"):
        load_checkpoint(find_checkpoint(run, "auto"), full_model=False)


def test_run_killed_after_its_last_checkpoint_is_finished_on_resume(make_cfg, tmp_path):
    # D6: resuming at step == total skipped the final evaluation: summary.json said "final": {}.
    run = tmp_path / "run"
    cfg = make_cfg(run, "train.max_steps=10")
    first = train(cfg, progress=False)
    assert first.final
    for name in ("adapter", "summary.json", "loss.png"):  # what the kill took away
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    logged = []
    again = train(cfg, resume=True, progress=False, log=logged.append)
    assert any("resumed from" in line and "step 10" in line for line in logged)
    assert again.steps == 10 and again.losses == []
    assert again.final == first.final
    assert json.loads((run / "summary.json").read_text())["final"] == first.final
    a = load_file(first.adapter_dir / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    val_rows = [
        r
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "val_loss" in r
    ]
    assert [r["step"] for r in val_rows] == [5, 10]  # the final evaluation is not logged twice


class _StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, out):
        if trainer.state.step == self.step:
            trainer.stop(f"stopped at {self.step}")


def test_a_stopped_run_stays_stopped_on_resume(make_cfg, tmp_path):
    cfg = make_cfg(tmp_path / "run", "train.max_steps=10", "train.save_every=0")
    trainer = Trainer(cfg, progress=False, log=lambda _: None)
    stop_first = [_StopAt(3), *default_callbacks(trainer, progress=False)]
    trainer.callbacks = stop_first
    trainer.setup()
    trainer.fit()
    assert trainer.state.step == 3
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-000003"]
    again = train(cfg, resume=True, progress=False)  # killed before its final save
    assert again.steps == 3 and again.stopped == "stopped at 3" and again.losses == []


def test_checkpoint_write_failure_leaves_previous_intact(make_cfg, tmp_path, monkeypatch):
    train(make_cfg(tmp_path / "run", "train.max_steps=5"), progress=False)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    real_save = torch.save

    def full_disk(obj, path, *a, **k):
        if str(path).endswith("trainer_state.pt"):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="step-000010: No space"):
        train(make_cfg(tmp_path / "run", "train.max_steps=10"), resume=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    state = ckpt.load_trainer_state(tmp_path / "run" / "checkpoints" / "step-000005")
    assert state["progress"]["step"] == 5


def test_resume_names_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        find_checkpoint(tmp_path, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        find_checkpoint(tmp_path, True)


def test_variants_that_cannot_resume_are_refused_by_name(make_cfg, tmp_path, monkeypatch):
    # resume.py had its own PiSSA test (init_lora_weights.startswith("pissa")); which variants
    # can resume is now the variant's own say (tuner.variants.resumable).
    from lorafit.train.resume import check_same_run
    from lorafit.tuner.variants import registered_variants

    pissa = make_cfg(tmp_path, "lora.init_lora_weights=pissa_niter_2")
    with pytest.raises(ValueError, match="resuming a PiSSA run is not supported"):
        check_same_run(pissa.to_dict(), pissa, tmp_path)
    dora = make_cfg(tmp_path, "lora.use_dora=true")
    check_same_run(dora.to_dict(), dora, tmp_path)
    (variant,) = [v for v in registered_variants() if v.label == "DoRA"]
    monkeypatch.setattr(variant, "resumable", False)
    with pytest.raises(ValueError, match="resuming a DoRA run is not supported"):
        check_same_run(dora.to_dict(), dora, tmp_path)
