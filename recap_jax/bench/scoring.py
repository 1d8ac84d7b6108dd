"""Each benchmark's published scoring rule, as small pure functions of (model answer, reference).

The model's answer is the text inside the completion's last ``<answer>…</answer>`` pair, or
the whole completion when it has none (`answer_text`, as recap_jax.rewards does). Rules:

- ``choice``: multiple choice (MMMU, MMMU-Pro, AI2D, MMBench, ScienceQA, MathVerse and
  MathVision multi-choice): the option letter of the answer (`choice_letter`) equals the
  reference letter. MMBench's circular evaluation is a suite-level aggregate over the
  per-item letters (`recap_jax.bench.circular`). MMMU's random fallback for unparseable
  answers is not reproduced (an unparseable answer scores 0).
- ``math``: free-form math (MathVerse, MathVision): recap_jax.rewards.accuracy, i.e.
  math-verify symbolic equivalence under its wall-clock limit, else normalised string equality.
- ``mathvista``: MathVista's own normalisation and exact match (its
  ``normalize_extracted_answer`` + ``safe_equal``) with rule-based extraction (the answer
  tags) instead of the GPT-4 extractor: the "rule-based MathVista-mini" of the paper.
- ``mmmu_open``: MMMU open questions: math-verify / string equality, or the normalised
  reference contained in the answer (MMMU's rule for string answers).
- ``relaxed``: ChartQA relaxed accuracy, 5% relative tolerance for numbers (lmms-eval's
  ``relaxed_correctness``), exact case-insensitive match otherwise.
- ``anls``: InfoVQA average normalised Levenshtein similarity (threshold 0.5).
- ``vqa``: VizWiz soft accuracy over its 10 answers (min(1, matches / 3) averaged over the
  10 leave-one-out subsets), after a simplified VQA answer normalisation.
- ``ocrbench``: OCRBench v1: a reference contained in the answer (case-folded; spaces removed
  for HME100k handwritten math).
- ``ocrbench_v2``: OCRBench v2's rule of the item's task type (`recap_jax.bench.ocrbench_v2`).
- ``grounding``: IoU >= 0.5 between the predicted box (rescaled from the model-input frame to
  the original image) and the reference box.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from recap_jax import rewards as rewards_lib

__all__ = ["RULES", "anls", "answer_text", "choice_letter", "grounding_hit", "levenshtein", "math_equal",
           "mathvista_match", "mathvista_normalize", "mmmu_open_match", "multiple_choice",
           "normalize_vqa_answer", "ocrbench_contains", "relaxed_correctness", "score",
           "vqa_accuracy"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LEADING_LETTER = re.compile(r"^\(?([A-Z])\)?(?=$|[\s.:,)])")
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")
_WHITESPACE = re.compile(r"\s+")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:'|~]")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def answer_text(completion: str) -> str:
    """The text inside the last ``<answer>…</answer>`` pair (stripped), else the whole
    completion stripped."""
    answer = rewards_lib.extract_answer(completion)
    return completion.strip() if answer is None else answer


def levenshtein(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Edit distance (insertions, deletions, substitutions of one element each) of two
    strings or token sequences; Myers' bit-parallel algorithm (Hyyrö's form), one pass over
    the longer sequence with the shorter one's positions as the bits of Python integers, so
    a page of OCR text or a large table is scored in milliseconds."""
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    positions: dict[Hashable, int] = {}
    for i, token in enumerate(b):
        positions[token] = positions.get(token, 0) | (1 << i)
    full, top = (1 << m) - 1, 1 << (m - 1)
    plus, minus, score = full, 0, m     # vertical +1 / -1 deltas of the current column
    for token in a:
        equal = positions.get(token, 0)
        vertical = equal | minus
        horizontal = (((equal & plus) + plus) ^ plus) | equal
        h_plus = minus | ~(horizontal | plus)
        h_minus = plus & horizontal
        if h_plus & top:
            score += 1
        elif h_minus & top:
            score -= 1
        h_plus = (h_plus << 1) | 1      # the first row grows by one per element of a
        h_minus <<= 1
        plus = (h_minus | ~(vertical | h_plus)) & full
        minus = h_plus & vertical & full
    return score


def _norm(text: str) -> str:
    return _WHITESPACE.sub(" ", str(text)).strip().casefold().rstrip(".").strip()


# --------------------------------------------------------------------------- multiple choice


