"""The matrix-factorisation recommender: its two heads, the catalogue ranking, and its folder."""

import math

import torch

from lorafit.models.loading import load_model
from lorafit.models.recommender import IdVocabulary, MatrixFactorization, RecommenderConfig


def model(seed=0):
    torch.manual_seed(seed)
    return MatrixFactorization(RecommenderConfig(["a", "b", "c"], ["x", "y", "z", "w"], dim=4))


def test_catalogue_scores_are_the_pairwise_scores():
    m = model()
    users = torch.tensor([0, 2])
    every = m.catalogue_scores(users)  # (2, 4)
    pairs = m.score(users, torch.arange(4).expand(2, 4))
    torch.testing.assert_close(every, pairs)


def test_loss_skips_unrated_rows_and_adds_the_ranking_loss():
    m = model()
    users, items = torch.tensor([0, 1]), torch.tensor([1, 2])
    ratings = torch.tensor([4.0, math.nan])
    only_rating = m(users, items, ratings).loss
    pred = m.rating(users[:1], items[:1])
    torch.testing.assert_close(only_rating, ((pred - 4.0) ** 2).mean())
    with_ranking = m(users, items, ratings, negatives=torch.tensor([[0, 3], [0, 3]])).loss
    assert with_ranking > only_rating


def test_a_saved_folder_loads_with_its_vocabulary(tmp_path):
    m = model()
    m.save_pretrained(tmp_path / "mf")
    loaded, vocab = load_model(str(tmp_path / "mf"), head="recommendation")
    assert isinstance(vocab, IdVocabulary) and vocab.item_row["z"] == 2
    users = torch.tensor([0, 1, 2])
    torch.testing.assert_close(loaded.catalogue_scores(users), m.catalogue_scores(users))
