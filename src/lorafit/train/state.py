"""Where a run stands (`TrainState`), what one optimizer step produced (`StepOutput`), and the
checkpoint payload that carries both across a restart.

The payload (`trainer_state.pt`) holds tensors and plain containers only, so it is read back with
`weights_only=True`: optimizer, scheduler, RNG states, the progress below and the run config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

import lorafit.train.checkpoints as ckpt

PAYLOAD_KEYS = ("optimizer", "scheduler", "rng", "progress", "config")


@dataclass
class TrainState:
    """Everything the loop needs to continue exactly where it stopped (besides model/optimizer)."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Epoch of the last micro-batch consumed."""
    index: int = 0
    """Position in that epoch's batch order of the next micro-batch to read."""
    best: float = math.inf
    """Lowest validation loss seen."""
    bad_evals: int = 0
    """Evaluations since the last improvement of `best` (early stopping counts these)."""
    tokens: int = 0
    """Input tokens (padding included) fed to the model so far."""
    stopped: str = ""
    """Why training stopped before the planned steps ("" while it has not)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, progress: dict[str, Any]) -> TrainState:
        """From a checkpoint's "progress" (older checkpoints lack the newer fields)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in progress.items() if k in known})

    def to_payload(self, optimizer, scheduler, config: dict[str, Any]) -> dict[str, Any]:
        """The `trainer_state.pt` of a checkpoint taken now (RNG states included)."""
        return {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "progress": self.to_dict(),
            "config": config,
        }

    @classmethod
    def restore(cls, payload: dict[str, Any], optimizer, scheduler) -> TrainState:
        """Load optimizer, scheduler and RNG states from a payload; return its progress.

        The RNG states go last, so nothing after this call draws before the loop does."""
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        state = cls.from_dict(payload["progress"])
        ckpt.set_rng_state(payload["rng"])
        return state


@dataclass
class StepOutput:
    """One optimizer step as the callbacks see it."""

    loss: float
    """Mean loss over the step's targets (micro-batches weighted by their target counts)."""
    grad_norm: torch.Tensor
    """Gradient norm before clipping (a 0-d tensor; not finite on a bad step)."""
    tokens: int
    """Input tokens in the step's micro-batches."""
    epoch: float = 0.0
    """Fractional epoch reached after this step."""
    lr: float = 0.0
    """Learning rate of the first parameter group after this step's schedule update."""
    seconds: float = 0.0
    """Wall time of the step (data, forward, backward, optimizer), without evaluation/saving."""

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and bool(torch.isfinite(self.grad_norm))

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)
