"""Epoch-bounded run length (the released RLVR-only run: until the smallest source is
exhausted) against a transcription of the released uniform sampler's length."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recap_jax.data.replay import epoch_steps


def released_optimizer_steps(sizes, kinds, per_device_batch, world_size, mini_repeat, grad_accum):
    """The released UniformHomogeneousMixedRepeatRandomSampler.__len__ (samples per rank),
    turned into optimizer steps as the HF Trainer does (batches per rank / accumulation)."""
    global_bs = per_device_batch * world_size
    rl_unique = global_bs // mini_repeat
    counts = [n // rl_unique if kind == "rl" else n // global_bs for n, kind in zip(sizes, kinds)]
    samples_per_rank = min(counts) * len(sizes) * per_device_batch
    return samples_per_rank // per_device_batch // grad_accum


def test_released_rlvr_only_run_is_328_steps():
    sizes = [1326, 5000, 9000, 15000]  # lisa (smallest), geoqav, sat, scienceqa
    assert epoch_steps(sizes, 16) == 328
    assert released_optimizer_steps(sizes, ["rl"] * 4, 2, 8, 1, 1) == 328


@given(st.lists(st.integers(16, 5000), min_size=1, max_size=5), st.sampled_from([1, 2, 4]),
       st.sampled_from([1, 2, 8]), st.sampled_from([1, 2]), st.data())
def test_matches_released_sampler_length(sizes, per_device, world, accum, data):
    kinds = data.draw(st.lists(st.sampled_from(["rl", "sft"]), min_size=len(sizes),
                               max_size=len(sizes)))
    global_bs = per_device * world
    rows = [global_bs] * len(sizes)  # mini_repeat 1: an RL batch holds global_bs prompts
    if min(n // r for n, r in zip(sizes, rows)) == 0:
        return
    assert epoch_steps(sizes, rows, sources_per_update=accum) == released_optimizer_steps(
        sizes, kinds, per_device, world, 1, accum)


def test_per_source_rows_and_accumulation():
    # hybrid: 16 RL prompts, but an SFT batch of 64 rows; two sources per optimizer step
    assert epoch_steps([70000, 321000, 640], [16, 16, 64], sources_per_update=2) == 15
    assert epoch_steps([100, 100], 10) == 20


@pytest.mark.parametrize("kwargs, message", [
    (dict(sizes=[100, 5], rows_per_batch=16, names=["sat", "lisa"]), "'lisa' has 5 records"),
    (dict(sizes=[100], rows_per_batch=16, strategy="uniform"), "no epoch end"),
    (dict(sizes=[], rows_per_batch=16), "at least one source"),
    (dict(sizes=[100, 100], rows_per_batch=[16]), "1 entries for 2 sources"),
    (dict(sizes=[100], rows_per_batch=0), ">= 1"),
    (dict(sizes=[100], rows_per_batch=4, sources_per_update=0), "sources_per_update"),
])
def test_bad_input_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        epoch_steps(**kwargs)
