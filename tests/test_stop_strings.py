"""Stop strings and per-source limits on sampled completions, with a toy tokenizer whose
pieces split a stop string across tokens."""

import numpy as np
import pytest

from recap_jax.stop_strings import finish_completions, stop_token_count

PIECES = {0: "", 1: "a", 2: "</ans", 3: "wer>", 4: "b", 5: "wer>x"}  # 0: EOS, decoded to ""


def decode(ids):
    return "".join(PIECES[i] for i in ids)


TOKENS = np.array([[1, 2, 3, 4, 0],    # stop completed by token 3
                   [1, 2, 5, 4, 4],    # stop completed inside "wer>x"
                   [1, 4, 4, 4, 4],    # no stop, runs into the limit
                   [1, 0, 0, 0, 0],    # EOS after one token
                   [4, 4, 4, 2, 3]])   # the stop lies beyond the source's limit
LENGTHS = np.array([5, 5, 5, 2, 5])
TRUNCATED = np.array([False, True, True, False, True])


def test_stop_token_count_by_hand():
    assert stop_token_count([1, 2, 3, 4], decode, ("</answer>",)) == 3
    assert stop_token_count([1, 2, 5], decode, ("</answer>",)) == 3
    assert stop_token_count([1, 4, 4], decode, ("</answer>",)) is None
    assert stop_token_count([1, 4, 2, 3], decode, ("</answer>", "ab")) == 2  # the earliest


def test_stop_strings_and_limit_by_hand():
    out = finish_completions(TOKENS, LENGTHS, TRUNCATED, decode, stop=("</answer>",),
                             max_new_tokens=4)
    assert out.texts == ["a</answer>", "a</answer>", "abbb", "a", "bbb</ans"]
    np.testing.assert_array_equal(out.lengths, [3, 3, 4, 2, 4])
    np.testing.assert_array_equal(out.truncated, [False, False, True, False, True])
    np.testing.assert_array_equal(out.stopped, [True, True, False, False, False])
    np.testing.assert_array_equal(out.mask, [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                                             [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    cut = finish_completions(TOKENS, LENGTHS, TRUNCATED, decode, stop=("</answer>",),
                             include_stop=False)
    assert cut.texts[:2] == ["a", "a"]
    np.testing.assert_array_equal(cut.lengths, [3, 3, 5, 2, 5])  # no limit: row 4 stops at 5
    assert cut.texts[4] == "bbb" and cut.stopped[4] and not cut.truncated[4]


def test_nothing_to_do_keeps_the_sampler_output():
    out = finish_completions(TOKENS, LENGTHS, TRUNCATED, decode)
    np.testing.assert_array_equal(out.lengths, LENGTHS)
    np.testing.assert_array_equal(out.truncated, TRUNCATED)
    assert out.texts[3] == "a" and out.texts[0] == "a</answer>b"


@pytest.mark.parametrize("kwargs,match", [
    (dict(stop="</answer>"), "pass a sequence of strings"), (dict(stop=("",)), "non-empty"),
    (dict(max_new_tokens=6), r"max_new_tokens=6.*\[1, 5\]"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
])
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        finish_completions(TOKENS, LENGTHS, TRUNCATED, decode, **kwargs)
