"""Evaluation metrics as pure functions over Python lists.

Classification: `accuracy`, `macro_f1`. Language modelling: `perplexity`, `token_accuracy`.
Data-to-text generation (E2E NLG challenge style, several references per hypothesis):
`corpus_bleu`, `rouge_l`, `meteor`, `cider`, and `generation_scores` for all four, each on the
scale the E2E paper reports (BLEU 0-100, ROUGE-L and METEOR 0-1, CIDEr about 0-10).

`refs` is always a list with one entry per hypothesis, each entry a non-empty list of reference
strings; entries may differ in length (ragged references, as in E2E).

The NLP packages are imported inside the functions that need them, so the classification and
perplexity helpers stay importable (and fast to import) without them.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import warnings
from collections import Counter

__all__ = [
    "accuracy",
    "macro_f1",
    "perplexity",
    "token_accuracy",
    "corpus_bleu",
    "rouge_l",
    "meteor",
    "cider",
    "generation_scores",
]


# ----------------------------------------------------------------- classification / LM helpers


def _check_same_length(preds, labels) -> None:
    if len(preds) != len(labels):
        raise ValueError(f"preds and labels differ in length: {len(preds)} vs {len(labels)}")
    if not preds:
        raise ValueError("preds and labels are empty; a metric over no examples is undefined")


def accuracy(preds, labels) -> float:
    """Fraction of positions where preds[i] == labels[i]."""
    _check_same_length(preds, labels)
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


def macro_f1(preds, labels, num_labels: int | None = None) -> float:
    """Unweighted mean of per-class F1, as sklearn's f1_score(average="macro").

    The classes averaged over are those seen in preds or labels; a class absent from both is
    ignored (it has no F1 to speak of). A class only predicted, or only in labels, scores 0.
    `num_labels`, when given, only checks that every class id is in range(num_labels).
    """
    _check_same_length(preds, labels)
    classes = set(preds) | set(labels)
    if num_labels is not None:
        bad = sorted(c for c in classes if not (isinstance(c, int) and 0 <= c < num_labels))
        if bad:
            raise ValueError(f"class ids {bad[:5]} outside range(num_labels={num_labels})")
    tp, fp, fn = Counter(), Counter(), Counter()
    for p, y in zip(preds, labels):
        if p == y:
            tp[p] += 1
        else:
            fp[p] += 1
            fn[y] += 1
    # F1 = 2TP / (2TP + FP + FN): the same number as 2PR/(P+R), and still defined (0) when a
    # class is never predicted, which is where sklearn's zero_division=0 lands too.
    f1 = [2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in classes]
    return sum(f1) / len(f1)


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(total_nll / total_tokens), from a summed (not averaged) negative log-likelihood."""
    if not isinstance(total_tokens, int) or total_tokens <= 0:
        raise ValueError(f"total_tokens must be a positive int, got {total_tokens!r}")
    if not math.isfinite(total_nll) or total_nll < 0:
        raise ValueError(f"total_nll must be a finite non-negative sum of NLLs, got {total_nll!r}")
    try:
        return math.exp(total_nll / total_tokens)
    except OverflowError:  # mean NLL > ~709 nats: a diverged model; inf is the honest answer
        return math.inf


def token_accuracy(correct: int, total: int) -> float:
    """correct / total for next-token predictions over the positions that count in the loss."""
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    if not 0 <= correct <= total:
        raise ValueError(f"correct must be in [0, total={total}], got {correct}")
    return correct / total


# ----------------------------------------------------------------- generation metrics


def _check_generation_inputs(hyps, refs) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"hyps and refs differ in length: {len(hyps)} vs {len(refs)}")
    if not hyps:
        raise ValueError("hyps is empty; a corpus metric over no examples is undefined")
    for i, (h, r) in enumerate(zip(hyps, refs)):
        if not isinstance(h, str):
            raise TypeError(f"hyps[{i}] must be a str, got {type(h).__name__}")
        # A bare string here is the classic single-reference mistake: it would be read as a
        # list of one-character references and score silently wrong.
        if isinstance(r, str) or not r or not all(isinstance(x, str) for x in r):
            raise TypeError(
                f"refs[{i}] must be a non-empty list of str (refs is one list of "
                f"references per hypothesis, e.g. [[ref], ...]); got {r!r}"
            )


def _words(text: str) -> list[str]:
    # Lowercased word tokens with punctuation dropped, close to what the COCO/E2E scripts'
    # PTB tokenisation feeds METEOR and CIDEr.
    return re.findall(r"\w+", text.lower())


