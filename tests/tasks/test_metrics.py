"""Metric code checked against values computed by hand or by the reference implementations."""

from __future__ import annotations

import math
import random

import pytest

from lorafit.tasks import metrics as metrics
from lorafit.tasks.metrics import (
    accuracy,
    cider,
    corpus_bleu,
    generation_scores,
    macro_f1,
    meteor,
    perplexity,
    rouge_l,
    token_accuracy,
)


# ----------------------------------------------------------------- classification / LM helpers


def test_accuracy():
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 0.5
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])


def test_macro_f1_by_hand():
    preds, labels = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]
    # F1 = 2TP / (2TP + FP + FN): class 0: 2/4, class 1: 2/3, class 2: 4/5.
    expected = (2 / 4 + 2 / 3 + 4 / 5) / 3
    assert macro_f1(preds, labels) == pytest.approx(expected)
    # Classes 3 and 4 appear nowhere, so they do not drag the mean down.
    assert macro_f1(preds, labels, num_labels=5) == pytest.approx(expected)
    # A class only ever predicted counts, with F1 0.
    assert macro_f1([0, 3], [0, 0]) == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(ValueError, match="outside range"):
        macro_f1([0, 3], [0, 0], num_labels=3)


def test_macro_f1_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 40)
        labels = [rng.randrange(6) for _ in range(n)]
        preds = [rng.randrange(6) for _ in range(n)]
        assert macro_f1(preds, labels) == pytest.approx(
            sk.f1_score(labels, preds, average="macro", zero_division=0)
        )


def test_perplexity_and_token_accuracy():
    assert perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert perplexity(0.0, 3) == 1.0
    assert perplexity(1e6, 1) == math.inf
    for nll, tokens in [(1.0, 0), (1.0, 2.5), (-1.0, 3), (math.nan, 3)]:
        with pytest.raises(ValueError):
            perplexity(nll, tokens)
    assert token_accuracy(3, 4) == 0.75
    for correct, total in [(1, 0), (5, 4), (-1, 4)]:
        with pytest.raises(ValueError):
            token_accuracy(correct, total)


# ----------------------------------------------------------------- BLEU


def test_bleu_by_hand():
    # hyp:  the cat sat on the mat   ref: the cat sat on a mat   (equal length, so BP = 1)
    # clipped n-gram precisions: 1-grams 5/6, 2-grams 3/5, 3-grams 2/4, 4-grams 1/3.
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert corpus_bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(
        expected, abs=1e-6
    )


def test_bleu_identical_is_100():
    hyps = ["The Eagle is a cheap coffee shop.", "Zizzi is a pub near the river."]
    assert corpus_bleu(hyps, [[h] for h in hyps]) == pytest.approx(100.0)


def test_bad_reference_shapes_are_refused():
    with pytest.raises(TypeError, match="list of str"):
        corpus_bleu(["a b"], ["a b"])  # refs not wrapped per hypothesis
    with pytest.raises(TypeError, match="list of str"):
        rouge_l(["a b"], [[]])
    with pytest.raises(ValueError, match="differ in length"):
        cider(["a b", "c"], [["a b"]])


# ----------------------------------------------------------------- ragged references

RAGGED_HYPS = ["the eagle is a cheap coffee shop near the river", "zizzi is a family friendly pub"]
RAGGED_REFS = [
    [
        "loch fyne serves french food",
        "the mill is expensive",
        "the eagle is a cheap coffee shop near the river",
    ],
    ["zizzi is a family friendly pub"],
]


def test_ragged_references_give_full_credit_for_third_reference():
    # Hypothesis 0 matches only its 3rd reference, hypothesis 1 has a single one. Dropping or
    # misaligning the references of either (e.g. zip-truncating to the shortest list) loses
    # credit.
    assert corpus_bleu(RAGGED_HYPS, RAGGED_REFS) == pytest.approx(100.0)
    assert rouge_l(RAGGED_HYPS, RAGGED_REFS) == pytest.approx(1.0)
    assert meteor(RAGGED_HYPS, RAGGED_REFS, synonyms=False) > 0.99
    # Moving the matching reference into another hypothesis's list must lose the credit.
    swapped = [RAGGED_REFS[0][:2], RAGGED_REFS[1] + [RAGGED_REFS[0][2]]]
    assert corpus_bleu(RAGGED_HYPS, swapped) < 50
    assert rouge_l(RAGGED_HYPS, swapped) < 0.8


def test_bleu_ragged_equals_padding_with_own_references():
    # Repeating a hypothesis's own reference changes neither clipped counts nor the closest
    # reference length, so it must score exactly like the ragged form. Padding the missing
    # streams with "" instead of None would let the short hypothesis pick length 0 as its
    # closest reference and dodge the brevity penalty.
    hyps = ["a b", "c d e f g h"]
    ragged = [["a b c d e f"], ["c d e f g h", "c d e f g x", "c d e f y z"]]
    padded = [["a b c d e f"] * 3, ragged[1]]
    assert corpus_bleu(hyps, ragged) == pytest.approx(corpus_bleu(hyps, padded), abs=1e-9)


# ----------------------------------------------------------------- ROUGE-L


def test_rouge_l_by_hand():
    # LCS("the cat was found under the bed", "the cat was under the bed") = 6 words:
    # P = 6/7, R = 6/6, F1 = 2PR/(P+R) = 12/13.
    assert rouge_l(
        ["the cat was found under the bed"], [["the cat was under the bed"]]
    ) == pytest.approx(12 / 13)
    # Best reference per hypothesis, then the mean: (12/13 + 0) / 2.
    assert rouge_l(
        ["the cat was found under the bed", "red"],
        [["dogs bark", "the cat was under the bed"], ["blue"]],
    ) == pytest.approx(6 / 13)


