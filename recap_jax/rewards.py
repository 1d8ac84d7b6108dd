"""Verifiable rewards r_f(completion, reference) in [0, 1] for RLVR, plus OCR eval metrics.

Every public reward has the contract signature

    recap_jax.rewards.<name>(completion: str, reference, **context) -> float

and the same guarantees: it never raises (anything unexpected scores 0.0), its value is a
finite float in [0, 1], and it runs in bounded time on any input (linear-time parsing, a cap
on what reaches symbolic math, and a wall-clock limit on math-verify where one can be set).

Rewards (the paper's, see shared/docs/recap-method.md, "Rewards used in the paper"):
- ``format_think``: 1 if the whole completion is ``<think>…</think>`` then optional
  whitespace then ``<answer>…</answer>`` (contents may span lines), else 0. The same language
  as ``re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", c, re.DOTALL)`` of the
  released code, decided in linear time. No stripping: leading/trailing text fails.
- ``format_think_strict``: open-r1's newline-strict format of the released RLVR-only runs,
  ``re.match(r"^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\n</answer>$", c, DOTALL | MULTILINE)``,
  decided in linear time. With MULTILINE, ``$`` also matches before any newline, so text
  after a newline that follows ``</answer>`` still scores 1 (as released).
- ``format_answer``: 1 if the whole completion is ``<answer>…</answer>``, else 0.
- ``accuracy``: 1 if the answer equals the reference by (1) math-verify symbolic
  equivalence, (2) exact string match after normalisation (case-folded, whitespace
  collapsed, one trailing period dropped), or (3) multiple-choice letter (reference "B",
  "(B)", "B." or "B) text" against an answer starting with that letter). The answer is the
  text inside the last ``<answer>…</answer>`` pair of the completion, or the whole
  completion when it has no such pair (as in the released code).
- ``accuracy_released``: the released cascade (ThinkLite/SAT rewards), first success wins:
  (1) math-verify ``parse`` of the WHOLE completion verified against the parsed reference;
  (2) the first ``<answer>…</answer>`` on one line (no DOTALL; else the whole completion),
  stripped, equal to the reference (its own first answer pair, else itself), case-sensitive;
  (3) the last standalone letter A-H of that answer equal to the reference; (4) a grader on
  math-verify's parse: inert (see `accuracy_released`). ``accuracy`` stays the default of
  our own configs: it reads the last ``<answer>`` (the final one a model writes), compares
  case- and whitespace-insensitively, and reads a letter only against a letter reference,
  so "C. blue" references accept "C" and prose never earns a letter by accident.
- ``iou``: IoU of the first ``[x1, y1, x2, y2]`` inside the last ``<answer>`` pair with the
  reference box. ``iou_thresholded``: 1 if that IoU > 0.5 else 0 (RLVR-only setting).
- ``ocr_exact`` / ``ocr_char_f1``: evaluation metrics for transcription (see their docs).

``REWARDS`` maps each name to its function.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import re
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "REWARDS",
    "RewardFn",
    "accuracy",
    "accuracy_released",
    "box_iou",
    "extract_answer",
    "format_answer",
    "format_think",
    "format_think_strict",
    "get_reward",
    "iou",
    "iou_thresholded",
    "ocr_char_f1",
    "ocr_exact",
    "parse_box",
]

RewardFn = Callable[..., float]

# Inputs longer than this (characters) score 0 on every reward: no legitimate completion of
# a few thousand tokens is this long, and it bounds the linear scans below.
MAX_COMPLETION_CHARS = 4_000_000
# Only answers/references this short reach math-verify (sympy); longer ones are compared as
# strings. Threads cannot use the signal-based time limit, so they get a tighter cap.
MAX_SYMBOLIC_CHARS = 200
MAX_SYMBOLIC_CHARS_OFF_MAIN_THREAD = 100
# Wall-clock limit on one math-verify comparison (main thread only; SIGALRM timer).
SYMBOLIC_TIME_LIMIT_S = 2.0
# Integer literals longer than this never reach sympy (big-int arithmetic runs in C, where
# no signal can interrupt it).
MAX_SYMBOLIC_DIGITS = 15
MAX_EXPONENT_DIGITS = 4
MAX_FACTORIAL_DIGITS = 3

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_THINK_TO_ANSWER = re.compile(r"</think>\s*<answer>")
_NUMBER = r"(-?\d{1,12}(?:\.\d{1,12})?)"
_BOX = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUMBER] * 4) + r"\s*\]")
_CHOICE_LETTER = re.compile(r"\(?([A-Z])\)?(?=$|[\s.:,)])")
_REFERENCE_CHOICE = re.compile(r"(?:\(([A-Z])\)|([A-Z])[.:)]?)(?:$|(?<=[.:)])\s)")
_DIGIT_RUN = re.compile(r"\d+")
_WHITESPACE = re.compile(r"\s+")

_log = logging.getLogger(__name__)


def _never_raise(fn: RewardFn) -> RewardFn:
    """Wraps a reward: exceptions and non-finite or out-of-range values become 0.0 / clipped."""

    @functools.wraps(fn)
    def wrapper(completion, reference=None, **context) -> float:
        try:
            if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
                return 0.0
            value = float(fn(completion, reference, **context))
        except Exception:  # noqa: BLE001 -- a reward must never crash the train step
            _log.debug("reward %s failed", fn.__name__, exc_info=True)
            return 0.0
        if not math.isfinite(value):
            return 0.0
        return min(1.0, max(0.0, value))

    return wrapper


# --------------------------------------------------------------------------- answer text


def extract_answer(text: str) -> str | None:
    """The text inside the last ``<answer>…</answer>`` pair (stripped), or None if none.

    "Last pair" = the last ``</answer>`` and the nearest ``<answer>`` before it; linear time.
    """
    end = text.rfind(_ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(_ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return text[start + len(_ANSWER_OPEN) : end].strip()


def _answer_or_whole(text: str) -> str:
    answer = extract_answer(text)
    return text.strip() if answer is None else answer


def _normalise(text: str) -> str:
    text = _WHITESPACE.sub(" ", text).strip().casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


# --------------------------------------------------------------------------- format rewards


@_never_raise
def format_think(completion: str, reference: Any = None, **context) -> float:
    """1.0 if ``completion`` is exactly ``<think>…</think>\\s*<answer>…</answer>``, else 0.0.

    ``reference`` and ``context`` are ignored (accepted for the common signature).
    """
    del reference, context
    n = len(completion)
    if not (completion.startswith(_THINK_OPEN) and completion.endswith(_ANSWER_CLOSE)):
        return 0.0
    # The earliest "</think>\s*<answer>" after the opening tag leaves the most room for the
    # answer body; the final "</answer>" must not overlap the "<answer>" it closes.
    match = _THINK_TO_ANSWER.search(completion, len(_THINK_OPEN))
    return float(match is not None and match.end() <= n - len(_ANSWER_CLOSE))


_STRICT_OPEN = "<think>\n"
_STRICT_MIDDLE = "\n</think>\n<answer>\n"
_STRICT_CLOSE = re.compile(r"\n</answer>(?:\n|\Z)")


@_never_raise
def format_think_strict(completion: str, reference: Any = None, **context) -> float:
    """1.0 if open-r1's newline-strict format matches ``completion`` (released RLVR-only runs).

    The released check is ``re.match(r"^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\n</answer>$",
    completion, re.DOTALL | re.MULTILINE)``. Decided here in linear time: the completion starts
    with ``"<think>\\n"``; the first ``"\\n</think>\\n<answer>\\n"`` after that opening (the
    reasoning may be empty, but the two newlines are distinct characters) leaves the most room
    for the answer; some later ``"\\n</answer>"`` is followed by the end of the text or by a
    newline (MULTILINE ``$``). ``<think> r </think> <answer>B</answer>`` scores 0 here and 1
    with `format_think`.
    """
    del reference, context
    if not completion.startswith(_STRICT_OPEN):
        return 0.0
    middle = completion.find(_STRICT_MIDDLE, len(_STRICT_OPEN))
    if middle < 0:
        return 0.0
    return float(_STRICT_CLOSE.search(completion, middle + len(_STRICT_MIDDLE)) is not None)


@_never_raise
def format_answer(completion: str, reference: Any = None, **context) -> float:
    """1.0 if ``completion`` is exactly ``<answer>…</answer>``, else 0.0."""
    del reference, context
    return float(
        len(completion) >= len(_ANSWER_OPEN) + len(_ANSWER_CLOSE)
        and completion.startswith(_ANSWER_OPEN)
        and completion.endswith(_ANSWER_CLOSE)
    )


# --------------------------------------------------------------------------- accuracy


class _SymbolicTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that library `except Exception` cannot eat it."""


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")


