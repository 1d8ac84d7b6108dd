"""Rewards: hand-worked cases, the released code's regexes as references, and fuzzing
(every reward returns a float in [0, 1], never raises, never hangs)."""

import math
import re
import signal
import threading
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recap_jax import rewards

ALL_REWARDS = sorted(rewards.REWARDS.items())
# The released code's format checks (VLM-R1 / open-r1), used as independent references.
RELEASED_THINK = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
RELEASED_ANSWER = re.compile(r"<answer>.*?</answer>", re.DOTALL)
FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\t", "a", "7", "<",
             ">", "/", "think", "answer"]
fragment_text = st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join)
HANG_GUARD = timedelta(seconds=20)  # generous: only catches hangs, not slowness


def run_in_thread(fn, timeout_s=60.0):
    """fn() in a worker thread; fails the test if it does not return (a hang guard)."""
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    worker.start()
    worker.join(timeout_s)
    assert not worker.is_alive(), "reward did not return (hang)"
    return result["value"]


# --------------------------------------------------------------------------- format


@pytest.mark.parametrize("completion, expected", [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("<think>\nmulti\nline\n</think>\n\n<answer>\n3\n</answer>", 1.0),
    ("<think></think><answer></answer>", 1.0),
    ("<think>a</think> x <answer>b</answer>", 0.0),  # text between the blocks
    (" <think>a</think><answer>b</answer>", 0.0),  # leading space: not the whole completion
    ("<think>a</think><answer>b</answer>\n", 0.0),
    ("<answer>b</answer>", 0.0),
    ("<think>a<answer>b</answer>", 0.0),  # unclosed think
    ("<think>a</think><answer>b", 0.0),
    ("<think><think></think></think><answer>b</answer>", 1.0),  # nesting is just text
    ("<think>x</think><think>y</think><answer>b</answer>", 1.0),  # '.*?' may hold tags
])
def test_format_think_hand_cases(completion, expected):
    assert rewards.format_think(completion) == expected
    assert float(bool(RELEASED_THINK.fullmatch(completion))) == expected


@given(fragment_text)
def test_format_think_matches_released_regex(completion):
    assert rewards.format_think(completion) == float(bool(RELEASED_THINK.fullmatch(completion)))


@given(fragment_text)
def test_format_answer_matches_released_regex(completion):
    assert rewards.format_answer(completion) == float(bool(RELEASED_ANSWER.fullmatch(completion)))