def choice_letter(answer: str, choices: Sequence[str] = (), num_choices: int | None = None
                  ) -> str | None:
    """The option letter an answer names, or None.

    In order: a leading letter ("B", "(B)", "B.", "B) text", "B: text"); the last "(X)";
    the answer equal to one option's text (case/space-insensitive); exactly one option's
    text contained in the answer; the last standalone capital letter. Only letters of
    existing options count (``num_choices``, default ``len(choices)``, 26 when both are
    unknown).
    """
    answer = answer.strip()
    count = num_choices if num_choices is not None else (len(choices) or len(LETTERS))
    valid = set(LETTERS[:count])
    match = _LEADING_LETTER.match(answer)
    if match and match.group(1) in valid:
        return match.group(1)
    parens = [m for m in _PAREN_LETTER.findall(answer) if m in valid]
    if parens:
        return parens[-1]
    normalised = _norm(answer)
    texts = [_norm(choice) for choice in choices]
    if normalised and normalised in texts:
        return LETTERS[texts.index(normalised)]
    contained = [i for i, text in enumerate(texts) if text and text in normalised]
    if len(contained) == 1:
        return LETTERS[contained[0]]
    standalone = [m for m in _STANDALONE_LETTER.findall(answer) if m in valid]
    return standalone[-1] if standalone else None


def multiple_choice(completion: str, reference: str, choices: Sequence[str] = (),
                    num_choices: int | None = None) -> float:
    """1.0 if the answer's option letter is the reference letter."""
    return float(choice_letter(answer_text(completion), choices, num_choices)
                 == str(reference).strip().upper())


# --------------------------------------------------------------------------- MathVista


def mathvista_normalize(extraction: str, choices: Sequence[str], question_type: str,
                        answer_type: str, precision: float | None) -> str | None:
    """MathVista's ``normalize_extracted_answer``: an option's text for multi_choice (by
    letter, else the option nearest in edit distance), ``str(int(float(x)))`` for integers,
    ``str(round(float(x), precision))`` for floats, ``str(x)`` for lists; None if unreadable."""
    extraction = str(extraction).strip()
    if question_type == "multi_choice":
        if not choices:
            return None
        letters = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letters:
            extraction = letters[0].upper()
        sequential = [LETTERS[i] for i in range(len(choices))]
        if extraction in sequential:
            return choices[sequential.index(extraction)]
        distances = [levenshtein(extraction, choice) for choice in choices]
        return choices[distances.index(min(distances))]
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision or 0)))
    except (TypeError, ValueError, OverflowError):
        return None
    return extraction


def mathvista_match(completion: str, reference: str, choices: Sequence[str], question_type: str,
                    answer_type: str, precision: float | None) -> float:
    """1.0 if MathVista's normalised answer equals the reference string (its ``safe_equal``)."""
    prediction = mathvista_normalize(answer_text(completion), list(choices), question_type,
                                     answer_type, precision)
    return float(prediction is not None and prediction == str(reference))


# --------------------------------------------------------------------------- math-verify


def math_equal(answer: str, reference: str) -> bool:
    """recap_jax.rewards.accuracy (math-verify under its time limit, else normalised string
    equality), tried once more with both sides in ``$…$`` when neither has one: math-verify
    reads bare text such as ``2\\sqrt{2}`` as its first number, LaTeX in math mode in full."""
    if rewards_lib.accuracy(answer, reference) == 1.0:
        return True
    if "$" in answer or "$" in reference:
        return False
    return rewards_lib.accuracy(f"${answer}$", f"${reference}$") == 1.0


# --------------------------------------------------------------------------- MMMU open


