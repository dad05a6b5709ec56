"""The `lorafit` process imports transformers' model code without two backends it never uses.

`transformers.modeling_utils` imports, at module level and only because they are installed,
torchao's safetensors support (for loading torchao-serialized checkpoints through
`from_pretrained(quantization_config=TorchAoConfig(...))`) and scipy's optimizer (the Hungarian
matching of the object-detection losses). The `lorafit` command does neither: its loader streams
weights itself, GGUFs go through transformers' GGUF reader, and QLoRA / serving import torchao's
quantization directly. Those two imports are ~125 MB of a training process's peak RSS (torchao 84,
scipy.optimize 40, measured on top of torch), so the command imports transformers' model code with
the two availability checks answering False for the length of that one import. Afterwards the checks
answer truthfully again (also through the names the modules imported meanwhile bound), so anything
that asks later, torchao's own import included, sees what is installed.

This is the command's choice only: `import lorafit` as a library changes nothing in transformers.
"""

from __future__ import annotations

import importlib
import sys

#: transformers' availability checks whose True makes `transformers.modeling_utils` import a
#: backend the `lorafit` command never calls.
UNUSED_BACKENDS = ("is_torchao_available", "is_scipy_available")


def import_model_code() -> bool:
    """Import `transformers.modeling_utils` without torchao / scipy; False if it was already in."""
    if "transformers.modeling_utils" in sys.modules:
        return False
    from transformers import utils

    hiding = True
    real = {name: getattr(utils, name) for name in UNUSED_BACKENDS if hasattr(utils, name)}

    def answering_false_while_hiding(check):
        def available(*args, **kwargs):
            return False if hiding else check(*args, **kwargs)

        return available

    for name, check in real.items():
        setattr(utils, name, answering_false_while_hiding(check))
    try:
        importlib.import_module("transformers.modeling_utils")
    finally:
        hiding = False
        for name, check in real.items():
            setattr(utils, name, check)
    return True