def test_format_answer_hand_cases():
    assert rewards.format_answer("<answer>[1, 2, 3, 4]</answer>") == 1.0
    assert rewards.format_answer("<answer></answer>") == 1.0
    assert rewards.format_answer("<answer>") == 0.0
    assert rewards.format_answer("<answer></answer") == 0.0
    assert rewards.format_answer("<think>a</think><answer>b</answer>") == 0.0


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("completion, reference, expected", [
    ("<answer>3</answer>", "3", 1.0),
    ("<think>2+1</think><answer> 3.0 </answer>", "3", 1.0),  # symbolic
    ("<answer>1/2</answer>", "\\frac{1}{2}", 1.0),
    ("<answer>0.5</answer>", "$\\frac{1}{2}$", 1.0),
    ("<answer>\\sqrt{2}/2</answer>", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("<answer>x^2+2x+1</answer>", "(x+1)^2", 1.0),
    ("<answer>4</answer>", "3", 0.0),
    ("<answer>Yes.</answer>", "yes", 1.0),  # normalised string
    ("<answer>a red  ball</answer>", "A red ball", 1.0),
    ("<answer>A cat</answer>", "A dog", 0.0),
    ("<answer>(B) blue</answer>", "B", 1.0),  # choice letter
    ("<answer>B</answer>", "(B) blue", 1.0),
    ("<answer>C.</answer>", "B", 0.0),
    ("the answer is 7", "7", 1.0),  # no tags: the whole completion, as released
    ("<answer>1</answer> then <answer>2</answer>", "2", 1.0),  # the last answer counts
    ("<answer></answer>", "3", 0.0),
    ("<answer>3</answer>", "<answer> 3 </answer>", 1.0),  # tags in the reference
    ("<answer>12</answer>", 12, 1.0),  # numeric reference
])
def test_accuracy_hand_cases(completion, reference, expected):
    assert rewards.accuracy(completion, reference) == expected


def test_accuracy_off_main_thread_uses_math_verify_without_signals():
    value = run_in_thread(lambda: rewards.accuracy("<answer>0.5</answer>", "\\frac{1}{2}"))
    assert value == 1.0


@pytest.mark.parametrize("answer", ["9^9^9", "9**9**9", "123456789^123456789",
                                    "10^{10^{10}}", "99999999!", "\\binom{10^9}{5}",
                                    "1" * 5000, "2^{99999999}"])
def test_accuracy_on_exploding_arithmetic_is_bounded(answer):
    completion = f"<answer>{answer}</answer>"
    assert run_in_thread(lambda: rewards.accuracy(completion, "5")) == 0.0
    assert rewards.accuracy(completion, "5") == 0.0  # main thread path as well


def test_time_limit_interrupts_code_that_swallows_exceptions():
    def stubborn():
        while True:
            try:
                sum(range(10_000))
            except Exception:  # a library catching everything it can
                pass

    previous = signal.getsignal(signal.SIGALRM)
    assert rewards._run_with_time_limit(stubborn, 0.2) is False
    assert signal.getsignal(signal.SIGALRM) is previous
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


# --------------------------------------------------------------------------- IoU


@pytest.mark.parametrize("completion, reference, expected", [
    ("<answer>[0, 0, 10, 10]</answer>", [0, 0, 10, 10], 1.0),
    ("<answer>[0,0,10,10]</answer>", [5, 5, 15, 15], 25 / 175),
    ("<answer>[0, 0, 10, 10]</answer>", [20, 20, 30, 30], 0.0),
    ("<answer>[0, 0, 10, 10]</answer>", "[0, 0, 10, 20]", 0.5),
    ("<answer>the box is [2, 2, 4, 4] I think</answer>", [0, 0, 4, 4], 4 / 16),
    ("<answer>[2.5, 0, 5, 10]</answer>", [0, 0, 5, 10], 0.5),
    ("[0, 0, 10, 10]", [0, 0, 10, 10], 0.0),  # no answer tags
    ("<answer>[10, 0, 0, 10]</answer>", [0, 0, 10, 10], 0.0),  # x2 < x1
    ("<answer>[0, 0, 10]</answer>", [0, 0, 10, 10], 0.0),
    ("<answer>[0, 0, 10, 10]</answer>", [0, 0, 0, 0], 0.0),  # empty reference
])
def test_iou_hand_cases(completion, reference, expected):
    assert rewards.iou(completion, reference) == pytest.approx(expected)


def test_iou_rescales_from_model_input_frame_to_original():
    # Model saw 28x56 (h', w'); the original is 56x224 (h, w): x scales by 4, y by 2.
    completion = "<answer>[0, 0, 14, 14]</answer>"
    kwargs = dict(image_size=(56, 224), input_size=(28, 56))
    assert rewards.iou(completion, [0, 0, 56, 28], **kwargs) == pytest.approx(1.0)
    # Without rescaling the same prediction covers [0,0,14,14] of [0,0,56,28]: 196 / 1568.
    assert rewards.iou(completion, [0, 0, 56, 28]) == pytest.approx(196 / 1568)
    assert rewards.iou(completion, [0, 0, 56, 28], image_size=(56, 224),
                       input_size=(0, 56)) == 0.0  # invalid size: 0, no exception


def test_iou_thresholded_is_strictly_above_half():
    assert rewards.iou_thresholded("<answer>[0, 0, 10, 20]</answer>", [0, 0, 10, 10]) == 0.0
    assert rewards.iou_thresholded("<answer>[0, 0, 10, 19]</answer>", [0, 0, 10, 10]) == 1.0
    assert rewards.iou_thresholded("<answer>[0, 0, 10, 10]</answer>", [5, 5, 15, 15]) == 0.0


@given(st.lists(st.integers(0, 100), min_size=4, max_size=4),
       st.lists(st.integers(0, 100), min_size=4, max_size=4))
def test_iou_matches_pixel_count_reference(a, b):
    import numpy as np

    box_a = (min(a[0], a[2]), min(a[1], a[3]), max(a[0], a[2]), max(a[1], a[3]))
    box_b = (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))
    grid_a = np.zeros((100, 100), bool)
    grid_b = np.zeros((100, 100), bool)
    grid_a[box_a[1]:box_a[3], box_a[0]:box_a[2]] = True
    grid_b[box_b[1]:box_b[3], box_b[0]:box_b[2]] = True
    union = (grid_a | grid_b).sum()
    empty = box_a[2] == box_a[0] or box_a[3] == box_a[1] or box_b[2] == box_b[0] or (
        box_b[3] == box_b[1])
    expected = 0.0 if empty or union == 0 else (grid_a & grid_b).sum() / union
    completion = "<answer>[{}, {}, {}, {}]</answer>".format(*box_a)
    assert rewards.iou(completion, box_b) == pytest.approx(expected)


# --------------------------------------------------------------------------- OCR


