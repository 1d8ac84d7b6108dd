"""MMBench CircularEval on hand-worked cases: the rotation of a question's options and the
group rule (a question counts only if every copy is answered correctly)."""

import math

import pytest

from recap_jax.bench import circular


def test_group_of_index():
    assert circular.group_of(241) == (241, 0)
    assert circular.group_of(3000241) == (241, 3)
    with pytest.raises(ValueError, match=">= 0"):
        circular.group_of(-1)


def test_rotate_row_shifts_options_and_answer():
    row = {"index": 5, "A": "x", "B": "y", "C": "z", "D": float("nan"), "answer": "C"}
    assert circular.option_count(row) == 3
    # option j of copy 2 is option (j + 2) mod 3: A = z, B = x, C = y; z was C, now A
    rotated = circular.rotate_row(row, 2)
    assert [rotated[k] for k in "ABC"] == ["z", "x", "y"]
    assert (rotated["answer"], rotated["index"]) == ("A", 2000005)
    assert circular.rotate_row(row, 1)["answer"] == "B"     # A = y, B = z, C = x
    assert circular.rotate_row(row, 0) == row
    with pytest.raises(ValueError, match="rotation 3 of a question with 3 options"):
        circular.rotate_row(row, 3)
    with pytest.raises(ValueError, match="not one of the 3 options"):
        circular.rotate_row(dict(row, answer="D"), 1)


def rec(group, rotation, score, category="a"):
    return {"score": score, "meta": {"group": group, "rotation": rotation, "category": category}}


def test_circular_needs_every_copy_right_vanilla_reads_the_originals():
    records = [rec(1, 0, 1.0), rec(1, 1, 1.0), rec(1, 2, 1.0), rec(1, 3, 1.0),   # all right
               rec(2, 0, 1.0), rec(2, 1, 0.0),                                   # one wrong
               rec(3, 0, 0.0, "b"),                                              # no copies
               rec(4, 0, 1.0)]                                                   # no copies
    metrics = circular.aggregate(records)
    assert metrics["vanilla"] == 0.75          # originals of 1, 2, 3, 4: 1 + 1 + 0 + 1
    assert metrics["circular"] == metrics["score"] == 0.5    # groups 1 and 4 of 4
    assert (metrics["questions"], metrics["copies"]) == (4, 8)
    assert metrics["circular_by_category"] == {"a": pytest.approx(2 / 3), "b": 0.0}


def test_circular_without_originals_and_empty():
    metrics = circular.aggregate([rec(1, 1, 1.0)])
    assert math.isnan(metrics["vanilla"]) and metrics["circular"] == 1.0
    assert circular.aggregate([]) == {}
