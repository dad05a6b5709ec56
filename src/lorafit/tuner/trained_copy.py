"""`TrainedCopy`: a module trained in full for an adapter (PEFT's modules_to_save), e.g. a
classifier head. The original stays frozen and in place; each adapter owns a copy, used while it
is active (or, in a mixed batch, for the rows that name it)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorafit.tuner.rows import current_rows


class TrainedCopy(nn.Module):
    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False

    def add_copy(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone

    def current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name]
        return self.original_module

    def forward(self, x, *args, **kwargs):
        rows = current_rows()
        if rows is None or self.disabled:
            return self.current()(x, *args, **kwargs)
        out = self.original_module(x, *args, **kwargs).clone()
        for name, indices in rows.groups.items():
            if name in self.copies:
                idx = torch.tensor(indices, device=x.device)  # (n,)
                out[idx] = self.copies[name](x[idx], *args, **kwargs)
        return out