# ----------------------------------------------------------------- METEOR


def test_meteor_identical_and_known_values():
    # Identical 6-word sentence: F = 1, one chunk, penalty 0.5 * (1/6)^3.
    assert meteor(["The cat sat on the mat"], [["The cat sat on the mat"]]) == pytest.approx(
        1 - 0.5 / 216
    )
    # nltk's documented value for this reordering (Wikipedia's METEOR example).
    assert meteor(["on the mat sat the cat"], [["The cat sat on the mat"]]) == pytest.approx(0.5)
    assert meteor(["John loves Mary"], [["the candidate has no alignment"]]) == 0.0


def test_meteor_exact_and_stem_by_hand():
    # "the shop is here" vs "the store is here" without synonyms: 3 of 4 words match, P = R =
    # 3/4, chunks {the} {is here} = 2, penalty 0.5 * (2/3)^3.
    expected = 0.75 * (1 - 0.5 * (2 / 3) ** 3)
    assert meteor(["the shop is here"], [["the store is here"]], synonyms=False) == pytest.approx(
        expected
    )
    # "opening" / "opened" share the Porter stem "open", so all 3 words match in 1 chunk.
    assert meteor(
        ["shops opened today"], [["shops opening today"]], synonyms=False
    ) == pytest.approx(1 - 0.5 / 27)


def test_meteor_synonyms_from_wordnet():
    if metrics._wordnet() is None:
        pytest.skip("no WordNet here (apt-get install wordnet-base, or nltk's wordnet data)")
    # shop and store share a WordNet synset: 4 of 4 words match in one chunk.
    assert meteor(["the shop is here"], [["the store is here"]]) == pytest.approx(1 - 0.5 / 64)


def test_meteor_warns_without_wordnet(monkeypatch):
    monkeypatch.setattr(metrics, "_wordnet", lambda: None)
    with pytest.warns(RuntimeWarning, match="lower bound"):
        score = meteor(["the shop is here"], [["the store is here"]])
    assert score == pytest.approx(0.75 * (1 - 0.5 * (2 / 3) ** 3))


# ----------------------------------------------------------------- CIDEr


def test_cider_by_hand():
    # Two examples, so idf = ln 2 - ln(df) and every n-gram below has weight ln 2.
    # 1: "a b" vs "a b": cosine 1 for 1- and 2-grams, no 3-/4-grams: 10 * (1+1+0+0)/4 = 5.
    # 2: "c d" vs "c e": unigram cosine ln2^2 / (sqrt2 ln2)^2 = 1/2, nothing else: 1.25.
    assert cider(["a b", "c d"], [["a b"], ["c e"]]) == pytest.approx((5 + 1.25) / 2)
    # Case and punctuation do not count (lowercased word tokens).
    assert cider(["A, b.", "c d"], [["a b"], ["C E!"]]) == pytest.approx((5 + 1.25) / 2)
    # One example: every reference n-gram has idf ln(1) - ln(1) = 0.
    assert cider(["a b"], [["a b"]]) == 0.0


def test_cider_length_penalty_and_clipping():
    base = cider(["a b", "c d"], [["a b"], ["c e"]])
    # Repeating a matched word raises no clipped overlap; it only adds length and norm.
    assert cider(["a b b b", "c d"], [["a b"], ["c e"]]) < base


def test_cider_matches_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.cider.cider import Cider

    rng = random.Random(0)
    vocab = "the a eagle coffee shop is near riverside city centre cheap family not rated".split()
    for _ in range(10):
        n = rng.randint(2, 8)
        hyps = [" ".join(rng.choices(vocab, k=rng.randint(1, 12))) for _ in range(n)]
        refs = [
            [" ".join(rng.choices(vocab, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 4))]
            for _ in range(n)
        ]
        gts = {i: [" ".join(metrics._words(x)) for x in r] for i, r in enumerate(refs)}
        res = {i: [" ".join(metrics._words(h))] for i, h in enumerate(hyps)}
        expected, _ = Cider().compute_score(gts, res)
        assert cider(hyps, refs) == pytest.approx(float(expected), abs=1e-9)


# ----------------------------------------------------------------- all four


def test_generation_scores_scales():
    hyps = [
        "The Eagle is a cheap coffee shop near Burger King.",
        "Zizzi is a pub with a low customer rating.",
        "Loch Fyne serves French food in the city centre.",
    ]
    refs = [
        [
            "The Eagle is a cheap coffee shop near Burger King.",
            "Near Burger King there is a low-priced coffee shop called The Eagle.",
        ],
        ["Zizzi is a pub rated low by customers."],
        [
            "Loch Fyne is a French restaurant.",
            "In the city centre, Loch Fyne serves French food.",
            "Loch Fyne, in the centre of the city, offers French cuisine.",
        ],
    ]
    scores = generation_scores(hyps, refs)
    assert set(scores) == {"bleu", "rouge_l", "meteor", "cider"}
    assert 10 < scores["bleu"] < 100  # 0-100 scale, not 0-1
    assert 0 < scores["rouge_l"] < 1 and 0 < scores["meteor"] < 1
    assert scores["cider"] > 1  # CIDEr is x10: a decent overlap lands well above 1
    same = generation_scores(hyps, [[h] for h in hyps])
    assert same["bleu"] == pytest.approx(100) and same["rouge_l"] == pytest.approx(1)
    assert same["meteor"] > 0.99