def test_ocr_metrics_hand_cases():
    assert rewards.ocr_exact("  HELLO   WORLD ", "HELLO WORLD") == 1.0
    assert rewards.ocr_exact("<answer>KLM</answer>", "KLM") == 1.0
    assert rewards.ocr_exact("hello", "HELLO") == 0.0
    assert rewards.ocr_char_f1("ABC", "ABD") == pytest.approx(2 / 3)
    assert rewards.ocr_char_f1("AAB", "AB") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert rewards.ocr_char_f1("A B", "AB") == 1.0  # whitespace ignored
    assert rewards.ocr_char_f1("", "") == 1.0
    assert rewards.ocr_char_f1("", "AB") == 0.0
    assert rewards.ocr_char_f1("XYZ", "AB") == 0.0


@given(st.text(alphabet="ABCD ", max_size=12), st.text(alphabet="ABCD ", max_size=12))
def test_ocr_char_f1_is_symmetric_and_one_iff_same_characters(a, b):
    assert rewards.ocr_char_f1(a, b) == pytest.approx(rewards.ocr_char_f1(b, a))
    same = sorted(a.replace(" ", "")) == sorted(b.replace(" ", ""))
    assert (rewards.ocr_char_f1(a, b) == pytest.approx(1.0)) == same


# --------------------------------------------------------------------------- registry + fuzz


def test_registry_names_and_unknown_name():
    for name in ("accuracy", "format_think", "format_answer", "iou", "iou_thresholded",
                 "ocr_exact", "ocr_char_f1"):
        assert rewards.get_reward(name) is rewards.REWARDS[name]
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards.get_reward("nope")


def assert_all_rewards_bounded(completion, reference):
    for name, fn in ALL_REWARDS:
        value = fn(completion, reference, image_size=(50, 60), input_size=(28, 28))
        assert isinstance(value, float) and math.isfinite(value), name
        assert 0.0 <= value <= 1.0, (name, value)


huge_number = st.integers(min_value=-(10 ** 400), max_value=10 ** 400).map(str)
nested = st.recursive(
    st.text(max_size=5) | huge_number,
    lambda inner: st.tuples(st.sampled_from(["think", "answer"]), inner, st.booleans()).map(
        lambda t: f"<{t[0]}>{t[1]}" + (f"</{t[0]}>" if t[2] else "")),
    max_leaves=8,
)
references = st.one_of(st.none(), st.text(max_size=20), huge_number,
                       st.lists(st.integers(-5, 10 ** 6), max_size=5),
                       st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4))


@settings(deadline=HANG_GUARD)
@given(st.one_of(st.text(), nested, fragment_text), references)
def test_fuzz_rewards_stay_in_unit_interval(completion, reference):
    assert_all_rewards_bounded(completion, reference)


@settings(deadline=HANG_GUARD)
@given(nested.map(lambda s: f"<answer>{s}</answer>"), st.sampled_from(["3", "x+1", "A", "[1,2,3,4]"]))
def test_fuzz_answers_against_typical_references(completion, reference):
    assert_all_rewards_bounded(completion, reference)


@pytest.mark.parametrize("completion", [
    "<think>" + "</think><answer>" * 200_000 + "x",  # quadratic for a backtracking regex
    "<answer>" * 300_000,
    "<think>" + "a" * 1_000_000 + "</think><answer>" + "9" * 1_000_000 + "</answer>",
    "<answer>[" + "1" * 1_000_000 + ", 2, 3, 4]</answer>",
    "\U0001F600" * 1_000_000,
    "<answer>" + "(" * 100_000 + "</answer>",
])
def test_megabyte_completions_are_bounded(completion):
    run_in_thread(lambda: assert_all_rewards_bounded(completion, "3"), timeout_s=120)


def test_non_string_completions_score_zero():
    for bad in (None, 3, b"<answer>3</answer>", ["<answer>3</answer>"]):
        for name, fn in ALL_REWARDS:
            assert fn(bad, "3") == 0.0, name


# --------------------------------------------------------------------------- released variants
# Independent transcriptions of the released reward code (open-r1 format_reward and the
# ThinkLite/SAT accuracy cascade), written from its source for these tests.
RELEASED_STRICT = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$",
                             re.DOTALL | re.MULTILINE)
RELEASED_FIRST_ANSWER = re.compile(r"<answer>(.*?)</answer>")
RELEASED_LETTER = re.compile(r"(^|\s|\[|\()([A-H])(\s|\]|\)|$)")


def released_cascade_without_symbolic(completion: str, solution: str) -> float:
    """Steps 2-3 of the released accuracy reward (math-verify aside, checked separately)."""
    sol_match = RELEASED_FIRST_ANSWER.search(solution)
    ground_truth = sol_match.group(1).strip() if sol_match else solution.strip()
    content_match = RELEASED_FIRST_ANSWER.search(completion)
    student = content_match.group(1).strip() if content_match else completion.strip()
    if student == ground_truth:
        return 1.0
    letters = [m[1] for m in RELEASED_LETTER.findall(student)]
    return float(bool(letters) and letters[-1] == ground_truth)


