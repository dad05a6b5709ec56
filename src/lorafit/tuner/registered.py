"""Plug-ins held in a registry (layer kinds, LoRA variants) are one object each."""

from __future__ import annotations


class Registered:
    """A registry singleton: modules refer to it, and copies of a model share it."""

    name: str = ""

    def __copy__(self):
        return self

    def __deepcopy__(self, memo: dict):
        return self
