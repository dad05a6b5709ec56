"""The tune tests' config: the tiny chat model trained for 10 steps, evaluated every 5."""

import pytest


@pytest.fixture
def tune_raw(chat_setup):
    """tune_raw(out, space=None, **train) -> a raw config dict (tune.space set when given)."""
    model, data = chat_setup

    def make(out, space=None, **train):
        raw = {
            "model": {"name": str(model)},
            "data": {"train": str(data)},
            "lora": {"r": 4},
            "train": {
                "output_dir": str(out),
                "batch_size": 4,
                "max_steps": 10,
                "eval_every": 5,
                "lr": 1e-2,
                "fused_kernels": False,  # no compile per trial process: the tests stay short
                "tensorboard": False,
                **train,
            },
        }
        if space is not None:
            raw["tune"] = {"space": space, "startup_trials": 2}
        return raw

    return make
