"""Checkpoint folders: atomic, pruned to keep_last, incomplete ones never listed."""

import shutil
from pathlib import Path

import pytest
import torch

from helpers import tiny_llama
from lorafit.train import checkpoints as ckpt
from lorafit.tuner.config import LoraConfig
from lorafit.tuner.inject import inject


@pytest.fixture
def model():
    m = tiny_llama()
    inject(m, LoraConfig(r=2, target_modules=["q_proj"]))
    return m


def test_save_prunes_to_keep_last_and_lists_oldest_first(model, tmp_path):
    for step in (5, 10, 15):
        ckpt.save_checkpoint(tmp_path, step, model, "default", {"progress": {"step": step}}, 2)
    found = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-000010", "step-000015"]
    assert [ckpt.checkpoint_step(p) for p in found] == [10, 15]
    assert (found[-1] / "adapter_model.safetensors").is_file()
    assert ckpt.load_trainer_state(found[-1])["progress"]["step"] == 15


def test_resaving_a_step_replaces_it_whole(model, tmp_path):
    ckpt.save_checkpoint(tmp_path, 5, model, "default", {"v": 1}, 2)
    ckpt.save_checkpoint(tmp_path, 5, model, "default", {"v": 2}, 2)
    assert ckpt.load_trainer_state(tmp_path / "checkpoints" / "step-000005") == {"v": 2}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000005"]


def test_a_failed_save_leaves_nothing_and_keeps_the_older(model, tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 5, model, "default", {"v": 1}, 1)

    def full_disk(obj, path, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="step-000010: No space left on device"):
        ckpt.save_checkpoint(tmp_path, 10, model, "default", {"v": 2}, 1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000005"]


def test_incomplete_folders_are_not_checkpoints_and_leftovers_are_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-000005").mkdir(parents=True)  # no trainer_state.pt
    (root / "notes").mkdir()
    (root / ".step-000010.tmp-1-abcd").mkdir()
    (root / ".tmp-step-000010-abcd").mkdir()  # the naming of earlier versions
    (tmp_path / ".adapter.tmp-1-abcd").mkdir()
    assert ckpt.list_checkpoints(tmp_path) == []
    ckpt.clean_partial(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-000005"]
    assert not (tmp_path / ".adapter.tmp-1-abcd").exists()


def test_full_weights_round_trip(tmp_path):
    source, target = tiny_llama(seed=1), tiny_llama(seed=2)
    ckpt.save_checkpoint(tmp_path, 1, source, None, {}, 1)
    ckpt.load_weights(target, tmp_path / "checkpoints" / "step-000001")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def test_rng_state_round_trips():
    import random

    state = ckpt.rng_state()
    expected = (torch.rand(2), random.random())
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(2), expected[0]) and random.random() == expected[1]


def test_a_kill_while_pruning_leaves_no_half_checkpoint_listed(model, tmp_path, monkeypatch):
    # Pruning deleted step-… in place: a kill midway left a folder that had lost its adapter but
    # kept trainer_state.pt, and list_checkpoints (so --resume) took it for a complete one.
    for step in (5, 10):
        ckpt.save_checkpoint(tmp_path, step, model, "default", {"step": step}, 2)

    def killed_midway(path, *args, **kwargs):
        (Path(path) / "adapter_model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 15, model, "default", {"step": 15}, 2)
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000010", "step-000015"]
    ckpt.clean_partial(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000010",
        "step-000015",
    ]
