"""OCRBench v2's rule-based scoring, per task type, and its aggregation into categories.

Follows the published evaluation (Yuliang-Liu/MultimodalOCR, ``OCRBench_v2/eval_scripts``:
``eval.py`` scores each item by its ``type``, ``vqa_metric.py`` / ``IoUscore_metric.py`` /
``TEDS_metric.py`` hold the rules, ``get_score.py`` averages). Scored here, with the published
rule of each type:

- VQA-style English types (text recognition, math QA, reasoning / cognition VQA, science QA,
  diagram QA, document classification, APP agent, ASCII art classification): `vqa_score`
  (an answer of fewer than 5 words contained in the prediction, else ANLS >= 0.5), or, by
  the row's ``eval`` field, ``multiple choice`` (the prediction's letters equal the answer)
  or ``case sensitive`` (`vqa_score` without lower-casing).
- cognition / reasoning VQA cn: `cn_vqa_score` (spaces removed; containment unless the
  answer has 4+ comma-separated parts, then ANLS).
- text counting en: `counting_score` (``exact match``: containment; ``regression``: the
  first integer p of the prediction scores 1 - |p - a| / a when above 0.5).
- formula recognition en / cn: `formula_score` (containment with all spaces removed; cn
  drops ``\\text{}`` wrappers first).
- key information extraction en / cn, key information mapping en: `kie_score` (the
  prediction read as a dict; mean per-key exact-match F1, best over the answer's
  alternatives).
- VQA with position en: `vqa_with_position_score` (0.5 * VQA of the dict's "answer" + 0.5 *
  IoU of its "bbox").
- text grounding en: `grounding_score` (IoU of the last 0..1000 box in the prediction).
- handwritten answer extraction cn, choice / fill-in questions: `handwritten_score` (the
  answer's characters, joined by any of the published separators, contained); short-answer
  ("简答") questions: the text metric below.
- full-page OCR en / cn, fine-grained text recognition en, text translation cn, short-answer
  handwritten questions: `ocrbench_v2_text.ocr_text_score`, the mean of BLEU, METEOR, a
  word-set F-measure and 1 - normalised edit distance (METEOR without WordNet synonyms unless
  NLTK's wordnet data is installed: `aggregate` reports the form as ``meteor``). A text
  translation item whose answer is empty is "ignored", as published (the adapter skips it).
- table parsing en / cn, chart parsing en: TEDS (`teds`: HTML or markdown tables, chart
  dicts drawn as key | value tables); document parsing en / cn: STEDS, a tree edit distance
  over the markdown headings (`teds.steds`).
- text spotting en: ICDAR 2015 end-to-end h-mean against the row's ``bbox_list`` and
  ``content`` (`spotting.spotting_score`).

Every task type is scored now; `UNSCORED_TYPES` (empty) stays the way to leave a type out:
the adapter skips such rows (skip kind "unscored") so no tokens are spent on them, and
`aggregate` names the types without scored items under ``missing_types``. How each metric
differs from the published code (HTML parsing, WordNet, clipping) is in the docstrings of
those modules and docs/benchmarks_eval.md.
"""

from __future__ import annotations

import ast
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from recap_jax.bench import ocrbench_v2_text, spotting, teds
from recap_jax.bench.scoring import levenshtein

__all__ = ["CATEGORIES", "CONTAINMENT_TYPES", "EVAL_METHODS", "SCORED_TYPES", "TEXT_METRIC_TYPES",
           "UNSCORED_TYPES", "aggregate", "calculate_iou", "check_method", "check_reference",
           "cn_vqa_score", "counting_score", "extract_coordinates", "formula_score",
           "handwritten_score", "is_ignored", "is_scored", "kie_combinations", "kie_f1", "kie_score",
           "language", "parse_prediction_dict", "score_item", "uses_text_metric", "vqa_score",
           "vqa_with_position_score"]

SHORT_ANSWER_MARK = "简答"  # handwritten answer extraction cn: a short-answer question