def _exponent_operand(text: str, start: int) -> tuple[str, int]:
    """The operand of a ``^`` whose operand starts at ``start``: ({…}/(…)/token, end index)."""
    while start < len(text) and text[start] == " ":
        start += 1
    if start >= len(text):
        return "", start
    pairs = {"{": "}", "(": ")"}
    if text[start] in pairs:
        opening, closing, depth = text[start], pairs[text[start]], 0
        for i in range(start, len(text)):
            depth += (text[i] == opening) - (text[i] == closing)
            if depth == 0:
                return text[start + 1 : i], i + 1
        return text[start + 1 :], len(text)
    end = start + 1
    while end < len(text) and (text[end].isalnum() or text[end] == "."):
        end += 1
    return text[start:end], end


def _safe_for_symbolic(text: str, max_chars: int) -> bool:
    """Whether sympy can evaluate ``text`` in bounded time (no towers, no huge integers)."""
    if not text or len(text) > max_chars:
        return False
    digit_runs = [len(run) for run in _DIGIT_RUN.findall(text)]
    longest = max(digit_runs, default=0)
    if longest > MAX_SYMBOLIC_DIGITS:
        return False
    lowered = text.lower()
    if any(op in lowered for op in ("!", "binom", "choose", "factorial", "gamma")):
        if longest > MAX_FACTORIAL_DIGITS:
            return False
    text = text.replace("**", "^")
    position = text.find("^")
    while position >= 0:
        operand, end = _exponent_operand(text, position + 1)
        if "^" in operand or max(map(len, _DIGIT_RUN.findall(operand)), default=0) > (
            MAX_EXPONENT_DIGITS
        ):
            return False
        rest = text[end:].lstrip(" }")
        if rest.startswith("^"):  # a^b^c parses as a^(b^c)
            return False
        position = text.find("^", end)
    return True


