"""Training-state checkpoints: adapter + optimizer + scheduler + RNG + position, written atomically.

A checkpoint is a folder `checkpoints/step-000100/` holding the adapter (PEFT layout), or with full
fine-tuning `model.safetensors`, and `trainer_state.pt` (tensors and plain containers only: it is
read back with weights_only=True, so loading a checkpoint never runs pickled code). It is written
with `lorafit.atomic.write_dir`, so a crash or a full disk mid-save leaves the previous
checkpoints intact and no half-written one visible.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from lorafit import atomic
from lorafit.tuner.peft_format import save_adapter

FULL_WEIGHTS = "model.safetensors"
STATE_FILE = "trainer_state.pt"

_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    """The step in a checkpoint folder's name (`step-000100` -> 100), None for other names."""
    match = _NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under root/checkpoints, oldest first."""
    folder = Path(root) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and checkpoint_step(p) is not None and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(internal),
        "python_version": version,
        "python_gauss": gauss,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(model: nn.Module, folder: Path, adapter_name: str | None) -> Path:
    """The trained weights: the adapter (PEFT layout), or with adapter_name None the whole model."""
    if adapter_name is not None:
        return save_adapter(model, folder, adapter_name)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / FULL_WEIGHTS))  # de-duplicates tied tensors
    return folder


def load_weights(model: nn.Module, folder: Path) -> None:
    """Inverse of save_weights(adapter_name=None)."""
    missing, unexpected = load_model(model, str(Path(folder) / FULL_WEIGHTS), strict=False)
    if unexpected or missing:
        raise ValueError(
            f"{folder}: checkpoint does not fit the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    adapter_name: str | None,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last` (each
    renamed away before it is deleted: a kill mid-delete leaves no half checkpoint listed)."""

    def build(tmp: Path) -> None:
        save_weights(model, tmp, adapter_name)
        torch.save(state, tmp / STATE_FILE)

    final = atomic.write_dir(Path(root) / "checkpoints" / f"step-{step:06d}", build)
    for old in list_checkpoints(root)[:-keep_last]:
        try:
            atomic.remove_dir(old)
        except atomic.WriteError as exc:  # a leftover old checkpoint is no reason to stop
            warnings.warn(f"old checkpoint not pruned: {exc}", stacklevel=2)
    return final


def load_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a lorafit checkpoint (no {STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=True)


def clean_partial(root: str | os.PathLike) -> None:
    """Remove temporary folders a save killed midway left (checkpoints and final folders)."""
    atomic.remove_leftovers(Path(root) / "checkpoints")
    atomic.remove_leftovers(root)
