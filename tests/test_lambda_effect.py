"""What RECAP's weights can change in an update (recap-method.md, "What lambda can do in
`reward` mode"): with a format reward saturated within every group, group-std normalisation
cancels that source's lambdas in `reward` mode (advantages and gradient unchanged) but not
in `loss` mode; the logged gradient cosine equals one computed from two separate updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given
from hypothesis import strategies as st

from recap_jax.grpo import GRPOConfig
from recap_jax.train_state import TrainState
from recap_jax.train_step import advantage_change, make_train_step
from tests.test_train_step import fixed_batch, init_params, logprob_fn

G = 4


def two_rewards(batch, accuracy, format_reward):
    return dict(batch, rewards=np.stack([accuracy, format_reward], 1).astype(np.float32))


def config(weighting):
    return GRPOConfig(group_size=G, reward_objective_index=((0, 1),), sft_objective_index=(-1,),
                      weighting=weighting)


def saturated(rng, groups):
    """Accuracy with variance in every group; format constant within each group."""
    accuracy = rng.random((groups, G))
    accuracy[:, 0], accuracy[:, 1] = 0.0, 1.0
    return accuracy.reshape(-1), np.repeat(rng.integers(0, 2, groups).astype(float), G)


@given(st.integers(0, 10_000), st.floats(0.2, 5.0), st.floats(0.2, 5.0))
def test_reward_mode_cancels_a_sources_lambdas_when_its_format_saturates(seed, lam_acc, lam_fmt):
    accuracy, fmt = saturated(np.random.default_rng(seed), groups=3)
    batch = {"rewards": jnp.asarray(np.stack([accuracy, fmt], 1), jnp.float32),
             "source_id": jnp.zeros((len(accuracy),), jnp.int32)}
    change = advantage_change(config("reward"), batch, jnp.asarray([lam_acc, lam_fmt]))
    assert float(change) < 2e-3  # only the 1e-4 added to the group std differs


def step_delta(cfg, batch, weights, measure=False):
    """(params after - before) of one SGD(lr 1) step (minus the gradient), and the metrics."""
    optimizer = optax.sgd(1.0)
    params = init_params(jax.random.key(1), 0.5)
    state = TrainState.create(jax.tree.map(jnp.copy, params), optimizer, jax.random.key(0))
    step = make_train_step(cfg, logprob_fn, optimizer, measure_lambda_effect=measure,
                           donate_state=False)
    new, metrics = step(state, jax.tree.map(jnp.asarray, batch), jnp.asarray(weights, jnp.float32))
    return jax.tree.map(lambda a, b: a - b, new.params, params), metrics


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_saturated_format_loss_mode_scales_the_update_reward_mode_does_not():
    accuracy, fmt = saturated(np.random.default_rng(0), groups=4)
    batch = two_rewards(fixed_batch(0, rows=4 * G), accuracy, fmt)
    for weighting, expected_ratio in (("reward", 1.0), ("loss", 3.0)):
        weighted, _ = step_delta(config(weighting), batch, [3.0, 0.5])
        unit, _ = step_delta(config(weighting), batch, [1.0, 1.0])
        ratio = np.linalg.norm(flat(weighted)) / np.linalg.norm(flat(unit))
        np.testing.assert_allclose(ratio, expected_ratio, rtol=2e-3, err_msg=weighting)


def test_logged_gradient_cosine_equals_two_separate_updates():
    """Format varying within groups: in `loss` mode lambda = (3, 0.5) turns the update; the
    logged lambda_gradient_cosine is the cosine of the two updates made separately."""
    rng = np.random.default_rng(1)
    batch = two_rewards(fixed_batch(1, rows=4 * G), rng.random(4 * G), rng.random(4 * G))
    weighted, metrics = step_delta(config("loss"), batch, [3.0, 0.5], measure=True)
    unit, _ = step_delta(config("loss"), batch, [1.0, 1.0])
    a, b = flat(weighted), flat(unit)
    expected = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    np.testing.assert_allclose(float(metrics["lambda_gradient_cosine"]), expected, rtol=1e-4)
    assert expected < 0.999  # lambda did turn the update
    assert float(metrics["advantage_change"]) == 0.0  # loss mode: lambda scales losses only