# get_score.py: task type -> (language, category)
CATEGORIES: dict[str, tuple[str, str]] = {
    "text recognition en": ("en", "text_recognition"),
    "fine-grained text recognition en": ("en", "text_recognition"),
    "full-page OCR en": ("en", "text_recognition"),
    "text grounding en": ("en", "text_detection"),
    "VQA with position en": ("en", "text_detection"),
    "text spotting en": ("en", "text_spotting"),
    "key information extraction en": ("en", "relationship_extraction"),
    "key information mapping en": ("en", "relationship_extraction"),
    "document parsing en": ("en", "element_parsing"),
    "chart parsing en": ("en", "element_parsing"),
    "table parsing en": ("en", "element_parsing"),
    "formula recognition en": ("en", "element_parsing"),
    "math QA en": ("en", "mathematical_calculation"),
    "text counting en": ("en", "mathematical_calculation"),
    "document classification en": ("en", "visual_text_understanding"),
    "cognition VQA en": ("en", "visual_text_understanding"),
    "diagram QA en": ("en", "visual_text_understanding"),
    "reasoning VQA en": ("en", "knowledge_reasoning"),
    "science QA en": ("en", "knowledge_reasoning"),
    "APP agent en": ("en", "knowledge_reasoning"),
    "ASCII art classification en": ("en", "knowledge_reasoning"),
    "full-page OCR cn": ("cn", "text_recognition"),
    "key information extraction cn": ("cn", "relationship_extraction"),
    "handwritten answer extraction cn": ("cn", "relationship_extraction"),
    "document parsing cn": ("cn", "element_parsing"),
    "table parsing cn": ("cn", "element_parsing"),
    "formula recognition cn": ("cn", "element_parsing"),
    "cognition VQA cn": ("cn", "visual_text_understanding"),
    "reasoning VQA cn": ("cn", "knowledge_reasoning"),
    "text translation cn": ("cn", "knowledge_reasoning"),
}
UNSCORED_TYPES: frozenset[str] = frozenset()   # types with no metric here (none, now)
TEXT_METRIC_TYPES = frozenset({"full-page OCR en", "full-page OCR cn",
                               "fine-grained text recognition en", "text translation cn"})
_PARSING_TYPES = frozenset({"table parsing en", "table parsing cn", "chart parsing en",
                            "document parsing en", "document parsing cn"})
_VQA_EN_TYPES = frozenset({
    "APP agent en", "ASCII art classification en", "math QA en", "reasoning VQA en",
    "science QA en", "text recognition en", "document classification en", "cognition VQA en",
    "diagram QA en"})
_VQA_CN_TYPES = frozenset({"cognition VQA cn", "reasoning VQA cn"})
SCORED_TYPES = frozenset(CATEGORIES) - UNSCORED_TYPES
# types whose references the published code strips or folds before comparing (the others,
# text / parsing / spotting metrics and handwritten answers, see them as written)
CONTAINMENT_TYPES = SCORED_TYPES - TEXT_METRIC_TYPES - _PARSING_TYPES - {
    "text spotting en", "handwritten answer extraction cn"}
_HANDWRITTEN_SEPARATORS = ("", ".", ". ", ",", ", ", "、", ";", "; ", " ", "和")
_COORDINATES = re.compile(r"[\(\[]\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*[\)\]]")
_TEXT_TAG = re.compile(r"\\text\{([^{}]*)\}")
_CODE_FENCE = re.compile(r"```(?:python|json)?\n(.*?)\n```", re.DOTALL | re.IGNORECASE)
_KEY_VALUE = re.compile(r"[\"']?([\w\s]+)[\"']?\s*[:=]\s*[\"']?([^\n,\"'{}]+)[\"']?")


def language(task_type: str) -> str:
    """"en" or "cn" of a task type; ValueError for a type OCRBench v2 does not have."""
    if task_type not in CATEGORIES:
        raise ValueError(f"unknown OCRBench v2 task type {task_type!r}")
    return CATEGORIES[task_type][0]


EVAL_METHODS = ("", "multiple choice", "case sensitive", "exact match", "regression")


def check_method(task_type: str, method: str) -> None:
    """ValueError unless ``method`` (a row's ``eval`` field, "" when absent) is one the
    published evaluation applies to ``task_type``."""
    if method not in EVAL_METHODS:
        raise ValueError(f"OCRBench v2 {task_type!r}: unknown eval {method!r} (known: {EVAL_METHODS})")
    if task_type == "text counting en" and method not in ("exact match", "regression"):
        raise ValueError(f"OCRBench v2 {task_type!r}: eval must be 'exact match' or 'regression', "
                         f"got {method!r}")