def _run_with_time_limit(fn: Callable[[], bool], seconds: float) -> bool:
    """fn() with a SIGALRM wall-clock limit in the main thread (False on timeout).

    The timer re-fires every 50 ms after expiry, so a library that swallows one interrupt
    still gets the next. Off the main thread signals cannot be used; callers cap inputs.
    """
    if not _in_main_thread():
        return fn()

    def on_alarm(signum, frame):
        raise _SymbolicTimeout()

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_timer = signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _SymbolicTimeout:
        _log.debug("math-verify comparison timed out after %.2fs", seconds)
        return False
    finally:
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_timer[0] > 0:  # someone else's timer was pending: give it back
            signal.setitimer(signal.ITIMER_REAL, previous_timer[0], previous_timer[1])


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once when its own (signal) timeout is off; we provide our own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


@functools.lru_cache(maxsize=1)
def _math_verify():
    """math_verify, imported and warmed up (its parsers are built on first use) outside any
    time limit, so that the first comparison is not charged for it."""
    import math_verify  # lazy: pulls in sympy

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
    math_verify.verify(math_verify.parse("$x+1$", parsing_timeout=None),
                       math_verify.parse("1 + x", parsing_timeout=None), timeout_seconds=None)
    return math_verify


def _parse_math(text: str):
    math_verify = _math_verify()
    parsed = math_verify.parse(text, parsing_timeout=None)
    if not parsed and "$" not in text:
        parsed = math_verify.parse(f"${text}$", parsing_timeout=None)
    return parsed


