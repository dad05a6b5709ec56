"""nn.Embedding: weight (num_embeddings, embedding_dim), a row lookup.

As in PEFT, A is (r, num_embeddings) and looked up like the weight, B is (embedding_dim, r);
A starts at 0 and B ~ N(0, 1) (loralib's choice), and dropout never applies: the input is ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.tuner.kinds.base import LayerKind, register_kind


def _lookup(module: nn.Embedding, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """F.embedding with the module's own options (padding_idx, max_norm, ...)."""
    return F.embedding(
        ids,
        table,
        module.padding_idx,
        module.max_norm,
        module.norm_type,
        module.scale_grad_by_freq,
        module.sparse,
    )


class EmbeddingKind(LayerKind):
    name = "embedding"
    label = "nn.Embedding"
    module_types = (nn.Embedding,)
    dropout = False
    own_init = True
    peft_keys = ("lora_embedding_A", "lora_embedding_B")

    def fan_dims(self, module: nn.Embedding) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    def init_factors(self, A: torch.Tensor, B: torch.Tensor, init: bool | str) -> None:
        nn.init.zeros_(A)
        nn.init.normal_(B)

    def weight(self, module: nn.Embedding) -> torch.Tensor:
        return module.weight.T  # stored (num, dim) -> (dim, num)

    def write_weight(self, module: nn.Embedding, w: torch.Tensor) -> None:
        module.weight.data.copy_(w.T.to(module.weight.dtype))

    def branch(self, module: nn.Embedding, x, A, B) -> torch.Tensor:
        h = _lookup(module, x, A.T)  # (..., r)
        return h @ B.T  # (..., dim)

    def base_op(self, module: nn.Embedding, x, w, bias: bool = True) -> torch.Tensor:
        return _lookup(module, x, w.to(module.weight.dtype).T)  # (..., dim)

    def probe(self, module: nn.Embedding, gen: torch.Generator) -> torch.Tensor:
        ids = torch.randint(0, module.num_embeddings, (8,), generator=gen)  # (8,)
        return ids.to(module.weight.device)


EMBEDDING = register_kind(EmbeddingKind())