def is_scored(task_type: str, question: str = "") -> bool:
    """Whether items of ``task_type`` are scored here (not in `UNSCORED_TYPES`); ValueError
    for a type OCRBench v2 does not have. ``question`` is accepted for callers that name one:
    every question of a scored type is scored."""
    language(task_type)
    return task_type not in UNSCORED_TYPES


def uses_text_metric(task_type: str, question: str = "") -> bool:
    """Whether an item is scored by BLEU / METEOR / F-measure / edit distance
    (`ocrbench_v2_text`): the OCR and translation types, and short-answer ("简答")
    handwritten questions."""
    return task_type in TEXT_METRIC_TYPES or (
        task_type == "handwritten answer extraction cn" and SHORT_ANSWER_MARK in question)


def is_ignored(task_type: str, answers: Sequence[Any]) -> bool:
    """The published evaluation's "ignore": a text translation cn item with an empty answer
    is scored 0 and left out of every mean."""
    return task_type == "text translation cn" and (not answers or not str(answers[0]))


def check_reference(task_type: str, answers: Sequence[Any], question: str = "",
                    boxes: Sequence[Any] | None = None, contents: Sequence[Any] | None = None) -> None:
    """ValueError naming the problem when an item's reference cannot be scored by its
    type's rule: a table parsing en question asking for neither HTML nor markdown, a chart
    parsing answer that is not a dict, text spotting boxes and transcriptions that are
    missing or differ in number."""
    if task_type == "table parsing en" and not any(k in question.lower() for k in ("html", "markdown")):
        raise ValueError("table parsing en: the question asks for neither HTML nor markdown")
    if task_type == "chart parsing en":
        teds.reference_chart_dict(answers[0] if answers else "")
    if task_type == "text spotting en":
        if not boxes or not contents or len(boxes) != len(contents):
            raise ValueError(f"text spotting en: needs as many bbox_list boxes as content "
                             f"transcriptions, got {len(boxes or [])} and {len(contents or [])}")
        for box in boxes:
            if len(box) < 4 or len(box) % 2:
                raise ValueError(f"text spotting en: a box needs x, y pairs, got {list(box)}")


# --------------------------------------------------------------------------- VQA


def _anls_value(prediction: str, answer: str) -> float:
    length = max(len(prediction), len(answer))
    return 1.0 - (levenshtein(prediction, answer) / length if length else 0.0)


def _vqa(prediction: str, answers: Sequence[Any], fold, short) -> float:
    score = 0.0
    prediction = fold(prediction)
    for answer in answers:
        answer = fold(str(answer))
        if short(answer):
            if answer in prediction:
                score = 1.0
        else:
            value = _anls_value(prediction, answer)
            if value >= 0.5 and value > score:
                score = value
    return score


def vqa_score(prediction: str, answers: Sequence[Any], case_sensitive: bool = False) -> float:
    """``vqa_evaluation``: per answer (lower-cased unless ``case_sensitive``, stripped,
    newlines as spaces), 1 if an answer of fewer than 5 words is contained in the prediction,
    else its ANLS value 1 - lev / max length when >= 0.5; the best over answers."""
    def fold(text: str) -> str:
        return (text if case_sensitive else text.lower()).strip().replace("\n", " ")

    return _vqa(prediction, answers, fold, lambda answer: len(answer.split()) < 5)


def cn_vqa_score(prediction: str, answers: Sequence[Any]) -> float:
    """``cn_vqa_evaluation``: as `vqa_score` with all spaces removed, and "short" meaning fewer
    than 4 comma-separated parts."""
    def fold(text: str) -> str:
        return text.lower().strip().replace("\n", " ").replace(" ", "")

    return _vqa(prediction, answers, fold, lambda answer: len(answer.split(",")) < 4)


def multiple_choice_score(prediction: str, answers: Sequence[Any]) -> float:
    """``eval == "multiple choice"``: the prediction's alphabetic characters, joined, equal the
    (single) answer."""
    return float("".join(c for c in prediction if c.isalpha()) == str(answers[0]))