def _symbolic_equal(answer: str, reference: str) -> bool:
    """math-verify equivalence of answer and reference, only on inputs it handles safely."""
    max_chars = MAX_SYMBOLIC_CHARS if _in_main_thread() else MAX_SYMBOLIC_CHARS_OFF_MAIN_THREAD
    if not (_safe_for_symbolic(answer, max_chars) and _safe_for_symbolic(reference, max_chars)):
        return False

    def compare() -> bool:
        gold, predicted = _parse_math(reference), _parse_math(answer)
        if not gold or not predicted:
            return False
        return bool(_math_verify().verify(gold, predicted, timeout_seconds=None))

    try:
        _math_verify()
        return _run_with_time_limit(compare, SYMBOLIC_TIME_LIMIT_S)
    except Exception:  # noqa: BLE001
        return False


def _choice_letter(text: str) -> str | None:
    """The option letter an answer starts with: "B", "(B)", "B.", "B) blue" → "B"."""
    match = _CHOICE_LETTER.match(text.strip())
    return match.group(1) if match else None


def _reference_choice_letter(reference: str) -> str | None:
    """The letter if the reference names an option: "B", "(B)", "B.", "B) blue", "(B) blue".

    "A cat" is not an option reference (a capital followed by a plain space).
    """
    match = _REFERENCE_CHOICE.match(reference.strip())
    return match.group(1) or match.group(2) if match else None


@_never_raise
def accuracy(completion: str, reference: Any, **context) -> float:
    """1.0 if the completion's answer matches ``reference`` (symbolic, string or letter).

    Args:
      completion: model output; the answer is inside its last ``<answer>…</answer>`` pair
        (the whole completion if it has none).
      reference: the reference answer (str, or a number); ``<answer>`` tags in it are removed.
      **context: ignored.
    """
    del context
    if reference is None:
        return 0.0
    reference = _answer_or_whole(str(reference))
    answer = _answer_or_whole(completion)
    if not answer or not reference:
        return 0.0
    if _normalise(answer) == _normalise(reference):
        return 1.0
    reference_letter = _reference_choice_letter(reference)
    if reference_letter is not None:
        return float(_choice_letter(answer) == reference_letter)
    return float(_symbolic_equal(answer, reference))


# --------------------------------------------------------------------------- released accuracy

# The whole completion reaches math-verify in `accuracy_released` (step 1) only up to this many
# characters (main thread, under the SIGALRM limit; off the main thread the tighter cap of
# `_symbolic_equal` applies), and only when `_safe_for_symbolic` finds nothing sympy cannot
# bound. Longer or unsafe completions go on to steps 2-3.
MAX_RELEASED_PARSE_CHARS = 8_000
_RELEASED_LETTERS = frozenset("ABCDEFGH")
_LETTER_BEFORE = frozenset("[(")
_LETTER_AFTER = frozenset("])")


def first_answer_on_one_line(text: str) -> str | None:
    """The body of the first ``<answer>…</answer>`` whose body holds no newline, or None.

    The released ``re.search(r"<answer>(.*?)</answer>", text)`` (no DOTALL: ``.`` stops at
    ``\\n``), decided in linear time: an opening tag whose first closing tag comes after a
    newline fails, and so does every opening tag before that newline.
    """
    position = 0
    while True:
        start = text.find(_ANSWER_OPEN, position)
        if start < 0:
            return None
        body = start + len(_ANSWER_OPEN)
        end = text.find(_ANSWER_CLOSE, body)
        if end < 0:
            return None
        newline = text.find("\n", body, end)
        if newline < 0:
            return text[body:end]
        position = newline + 1


def released_letters(text: str) -> list[str]:
    """The standalone option letters A-H of ``text``, as the released ``extract_letters``.

    A letter counts when it opens the text or follows whitespace, ``[`` or ``(``, and is
    followed by whitespace, ``]``, ``)`` or the end. Matches do not overlap and each consumes
    the delimiter after its letter (the released ``re.findall``), so in "A B" only "A" counts:
    the space before "B" was taken by "A".
    """
    letters, position, n = [], 0, len(text)
    while position < n:
        if position == 0 and text[0] in _RELEASED_LETTERS:
            letter_at = 0
        elif (text[position].isspace() or text[position] in _LETTER_BEFORE) and (
                position + 1 < n and text[position + 1] in _RELEASED_LETTERS):
            letter_at = position + 1
        else:
            position += 1
            continue
        after = letter_at + 1
        if after == n:
            letters.append(text[letter_at])
            break
        if text[after].isspace() or text[after] in _LETTER_AFTER:
            letters.append(text[letter_at])
            position = after + 1
            continue
        position += 1
    return letters


