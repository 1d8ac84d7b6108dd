"""Reward functions for tests/test_reward_pool.py, named by import path
("tests.reward_fixtures:<name>") so that worker processes import them."""

import os
import time

NOT_CALLABLE = 3


def length_reward(completion, reference=None, **context):
    """len(completion) / 10, plus 1 when the box context is given (to see it arrive)."""
    return len(completion) / 10 + (1.0 if "image_size" in context else 0.0)


def hang_on_x(completion, reference=None, **context):
    """Sleeps (for far longer than any test's timeout) on a completion containing 'x'."""
    if "x" in completion:
        time.sleep(600)
    return 1.0


def crash_on_y(completion, reference=None, **context):
    if "y" in completion:
        raise RuntimeError("a reward bug")
    return 0.5


def exit_on_z(completion, reference=None, **context):
    """Kills its process on a completion containing 'z' (a segfault, as far as the pool sees)."""
    if "z" in completion:
        os._exit(3)
    return 0.25


def nan_reward(completion, reference=None, **context):
    return float("nan")


def constant_reward(completion, reference=None, **context):
    """0.5 whatever the completion: every group's rewards are equal (dynamic sampling drops
    them all)."""
    return 0.5


def length_parity_reward(completion, reference=None, **context):
    """1 for a completion of odd length, else 0: a group's rewards vary about half the time
    with G = 2, so dynamic sampling both drops and keeps groups."""
    return float(len(completion) % 2)
