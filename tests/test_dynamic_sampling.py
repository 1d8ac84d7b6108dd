"""Dynamic sampling on the host: zero-variance groups dropped, the fixed batch filled from
extra draws within a budget, counts by hand."""

import numpy as np
import pytest

from recap_jax.dynamic_sampling import DynamicSamplingStats, ScoredGroups, fill_batch, informative_groups

G = 2


def groups(ids, informative):
    """Scored groups whose rows carry their group id; a group varies iff informative."""
    ids = np.asarray(ids)
    rewards = np.repeat(np.ones(len(ids)), G)[:, None].copy()
    rewards[::G][np.asarray(informative, bool)] = 0.0  # first row differs
    return ScoredGroups(rewards=rewards, rows={"group_of_row": np.repeat(ids, G)},
                        groups={"prompt": ids * 10})


def scripted(*rounds):
    calls = []

    def draw():
        calls.append(1)
        return rounds[len(calls) - 1]
    return draw, calls


def test_informative_groups_by_hand():
    nan = np.nan
    rewards = np.array([[1, .5], [0, .5],      # column 0 varies
                        [1, .5], [1, .5],      # nothing varies
                        [1, nan], [1, nan],    # a missing column never varies
                        [1, 0], [1, 1]])       # only column 1 varies
    np.testing.assert_array_equal(informative_groups(rewards, G), [1, 0, 0, 1])
    np.testing.assert_array_equal(informative_groups(rewards, G, columns=(0,)), [1, 0, 0, 0])
    np.testing.assert_array_equal(informative_groups(rewards[:, 0], G), [1, 0, 0, 0])
    with pytest.raises(ValueError, match=r"columns=\(2,\)"):
        informative_groups(rewards, G, columns=(2,))
    with pytest.raises(ValueError, match="multiple of the group size G=3"):
        informative_groups(rewards, 3)


def test_fills_the_batch_from_an_extra_draw():
    draw, calls = scripted(groups([0, 1, 2, 3], [1, 0, 1, 0]), groups([4, 5, 6, 7], [0, 1, 1, 0]),
                           groups([8, 9, 10, 11], [1, 1, 1, 1]))
    batch, stats = fill_batch(draw, num_groups=4, group_size=G, max_extra_draws=5)
    np.testing.assert_array_equal(batch.groups["prompt"], [0, 20, 50, 60])
    np.testing.assert_array_equal(batch.rows["group_of_row"], [0, 0, 2, 2, 5, 5, 6, 6])
    assert batch.rewards.shape == (4 * G, 1)
    assert len(calls) == 2  # no draw once the batch is full
    assert stats == DynamicSamplingStats(draws=2, resampled=4, dropped=4,
                                         filled_zero_variance=0, surplus=0)
    assert stats.as_metrics()["dynamic_sampling/dropped"] == 4


def test_budget_exhausted_fills_with_zero_variance_groups():
    draw, calls = scripted(groups([0, 1, 2, 3], [1, 0, 1, 0]))
    batch, stats = fill_batch(draw, num_groups=4, group_size=G, max_extra_draws=0)
    np.testing.assert_array_equal(batch.groups["prompt"], [0, 20, 10, 30])
    assert stats == DynamicSamplingStats(draws=1, resampled=0, dropped=0,
                                         filled_zero_variance=2, surplus=0)
    draw, calls = scripted(groups([0, 1], [0, 0]), groups([2, 3], [0, 1]))
    batch, stats = fill_batch(draw, num_groups=2, group_size=G, max_extra_draws=1)
    np.testing.assert_array_equal(batch.groups["prompt"], [30, 0])
    assert stats == DynamicSamplingStats(draws=2, resampled=2, dropped=2,
                                         filled_zero_variance=1, surplus=0)


def test_surplus_informative_groups_are_counted():
    draw, _ = scripted(groups([0, 1, 2], [1, 0, 0]), groups([3, 4, 5], [1, 1, 1]))
    batch, stats = fill_batch(draw, num_groups=3, group_size=G, max_extra_draws=1)
    np.testing.assert_array_equal(batch.groups["prompt"], [0, 30, 40])
    assert (stats.dropped, stats.surplus, stats.resampled) == (2, 1, 3)


def test_bad_draws_and_arguments_name_the_field():
    bad = ScoredGroups(rewards=np.zeros((4, 1)), rows={"tokens": np.zeros((3, 5))})
    with pytest.raises(ValueError, match=r"rows\['tokens'\] has shape \(3, 5\); expected 4"):
        fill_batch(lambda: bad, 2, G, 0)
    with pytest.raises(ValueError, match="expected ScoredGroups"):
        fill_batch(lambda: {"rewards": np.zeros(4)}, 2, G, 0)
    with pytest.raises(ValueError, match="max_extra_draws=-1"):
        fill_batch(lambda: bad, 2, G, -1)
    with pytest.raises(ValueError, match="cannot fill num_groups=3"):
        fill_batch(lambda: groups([0, 1], [1, 1]), 3, G, 0)