def corpus_bleu(hyps: list[str], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 (0-100) from sacrebleu: 13a tokenisation (as mteval-v13a), cased.

    sacrebleu takes references as parallel streams (stream k holds everyone's k-th reference);
    hypotheses with fewer references are padded with None, which sacrebleu skips per segment,
    so each hypothesis is scored against exactly its own references.
    """
    from sacrebleu.metrics import BLEU

    _check_generation_inputs(hyps, refs)
    n_streams = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(n_streams)]
    return float(BLEU().corpus_score(hyps, streams).score)


def rouge_l(hyps: list[str], refs: list[list[str]]) -> float:
    """ROUGE-L F1 (0-1) from rouge-score: per hypothesis the best F1 over its references,
    then the plain mean over hypotheses.

    rouge-score lowercases and keeps only [a-z0-9] tokens, without stemming. The E2E script
    (pycocoevalcap) also takes the best over references, but of precision and recall separately
    and combines them with F-beta, beta=1.2, so its numbers differ slightly from these.
    """
    from rouge_score.rouge_scorer import RougeScorer

    _check_generation_inputs(hyps, refs)
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    return sum(scorer.score_multi(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)


class _NoSynonyms:
    """Stands in for WordNet: METEOR then aligns by exact and Porter-stem matches only."""

    def synsets(self, word):
        return []


@functools.lru_cache(maxsize=1)
def _wordnet():
    """A WordNet reader for METEOR's synonym stage, or None when no WordNet is on this machine.

    nltk's downloader fetches WordNet from GitHub, which many machines cannot reach, so besides
    nltk's own data we read a plain WordNet 3.0 database folder: $WNSEARCHDIR (WordNet's own
    variable) or /usr/share/wordnet (Debian/Ubuntu package `wordnet-base`). nltk's
    "wordnet" corpus is that same WordNet 3.0 database, so the scores are identical.
    """
    import nltk
    from nltk.corpus import wordnet
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    try:
        wordnet.synsets("test")
        return wordnet
    except LookupError:
        pass
    folder = next(
        (
            d
            for d in (os.environ.get("WNSEARCHDIR"), "/usr/share/wordnet")
            if d and os.path.isfile(os.path.join(d, "data.noun"))
        ),
        None,
    )
    if folder is None:
        return None

    class DictFolderReader(WordNetCorpusReader):
        def open(self, fileid):
            # Debian ships no `lexnames`; nltk needs one only to name synsets' lexicographer
            # files (Synset.lexname), which METEOR never asks for.
            if fileid == "lexnames" and not os.path.isfile(os.path.join(folder, fileid)):
                return io.StringIO("".join(f"{i:02d}\tlex{i:02d}\t0\n" for i in range(45)))
            return super().open(fileid)

        def map_wn(self, version="wordnet"):
            return None  # maps other WordNet versions for multilingual use; not needed here

    # nltk (>= 3.9) refuses to read corpora outside its data path.
    if folder not in nltk.data.path:
        nltk.data.path.append(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        return DictFolderReader(folder, None)


def meteor(hyps: list[str], refs: list[list[str]], synonyms: bool = True) -> float:
    """METEOR (0-1) from nltk: per hypothesis the best score over its references, then the mean.

    nltk's METEOR (alpha=0.9, beta=3, gamma=0.5) aligns words by exact match, then Porter stem,
    then WordNet synonym (see `_wordnet` for where WordNet is looked for). Without WordNet, or
    with synonyms=False, only the first two stages run and the score is a lower bound of the
    full one; a warning says so in the first case. Tokens are `_words` (lowercased, no
    punctuation). Not comparable with the E2E paper's METEOR, which is METEOR 1.5 (Java, other
    parameters, function-word weights, paraphrase tables): nltk's runs far higher (0.86 vs 0.52
    on the same three E2E-style sentences), so compare models with one implementation only.
    """
    from nltk.translate.meteor_score import meteor_score

    _check_generation_inputs(hyps, refs)
    wordnet = _wordnet() if synonyms else None
    if synonyms and wordnet is None:
        warnings.warn(
            "METEOR: no WordNet found (nltk data, $WNSEARCHDIR or /usr/share/wordnet"
            " from apt package wordnet-base); synonym matching is off, so scores are"
            " a lower bound",
            RuntimeWarning,
            stacklevel=2,
        )
    wordnet = wordnet or _NoSynonyms()
    total = 0.0
    for h, r in zip(hyps, refs):
        total += meteor_score([_words(x) for x in r], _words(h), wordnet=wordnet)
    return total / len(hyps)


def cider(hyps: list[str], refs: list[list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D (about 0-10) as computed by pycocoevalcap's Cider scorer.

    n-grams n=1..4 weighted by tf-idf, the idf taken over this corpus's references (so the score
    depends on the whole corpus, and a one-example corpus scores 0); per n the cosine similarity
    with hypothesis weights clipped to the reference's, a Gaussian penalty on the length
    difference (sigma=6), averaged over n and over the hypothesis's references, times 10; the
    corpus score is the mean over hypotheses. Tokens are `_words`.
    """
    _check_generation_inputs(hyps, refs)

    def ngram_counts(text):
        words = _words(text)
        return Counter(
            tuple(words[i : i + n]) for n in range(1, 5) for i in range(len(words) - n + 1)
        ), len(words)

    hyp_counts = [ngram_counts(h) for h in hyps]
    ref_counts = [[ngram_counts(x) for x in r] for r in refs]
    doc_freq = Counter(g for rs in ref_counts for g in {g for c, _ in rs for g in c})
    log_n_docs = math.log(len(hyps))

    def tfidf(counts):
        vec = [{} for _ in range(4)]  # one tf-idf vector per n-gram order
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (log_n_docs - math.log(max(1.0, doc_freq[g])))
        return vec, [math.sqrt(sum(v * v for v in d.values())) for d in vec]

    total = 0.0
    for (h_counts, h_len), rs in zip(hyp_counts, ref_counts):
        h_vec, h_norm = tfidf(h_counts)
        score = 0.0
        for r_counts, r_len in rs:
            r_vec, r_norm = tfidf(r_counts)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma**2))
            for n in range(4):
                # Clipping the hypothesis weight (the "D" in CIDEr-D) stops repeated n-grams
                # from buying score.
                dot = sum(
                    min(v, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, v in h_vec[n].items()
                )
                if h_norm[n] and r_norm[n]:
                    dot /= h_norm[n] * r_norm[n]
                score += dot * penalty
        total += 10.0 * score / (4 * len(rs))
    return total / len(hyps)


def generation_scores(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    """{"bleu", "rouge_l", "meteor", "cider"} for one corpus, on the E2E paper's scales."""
    _check_generation_inputs(hyps, refs)
    return {
        "bleu": corpus_bleu(hyps, refs),
        "rouge_l": rouge_l(hyps, refs),
        "meteor": meteor(hyps, refs),
        "cider": cider(hyps, refs),
    }
