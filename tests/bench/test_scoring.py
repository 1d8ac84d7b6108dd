"""Each benchmark's scoring rule on hand-worked cases (expected values worked out by hand from
the published rules, not computed by the code under test)."""

import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recap_jax.bench import scoring


def item(answer, choices=(), **meta):
    return types.SimpleNamespace(answer=answer, choices=tuple(choices), meta=meta)


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("a, b, distance", [
    ("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("hello", "hallo", 1),
    ("hello", "help", 2), ("145", "145°", 1), ("145", "35°", 3)])
def test_levenshtein(a, b, distance):
    assert scoring.levenshtein(a, b) == distance
    assert scoring.levenshtein(b, a) == distance


def dynamic_programming_distance(a, b):
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


@settings(max_examples=300, deadline=None)
@given(st.text("abc ", max_size=70), st.text("abc ", max_size=70))
def test_bit_parallel_levenshtein_equals_the_textbook_table(a, b):
    # 70 characters cross the 64-bit word size that bit-parallel code often gets wrong
    assert scoring.levenshtein(a, b) == dynamic_programming_distance(a, b)
    tokens_a, tokens_b = [f"<{c}>" for c in a], [f"<{c}>" for c in b]   # token lists too
    assert scoring.levenshtein(tokens_a, tokens_b) == dynamic_programming_distance(a, b)


def test_answer_text_takes_the_last_answer_pair_or_the_whole_completion():
    assert scoring.answer_text("<think>x</think><answer> B </answer>") == "B"
    assert scoring.answer_text("<answer>A</answer> then <answer>C</answer>") == "C"
    assert scoring.answer_text("  just text ") == "just text"


# --------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("(C)", "C"), ("D. blue", "D"), ("A) red", "A"), ("B: 12", "B"),
    ("The answer is (C).", "C"),    # the last "(X)"
    ("blue", "D"),                  # equal to option D's text
    ("it is clearly green here", "C"),  # one option's text inside the answer
    ("I pick A", "A"),              # last standalone letter
    ("E", None),                    # not an option (4 options)
    ("nothing useful", None)])
def test_choice_letter(answer, letter):
    assert scoring.choice_letter(answer, ["red", "yellow", "green", "blue"]) == letter


def test_multiple_choice_scores_the_letter():
    choices = ["red", "yellow", "green", "blue"]
    assert scoring.multiple_choice("<answer>(B) yellow</answer>", "B", choices) == 1.0
    assert scoring.multiple_choice("<answer>blue</answer>", "B", choices) == 0.0
    # MMMU-Pro with 10 options: J is a valid letter
    assert scoring.multiple_choice("<answer>J</answer>", "J", num_choices=10) == 1.0
    assert scoring.score("choice", "<answer>A</answer>", item("A", choices)) == 1.0


# --------------------------------------------------------------------------- MathVista


def test_mathvista_multi_choice_by_letter_or_nearest_option():
    choices = ["145°", "35°", "55°", "125°"]
    args = (choices, "multi_choice", "text", None)
    assert scoring.mathvista_match("<answer>A</answer>", "145°", *args) == 1.0
    assert scoring.mathvista_match("<answer>(B) 35°</answer>", "145°", *args) == 0.0
    # "145": distance 1 to "145°", 3 to "35°", 2 to "55°" ("1"->"5"? no: 145 vs 55°: sub, sub,
    # ins = 3), 2 to "125°" (sub 4->2, ins °) -> the nearest is "145°"
    assert scoring.mathvista_normalize("145", choices, "multi_choice", "text", None) == "145°"


def test_mathvista_integer_float_and_list_answers():
    assert scoring.mathvista_match("<answer>3.0</answer>", "3", [], "free_form", "integer", None) == 1.0
    assert scoring.mathvista_match("<answer>three</answer>", "3", [], "free_form", "integer", None) == 0.0
    assert scoring.mathvista_match("<answer>1.449</answer>", "1.45", [], "free_form", "float", 2.0) == 1.0
    assert scoring.mathvista_match("<answer>1.46</answer>", "1.45", [], "free_form", "float", 2.0) == 0.0
    assert scoring.mathvista_match("<answer>[1, 2]</answer>", "[1, 2]", [], "free_form", "list", None) == 1.0
    meta = dict(question_type="free_form", answer_type="integer", precision=None)
    assert scoring.score("mathvista", "<answer>12</answer>", item("12", **meta)) == 1.0


# --------------------------------------------------------------------------- math-verify


def test_math_rule_uses_math_verify_for_free_form_and_letters_for_choices():
    assert scoring.score("math", "<answer>\\frac{1}{2}</answer>", item("0.5")) == 1.0
    assert scoring.score("math", "<answer>2\\sqrt{2}</answer>", item("\\sqrt{8}")) == 1.0
    assert scoring.score("math", "<answer>3</answer>", item("0.5")) == 0.0
    assert scoring.score("math", "<answer>B</answer>", item("B", multiple_choice=True)) == 1.0
    assert scoring.score("math", "<answer>C</answer>", item("B", multiple_choice=True)) == 0.0


