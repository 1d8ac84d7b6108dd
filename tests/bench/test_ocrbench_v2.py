"""OCRBench v2's per-task-type rules and category aggregation on hand-worked cases (expected
values worked out by hand from the published eval_scripts, not computed by the code under
test)."""

import types

import pytest

from recap_jax.bench import ocrbench_v2 as v2
from recap_jax.bench import scoring

# --------------------------------------------------------------------------- VQA


def test_vqa_containment_for_short_answers_and_anls_for_long_ones():
    assert v2.vqa_score("The sign says STOP", ["stop"]) == 1.0
    assert v2.vqa_score("go", ["stop", "halt"]) == 0.0
    # 5 words -> ANLS: "jumps" -> "jumped" is 2 edits, the prediction has 26 characters
    long = ["the quick brown fox jumps"]
    assert v2.vqa_score("The quick brown fox jumped", long) == pytest.approx(1 - 2 / 26)
    assert v2.vqa_score("no", long) == 0.0                    # ANLS below 0.5
    # a long answer contained in a longer prediction is not enough: ANLS of the whole
    assert v2.vqa_score("the quick brown fox jumps over", long) == pytest.approx(1 - 5 / 30)
    # 27 extra characters over 52: ANLS 0.48 < 0.5 -> 0 although the answer is contained
    assert v2.vqa_score("the quick brown fox jumps over the lazy dog and more", long) == 0.0


def test_case_sensitive_and_multiple_choice_variants():
    assert v2.vqa_score("stop", ["STOP"], case_sensitive=True) == 0.0
    assert v2.vqa_score("STOP here", ["STOP"], case_sensitive=True) == 1.0
    assert v2.multiple_choice_score("(B)", ["B"]) == 1.0
    assert v2.multiple_choice_score("B. blue", ["B"]) == 0.0   # letters "Bblue"
    assert v2.score_item("science QA en", "B", ["B"], method="multiple choice") == 1.0
    assert v2.score_item("science QA en", "stop", ["STOP"], method="case sensitive") == 0.0
    assert v2.score_item("science QA en", "stop", ["STOP"]) == 1.0


def test_cn_vqa_removes_spaces_and_uses_anls_for_four_part_answers():
    assert v2.cn_vqa_score("你 好 世界", ["你好"]) == 1.0
    # 4 comma-separated parts -> ANLS: 1 substitution over 7 characters
    assert v2.cn_vqa_score("a,b,c,e", ["a,b,c,d"]) == pytest.approx(1 - 1 / 7)
    assert v2.score_item("reasoning VQA cn", "答案：北京", ["北京"]) == 1.0


# --------------------------------------------------------------------------- counting, formulas


@pytest.mark.parametrize("prediction, score", [
    ("There are 8 of them", 0.8),   # 1 - |8 - 10| / 10
    ("12", 0.8),
    ("4", 0.0),                     # 1 - 6/10 = 0.4, not above 0.5
    ("6", 0.6),
    ("20", 0.0),                    # >= 2 * 10
    ("0", 0.0), ("none", 0.0),
    ("10 words, 3 lines", 1.0)])    # the first integer
def test_counting_regression(prediction, score):
    assert v2.counting_score(prediction, ["10"], "regression") == pytest.approx(score)


def test_counting_exact_match_is_containment_in_the_prediction_as_written():
    assert v2.counting_score("I count 3", ["3"], "exact match") == 1.0
    # the answer is lower-cased but the prediction is not (as published)
    assert v2.counting_score("Three", ["Three"], "exact match") == 0.0
    with pytest.raises(ValueError, match="exact match"):
        v2.counting_score("3", ["3"], "")


def test_formula_containment_without_spaces():
    assert v2.formula_score("x ^ { 2 } + 1", ["x^{2}"]) == 1.0
    assert v2.formula_score("x^{3}", ["x^{2}"]) == 0.0
    assert v2.formula_score("面积 = 3", ["\\text{面积}=3"], chinese=True) == 1.0
    assert v2.formula_score("面积 = 3", ["\\text{面积}=3"], chinese=False) == 0.0


