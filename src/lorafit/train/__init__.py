"""Training: `train(load_run_config(path))` fine-tunes per a run config and returns a TrainResult.

The pieces (setup / fit / save in trainer.py, callbacks.py, step.py, optim.py, resume.py,
state.py, checkpoints.py) are importable from their modules.
"""

from lorafit.train.config import RunConfig, load_run_config
from lorafit.train.trainer import TrainingStopped, TrainResult, train

__all__ = ["RunConfig", "TrainResult", "TrainingStopped", "load_run_config", "train"]
