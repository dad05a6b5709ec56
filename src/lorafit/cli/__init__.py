"""The `lorafit` command line (see main.py)."""

from lorafit.cli.lean_imports import import_model_code

import_model_code()  # before anything below imports transformers' model code (lean_imports.py)

from lorafit.cli.main import main  # noqa: E402

__all__ = ["main"]