def test_handwritten_answers_joined_by_any_published_separator():
    assert v2.handwritten_score("答案是A、B、D", ["ABD"]) == 1.0
    assert v2.handwritten_score("A; B; D", ["ABD"]) == 1.0
    assert v2.handwritten_score("A, B, C", ["ABD"]) == 0.0
    assert v2.handwritten_score("选C", ["C"]) == 1.0
    # short-answer ("简答") questions are scored too, by the text metric
    assert v2.is_scored("handwritten answer extraction cn", "请回答简答题")
    assert v2.uses_text_metric("handwritten answer extraction cn", "请回答简答题")
    assert not v2.uses_text_metric("handwritten answer extraction cn", "选择题")


# --------------------------------------------------------------------------- KIE


def test_parse_prediction_dict_json_fence_literal_and_key_value_lines():
    assert v2.parse_prediction_dict('{"total": 12.5}') == {"total": "12.5"}
    assert v2.parse_prediction_dict('```json\n{"a": "B C"}\n```') == {"a": "B C"}
    assert v2.parse_prediction_dict("{'a': 1}") == {"a": "1"}
    assert v2.parse_prediction_dict("total: 12.50\ndate: 01/01/2020") == {
        "total": "12.50", "date": "01/01/2020"}
    assert v2.parse_prediction_dict("[1, 2]") == {}
    assert v2.parse_prediction_dict("nothing here") == {}


def test_kie_f1_best_over_answer_alternatives():
    answers = ['{"total": "12.50", "date": ["2020-01-01", "01/01/2020"]}']
    assert v2.kie_combinations(answers[0]) == [{"total": "12.50", "date": "2020-01-01"},
                                               {"total": "12.50", "date": "01/01/2020"}]
    # the second alternative matches both keys
    assert v2.kie_score('{"total": "12.50", "date": "01/01/2020"}', answers) == 1.0
    # keys {total, date, shop}: total differs ("12.5"), date matches the first alternative,
    # shop is not in the reference -> 1/3
    assert v2.kie_score('{"total": "12.5", "date": "2020-01-01", "shop": "x"}', answers) == \
        pytest.approx(1 / 3)
    assert v2.kie_f1({"a": "B C"}, {"a": "bc"}) == 1.0        # case and spaces ignored
    assert v2.kie_f1({}, {}) == 0.0
    cn = ["{'姓名': '张三', '日期': '2020'}"]
    assert v2.kie_score('{"姓名": "张三", "日期": "2021"}', cn, chinese=True) == 0.5
    assert v2.score_item("key information mapping en", "total: 12.50", ['{"total": "12.50"}']) == 1.0


# --------------------------------------------------------------------------- boxes


def test_iou_and_coordinates():
    assert v2.calculate_iou([10, 10, 50, 30], [10, 10, 50, 50]) == 0.5   # 800 / 1600
    assert v2.calculate_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0           # empty union
    assert v2.calculate_iou(["a", 0, 1, 1], [0, 0, 1, 1]) == 0.0
    assert v2.extract_coordinates("The box is [100, 200, 300, 400].") == [100, 200, 300, 400]
    # a box beyond 0..1000 is ignored; the last remaining one is taken
    assert v2.extract_coordinates("(0, 0, 2000, 10) then (1, 2, 3, 4)") == [1, 2, 3, 4]
    assert v2.extract_coordinates("[1, 1, 5, 5] [2, 2, 6, 6] [1, 1, 5, 5]") == [1, 1, 5, 5]
    assert v2.extract_coordinates("no box") is None