def _released_symbolic(completion: str, reference: str) -> bool:
    """Step 1: math-verify's parse of the whole completion verifies against the reference's
    parse (released argument order: the completion is math-verify's gold)."""
    max_chars = (MAX_RELEASED_PARSE_CHARS if _in_main_thread()
                 else MAX_SYMBOLIC_CHARS_OFF_MAIN_THREAD)
    if not (_safe_for_symbolic(completion, max_chars)
            and _safe_for_symbolic(reference, max_chars)):
        return False

    def compare() -> bool:
        math_verify = _math_verify()
        predicted = math_verify.parse(completion, parsing_timeout=None)
        gold = math_verify.parse(reference, parsing_timeout=None)
        if not predicted or not gold:
            return False
        return float(math_verify.verify(predicted, gold, timeout_seconds=None)) > 0

    try:
        _math_verify()
        return _run_with_time_limit(compare, SYMBOLIC_TIME_LIMIT_S)
    except Exception:  # noqa: BLE001
        return False


@_never_raise
def accuracy_released(completion: str, reference: Any, **context) -> float:
    """The released accuracy cascade (ThinkLite/SAT reward functions); first success wins.

    1. math-verify: ``parse(completion)`` (the whole completion, not the answer) verified
       against ``parse(reference)``, under the same time limit and input caps as `accuracy`.
    2. exact match: the first one-line ``<answer>…</answer>`` body of the completion (else the
       whole completion), stripped, equals the reference's own first one-line answer body
       (else the whole reference), stripped. Case-sensitive, nothing else normalised.
    3. letter: the LAST standalone letter A-H of that answer (`released_letters`) equals the
       reference. No letter: the released code raises here and ends the cascade.
    4. grader: the released code calls a MATH-style ``grade_answer`` on math-verify's parse of
       the completion (a list, not a string); its module is not in the released repository,
       and such graders either raise on a list or compare its text form, which never equals
       a reference. The step is therefore inert, and omitted.

    Differences from `accuracy` (ours): "The answer is (C)" vs "C" scores 1 here (letter
    step) and 0 there (ours reads only a leading letter); "C" vs "C. blue" scores 0 here
    (exact match on the whole reference) and 1 there (the reference names option C);
    "<answer>yes</answer>" vs "Yes" scores 0 here and 1 there (case-folded).
    """
    del context
    if reference is None:
        return 0.0
    reference = str(reference)
    if _released_symbolic(completion, reference):
        return 1.0
    ground_truth = first_answer_on_one_line(reference)
    ground_truth = (reference if ground_truth is None else ground_truth).strip()
    answer = first_answer_on_one_line(completion)
    answer = (completion if answer is None else answer).strip()
    if answer == ground_truth:
        return 1.0
    letters = released_letters(answer)
    return float(bool(letters) and letters[-1] == ground_truth)


# --------------------------------------------------------------------------- IoU


