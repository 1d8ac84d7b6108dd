"""Rewards scored in worker processes: the same values as serial scoring, hanging and crashing
rewards scored 0 and counted, import-path names validated with a clear error."""

import types

import numpy as np
import pytest

from recap_jax import reward_pool, rollout
from recap_jax.reward_pool import RewardPool, resolve_reward

FIX = "tests.reward_fixtures:"
TEXT = types.SimpleNamespace(answer_kind="text")
BOX = types.SimpleNamespace(answer_kind="box")


def test_names_resolve_or_fail_naming_the_path():
    assert resolve_reward("accuracy") is rollout.rewards_lib.REWARDS["accuracy"]
    assert resolve_reward(FIX + "length_reward")("abcd") == pytest.approx(0.4)
    for name, match in [("no_such_package.mod:fn", r"'no_such_package\.mod:fn'.*cannot import "
                                                   r"module 'no_such_package\.mod'"),
                        (FIX + "missing", "has no attribute 'missing'"),
                        (FIX + "NOT_CALLABLE", "is a int, not a function"),
                        ("acuracy", "unknown reward 'acuracy'.*package.module:function"),
                        ("mod:", "an import path is 'package.module:function'")]:
        with pytest.raises(ValueError, match=match):
            resolve_reward(name)
    with pytest.raises(ValueError, match="'acuracy'"):
        RewardPool(0, names=("accuracy", "acuracy"))  # validated at start
    with pytest.raises(ValueError, match="workers=-1"):
        RewardPool(-1)
    with pytest.raises(ValueError, match="timeout_s=0"):
        RewardPool(1, timeout_s=0)


def test_pool_equals_serial_scoring():
    texts = ["<think>2+2</think><answer>4</answer>", "<answer>5</answer>", "four", "",
             "<think>a</think> <answer>\\frac{1}{2}</answer>", "<answer>(B)</answer>"]
    refs = ["4", "4", "4", "4", "0.5", "B"]
    names = ["accuracy", "format_think", "format_answer", FIX + "length_reward"]
    sizes = np.tile([[64, 48]], (len(texts), 1))
    registered = names[:3]
    expected = rollout.score(TEXT, texts, refs, sizes, sizes, registered)
    with RewardPool(2, timeout_s=60.0) as pool:
        parallel = pool.score(TEXT, texts, refs, sizes, sizes, names)
        boxes = pool.score(BOX, ["[1, 2, 3, 4]"] * 2, [[1, 2, 3, 4], [0, 0, 1, 1]], sizes[:2],
                           sizes[:2], ["iou", FIX + "length_reward"])
        assert pool.take_counts() == {}
    np.testing.assert_array_equal(parallel[:, :3], expected)
    np.testing.assert_array_equal(parallel, reward_pool.score(TEXT, texts, refs, sizes, sizes, names))
    np.testing.assert_array_equal(boxes[:, 0], rollout.score(BOX, ["[1, 2, 3, 4]"] * 2,
                                                             [[1, 2, 3, 4], [0, 0, 1, 1]],
                                                             sizes[:2], sizes[:2], ["iou"])[:, 0])
    np.testing.assert_allclose(boxes[:, 1], [2.2, 2.2])  # the box context reached the worker
    assert parallel.dtype == np.float32 and parallel[0, 0] == 1.0


def test_hanging_crashing_and_dying_rewards_score_zero_and_are_counted():
    texts = ["ab", "x", "y", "abc", "z", "xz"]
    names = [FIX + "length_reward", FIX + "hang_on_x", FIX + "crash_on_y", FIX + "exit_on_z",
             FIX + "nan_reward"]
    with RewardPool(2, timeout_s=1.0) as pool:
        values = pool.score(TEXT, texts, [None] * 6, None, None, names)
        counts = pool.take_counts()
        again = pool.score(TEXT, ["abcd"], [None], None, None, names[:4])  # replaced workers
        assert pool.workers == 2 and pool.take_counts() == {}
    np.testing.assert_allclose(values[:, 0], [0.2, 0.1, 0.1, 0.3, 0.1, 0.2])
    np.testing.assert_array_equal(values[:, 1], [1, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(values[:, 2], [.5, .5, 0, .5, .5, .5])
    np.testing.assert_array_equal(values[:, 3], [.25, .25, .25, .25, 0, 0])
    np.testing.assert_array_equal(values[:, 4], np.zeros(6))
    assert counts == {f"reward_timeouts/{FIX}hang_on_x": 2, f"reward_errors/{FIX}crash_on_y": 1,
                      f"reward_errors/{FIX}exit_on_z": 2, f"reward_errors/{FIX}nan_reward": 6}
    np.testing.assert_allclose(again, [[0.4, 1, 0.5, 0.25]])


def test_serial_mode_counts_errors():
    pool = RewardPool(0)
    values = pool.score(TEXT, ["y", "a"], [None, None], None, None,
                        [FIX + "crash_on_y", FIX + "length_reward"])
    np.testing.assert_allclose(values, [[0, 0.1], [0.5, 0.1]])
    assert pool.take_counts() == {f"reward_errors/{FIX}crash_on_y": 1}
