"""Starting or continuing a run in train.output_dir: refuse to overwrite a previous run, find the
checkpoint to resume from, check it loads and belongs to this config, all before a model loads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

import lorafit.train.checkpoints as ckpt
from lorafit.train.config import RunConfig
from lorafit.train.state import PAYLOAD_KEYS
from lorafit.tuner.peft_format import read_adapter
from lorafit.tuner.variants import resumable

RUN_PRODUCTS = ("adapter", "model", "best_adapter", "best_model", "metrics.jsonl", "summary.json")
"""What a previous run leaves in its output_dir (besides checkpoints)."""


def previous_run(out: Path) -> list[str]:
    """The signs in `out` that a run already used it (empty when it is free to start in)."""
    found = [name for name in RUN_PRODUCTS if (out / name).exists()]
    if ckpt.list_checkpoints(out):
        found.append("checkpoints/")
    return found


def check_fresh_start(out: Path) -> None:
    """Refuse (touching nothing) to start a new run where a run already is."""
    found = previous_run(out)
    if found:
        raise FileExistsError(
            f"{out} already holds a run ({', '.join(found)}); pass --resume to continue it "
            "or choose another train.output_dir"
        )


def find_checkpoint(out: Path, resume: bool | str) -> Path:
    """The checkpoint `resume` names: a folder, or (True / "auto" / "latest") the newest in out."""
    if isinstance(resume, (str, os.PathLike)) and str(resume) not in ("auto", "latest"):
        path = Path(resume)
        if not (path / ckpt.STATE_FILE).is_file():
            raise FileNotFoundError(
                f"--resume {resume}: not a checkpoint folder (no {ckpt.STATE_FILE})"
            )
        return path
    found = ckpt.list_checkpoints(out)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    return found[-1]


def load_checkpoint(checkpoint: Path, full_model: bool) -> dict[str, Any]:
    """The checkpoint's trainer state, after checking that its weights read too; a ValueError
    names the unreadable file and the newest older checkpoint that does load, if any."""
    try:
        return _read(checkpoint, full_model)
    except _Unreadable as bad:
        older = _newest_loadable_before(checkpoint, full_model)
        hint = (
            f"; the newest older checkpoint that loads is {older}: resume from it with "
            f"--resume {older}"
            if older
            else "; no older checkpoint loads: start again in another train.output_dir"
        )
        raise ValueError(f"cannot resume from {checkpoint}: {bad}{hint}") from None


class _Unreadable(Exception):
    pass


def _read(checkpoint: Path, full_model: bool) -> dict[str, Any]:
    state_file = checkpoint / ckpt.STATE_FILE
    try:
        payload = ckpt.load_trainer_state(checkpoint)
    except Exception as exc:  # torch.load reports a damaged file in many ways (zip, pickle, EOF)
        raise _Unreadable(f"{state_file} is unreadable or corrupt ({_first_line(exc)})") from None
    if not isinstance(payload, dict) or any(k not in payload for k in PAYLOAD_KEYS):
        raise _Unreadable(f"{state_file} is not a lorafit trainer state (corrupt or foreign)")
    if full_model:
        weights = checkpoint / ckpt.FULL_WEIGHTS
        try:
            with safe_open(str(weights), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as exc:
            raise _Unreadable(f"{weights} is unreadable or corrupt ({_first_line(exc)})") from None
    else:
        try:
            read_adapter(checkpoint)
        except (ValueError, OSError) as exc:
            raise _Unreadable(f"its adapter is unreadable or corrupt: {_first_line(exc)}") from None
    return payload


def _newest_loadable_before(checkpoint: Path, full_model: bool) -> Path | None:
    step = ckpt.checkpoint_step(checkpoint)
    if step is None:
        return None
    older = [
        p for p in ckpt.list_checkpoints(checkpoint.parent.parent) if ckpt.checkpoint_step(p) < step
    ]
    for candidate in reversed(older):
        try:
            _read(candidate, full_model)
        except _Unreadable:
            continue
        return candidate
    return None


def _first_line(exc: BaseException) -> str:
    """The first sentence of an error (torch's go on for lines, some suggesting unpickling)."""
    text = str(exc).strip().splitlines()
    sentence = text[0].split(". ")[0] if text else ""
    return sentence[:160] or type(exc).__name__


def check_same_run(saved: dict[str, Any], cfg: RunConfig, where: Path) -> None:
    """A resumed run must replay the same examples in the same order with the same model."""
    blocker = resumable(cfg.lora)
    if blocker is not None:
        raise ValueError(
            f"resuming a {blocker} run is not supported: its checkpoints do not hold the weights "
            "being trained; start it again in another train.output_dir"
        )
    now = cfg.to_dict()
    for section in ("model", "data", "lora"):
        before = saved.get(section, {})
        if before != now[section]:
            diff = sorted(
                k for k in set(before) | set(now[section]) if before.get(k) != now[section].get(k)
            )
            raise ValueError(
                f"cannot resume from {where}: {section} options changed ({', '.join(diff)}); "
                "resume with the config the run started with"
            )
    changed = [
        k
        for k in ("seed", "batch_size", "method", "relora")
        if saved["train"].get(k) != now["train"][k]
    ]
    if changed:
        names = ", ".join(f"train.{k}" for k in changed)
        raise ValueError(f"cannot resume from {where}: {names} changed")