def test_grounding_and_vqa_with_position():
    answers = ["100", "200", "300", "400"]
    assert v2.grounding_score("[100, 200, 300, 400]", answers) == 1.0
    # intersection 100 x 100 over union 200 x 200
    assert v2.grounding_score("[100, 200, 200, 300]", answers) == pytest.approx(0.25)
    assert v2.grounding_score("[100, 200, 200, 300]", ["[100, 200, 300, 400]"]) == pytest.approx(0.25)
    assert v2.grounding_score("somewhere", answers) == 0.0
    # answer contained (1.0) and IoU 0.5 -> 0.5 * 1 + 0.5 * 0.5
    prediction = '{"answer": "hello world", "bbox": [10, 10, 50, 30]}'
    assert v2.vqa_with_position_score(prediction, ["hello"], [10, 10, 50, 50]) == 0.75
    assert v2.vqa_with_position_score('{"answer": "hello"}', ["hello"], [10, 10, 50, 50]) == 0.5
    assert v2.vqa_with_position_score("hello", ["hello"], [10, 10, 50, 50]) == 0.0


def test_score_item_refuses_unscored_and_unknown_types(monkeypatch):
    # every type has a metric now; the mechanism for leaving one out stays
    monkeypatch.setattr(v2, "UNSCORED_TYPES", frozenset({"table parsing en"}))
    with pytest.raises(ValueError, match="not scored here"):
        v2.score_item("table parsing en", "<table></table>", ["<table></table>"])
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unknown OCRBench v2 task type"):
        v2.score_item("poetry en", "x", ["x"])
    with pytest.raises(ValueError, match="unknown eval"):
        v2.score_item("math QA en", "x", ["x"], method="fuzzy")
    with pytest.raises(ValueError, match="unknown eval 'fuzzy'"):
        v2.check_method("math QA en", "fuzzy")
    with pytest.raises(ValueError, match="'exact match' or 'regression'"):
        v2.check_method("text counting en", "")
    v2.check_method("science QA en", "multiple choice")
    assert v2.SCORED_TYPES | v2.UNSCORED_TYPES == set(v2.CATEGORIES)
    assert len(v2.CATEGORIES) == 30   # eval.py's task_type_list


def test_scoring_rule_reads_the_answer_tags_and_item_meta():
    item = types.SimpleNamespace(answer=["10"], question="How many?",
                                 meta={"type": "text counting en", "eval": "regression"})
    assert scoring.score("ocrbench_v2", "<think>8?</think><answer>12</answer>", item) == \
        pytest.approx(0.8)
    position = types.SimpleNamespace(answer=["hello"], question="q",
                                     meta={"type": "VQA with position en", "eval": "",
                                           "bbox": [10, 10, 50, 50]})
    completion = '<answer>{"answer": "hello", "bbox": [10, 10, 50, 50]}</answer>'
    assert scoring.score("ocrbench_v2", completion, position) == 1.0


# --------------------------------------------------------------------------- aggregation


def record(task_type, score):
    return {"score": score, "meta": {"type": task_type}}


def test_aggregate_categories_average_items_and_languages_average_categories():
    records = [record("text recognition en", 1.0), record("text recognition en", 0.0),
               record("text grounding en", 0.25), record("VQA with position en", 0.75),
               record("math QA en", 1.0), record("text counting en", 0.8),
               record("text counting en", 0.0),
               record("cognition VQA cn", 1.0), record("formula recognition cn", 0.0)]
    metrics = v2.aggregate(records)
    assert metrics["types"]["text counting en"] == {"score": pytest.approx(0.4), "n": 2}
    # a category is the mean of its items (get_score.py appends item scores), not of its
    # types: mathematical_calculation = (1 + 0.8 + 0) / 3 = 0.6, not (1 + 0.4) / 2 = 0.7
    assert metrics["categories"]["en"] == {
        "mathematical_calculation": pytest.approx(0.6), "text_detection": 0.5,
        "text_recognition": 0.5}
    assert metrics["categories"]["cn"] == {"element_parsing": 0.0, "visual_text_understanding": 1.0}
    assert metrics["overall"] == {"en": pytest.approx(1.6 / 3), "cn": 0.5}
    assert metrics["score"] == pytest.approx(1.6 / 3)    # English overall
    assert "table parsing en" in metrics["missing_types"] and "math QA en" not in metrics["missing_types"]
    only_cn = v2.aggregate([record("cognition VQA cn", 1.0)])
    assert only_cn["score"] == 1.0 and "en" not in only_cn["overall"]