def test_mmmu_open_answers():
    assert scoring.mmmu_open_match("<answer>24/7</answer>", ["24/7", "3.429"]) == 1.0
    # MMMU reads the numbers out of an open answer, as math-verify does
    assert scoring.mmmu_open_match("<answer>about 3.429</answer>", ["3.429"]) == 1.0
    assert scoring.mmmu_open_match("<answer>about 3.5</answer>", ["3.429"]) == 0.0
    assert scoring.mmmu_open_match("<answer>it is the mitochondria</answer>", ["Mitochondria"]) == 1.0
    assert scoring.score("mmmu", "<answer>B</answer>", item("B", ["x", "y"], multiple_choice=True)) == 1.0


# --------------------------------------------------------------------------- ChartQA


@pytest.mark.parametrize("prediction, target, correct", [
    ("104", "100", True),    # 4% off
    ("106", "100", False),   # 6% off
    ("95", "100", True),     # exactly 5%
    ("45%", "0.45", True),   # % divides by 100
    ("45%", "45", False),
    ("0", "0", True),        # zero target: string match
    ("0.01", "0", False),
    ("Yes", "yes", True), ("Brazil", "brazil ", True), ("Peru", "Chile", False)])
def test_chartqa_relaxed_correctness(prediction, target, correct):
    assert scoring.relaxed_correctness(prediction, target) is correct


# --------------------------------------------------------------------------- InfoVQA


def test_anls():
    assert scoring.anls("hello", ["hello"]) == 1.0
    assert scoring.anls("Hallo", ["hello"]) == pytest.approx(0.8)       # 1 - 1/5
    assert scoring.anls("help", ["hello"]) == pytest.approx(0.6)        # 1 - 2/5
    assert scoring.anls("world", ["hello"]) == 0.0                       # 4/5 >= 0.5
    assert scoring.anls("help", ["world", "hello"]) == pytest.approx(0.6)  # best reference
    assert scoring.anls("  New   York ", ["new york"]) == 1.0


# --------------------------------------------------------------------------- VizWiz


def test_vqa_soft_accuracy_over_ten_answers():
    ten = ["yes"] * 4 + ["no"] * 6
    assert scoring.vqa_accuracy("yes", ten) == 1.0   # every leave-one-out subset has >= 3 yes
    two = ["yes"] * 2 + ["no"] * 8
    # the 2 "yes" left out: 1 match -> 1/3; the 8 "no" left out: 2 matches -> 2/3
    assert scoring.vqa_accuracy("yes", two) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
    assert scoring.vqa_accuracy("maybe", two) == 0.0
    assert scoring.vqa_accuracy("Two.", ["2"] * 10) == 1.0    # number word, period
    assert scoring.vqa_accuracy("a dog", ["dog"] * 10) == 1.0  # article


# --------------------------------------------------------------------------- OCRBench


def test_ocrbench_containment():
    assert scoring.ocrbench_contains("The sign says STOP here", ["stop"]) == 1.0
    assert scoring.ocrbench_contains("go", ["stop", "halt"]) == 0.0
    assert scoring.ocrbench_contains("x ^ { 2 }", ["x^{2}"], "HME100k") == 1.0
    assert scoring.ocrbench_contains("x ^ { 2 }", ["x^{2}"], "IIIT5K") == 0.0


# --------------------------------------------------------------------------- grounding


def test_grounding_iou_threshold_and_rescaling():
    box = (0, 0, 100, 100)
    # IoU of [0,0,100,50] with [0,0,100,100] is exactly 0.5 -> a hit (>= 0.5)
    assert scoring.grounding_hit("<answer>[0, 0, 100, 50]</answer>", box, None, None) == 1.0
    assert scoring.grounding_hit("<answer>[0, 0, 100, 49]</answer>", box, None, None) == 0.0
    # the model saw a 50x50 input of a 100x100 image: [0,0,50,50] rescales to [0,0,100,100]
    assert scoring.grounding_hit("<answer>[0, 0, 50, 50]</answer>", box, (100, 100), (50, 50)) == 1.0
    assert scoring.score("grounding", "<answer>[0, 0, 50, 50]</answer>", item(box),
                         image_size=(100, 100), input_size=(100, 100)) == 0.0   # IoU 0.25


def test_score_never_raises_on_odd_items_but_rejects_unknown_rules():
    assert scoring.score("mathvista", "<answer>1</answer>", item("1")) == 0.0  # meta missing
    with pytest.raises(ValueError, match="unknown scoring rule"):
        scoring.score("bleu", "x", item("x"))