def mmmu_open_match(completion: str, references: Sequence[str]) -> float:
    """MMMU open question: any reference equal by math-verify / normalised string, or (string
    references) contained in the normalised answer."""
    answer = answer_text(completion)
    for reference in references:
        if math_equal(answer, str(reference)):
            return 1.0
        reference = _norm(reference)
        if reference and not _is_number(reference) and reference in _norm(answer):
            return 1.0
    return 0.0


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- ChartQA


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's relaxed accuracy: numbers (a trailing % divides by 100) within 5% relative
    change of a non-zero target; otherwise case-insensitive exact match."""
    prediction, target = prediction.strip(), target.strip()
    prediction_float, target_float = _to_float(prediction), _to_float(target)
    if prediction_float is not None and target_float:
        return abs(prediction_float - target_float) / abs(target_float) <= max_relative_change
    return prediction.lower() == target.lower()


# --------------------------------------------------------------------------- InfoVQA


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """Average normalised Levenshtein similarity of one answer: max over references of
    1 - NL if NL < threshold else 0, with NL = lev(a, r) / max(|a|, |r|) on lower-cased,
    space-collapsed strings."""
    answer = " ".join(prediction.strip().lower().split())
    best = 0.0
    for reference in references:
        reference = " ".join(str(reference).strip().lower().split())
        length = max(len(answer), len(reference))
        distance = levenshtein(answer, reference) / length if length else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


# --------------------------------------------------------------------------- VizWiz


def normalize_vqa_answer(text: str) -> str:
    """A simplified VQA answer normalisation: lower case, punctuation removed (a period only
    outside numbers), number words zero..ten to digits, articles dropped, spaces collapsed."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip().lower()
    text = _PERIOD.sub("", _PUNCTUATION.sub("", text))
    words = [_NUMBER_WORDS.get(word, word) for word in text.split()]
    return " ".join(word for word in words if word not in _ARTICLES)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA soft accuracy: the mean over each reference left out of min(1, number of the other
    references equal to the answer / 3), after `normalize_vqa_answer`."""
    if not references:
        return 0.0
    answer = normalize_vqa_answer(prediction)
    normalised = [normalize_vqa_answer(reference) for reference in references]
    total = 0.0
    for left_out in range(len(normalised)):
        matches = sum(1 for i, ref in enumerate(normalised) if i != left_out and ref == answer)
        total += min(1.0, matches / 3.0)
    return total / len(normalised)


# --------------------------------------------------------------------------- OCRBench


def ocrbench_contains(prediction: str, references: Sequence[str], dataset: str = "") -> float:
    """OCRBench v1: 1.0 if a reference is contained in the answer (lower-cased, newlines as
    spaces; for HME100k without any spaces and case kept)."""
    for reference in references:
        if dataset == "HME100k":
            ref = str(reference).strip().replace("\n", " ").replace(" ", "")
            answer = prediction.strip().replace("\n", " ").replace(" ", "")
        else:
            ref = str(reference).lower().strip().replace("\n", " ")
            answer = prediction.lower().strip().replace("\n", " ")
        if ref and ref in answer:
            return 1.0
    return 0.0


# --------------------------------------------------------------------------- grounding


def grounding_hit(completion: str, box: Sequence[float], image_size: Sequence[int] | None,
                  input_size: Sequence[int] | None, threshold: float = 0.5) -> float:
    """1.0 if the IoU of the answer's box (model-input frame, rescaled to the image) with the
    reference box is >= ``threshold``."""
    value = rewards_lib.iou(completion, list(box), image_size=image_size, input_size=input_size)
    return float(value >= threshold)


# --------------------------------------------------------------------------- dispatch


def _rule_choice(completion, item, context):
    return multiple_choice(completion, item.answer, item.choices, item.meta.get("num_choices"))


def _rule_math(completion, item, context):
    if item.meta.get("multiple_choice"):
        return _rule_choice(completion, item, context)
    return float(math_equal(answer_text(completion), str(item.answer)))


def _rule_mathvista(completion, item, context):
    meta = item.meta
    return mathvista_match(completion, item.answer, item.choices, meta["question_type"],
                           meta["answer_type"], meta.get("precision"))


def _rule_mmmu(completion, item, context):
    if item.meta.get("multiple_choice"):
        return _rule_choice(completion, item, context)
    answers = item.answer if isinstance(item.answer, (list, tuple)) else [item.answer]
    return mmmu_open_match(completion, answers)


def _rule_relaxed(completion, item, context):
    answers = item.answer if isinstance(item.answer, (list, tuple)) else [item.answer]
    return float(any(relaxed_correctness(answer_text(completion), str(a)) for a in answers))


def _rule_anls(completion, item, context):
    return anls(answer_text(completion), item.answer)


def _rule_vqa(completion, item, context):
    return vqa_accuracy(answer_text(completion), item.answer)


def _rule_ocrbench(completion, item, context):
    return ocrbench_contains(answer_text(completion), item.answer, item.meta.get("dataset", ""))


def _rule_ocrbench_v2(completion, item, context):
    from recap_jax.bench import ocrbench_v2  # imports this module's levenshtein

    meta = item.meta
    return ocrbench_v2.score_item(meta["type"], answer_text(completion), item.answer,
                                  method=meta.get("eval") or "", box=meta.get("bbox"),
                                  question=getattr(item, "question", ""),
                                  boxes=meta.get("bbox_list"), contents=meta.get("content"))


def _rule_grounding(completion, item, context):
    return grounding_hit(completion, item.answer, context.get("image_size"),
                         context.get("input_size"))


RULES: dict[str, Callable[[str, Any, dict], float]] = {
    "choice": _rule_choice, "math": _rule_math, "mathvista": _rule_mathvista, "mmmu": _rule_mmmu,
    "relaxed": _rule_relaxed, "anls": _rule_anls, "vqa": _rule_vqa, "ocrbench": _rule_ocrbench,
    "ocrbench_v2": _rule_ocrbench_v2, "grounding": _rule_grounding,
}


def score(rule: str, completion: str, item: Any, **context) -> float:
    """The score in [0, 1] of ``completion`` on ``item`` (a suites.BenchItem) by ``rule``;
    ``context``: image_size and input_size (h, w) for grounding. Never raises on model output:
    anything unexpected scores 0."""
    if rule not in RULES:
        raise ValueError(f"unknown scoring rule {rule!r}; known: {sorted(RULES)}")
    try:
        value = float(RULES[rule](completion, item, context))
    except Exception:  # noqa: BLE001 -- one odd completion must not end an evaluation
        return 0.0
    return value if math.isfinite(value) else 0.0
