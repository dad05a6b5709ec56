"""The `lorafit` command line (see main.py)."""

from lorafit.cli.main import main

__all__ = ["main"]
