"""OCRBench v2's text metric for full-page OCR, fine-grained recognition, translation and
short-answer handwritten questions: the mean of BLEU, METEOR, a word-set F-measure and one
minus the normalised character edit distance (``page_ocr_metric.cal_per_metrics`` of the
published evaluation, used by ``eval.py`` as ``(bleu + meteor + f_measure + (1 -
edit_dist)) / 4``).

- Words: text with a CJK character (U+4E00..U+9FA5) in the reference or the prediction is cut
  by jieba (``jieba.lcut``, its default dictionary and HMM, spaces kept as words), other text
  by whitespace.
- BLEU: NLTK's ``bleu([reference], hypothesis)``: 4-gram, uniform weights, clipped counts,
  brevity penalty, no smoothing (an n-gram order without matches counts as precision
  ``sys.float_info.min``, so such a BLEU is about 1e-77, not exactly 0; no unigram match: 0).
- METEOR: NLTK's ``meteor_score`` (alpha 0.9, beta 3, gamma 0.5, words lower-cased):
  exact matches, then Porter-stem matches (NLTK's PorterStemmer), then WordNet synonyms of
  the stems still unmatched (NLTK's order). The WordNet stage needs NLTK's wordnet data,
  which is never downloaded here: it runs only when ``nltk.corpus.wordnet`` already loads
  locally (`meteor_form` says which form is in use). Without it a hypothesis word that is
  only a synonym of a reference word stays unmatched, so METEOR (and the item score) can be
  lower than the published one; exact and stem matches are the same.
- F-measure: of the sets of words (NLTK's ``f_measure``, alpha 0.5); empty sets: 0.
- Edit distance: character Levenshtein / the longer length.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from recap_jax.bench.scoring import levenshtein

__all__ = ["bleu", "edit_distance_ratio", "meteor", "meteor_form", "ocr_text_metrics",
           "ocr_text_score", "set_f_measure", "words"]

_CJK = re.compile(r"[\u4e00-\u9fa5]")


# jieba and nltk are imported on first use: `import nltk` alone takes ~1.3 s, which every
# `python -m recap_jax.train` would pay through the benchmark suites' import
@functools.cache
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)   # no "Building prefix dict ..." lines in evaluation logs
    return jieba


@functools.cache
def _stemmer():
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


def words(prediction: str, reference: str) -> tuple[list[str], list[str]]:
    """(prediction words, reference words): jieba's cut when either text has a CJK
    character, else whitespace splitting."""
    if _CJK.search(reference) or _CJK.search(prediction):
        return _jieba().lcut(prediction), _jieba().lcut(reference)
    return prediction.split(), reference.split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[k:k + n]) for k in range(len(tokens) - n + 1))


def bleu(hypothesis: Sequence[str], reference: Sequence[str], max_order: int = 4) -> float:
    """Sentence BLEU of ``hypothesis`` against one ``reference`` (word lists): the geometric
    mean of the clipped n-gram precisions for n = 1..max_order (an order with no match
    contributes ``sys.float_info.min``, NLTK's unsmoothed rule) times the brevity penalty
    exp(1 - r / c) when the hypothesis (c words) is not longer than the reference (r)."""
    log_sum = 0.0
    for n in range(1, max_order + 1):
        hypothesis_counts, reference_counts = _ngrams(hypothesis, n), _ngrams(reference, n)
        matches = sum(min(count, reference_counts[gram]) for gram, count in hypothesis_counts.items())
        if n == 1 and matches == 0:
            return 0.0
        total = max(1, sum(hypothesis_counts.values()))
        precision = matches / total if matches else sys.float_info.min
        log_sum += math.log(precision) / max_order
    c, r = len(hypothesis), len(reference)
    penalty = 1.0 if c > r else math.exp(1 - r / c)
    return penalty * math.exp(log_sum)


@functools.lru_cache(maxsize=1)
def _local_wordnet() -> Any:
    """NLTK's wordnet reader when its data is already on this machine, else None (no
    download is ever attempted)."""
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("test")
    except (LookupError, OSError, ImportError):
        return None
    return wordnet


def meteor_form() -> str:
    """The METEOR stages in use here: "exact+stem+wordnet" when NLTK's wordnet data loads
    locally, else "exact+stem" (see the module docstring)."""
    return "exact+stem+wordnet" if _local_wordnet() is not None else "exact+stem"


def _align(hypothesis: list[tuple[int, str]], reference: list[tuple[int, str]],
           candidates=lambda word: (word,)):
    """NLTK's alignment stage: each hypothesis word, last first, is paired with the last
    unused reference word among ``candidates(hypothesis word)`` (the word itself, or its
    synonyms); returns the pairs (hypothesis position, reference position) and the
    unmatched words of each side."""
    positions: dict[str, list[int]] = {}
    for j, (_, word) in enumerate(reference):
        positions.setdefault(word, []).append(j)
    pairs, matched_hyp, matched_ref = [], set(), set()
    for i in range(len(hypothesis) - 1, -1, -1):
        best, best_word = -1, None
        for word in candidates(hypothesis[i][1]):
            if positions.get(word) and positions[word][-1] > best:
                best, best_word = positions[word][-1], word
        if best_word is not None:
            positions[best_word].pop()
            matched_hyp.add(i)
            matched_ref.add(best)
            pairs.append((hypothesis[i][0], reference[best][0]))
    return (pairs, [w for i, w in enumerate(hypothesis) if i not in matched_hyp],
            [w for j, w in enumerate(reference) if j not in matched_ref])


def _synonyms(word: str, wordnet: Any) -> set[str]:
    names = {lemma.name() for synset in wordnet.synsets(word) for lemma in synset.lemmas()}
    return {name for name in names if "_" not in name} | {word}


def _chunks(pairs: list[tuple[int, int]]) -> int:
    chunks = 1
    for (h0, r0), (h1, r1) in zip(pairs, pairs[1:]):
        if not (h1 == h0 + 1 and r1 == r0 + 1):
            chunks += 1
    return chunks


def meteor(hypothesis: Sequence[str], reference: Sequence[str], *, wordnet: Any = "local",
           alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    """METEOR of ``hypothesis`` against one ``reference`` (word lists, lower-cased here):
    words aligned by exact form, then Porter stem, then (when ``wordnet`` is a reader; the
    default "local" means NLTK's when its data is installed, None skips the stage) WordNet
    synonyms; F = P R / (alpha P + (1 - alpha) R) times 1 - gamma (chunks / matches)^beta.
    0 when nothing matches or a side is empty."""
    if wordnet == "local":
        wordnet = _local_wordnet()
    hyp = [(i, w.lower()) for i, w in enumerate(hypothesis)]
    ref = [(j, w.lower()) for j, w in enumerate(reference)]
    exact, hyp, ref = _align(hyp, ref)
    hyp = [(i, _stemmer().stem(w)) for i, w in hyp]
    ref = [(j, _stemmer().stem(w)) for j, w in ref]
    stem, hyp, ref = _align(hyp, ref)
    synonym: list[tuple[int, int]] = []
    if wordnet is not None:
        synonym, hyp, ref = _align(hyp, ref, lambda word: _synonyms(word, wordnet))
    pairs = sorted(exact + stem + synonym)
    if not pairs or not hypothesis or not reference:
        return 0.0
    precision, recall = len(pairs) / len(hypothesis), len(pairs) / len(reference)
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    return (1 - gamma * (_chunks(pairs) / len(pairs)) ** beta) * fmean


def set_f_measure(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """The F-measure (alpha 0.5) of the hypothesis' word set against the reference's:
    0 when either set is empty or nothing is shared."""
    hyp, ref = set(hypothesis), set(reference)
    if not hyp or not ref:
        return 0.0
    shared = len(hyp & ref)
    if shared == 0:
        return 0.0
    precision, recall = shared / len(hyp), shared / len(ref)
    return 1.0 / (0.5 / precision + 0.5 / recall)


def edit_distance_ratio(prediction: str, reference: str) -> float:
    """Character Levenshtein distance over the longer length (1.0 for two empty texts, a
    case the published code divides by zero on)."""
    longest = max(len(prediction), len(reference))
    return levenshtein(prediction, reference) / longest if longest else 1.0


def ocr_text_metrics(prediction: str, reference: str) -> dict[str, float]:
    """``cal_per_metrics``: bleu, meteor, f_measure, edit_dist of one prediction."""
    hypothesis, reference_words = words(prediction, reference)
    return {"bleu": bleu(hypothesis, reference_words),
            "meteor": meteor(hypothesis, reference_words),
            "f_measure": set_f_measure(hypothesis, reference_words),
            "edit_dist": edit_distance_ratio(prediction, reference)}


def ocr_text_score(prediction: str, reference: str) -> float:
    """(bleu + meteor + f_measure + 1 - edit_dist) / 4; 0 for an empty prediction (as every
    published branch that uses it)."""
    if not prediction:
        return 0.0
    metrics = ocr_text_metrics(prediction, reference)
    return (metrics["bleu"] + metrics["meteor"] + metrics["f_measure"]
            + 1.0 - metrics["edit_dist"]) / 4