# --------------------------------------------------------------------------- counting, formulas


def counting_score(prediction: str, answers: Sequence[Any], method: str) -> float:
    """``counting_evaluation``. ``exact match``: 1 if a (lower-cased) answer is contained in
    the prediction as written. ``regression``: p = the first integer of the prediction; 0 if
    none, p <= 0 or p >= 2a, else 1 - |p - a| / a when that is above 0.5; best over answers."""
    if method not in ("exact match", "regression"):
        raise ValueError(f"text counting: eval must be 'exact match' or 'regression', got {method!r}")
    processed = prediction.lower().strip().replace("\n", " ")
    first = re.search(r"\d+", processed)
    number = int(first.group()) if first else 0
    best = 0.0
    for answer in answers:
        answer = str(answer).lower().strip().replace("\n", " ")
        if method == "exact match":
            score = float(answer in prediction)
        else:
            target = int(answer)
            if number <= 0 or number >= 2 * target:
                score = 0.0
            else:
                value = 1.0 - abs(number - target) / target
                score = value if value > 0.5 else 0.0
        best = max(best, score)
    return best


def _no_spaces(text: str) -> str:
    return text.strip().replace("\n", " ").replace(" ", "")


def formula_score(prediction: str, answers: Sequence[Any], chinese: bool = False) -> float:
    """``math_expression_evaluation`` (``cn_math_expression_evaluation`` when ``chinese``: the
    ``\\text{…}`` wrappers dropped from both first): 1 if an answer, all spaces removed, is
    contained in the prediction with all spaces removed."""
    if chinese:
        answers = [_TEXT_TAG.sub(r"\1", str(answers[0]))]
        prediction = _TEXT_TAG.sub(r"\1", prediction)
    prediction = _no_spaces(prediction)
    return float(any(_no_spaces(str(answer)) in prediction for answer in answers))


def handwritten_score(prediction: str, answers: Sequence[Any]) -> float:
    """handwritten answer extraction cn, choice / fill-in questions: 1 if the answer's
    characters, joined by any of "", ".", ". ", ",", ", ", "、", ";", "; ", " ", "和", are
    contained in the prediction (a one-character answer: itself)."""
    answer = str(answers[0])
    if len(answer) <= 1:
        return float(answer in prediction)
    return float(any(sep.join(answer) in prediction for sep in _HANDWRITTEN_SEPARATORS))


# --------------------------------------------------------------------------- dictionaries (KIE)


def parse_prediction_dict(prediction: str) -> dict[str, str]:
    """``convert_str_to_dict``: the first ```python / ```json fenced block (else the whole
    text) read as JSON, else as a Python literal dict, else as ``key: value`` / ``key = value``
    pairs; keys and values stripped strings; {} when nothing can be read."""
    match = _CODE_FENCE.search(prediction)
    content = match.group(1) if match else prediction.strip()
    data: Any = None
    try:
        data = json.loads(content)
    except json.JSONDecodeError:
        try:
            literal = ast.literal_eval(content)
            data = literal if isinstance(literal, dict) else None
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            data = None
        if data is None:
            data = {key.strip(): value.strip() for key, value in _KEY_VALUE.findall(content)}
    if not isinstance(data, dict) or not data:
        return {}
    return {str(key).strip(): str(value).strip() for key, value in data.items()}


def kie_combinations(answer: Any) -> list[dict]:
    """``generate_combinations``: the reference dict (or its JSON / Python-literal text) with
    list values expanded into every combination of one value per key."""
    if not isinstance(answer, Mapping):
        text = str(answer).strip('"')
        try:
            answer = json.loads(text)
        except json.JSONDecodeError:
            try:
                answer = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueError(f"KIE answer is not a dict: {text[:80]!r}") from None
        if not isinstance(answer, Mapping):
            raise ValueError(f"KIE answer is not a dict: {str(answer)[:80]!r}")
    keys = list(answer)
    values = [answer[k] if isinstance(answer[k], list) else [answer[k]] for k in keys]
    return [dict(zip(keys, combination)) for combination in itertools.product(*values)]


