"""A matrix-factorisation recommender as a transformers model: user and item `nn.Embedding`
tables (what LoRA adapts), rating biases, and an item popularity bias for ranking.

    rating(u, i) = mean + b_u + b_i + <p_u, q_i>        trained with squared error
    score(u, i)  = <p_u, q_i> + c_i                     trained to tell rated items from
                                                        sampled unrated ones (logistic loss)

Both heads share the embeddings, so one model predicts ratings (RMSE) and ranks the catalogue
(recall@K, NDCG@K). The id vocabulary (the users' and items' own ids, in row order) is part of
the config, so a saved folder is self-contained and adapters trained on it line up row for row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


class RecommenderConfig(PretrainedConfig):
    model_type = "lorafit-matrix-factorization"

    def __init__(
        self,
        users=(),
        items=(),
        dim: int = 32,
        rating_mean: float = 3.5,
        init_std: float = 0.1,
        **kwargs,
    ):
        self.users, self.items = [str(u) for u in users], [str(i) for i in items]
        self.dim, self.rating_mean, self.init_std = int(dim), float(rating_mean), float(init_std)
        super().__init__(**kwargs)


class IdVocabulary:
    """User / item id -> table row, from a recommender's config: what a tokenizer is to text."""

    def __init__(self, users: list[str], items: list[str]):
        self.users, self.items = list(users), list(items)
        self.user_row = {u: i for i, u in enumerate(self.users)}
        self.item_row = {u: i for i, u in enumerate(self.items)}

    @classmethod
    def of(cls, config: RecommenderConfig) -> "IdVocabulary":
        return cls(config.users, config.items)

    def save_pretrained(self, folder) -> None:
        """Nothing to write: the vocabulary is in the model's config.json."""


class MatrixFactorization(PreTrainedModel):
    config_class = RecommenderConfig
    main_input_name = "users"
    _supports_sdpa = True  # no attention layers: the loader's "sdpa" request is moot
    base_model_prefix = "mf"

    def __init__(self, config: RecommenderConfig):
        super().__init__(config)
        n_users, n_items = max(len(config.users), 1), max(len(config.items), 1)
        self.n_items = n_items  # the tables may be wrapped (LoRA), so not read back from them
        self.user_embedding = nn.Embedding(n_users, config.dim)
        self.item_embedding = nn.Embedding(n_items, config.dim)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        self.item_popularity = nn.Embedding(n_items, 1)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if any(module is getattr(self, n, None) for n in ("user_embedding", "item_embedding")):
            nn.init.normal_(module.weight, std=self.config.init_std)
        elif any(
            module is getattr(self, n, None) for n in ("user_bias", "item_bias", "item_popularity")
        ):
            nn.init.zeros_(module.weight)

    def rating(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        dot = (self.user_embedding(users) * self.item_embedding(items)).sum(-1)  # (N,)
        bias = self.user_bias(users).squeeze(-1) + self.item_bias(items).squeeze(-1)
        return self.config.rating_mean + bias + dot

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Ranking logits of (users (N,), items (N, k)) -> (N, k)."""
        p = self.user_embedding(users).unsqueeze(1)  # (N, 1, d)
        q = self.item_embedding(items)  # (N, k, d)
        return (p * q).sum(-1) + self.item_popularity(items).squeeze(-1)

    def catalogue_scores(self, users: torch.Tensor) -> torch.Tensor:
        """Ranking logits of every item for each user: (N,) -> (N, n_items)."""
        all_items = torch.arange(self.n_items, device=users.device)
        q = self.item_embedding(all_items)  # (I, d)
        return self.user_embedding(users) @ q.T + self.item_popularity(all_items).squeeze(-1)

    def forward(self, users, items, ratings=None, negatives=None, **_):
        """users, items (N,); ratings (N,) float, NaN where unrated; negatives (N, k) unrated
        items. The loss is the mean squared rating error plus the ranking loss."""
        pred = self.rating(users, items)  # (N,)
        loss = None
        if ratings is not None:
            rated = ~torch.isnan(ratings)
            loss = F.mse_loss(pred[rated].float(), ratings[rated].float()) if rated.any() else 0
            if negatives is not None:
                both = torch.cat([items.unsqueeze(1), negatives], 1)  # (N, 1 + k)
                target = torch.zeros_like(both, dtype=torch.float32)
                target[:, 0] = 1
                logits = self.score(users, both).float()
                loss = loss + F.binary_cross_entropy_with_logits(logits, target)
        return ModelOutput(loss=loss, logits=pred)


AutoConfig.register(RecommenderConfig.model_type, RecommenderConfig)
AutoModel.register(RecommenderConfig, MatrixFactorization)
