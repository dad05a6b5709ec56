"""The adapter chosen per batch row, as a per-call setting rather than module state.

The choice lives in a `contextvars.ContextVar`, which is local to each thread and each asyncio
task: concurrent requests on one model (a server's threads or tasks) each see only their own
rows. Layers read it in forward; nothing is stored on the modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

BASE = "__base__"
"""The row name meaning "no adapter" for that row."""


@dataclass(frozen=True)
class Rows:
    names: tuple[str, ...]
    groups: dict[str, list[int]]
    """name -> the row indices that use it, in first-seen order."""
    spans: dict[str, slice] | None = None
    """name -> its rows as one slice, when every adapter's rows are contiguous (a batch sorted
    by adapter): layers then work on views, without gathering rows."""
    index: dict = field(default_factory=dict, compare=False)
    """Per-device index tensors of the groups, made once per batch (not once per layer)."""

    def __len__(self) -> int:
        return len(self.names)

    def indices(self, name: str, device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self.index:
            self.index[key] = torch.tensor(self.groups[name], device=device)
        return self.index[key]


_ROWS: ContextVar[Rows | None] = ContextVar("lorafit_adapter_rows", default=None)


def current_rows() -> Rows | None:
    """The per-row adapter names in effect for this thread / task, or None (use the active set)."""
    return _ROWS.get()


@contextlib.contextmanager
def rows_context(names: Sequence[str] | None) -> Iterator[None]:
    """Row i of every batch run inside uses adapter names[i]; None: the active adapters."""
    if names is None:
        rows = None
    else:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"give one adapter name per row (a list of str), got {names!r}")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        contiguous = all(ix[-1] - ix[0] + 1 == len(ix) for ix in groups.values())
        spans = {n: slice(ix[0], ix[-1] + 1) for n, ix in groups.items()} if contiguous else None
        rows = Rows(tuple(names), groups, spans)
    token = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(token)