def _kie_value(value: Any) -> str | None:
    if value is None:
        return None
    return str(value).lower().strip().replace("\n", " ").replace(" ", "")


def kie_f1(prediction: Mapping[str, Any], reference: Mapping[str, Any]) -> float:
    """``compute_f1_score``: over the union of keys, 1 for a key whose values are equal (lower
    case, spaces removed), 0 for a different or missing one; the mean (0 when no keys)."""
    scores = []
    for key in set(prediction) | set(reference):
        predicted, expected = _kie_value(prediction.get(key)), _kie_value(reference.get(key))
        if predicted is None and expected is None:
            continue
        scores.append(float(predicted is not None and expected is not None and predicted == expected))
    return sum(scores) / len(scores) if scores else 0.0


def kie_score(prediction: str, answers: Sequence[Any], chinese: bool = False) -> float:
    """key information extraction / mapping: the best `kie_f1` of the prediction read by
    `parse_prediction_dict` over `kie_combinations` of the single reference (for cn, the
    reference's scalar values are first made one-element lists, as published)."""
    if len(answers) != 1:
        raise ValueError(f"key information extraction: expected one answer, got {len(answers)}")
    reference = answers[0]
    if chinese:
        reference = ast.literal_eval(str(reference))
        reference = {k: v if isinstance(v, list) else [v] for k, v in reference.items()}
    predicted = parse_prediction_dict(prediction)
    return max((kie_f1(predicted, combination) for combination in kie_combinations(reference)),
               default=0.0)


# --------------------------------------------------------------------------- boxes


def calculate_iou(box: Sequence[Any], reference: Sequence[Any]) -> float:
    """``calculate_iou``: IoU of two [x1, y1, x2, y2] boxes with integer coordinates (0 when
    either cannot be read or the union is empty)."""
    try:
        a = [int(float(v)) for v in box]
        b = [int(float(v)) for v in reference]
    except (TypeError, ValueError):
        return 0.0
    if len(a) != 4 or len(b) != 4:
        return 0.0
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union != 0 else 0.0


def extract_coordinates(prediction: str) -> list[int] | None:
    """``extract_coordinates``: the last distinct "(x1, y1, x2, y2)" / "[x1, y1, x2, y2]" of
    integers all within 0..1000 in the prediction (a box repeated counts at its last place)."""
    boxes: list[tuple[int, ...]] = []
    for match in _COORDINATES.finditer(prediction):
        box = tuple(int(v) for v in match.groups())
        if all(0 <= v <= 1000 for v in box):
            boxes = [b for b in boxes if b != box] + [box]
    return list(boxes[-1]) if boxes else None


def _reference_box(answers: Sequence[Any]) -> list:
    if len(answers) == 4:
        return list(answers)
    if len(answers) == 1:
        value = answers[0]
        return list(ast.literal_eval(value)) if isinstance(value, str) else list(value)
    raise ValueError(f"text grounding: expected a box as the answer, got {list(answers)[:8]}")


def grounding_score(prediction: str, answers: Sequence[Any]) -> float:
    """text grounding en: IoU of `extract_coordinates` with the answer box (0 if none)."""
    box = extract_coordinates(prediction)
    return 0.0 if box is None else calculate_iou(box, _reference_box(answers))


def vqa_with_position_score(prediction: str, answers: Sequence[Any], box: Sequence[Any]) -> float:
    """VQA with position en: the prediction read as a dict; 0.5 * `vqa_score` of its "answer"
    + 0.5 * IoU of its "bbox" (a list literal) with the row's ``bbox``."""
    predicted = parse_prediction_dict(prediction)
    content = vqa_score(predicted["answer"], answers) if "answer" in predicted else 0.0
    iou = 0.0
    if "bbox" in predicted:
        try:
            iou = calculate_iou(ast.literal_eval(predicted["bbox"]), box)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            iou = 0.0
    return 0.5 * content + 0.5 * iou


# --------------------------------------------------------------------------- dispatch


