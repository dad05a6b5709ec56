"""The `lorafit` command imports transformers' model code without torchao's and scipy's modules
(cli/lean_imports.py), and nothing else in the process is told those are missing."""

import importlib.util
import subprocess
import sys

import pytest

CHECK = """
import sys
import {module}
import transformers.utils as u
from transformers.quantizers import quantizer_torchao
from transformers.loss import loss_for_object_detection
print(sorted(m for m in ("torchao", "scipy") if m in sys.modules))
print(u.is_torchao_available(), u.is_scipy_available(), quantizer_torchao.is_torchao_available(),
      loss_for_object_detection.is_scipy_available())
"""


def _run(module: str) -> list[str]:
    code = CHECK.format(module=module)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torchao", "scipy")),
    reason="needs torchao and scipy installed (what transformers would import)",
)
def test_the_command_leaves_out_torchao_and_scipy_and_the_checks_still_tell_the_truth():
    loaded, checks = _run("lorafit.cli")
    assert loaded == "[]"
    assert checks == "True True True True"  # installed, and every check says so afterwards
    # The library (`import lorafit` and the LoRA core) leaves transformers as it is.
    loaded, checks = _run("lorafit.tuner")
    assert loaded == "['scipy', 'torchao']"
    assert checks == "True True True True"


def test_the_public_api_loads_on_first_use():
    import lorafit

    assert "inject" in dir(lorafit) and callable(lorafit.inject)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        lorafit.nothing_here  # noqa: B018
