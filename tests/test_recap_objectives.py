"""RecapConfig validation, and the ObjectiveSet naming and weight/statistic mappings."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recap_jax import recap

# ----------------------------------------------------------------- config validation


@pytest.mark.parametrize("kwargs, field", [
    (dict(variant="dynamic"), "variant"),
    (dict(window=0), "window"),
    (dict(window=2.5), "window"),
    (dict(window=True), "window"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(alpha=1.5), "alpha"),
    (dict(alpha=-0.1), "alpha"),
    (dict(alpha="linear"), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(alpha="anneal"), "max_steps"),
    (dict(alpha="anneal", max_steps=0), "max_steps"),
    (dict(max_steps=2.0), "max_steps"),
    (dict(eps=0.0), "eps"),
    (dict(eps=1.0), "eps"),
    (dict(directions=("reward", "gain")), "directions[1]"),
    (dict(directions="reward"), "directions"),
    (dict(directions=()), "directions"),
    (dict(reward_upper_bounds=(1.0, float("inf"))), "reward_upper_bounds[1]"),
    (dict(static_weights=(1.0, -0.5)), "static_weights[1]"),
    (dict(static_weights=(1.0, float("nan"))), "static_weights[1]"),
    (dict(directions=("reward",) * 2, static_weights=(1.0,) * 3), "directions"),
])
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=re.escape(f"RecapConfig.{field}=") + ".*allowed"):
        recap.RecapConfig(**kwargs)


def test_init_checks_per_objective_lengths():
    config = recap.RecapConfig(variant="static", static_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match=r"static_weights.*exactly 3"):
        recap.init(config, 3)
    with pytest.raises(ValueError, match="num_objectives"):
        recap.init(recap.RecapConfig(), 0)


def test_config_defaults_and_normalisation():
    assert recap.RecapConfig().temperature == 5.0
    assert recap.RecapConfig(variant="paper").temperature == 5.0
    assert recap.RecapConfig(variant="dwa").temperature == 2.0
    config = recap.RecapConfig(directions=["reward", "loss"], static_weights=[1, 2],
                               alpha=np.float64(0.25), window=np.int64(3))
    assert config.directions == ("reward", "loss") and config.static_weights == (1.0, 2.0)
    assert config.alpha == 0.25 and config.window == 3
    assert hash(config) == hash(recap.RecapConfig(
        directions=("reward", "loss"), static_weights=(1.0, 2.0), alpha=0.25, window=3))


# ----------------------------------------------------------------- objective set

SOURCES = [
    ("reasoning", "rl", ("accuracy", "format_think")),   # objectives 0, 1
    ("ocr", "sft", ()),                                  # 2
    ("grounding", "rl", ("iou", "format_answer")),       # 3, 4
    ("geo", "rl", ("accuracy",)),                        # 5
]


@pytest.fixture
def objectives():
    return recap.ObjectiveSet(SOURCES)


def test_names_kinds_directions_and_tables(objectives):
    assert objectives.names == ("reasoning/accuracy", "reasoning/format_think", "ocr/ntp",
                                "grounding/iou", "grounding/format_answer", "geo/accuracy")
    assert objectives.directions == ("reward", "reward", "loss", "reward", "reward", "reward")
    assert objectives.num_objectives == 6 and objectives.max_rewards_per_source == 2
    np.testing.assert_array_equal(objectives.reward_objective_index,
                                  [[0, 1], [-1, -1], [3, 4], [5, -1]])
    np.testing.assert_array_equal(objectives.sft_objective_index, [-1, 2, -1, -1])
    assert objectives.objective_index("grounding/iou") == 3
    assert objectives.source_id("geo") == 3
    config = objectives.recap_config(variant="paper", window=4)
    assert config.directions == objectives.directions and config.window == 4


def test_sample_weights_hand_worked(objectives):
    weights = jnp.array([0.5, 1.5, 2.0, 0.25, 0.75, 3.0])
    source_ids = jnp.array([0, 1, 2, 3, -1, 7])  # -1 and 7: padding / out of range
    out = jax.jit(objectives.sample_weights)(weights, source_ids)
    np.testing.assert_array_equal(out.reward, [[0.5, 1.5], [0, 0], [0.25, 0.75], [3.0, 0],
                                               [0, 0], [0, 0]])
    np.testing.assert_array_equal(out.reward_mask, [[1, 1], [0, 0], [1, 1], [1, 0], [0, 0],
                                                    [0, 0]])
    np.testing.assert_array_equal(out.sft, [0, 2.0, 0, 0, 0, 0])


def test_objective_means_hand_worked(objectives):
    source_ids = jnp.array([0, 0, 2, 3, 1, 1, -1])
    nan = float("nan")
    rewards = jnp.array([[1, 0], [0, 1], [0.5, 1], [0.2, nan], [9, 9], [9, 9], [nan, 7]])
    ntp = jnp.array([9, 9, 9, 9, 2.0, 3.0, nan])
    means, present = jax.jit(objectives.objective_means)(source_ids, rewards, ntp)
    np.testing.assert_allclose(means, [0.5, 0.5, 2.5, 0.5, 1.0, 0.2])
    assert present.all()
    # sample weights: (1*1 + 3*0) / 4 = 0.25, (1*0 + 3*1) / 4 = 0.75; ocr keeps only 2.0
    # (the masked sample's loss is nan and must not leak into the mean)
    ntp = ntp.at[5].set(nan)
    means, present = objectives.objective_means(
        source_ids, rewards, ntp, sample_weight=jnp.array([1, 3, 1, 1, 1, 0, 1]))
    np.testing.assert_allclose(means, [0.25, 0.75, 2.0, 0.5, 1.0, 0.2])
    # a batch without geo and ocr samples: those objectives are absent
    means, present = objectives.objective_means(jnp.array([0, 2]),
                                                jnp.array([[1.0, 0.0], [0.4, 1.0]]))
    np.testing.assert_array_equal(present, [1, 1, 0, 1, 1, 0])
    np.testing.assert_allclose(means, [1.0, 0.0, 0.0, 0.4, 1.0, 0.0])


def test_means_feed_update_and_weights_map_back(objectives):
    """End to end: per-sample rewards -> signals -> update -> per-sample reward weights."""
    config = objectives.recap_config(window=1, temperature=1.0)
    state = recap.init(config, objectives.num_objectives)

    @jax.jit
    def step(state, source_ids, rewards, ntp):
        signals, present = objectives.objective_means(source_ids, rewards, ntp)
        state, weights = recap.update(config, state, signals, present)
        return state, objectives.sample_weights(weights, source_ids)

    ids = jnp.array([0, 1])
    state, _ = step(state, ids, jnp.array([[0.8, 1.0], [0, 0]]), jnp.array([0.0, 2.0]))
    state, out = step(state, ids, jnp.array([[0.4, 1.0], [0, 0]]), jnp.array([0.0, 2.0]))
    # accuracy halved (c = 2), format_think steady (c = 1), ocr loss steady (c = 1):
    # the falling accuracy gets the largest weight, and it lands on sample 0's column 0.
    weights = np.asarray(state.weights)
    assert weights[0] > weights[1] and weights[0] > weights[2]
    np.testing.assert_allclose(out.reward[0], weights[[0, 1]])
    np.testing.assert_allclose(out.sft, [0.0, weights[2]])
    np.testing.assert_array_equal(state.count, [2, 2, 2, 0, 0, 0])
    metrics = objectives.metrics(state)
    assert float(metrics["recap/weight/reasoning/accuracy"]) == weights[0]
    assert float(metrics["recap/c/reasoning/accuracy"]) == pytest.approx(2.0)


@pytest.mark.parametrize("sources, message", [
    ([], "empty"),
    ([("a", "rl", ())], r"sources\[0\].*rl source needs"),
    ([("a", "sft", ("x",))], r"sources\[0\].*sft source has no rewards"),
    ([("a", "supervised", ())], r"kind='supervised'"),
    ([("a/b", "sft", ())], "without '/'"),
    ([("a", "rl", ("x", "x"))], "duplicates"),
    ([("a", "rl", "xy")], "sequence of names"),
    ([("a", "sft", ()), ("a", "rl", ("x",))], "duplicate source names"),
])
def test_objective_set_validation(sources, message):
    with pytest.raises(ValueError, match=message):
        recap.ObjectiveSet(sources)


def test_mapping_shape_errors(objectives):
    with pytest.raises(ValueError, match=r"weights has shape \(5,\)"):
        objectives.sample_weights(jnp.ones(5), jnp.array([0]))
    with pytest.raises(ValueError, match="source_ids"):
        objectives.sample_weights(jnp.ones(6), jnp.array([0.0]))
    with pytest.raises(ValueError, match="reward_values"):
        objectives.objective_means(jnp.array([0]), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="unknown objective 'ocr/iou'"):
        objectives.objective_index("ocr/iou")