STRICT_FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "\n", " ", "a", "B"]
strict_text = st.lists(st.sampled_from(STRICT_FRAGMENTS), max_size=14).map("".join)


@pytest.mark.parametrize("completion, expected", [
    ("<think>\nr\n</think>\n<answer>\nB\n</answer>", 1.0),
    ("<think>\n\n</think>\n<answer>\n\n</answer>", 1.0),  # empty bodies, distinct newlines
    ("<think>\n</think>\n<answer>\nB\n</answer>", 0.0),  # one newline cannot serve twice
    ("<think> r </think> <answer>B</answer>", 0.0),  # format_think gives 1
    ("<think>\nr\n</think><answer>\nB\n</answer>", 0.0),
    ("<think>\nr\n</think>\n<answer>\nB\n</answer>\ntrailing", 1.0),  # MULTILINE $
    ("<think>\nr\n</think>\n<answer>\nB\n</answer> trailing", 0.0),
    (" <think>\nr\n</think>\n<answer>\nB\n</answer>", 0.0),
])
def test_format_think_strict_hand_cases(completion, expected):
    assert rewards.format_think_strict(completion) == expected
    assert float(bool(RELEASED_STRICT.match(completion))) == expected


@given(strict_text)
def test_format_think_strict_matches_released_regex(completion):
    assert rewards.format_think_strict(completion) == float(bool(RELEASED_STRICT.match(completion)))


def test_format_think_strict_is_linear_on_adversarial_input():
    completion = "<think>\n" + "\n</think>\n<answer>\n" * 100_000 + "x"
    assert run_in_thread(lambda: rewards.format_think_strict(completion), timeout_s=30) == 0.0


@pytest.mark.parametrize("completion, reference, released, ours", [
    ("The answer is (C)", "C", 1.0, 0.0),  # the counterexamples
    ("C", "C. blue", 0.0, 1.0),
    ("<answer>yes</answer>", "Yes", 0.0, 1.0),  # released is case-sensitive
    ("<answer>1</answer> then <answer>2</answer>", "2", 0.0, 1.0),  # first vs last answer
    ("<answer>A or B</answer>", "B", 1.0, 0.0),  # the last letter counts
    ("<answer>\nB\n</answer>", "B", 1.0, 1.0),  # no one-line pair: the whole completion,
    # whose letters end in B (the newline is whitespace)
    ("<answer>B</answer>", "<answer>B</answer>", 1.0, 1.0),
])
def test_accuracy_released_counterexamples(completion, reference, released, ours):
    assert rewards.accuracy_released(completion, reference) == released
    assert released_cascade_without_symbolic(completion, reference) == released
    assert rewards.accuracy(completion, reference) == ours


def test_accuracy_released_symbolic_step_reads_the_whole_completion():
    # math-verify finds "\frac{1}{2}" in the prose; the one-line answer alone would not match
    completion = "so the result is $\\frac{1}{2}$ <answer>half</answer>"
    assert released_cascade_without_symbolic(completion, "0.5") == 0.0
    assert rewards.accuracy_released(completion, "0.5") == 1.0
    assert run_in_thread(lambda: rewards.accuracy_released("$x+1$", "$1+x$")) == 1.0


answer_bodies = st.text(alphabet="ABCHIabc ()[]\n.-:,", max_size=12)


@settings(deadline=HANG_GUARD)
@given(st.lists(st.sampled_from(["<answer>", "</answer>", "<think>", "\n", " "]) | answer_bodies.map(
    lambda t: [t]), max_size=6).map(lambda parts: "".join(p if isinstance(p, str) else p[0] for p in parts)),
    st.sampled_from(["A", "B", "C", "H", "(B)", "B. red", "<answer>C</answer>", "blue", "I"]))
def test_accuracy_released_matches_transcription(completion, reference):
    # letters and punctuation only: nothing math-verify would verify, so steps 2-3 decide
    assert rewards.accuracy_released(completion, reference) == released_cascade_without_symbolic(
        completion, reference)


@given(st.text(alphabet=st.sampled_from(list("ABHI ([])\n\t\u00a0\u2003x")), max_size=20))
def test_released_letters_match_released_findall(text):
    assert rewards.released_letters(text) == [m[1] for m in RELEASED_LETTER.findall(text)]


@given(st.lists(st.sampled_from(["<answer>", "</answer>", "\n", "a", "<"]), max_size=12).map("".join))
def test_first_answer_on_one_line_matches_released_search(text):
    match = RELEASED_FIRST_ANSWER.search(text)
    assert rewards.first_answer_on_one_line(text) == (match.group(1) if match else None)


def test_released_rewards_are_registered():
    assert rewards.get_reward("accuracy_released") is rewards.accuracy_released
    assert rewards.get_reward("format_think_strict") is rewards.format_think_strict
