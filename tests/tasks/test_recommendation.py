"""Recommendation: examples, the per-user evaluation view, metrics against a hand count, LoRA on
the embedding tables (step-0 identity)."""

import math

import pytest
import torch

from lorafit import LoraConfig, inject
from lorafit.data import RecordList
from lorafit.models.recommender import IdVocabulary, MatrixFactorization, RecommenderConfig
from lorafit.tasks import get_task
from lorafit.train.config import DataOptions

TASK = get_task("recommendation")
VOCAB = IdVocabulary(["a", "b"], ["x", "y", "z", "w"])


def recs(rows):
    return RecordList(
        [dict(zip(("user", "item", "rating"), r)) for r in rows],
        "r.csv",
        [f"r.csv:{i + 2}" for i in range(len(rows))],
    )


def test_examples_map_ids_to_rows_and_draw_fixed_negatives():
    rows = [("a", "y", "4"), ("b", "w", "")]
    first, _ = TASK.build_examples(recs(rows), VOCAB, DataOptions())
    again, _ = TASK.build_examples(recs(rows), VOCAB, DataOptions())
    assert [(e["user"], e["item"]) for e in first] == [(0, 1), (1, 3)]
    assert first[0]["rating"] == 4.0 and math.isnan(first[1]["rating"])
    assert first == again or all(
        a["negatives"] == b["negatives"] for a, b in zip(first, again)
    )  # NaN != NaN: compare the negatives
    assert len(first[0]["negatives"]) == 4


def test_an_id_without_a_row_names_the_record():
    with pytest.raises(ValueError, match=r"r.csv:3: user 'c' has no row"):
        TASK.build_examples(recs([("a", "x", "1"), ("c", "x", "1")]), VOCAB, DataOptions())


def test_eval_view_excludes_the_users_other_items_but_not_the_held_out_ones():
    held, _ = TASK.build_examples(recs([("a", "y", "5")]), VOCAB, DataOptions())
    context, _ = TASK.build_examples(
        recs([("a", "x", "3"), ("a", "y", "5"), ("b", "z", "1")]), VOCAB, DataOptions()
    )
    (view,) = TASK.eval_view(held, context)
    assert view["user"] == 0 and view["items"] == [1] and view["exclude"] == [0]


def model():
    torch.manual_seed(0)
    return MatrixFactorization(RecommenderConfig(VOCAB.users, VOCAB.items, dim=3))


def test_metrics_match_a_hand_count():
    m = model()
    with torch.no_grad():  # user 0 scores items 3 > 2 > 1 > 0; item 3 is excluded
        m.user_embedding.weight.zero_()
        m.item_embedding.weight.zero_()
        m.item_popularity.weight.copy_(torch.tensor([[0.0], [1.0], [2.0], [3.0]]))
    view = [{"user": 0, "items": [1], "ratings": [4.0], "exclude": [3]}]
    got = TASK.evaluate(m, view, None)
    assert got["recall@10"] == 1.0
    assert got["ndcg@10"] == pytest.approx(1 / math.log2(3))  # rank 2 of the remaining items
    pred = m.rating(torch.tensor([0]), torch.tensor([1])).item()
    assert got["rmse"] == pytest.approx(abs(pred - 4.0), rel=1e-6)


def test_lora_on_the_embedding_tables_is_the_base_model_at_step_0():
    m, ref = model(), model()
    inject(m, LoraConfig(r=2, target_modules=["user_embedding", "item_embedding"]))
    users = torch.tensor([0, 1])
    torch.testing.assert_close(
        m.catalogue_scores(users), ref.catalogue_scores(users), rtol=0, atol=0
    )
