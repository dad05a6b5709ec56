"""Recommendation: user-item interactions -> a matrix-factorisation model (models/recommender.py)
that predicts ratings and ranks the catalogue.

Training examples are interactions with a fixed set of sampled unrated items each (drawn once
from the run's seed, so batches and resumes stay deterministic). Evaluation groups held-out
interactions by user: RMSE of the predicted ratings, and recall@10 / NDCG@10 (torchmetrics) of
the catalogue ranked for each user, never recommending an item the user already has in the
context (data.train, data.validation, data.history) outside the evaluated set.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict

import torch
from torch import nn

from lorafit.data import rating_of
from lorafit.data.records import record_location
from lorafit.tasks.base import Task, register_task

RECOMMENDER_FILE = "recommendation.json"
"""Beside a trained recommender adapter or model: how it was trained (negatives, top_k)."""
TOP_K = 10
NEGATIVES = 4


def vocabulary_of(records_lists) -> tuple[list[str], list[str]]:
    """Users and items of every record, in first-seen order: a new model's table rows."""
    users, items = {}, {}
    for records in records_lists:
        for r in records:
            users.setdefault(str(r["user"]), None)
            items.setdefault(str(r["item"]), None)
    return list(users), list(items)


@register_task
class Recommendation(Task):
    name = "recommendation"
    peft_task_type = None
    head = "recommendation"
    metrics = {
        "loss": "minimize",
        "rmse": "minimize",
        f"recall@{TOP_K}": "maximize",
        f"ndcg@{TOP_K}": "maximize",
    }
    marker_files = (RECOMMENDER_FILE,)
    eval_needs_context = True

    def build_examples(self, records, vocab, data, labels=None):
        rng = random.Random(0)  # the same negatives in every run on the same records
        n_items = len(vocab.items)
        examples = []
        for i, record in enumerate(records):
            if "user" not in record or "item" not in record:
                where = record_location(records, i)
                raise ValueError(f"{where}: expected a user + item record, got {sorted(record)}")
            u, it = vocab.user_row.get(str(record["user"])), vocab.item_row.get(str(record["item"]))
            if u is None or it is None:
                what, value = ("user", record["user"]) if u is None else ("item", record["item"])
                raise ValueError(
                    f"{record_location(records, i)}: {what} {value!r} has no row in the model "
                    f"({len(vocab.users)} users, {n_items} items); a new model gives rows to "
                    "the ids in data.train, data.validation and data.history"
                )
            negatives = [rng.randrange(n_items) for _ in range(NEGATIVES)]
            examples.append(
                {"user": u, "item": it, "rating": rating_of(record), "negatives": negatives}
            )
        return examples, labels

    def eval_view(self, examples: list[dict], context: list[dict]) -> list[dict]:
        """Held-out interactions grouped by user, each with the items to leave unranked."""
        own: dict[int, list[dict]] = defaultdict(list)
        for e in examples:
            own[e["user"]].append(e)
        seen: dict[int, set[int]] = defaultdict(set)
        for e in context:
            if e["user"] in own:
                seen[e["user"]].add(e["item"])
        view = []
        for user, rows in own.items():
            held = {e["item"] for e in rows}
            view.append(
                {
                    "user": user,
                    "items": [e["item"] for e in rows],
                    "ratings": [e["rating"] for e in rows],
                    "exclude": sorted(seen[user] - held),
                }
            )
        return view

    def collator(self, vocab):
        def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
            return {
                "users": torch.tensor([e["user"] for e in examples]),
                "items": torch.tensor([e["item"] for e in examples]),
                "ratings": torch.tensor([e["rating"] for e in examples], dtype=torch.float32),
                "negatives": torch.tensor([e["negatives"] for e in examples]),
            }

        return collate

    def target_count(self, batch):
        return int(batch["users"].numel())

    @torch.no_grad()
    def evaluate(self, model, examples, collator, batch_size=8, chunk=2048, max_batches=None):
        if not examples:
            return {}
        if "exclude" not in examples[0]:  # plain interactions: group them by user first
            examples = self.eval_view(examples, [])
        from torchmetrics.functional.retrieval import retrieval_normalized_dcg, retrieval_recall

        was = model.training
        model.eval()
        device = next(model.parameters()).device
        sq, n_rated, recalls, ndcgs = 0.0, 0, [], []
        try:
            for start in range(0, len(examples), 256):
                group = examples[start : start + 256]
                users = torch.tensor([g["user"] for g in group], device=device)
                scores = model.catalogue_scores(users).float()  # (U, I)
                for row, g in enumerate(group):
                    ratings = torch.tensor(g["ratings"])
                    rated = ~torch.isnan(ratings)
                    if rated.any():
                        items = torch.tensor(g["items"], device=device)[rated.to(device)]
                        u = users[row].expand(len(items))
                        pred = model.rating(u, items).float().cpu()
                        sq += ((pred - ratings[rated]) ** 2).sum().item()
                        n_rated += int(rated.sum())
                    s = scores[row].cpu()
                    s[g["exclude"]] = -math.inf  # never recommend what the user already has
                    target = torch.zeros_like(s, dtype=torch.bool)
                    target[g["items"]] = True
                    recalls.append(retrieval_recall(s, target, top_k=TOP_K).item())
                    ndcgs.append(retrieval_normalized_dcg(s, target, top_k=TOP_K).item())
        finally:
            model.train(was)
        rmse = math.sqrt(sq / n_rated) if n_rated else math.nan
        return {
            "loss": rmse**2 if n_rated else math.nan,
            "rmse": rmse,
            f"recall@{TOP_K}": sum(recalls) / len(recalls),
            f"ndcg@{TOP_K}": sum(ndcgs) / len(ndcgs),
            "users": float(len(examples)),
        }

    def infer(self, model, vocab, inputs, top_k: int = TOP_K, **options):
        """The top_k item ids for each user id."""
        device = next(model.parameters()).device
        rows = [vocab.user_row[str(u)] for u in inputs]
        with torch.no_grad():
            scores = model.catalogue_scores(torch.tensor(rows, device=device))
        return [" ".join(vocab.items[i] for i in s.topk(top_k).indices.tolist()) for s in scores]

    def fresh_model(
        self, options: dict, records_lists, dtype=torch.float32
    ) -> tuple[nn.Module, object]:
        """A new matrix-factorisation model (model.name: new) with a row for every user and item
        in the records; `options` (model.init): dim, init_std."""
        from lorafit.models.recommender import IdVocabulary, MatrixFactorization, RecommenderConfig

        unknown = sorted(set(options) - {"dim", "init_std"})
        if unknown:
            raise ValueError(
                f"model.init: unknown option(s) {unknown}; a recommender takes dim, init_std"
            )
        users, items = vocabulary_of(records_lists)
        rated = [x for recs in records_lists[:1] for r in recs if not math.isnan(x := rating_of(r))]
        mean = sum(rated) / len(rated) if rated else 0.0
        config = RecommenderConfig(users, items, rating_mean=mean, **options)
        model = MatrixFactorization(config).to(dtype)
        return model, IdVocabulary.of(config)

    def product_files(self, data, processor) -> dict[str, str]:
        return {RECOMMENDER_FILE: json.dumps({"negatives": NEGATIVES, "top_k": TOP_K}) + "\n"}
