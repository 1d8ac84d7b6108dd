"""Properties of recap.update: safety, normalisation, symmetry, purity, checkpointing."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recap_jax import recap

update_jit = jax.jit(recap.update, static_argnums=0)
REWEIGHTING = ("released", "paper", "dwa")


@st.composite
def scenarios(draw, variants=recap.VARIANTS, wild=False):
    """(config, signals [steps, K], present [steps, K]); `wild` draws any float32."""
    variant = draw(st.sampled_from(variants))
    k = draw(st.integers(1, 4))
    window = draw(st.integers(1, 2))
    steps = draw(st.integers(1, 4 * window + 2))
    directions = tuple(draw(st.lists(st.sampled_from(recap.DIRECTIONS), min_size=k,
                                     max_size=k)))
    if wild:
        elements = st.one_of(
            st.floats(width=32, allow_nan=True, allow_infinity=True),
            st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38, 1.0, -1.0]))
        temperature = draw(st.sampled_from([1e-30, 1e-3, 1.0, 5.0, 1e30]))
    else:
        elements = st.floats(0.0, 1.0, width=32)
        temperature = draw(st.sampled_from([0.5, 5.0]))
    signals = draw(hnp.arrays(np.float32, (steps, k), elements=elements))
    present = draw(hnp.arrays(bool, (steps, k), elements=st.booleans()))
    config = recap.RecapConfig(
        variant=variant, window=window, temperature=temperature,
        alpha=draw(st.sampled_from([0.0, 0.5, 1.0, "anneal"])), max_steps=3,
        directions=directions)
    return config, signals, present


def run(config, signals, present, update=update_jit):
    state = recap.init(config, signals.shape[1])
    weights = state.weights
    for t in range(signals.shape[0]):
        state, weights = update(config, state, signals[t], present[t])
    return state, weights


@settings(max_examples=30, deadline=None)
@given(scenarios(wild=True))
def test_weights_finite_nonnegative_and_mean_one_for_any_signal(scenario):
    config, signals, present = scenario
    state, weights = run(config, signals, present)
    for name in ("weights", "c", "i", "s"):
        assert np.all(np.isfinite(getattr(state, name))), name
    assert np.all(np.asarray(weights) >= 0)
    chex.assert_trees_all_equal(weights, state.weights)
    seen = np.asarray(state.count) > 0
    if config.variant != "static" and seen.any():
        np.testing.assert_allclose(np.mean(np.asarray(weights)[seen]), 1.0, rtol=1e-5)
    # non-finite signals of present objectives are skipped and counted
    skipped = (present & ~np.isfinite(signals)).sum(axis=0)
    np.testing.assert_array_equal(state.skipped, skipped)
    np.testing.assert_array_equal(state.count, (present & np.isfinite(signals)).sum(axis=0))


@pytest.mark.parametrize("temperature", [1e30, float("inf")])
@pytest.mark.parametrize("variant", REWEIGHTING)
def test_infinite_temperature_gives_uniform_weights(variant, temperature):
    rng = np.random.default_rng(0)
    signals = rng.uniform(0.05, 1.0, (9, 4)).astype(np.float32)
    signals[:, 2] *= 100.0  # very different scales and rates
    config = recap.RecapConfig(variant=variant, window=2, temperature=temperature)
    state, weights = run(config, signals, np.ones_like(signals, bool))
    np.testing.assert_allclose(weights, np.ones(4), atol=1e-6)
    # ... while a finite temperature does reweight the same history
    _, finite = run(recap.RecapConfig(variant=variant, window=2, temperature=0.1),
                    signals, np.ones_like(signals, bool))
    assert not np.allclose(finite, 1.0, atol=1e-3)


@settings(max_examples=15, deadline=None)
@given(scenarios(variants=REWEIGHTING), st.randoms(use_true_random=False))
def test_permuting_objectives_permutes_weights(scenario, rnd):
    config, signals, present = scenario
    k = signals.shape[1]
    perm = list(range(k))
    rnd.shuffle(perm)
    permuted_config = recap.RecapConfig(
        variant=config.variant, window=config.window, temperature=config.temperature,
        alpha=config.alpha, max_steps=config.max_steps,
        directions=tuple(config.directions[p] for p in perm))
    state, weights = run(config, signals, present)
    pstate, pweights = run(permuted_config, signals[:, perm], present[:, perm])
    np.testing.assert_allclose(pweights, np.asarray(weights)[perm], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pstate.c, np.asarray(state.c)[perm], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pstate.i, np.asarray(state.i)[perm], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", recap.VARIANTS)
def test_jit_equals_eager(variant):
    rng = np.random.default_rng(1)
    signals = rng.uniform(0.05, 1.0, (7, 3)).astype(np.float32)
    present = rng.uniform(size=(7, 3)) < 0.7
    config = recap.RecapConfig(variant=variant, window=2,
                               directions=("reward", "loss", "reward"))
    jit_state, jit_weights = run(config, signals, present)
    eager_state, eager_weights = run(config, signals, present, update=recap.update)
    np.testing.assert_allclose(jit_weights, eager_weights, rtol=1e-6)
    chex.assert_trees_all_close(jit_state, eager_state, rtol=1e-6)


def test_vmap_over_independent_states_equals_a_loop():
    config = recap.RecapConfig(window=2, directions=("reward", "loss", "reward"))
    rng = np.random.default_rng(2)
    signals = rng.uniform(0.05, 1.0, (5, 4, 3)).astype(np.float32)  # [steps, batch, K]
    present = rng.uniform(size=(5, 4, 3)) < 0.7
    batched = jax.vmap(lambda _: recap.init(config, 3))(jnp.arange(4))
    vmapped = jax.jit(jax.vmap(lambda s, x, p: recap.update(config, s, x, p)))
    for t in range(5):
        batched, batched_weights = vmapped(batched, signals[t], present[t])
    for b in range(4):
        state, weights = run(config, signals[:, b], present[:, b])
        np.testing.assert_allclose(batched_weights[b], weights, rtol=1e-6)
        chex.assert_trees_all_close(jax.tree.map(lambda x, b=b: x[b], batched), state, rtol=1e-6)


def test_inputs_are_not_mutated():
    config = recap.RecapConfig(window=2)
    state, _ = run(config, np.full((3, 2), 0.5, np.float32), np.ones((3, 2), bool))
    before = jax.tree.map(np.array, state)
    signals = np.array([0.25, np.nan], np.float32)
    present = np.array([True, True])
    signals_copy, present_copy = signals.copy(), present.copy()
    for update in (update_jit, recap.update):
        new_state, _ = update(config, state, signals, present)
        assert not np.array_equal(new_state.history, state.history)
    chex.assert_trees_all_equal(jax.tree.map(np.array, state), before)
    np.testing.assert_array_equal(signals, signals_copy)
    np.testing.assert_array_equal(present, present_copy)


def test_state_survives_orbax_round_trip_bit_for_bit(tmp_path):
    config = recap.RecapConfig(variant="paper", window=2, directions=("reward", "loss"))
    rng = np.random.default_rng(3)
    signals = rng.uniform(0.05, 1.0, (9, 2)).astype(np.float32)
    state, _ = run(config, signals, rng.uniform(size=(9, 2)) < 0.8)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "recap", state)
    checkpointer.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = checkpointer.restore(tmp_path / "recap", target)
    assert isinstance(restored, recap.RecapState)
    chex.assert_trees_all_equal(restored, state)
    chex.assert_trees_all_equal_dtypes(restored, state)
    next_signal, present = np.array([0.3, 0.7], np.float32), np.array([True, False])
    chex.assert_trees_all_equal(update_jit(config, restored, next_signal, present),
                                update_jit(config, state, next_signal, present))


@settings(max_examples=15, deadline=None)
@given(scenarios())
def test_absent_objectives_keep_their_history(scenario):
    config, signals, present = scenario
    state = recap.init(config, signals.shape[1])
    for t in range(signals.shape[0]):
        new_state, _ = update_jit(config, state, signals[t], present[t])
        absent = ~present[t]
        np.testing.assert_array_equal(np.asarray(new_state.history)[absent],
                                      np.asarray(state.history)[absent])
        np.testing.assert_array_equal(np.asarray(new_state.count)[absent],
                                      np.asarray(state.count)[absent])
        # the ordered view of a present objective gains exactly this step's signal
        ordered, filled = recap.ordered_history(new_state)
        for k in np.flatnonzero(present[t]):
            history = signals[:t + 1, k][present[:t + 1, k]][-2 * config.window:]
            np.testing.assert_array_equal(np.asarray(ordered[k])[np.asarray(filled[k])],
                                          history)
        state = new_state


def test_init_and_state_shapes():
    config = recap.RecapConfig(window=4)
    state = recap.init(config, 5)
    chex.assert_shape(state.history, (5, 8))
    chex.assert_type([state.history, state.weights, state.c, state.i, state.s], jnp.float32)
    chex.assert_type([state.count, state.skipped, state.step], jnp.int32)
    np.testing.assert_array_equal(state.weights, np.ones(5))
    state, weights = update_jit(config, state, np.zeros(5, np.float64), np.ones(5, int))
    chex.assert_type(weights, jnp.float32)
    assert int(state.step) == 1


@pytest.mark.parametrize("bad", [
    dict(signals=np.zeros(3), present=np.ones(2, bool)),
    dict(signals=np.zeros(2), present=np.ones(3, bool)),
    dict(signals=np.zeros((2, 1)), present=np.ones(2, bool)),
])
def test_update_rejects_mismatched_shapes(bad):
    config = recap.RecapConfig(window=2)
    with pytest.raises(ValueError, match=r"signals|present"):
        recap.update(config, recap.init(config, 2), **bad)


def test_update_rejects_a_state_built_for_another_window_or_size():
    state = recap.init(recap.RecapConfig(window=2), 2)
    with pytest.raises(ValueError, match="window"):
        recap.update(recap.RecapConfig(window=3), state, np.zeros(2), np.ones(2, bool))
    with pytest.raises(ValueError, match="directions"):
        recap.update(recap.RecapConfig(window=2, directions=("loss",) * 3), state,
                     np.zeros(2), np.ones(2, bool))