def parse_box(value: Any) -> tuple[float, float, float, float] | None:
    """A box ``(x1, y1, x2, y2)`` from a sequence of 4 numbers or a text containing
    ``[x1, y1, x2, y2]`` (first such list; inside ``<answer>`` tags if present).

    Returns None when there is no box, a coordinate is not finite, or the box is empty
    (x2 <= x1 or y2 <= y1).
    """
    if isinstance(value, str):
        text = _answer_or_whole(value)
        match = _BOX.search(text)
        if match is None:
            return None
        coords = tuple(float(group) for group in match.groups())
    else:
        coords = tuple(float(v) for v in value)
        if len(coords) != 4:
            return None
    x1, y1, x2, y2 = coords
    if not all(math.isfinite(c) for c in coords) or x2 <= x1 or y2 <= y1:
        return None
    return coords


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Geometric IoU of two ``[x1, y1, x2, y2]`` boxes (continuous coordinates)."""
    ax1, ay1, ax2, ay2 = box_a
    bx1, by1, bx2, by2 = box_b
    inter_w = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    inter_h = max(0.0, min(ay2, by2) - max(ay1, by1))
    intersection = inter_w * inter_h
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - intersection
    return intersection / union if union > 0 else 0.0


def _rescale_box(box, image_size, input_size):
    """Model-input frame (h', w') → original image frame (h, w)."""
    if image_size is None or input_size is None:
        return box
    (height, width), (input_height, input_width) = image_size, input_size
    if min(height, width, input_height, input_width) <= 0:
        raise ValueError(f"sizes must be positive: image_size={image_size}, "
                         f"input_size={input_size}")
    sx, sy = width / input_width, height / input_height
    x1, y1, x2, y2 = box
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def _predicted_iou(completion, reference, image_size, input_size) -> float:
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    predicted = parse_box(answer)
    target = parse_box(reference)
    if predicted is None or target is None:
        return 0.0
    return box_iou(_rescale_box(predicted, image_size, input_size), target)


@_never_raise
def iou(completion: str, reference: Any, *, image_size=None, input_size=None, **context) -> float:
    """IoU of the predicted box with the reference box (continuous, in [0, 1]).

    Args:
      completion: model output; the box is the first ``[x1, y1, x2, y2]`` (integers or
        decimals) inside its last ``<answer>…</answer>`` pair. No pair or no box → 0.
      reference: reference box in the ORIGINAL image's pixel frame: 4 numbers, or a string
        containing ``[x1, y1, x2, y2]``.
      image_size: ``(height, width)`` of the original image.
      input_size: ``(height', width')`` of the image the model saw (after smart_resize).
        When both sizes are given the predicted box is rescaled by (width/width',
        height/height') before comparing; otherwise both boxes are taken to share one frame.
      **context: ignored.
    """
    del context
    return _predicted_iou(completion, reference, image_size, input_size)


@_never_raise
def iou_thresholded(
    completion: str, reference: Any, *, image_size=None, input_size=None, **context
) -> float:
    """1.0 if ``iou(completion, reference, ...)`` > 0.5, else 0.0 (RLVR-only setting)."""
    del context
    return float(_predicted_iou(completion, reference, image_size, input_size) > 0.5)


# --------------------------------------------------------------------------- OCR metrics


def _ocr_text(text: str) -> str:
    return _WHITESPACE.sub(" ", _answer_or_whole(text)).strip()


@_never_raise
def ocr_exact(completion: str, reference: Any, **context) -> float:
    """1.0 if the transcription equals ``reference`` after collapsing whitespace.

    Case-sensitive. The transcription is the last ``<answer>`` pair's text if present,
    else the whole completion.
    """
    del context
    return float(reference is not None and _ocr_text(completion) == _ocr_text(str(reference)))


@_never_raise
def ocr_char_f1(completion: str, reference: Any, **context) -> float:
    """Character-level F1 between the transcription and ``reference``.

    Bag-of-characters overlap, whitespace ignored, case-sensitive:
    P = common / |pred|, R = common / |ref|, F1 = 2PR / (P + R), where common is the sum
    over characters of min(count in pred, count in ref). Both empty → 1.0.
    """
    del context
    if reference is None:
        return 0.0
    predicted = collections.Counter(_ocr_text(completion).replace(" ", ""))
    target = collections.Counter(_ocr_text(str(reference)).replace(" ", ""))
    if not predicted and not target:
        return 1.0
    common = sum((predicted & target).values())
    if common == 0:
        return 0.0
    precision = common / sum(predicted.values())
    recall = common / sum(target.values())
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- registry

REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy,
    "accuracy_released": accuracy_released,
    "format_think": format_think,
    "format_think_strict": format_think_strict,
    "format_answer": format_answer,
    "iou": iou,
    "iou_thresholded": iou_thresholded,
    "ocr_exact": ocr_exact,
    "ocr_char_f1": ocr_char_f1,
}


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name`` (ValueError naming the known ones)."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known: {sorted(REWARDS)}") from None