def score_item(task_type: str, prediction: str, answers: Sequence[Any], *, method: str = "",
               box: Sequence[Any] | None = None, question: str = "",
               boxes: Sequence[Any] | None = None, contents: Sequence[Any] | None = None) -> float:
    """The published score in [0, 1] of ``prediction`` for one item of ``task_type``;
    ``method`` is the row's ``eval`` field, ``box`` its ``bbox``, ``boxes`` and ``contents``
    its ``bbox_list`` and ``content`` (text spotting), ``question`` its question (short-answer
    handwritten questions, table parsing en's HTML / markdown). ValueError for a type that is
    not scored here (`is_scored`)."""
    if not is_scored(task_type, question):
        raise ValueError(f"OCRBench v2 task type {task_type!r} is not scored here")
    answers = list(answers)
    if task_type in _VQA_EN_TYPES or task_type in _VQA_CN_TYPES:
        if method == "multiple choice":
            return multiple_choice_score(prediction, answers)
        if method == "case sensitive":
            return vqa_score(prediction, answers, case_sensitive=True)
        if method:
            raise ValueError(f"OCRBench v2 {task_type!r}: unknown eval {method!r}")
        return vqa_score(prediction, answers) if task_type in _VQA_EN_TYPES else \
            cn_vqa_score(prediction, answers)
    if task_type == "text counting en":
        return counting_score(prediction, answers, method)
    if task_type in ("formula recognition en", "formula recognition cn"):
        return formula_score(prediction, answers, chinese=task_type.endswith("cn"))
    if task_type in ("key information extraction en", "key information mapping en",
                     "key information extraction cn"):
        return kie_score(prediction, answers, chinese=task_type.endswith("cn"))
    if task_type == "VQA with position en":
        return vqa_with_position_score(prediction, answers, box if box is not None else ())
    if task_type == "text grounding en":
        return grounding_score(prediction, answers)
    if uses_text_metric(task_type, question):
        return ocrbench_v2_text.ocr_text_score(prediction, str(answers[0]))
    if task_type == "handwritten answer extraction cn":
        return handwritten_score(prediction, answers)
    if task_type == "table parsing en":
        return teds.table_parsing_score(prediction, str(answers[0]), question)
    if task_type == "table parsing cn":        # always HTML, whatever the question says
        return teds.html_table_score(prediction, str(answers[0]))
    if task_type == "chart parsing en":
        return teds.chart_parsing_score(prediction, answers[0])
    if task_type in ("document parsing en", "document parsing cn"):
        return teds.steds(prediction, str(answers[0]))
    if task_type == "text spotting en":
        return spotting.spotting_score(prediction, boxes or (), contents or ())
    raise AssertionError(f"no rule for scored type {task_type!r}")  # SCORED_TYPES all handled


# --------------------------------------------------------------------------- aggregation


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict:
    """``get_score.py`` on the scored items (each a record with ``score`` and ``meta.type``):
    the mean per task type, per (language, category) the mean of its items, and per language
    the mean of its category means ("en" / "cn" overall). ``score``: the English overall
    when there are English items, else the Chinese. Categories and types with no scored item
    are listed under ``missing_types`` (a partial OCRBench v2 when not empty). ``meteor``:
    the METEOR stages in use (`ocrbench_v2_text.meteor_form`) when an item used the text
    metric (its meta's ``meteor``, set by the adapter)."""
    by_type: dict[str, list[float]] = {}
    for record in records:
        by_type.setdefault(record["meta"]["type"], []).append(float(record["score"]))
    by_category: dict[str, dict[str, list[float]]] = {"en": {}, "cn": {}}
    for task_type, scores in by_type.items():
        lang, category = CATEGORIES[task_type]
        by_category[lang].setdefault(category, []).extend(scores)
    categories = {lang: {c: _mean(s) for c, s in sorted(cats.items())}
                  for lang, cats in by_category.items() if cats}
    overall = {lang: _mean(list(means.values())) for lang, means in categories.items()}
    metrics = {
        "types": {t: {"score": _mean(s), "n": len(s)} for t, s in sorted(by_type.items())},
        "categories": categories, "overall": overall,
        "missing_types": sorted(set(CATEGORIES) - set(by_type)),
    }
    if any(record["meta"].get("meteor") for record in records):
        metrics["meteor"] = ocrbench_v2_text.meteor_form()
    if overall:
        metrics["score"] = overall.get("en", overall.get("cn"))
    return metrics
