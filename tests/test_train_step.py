"""The jitted GRPO step with a toy policy: compilation, epochs / mini-batches, skipping bad
updates, gradient clipping, old log-prob recomputation, and a learning test."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recap_jax.grpo import GRPOConfig
from recap_jax.train_state import TrainState, make_lr_schedule, make_optimizer
from recap_jax.train_step import check_batch_values, make_train_step

V, D, T, BOS = 16, 8, 3, 0  # vocabulary, hidden size, completion length, prompt token


# --------------------------------------------------------------------------- toy policy


def init_params(key, scale=0.0):
    """A one-hidden-layer next-token model; with scale 0 the policy starts uniform."""
    k1, k2 = jax.random.split(key)
    return {"embed": jax.random.normal(k1, (V, D)),
            "out": scale * jax.random.normal(k2, (D, V)), "bias": jnp.zeros((V,))}


def next_token_logits(params, prev_tokens):
    return jnp.tanh(params["embed"][prev_tokens]) @ params["out"] + params["bias"]


def logprob_fn(params, batch):
    """(log-probs, entropies) [B, T] of batch['tokens'][:, 1:] given the previous token."""
    tokens = batch["tokens"]
    logp = jax.nn.log_softmax(next_token_logits(params, tokens[:, :-1]))
    entropy = -(jnp.exp(logp) * logp).sum(-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0], entropy


@functools.partial(jax.jit, static_argnums=2)
def sample(params, key, rows):
    """Categorical sampling of T tokens after BOS; returns tokens [rows, T+1], log-probs."""
    def body(prev, key):
        logp = jax.nn.log_softmax(next_token_logits(params, prev))
        tok = jax.random.categorical(key, logp)
        return tok, (tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0])
    _, (toks, logps) = jax.lax.scan(body, jnp.full((rows,), BOS), jax.random.split(key, T))
    return jnp.concatenate([jnp.full((rows, 1), BOS), toks.T], axis=1), logps.T


def make_batch(params, key, rows, target=5):
    tokens, logps = sample(params, key, rows)
    reward = (tokens[:, 1:] == target).any(axis=1).astype(jnp.float32)
    return {"tokens": tokens, "completion_mask": jnp.ones((rows, T), bool),
            "source_id": jnp.zeros((rows,), jnp.int32), "rewards": reward[:, None],
            "old_logprobs": logps}


def fixed_batch(seed=0, rows=16, params=None):
    params = init_params(jax.random.key(1), 0.5) if params is None else params
    return jax.tree.map(np.array, make_batch(params, jax.random.key(seed), rows))


def new_state(optimizer, params=None):
    params = init_params(jax.random.key(1), 0.5) if params is None else params
    params = jax.tree.map(jnp.copy, params)  # the step donates the state
    return TrainState.create(params, optimizer, jax.random.key(7), recap_state={"w": jnp.ones(2)})


@functools.lru_cache(maxsize=None)
def cached_step(cfg, optimizer):
    return make_train_step(cfg, logprob_fn, optimizer)


def run(cfg, optimizer, batches, params=None, weights=None):
    step = cached_step(cfg, optimizer)
    state = new_state(optimizer, params)
    weights = jnp.ones(cfg.num_objectives) if weights is None else jnp.asarray(weights)
    metrics = []
    for batch in batches:
        state, m = step(state, batch, weights)
        metrics.append(m)
    return state, metrics


SGD = optax.sgd(0.5)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("committed_params", [False, True])
def test_compiles_once_across_calls(committed_params):
    """Also with params committed to a device (as loaded from a checkpoint): the state's own
    new leaves must then be committed too, or the second call compiles again."""
    traces = []

    def counting_logprob_fn(params, batch):
        traces.append(1)
        return logprob_fn(params, batch)

    cfg = GRPOConfig(group_size=4, num_iterations=2, num_minibatches=2)
    optimizer = make_optimizer(1e-2, 20)
    step = make_train_step(cfg, counting_logprob_fn, optimizer)
    params = init_params(jax.random.key(1), 0.5)
    state = new_state(optimizer, jax.device_put(params, jax.devices()[0]) if committed_params else params)
    state, _ = step(state, fixed_batch(0), jnp.ones(1))
    first = len(traces)
    for seed in range(1, 4):
        state, metrics = step(state, fixed_batch(seed), jnp.array([0.5 * seed]))
    assert len(traces) == first > 0
    if hasattr(step, "_cache_size"):
        assert step._cache_size() == 1
    assert int(state.step) == 4
    chex.assert_trees_all_equal(state.recap_state, {"w": jnp.ones(2)})


def test_two_iterations_equal_two_sequential_updates():
    batch = fixed_batch(3)
    one, m1 = run(GRPOConfig(group_size=4), SGD, [batch])
    twice, _ = run(GRPOConfig(group_size=4), SGD, [batch, batch])  # same old log-probs
    two, m2 = run(GRPOConfig(group_size=4, num_iterations=2), SGD, [batch])
    chex.assert_trees_all_close(two.params, twice.params, rtol=1e-5, atol=1e-6)
    assert not np.allclose(two.params["out"], one.params["out"])
    # epoch 1 starts at the sampler's policy (ratio 1, surrogate 0 with all tokens valid);
    # epoch 2 starts from the improved policy, so the mean surrogate over updates drops
    assert float(m1[0]["logprob_abs_diff"]) < 1e-5
    assert float(m1[0]["loss"]) == pytest.approx(0.0, abs=1e-6)
    assert float(m2[0]["loss"]) < -1e-4


def test_two_minibatches_equal_updates_on_each_half():
    batch = fixed_batch(4)
    halves = [jax.tree.map(lambda x, i=i: x[i * 8:(i + 1) * 8], batch) for i in range(2)]
    sequential, _ = run(GRPOConfig(group_size=4), SGD, halves)
    split, metrics = run(GRPOConfig(group_size=4, num_minibatches=2), SGD, [batch])
    whole, _ = run(GRPOConfig(group_size=4), SGD, [batch])
    chex.assert_trees_all_close(split.params, sequential.params, rtol=1e-5, atol=1e-6)
    assert not np.allclose(split.params["out"], whole.params["out"])
    # shuffling whole groups does not change a single full-batch token-mean update
    shuffled, _ = run(GRPOConfig(group_size=4, shuffle_minibatches=True), SGD, [batch])
    chex.assert_trees_all_close(shuffled.params, whole.params, rtol=1e-5, atol=1e-6)


def test_nan_reward_skips_the_update():
    batch = fixed_batch(5)
    batch["rewards"][2, 0] = np.nan
    optimizer = make_optimizer(1e-2, 10, warmup_fraction=0.0)
    step = make_train_step(GRPOConfig(group_size=4), logprob_fn, optimizer)
    state = new_state(optimizer)
    before = jax.tree.map(np.array, (state.params, state.opt_state))
    state, metrics = step(state, batch, jnp.ones(1))
    assert float(metrics["skipped"]) == 1.0 and int(metrics["skipped_updates"]) == 1
    chex.assert_trees_all_equal((state.params, state.opt_state), before)
    assert int(state.step) == 1
    batch["rewards"][2, 0] = 1.0
    state, metrics = step(state, batch, jnp.ones(1))
    assert float(metrics["skipped"]) == 0.0
    assert not np.allclose(state.params["out"], before[0]["out"])


def test_grad_clipping_bounds_the_update():
    max_norm, lr = 0.01, 1.0
    batch = fixed_batch(6)
    cfg = GRPOConfig(group_size=4, advantage_normalization="none")
    batch["rewards"] = batch["rewards"] * 1000.0  # huge advantages, huge gradients
    params = init_params(jax.random.key(1), 0.5)
    clipped, m = run(cfg, optax.chain(optax.clip_by_global_norm(max_norm), optax.sgd(lr)),
                     [batch], params)
    free, _ = run(cfg, optax.sgd(lr), [batch], params)
    moved = lambda s: optax.global_norm(jax.tree.map(jnp.subtract, s.params, params))  # noqa
    assert float(m[0]["grad_norm"]) > 10 * max_norm  # reported before clipping
    assert float(moved(clipped)) == pytest.approx(lr * max_norm, rel=1e-4)
    assert float(moved(free)) == pytest.approx(lr * float(m[0]["grad_norm"]), rel=1e-4)


def test_recomputed_old_logprobs_replace_a_stale_sampler():
    batch = fixed_batch(8)
    stale = dict(batch, old_logprobs=batch["old_logprobs"] + 0.1)
    cfg = GRPOConfig(group_size=4, recompute_old_logprobs=True, num_minibatches=2)
    exact, _ = run(GRPOConfig(group_size=4, num_minibatches=2), SGD, [batch])
    recomputed, m = run(cfg, SGD, [stale])
    chex.assert_trees_all_close(recomputed.params, exact.params, rtol=1e-5, atol=1e-6)
    assert float(m[0]["logprob_abs_diff"]) == pytest.approx(0.1, rel=1e-3)
    without = {k: v for k, v in batch.items() if k != "old_logprobs"}
    run(cfg, SGD, [without])  # the sampler's log-probs are optional then
    with pytest.raises(ValueError, match="'old_logprobs'.*missing"):
        run(GRPOConfig(group_size=4), SGD, [without])


def test_kl_needs_reference_logprobs_only_when_beta_positive():
    batch = fixed_batch(9)
    with pytest.raises(ValueError, match="'ref_logprobs'.*missing.*beta=0.1"):
        run(GRPOConfig(group_size=4, beta=0.1), SGD, [batch])
    ref = dict(batch, ref_logprobs=batch["old_logprobs"] - 0.2)
    _, m = run(GRPOConfig(group_size=4, beta=0.1, kl_estimator="k1"), SGD, [ref])
    assert float(m[0]["kl"]) == pytest.approx(0.2, rel=1e-4)  # k1 at the first update
    _, m = run(GRPOConfig(group_size=4), SGD, [batch])
    assert "kl" not in m[0]


def test_metrics_against_numpy():
    batch = fixed_batch(10, rows=16)
    batch["completion_mask"][3, 2:] = False
    batch["truncated"] = np.arange(16) % 5 == 0
    cfg = GRPOConfig(group_size=4, mask_truncated_completions=True)
    _, (m,) = run(cfg, SGD, [batch])
    lengths = batch["completion_mask"].sum(1)
    assert float(m["completion_length_mean"]) == pytest.approx(lengths.mean())
    assert float(m["completion_length_max"]) == lengths.max()
    assert float(m["truncated_fraction"]) == pytest.approx(batch["truncated"].mean())
    r = batch["rewards"][:, 0]
    np.testing.assert_allclose(m["objective_signal"], [r.mean()], rtol=1e-6)
    np.testing.assert_allclose(m["objective_reward_std"], [r.std()], rtol=1e-5)
    groups = r.reshape(-1, 4)
    assert float(m["zero_variance_group_fraction"]) == pytest.approx(
        (groups.max(1) == groups.min(1)).mean())
    params = init_params(jax.random.key(1), 0.5)
    _, entropy = logprob_fn(params, batch)
    keep = batch["completion_mask"] & ~batch["truncated"][:, None]
    assert float(m["entropy"]) == pytest.approx(float(entropy[keep].mean()), rel=1e-5)


@pytest.mark.parametrize("weighting", ["reward", "loss"])
def test_sft_source_signal_is_the_ntp_loss(weighting):
    """Mixed batch: an RL group and an SFT group; lambda scales the SFT loss."""
    batch = fixed_batch(11, rows=8)
    batch["source_id"] = np.array([0] * 4 + [1] * 4, np.int32)
    cfg = GRPOConfig(group_size=4, reward_objective_index=((0,), (-1,)),
                     sft_objective_index=(-1, 1), weighting=weighting)
    check_batch_values(cfg, batch)
    params = init_params(jax.random.key(1), 0.5)
    _, (m,) = run(cfg, SGD, [batch], params, weights=[0.5, 3.0])
    nll = -np.asarray(logprob_fn(params, batch)[0])[4:].mean()
    np.testing.assert_allclose(m["objective_signal"],
                               [batch["rewards"][:4, 0].mean(), nll], rtol=1e-5)
    np.testing.assert_array_equal(m["objective_present"], [True, True])
    # at ratio 1 with all tokens valid the RL surrogate is 0: the loss is the weighted NTP
    expected = 3.0 * nll if weighting == "reward" else 3.0 * nll / 2
    assert float(m["loss"]) == pytest.approx(expected, rel=1e-5)
    bad = dict(batch, source_id=np.array([0] * 3 + [1] * 5, np.int32))
    with pytest.raises(ValueError, match="group 0 .* mixes sources"):
        check_batch_values(cfg, bad)


def test_lr_schedule_by_hand():
    lr = make_lr_schedule(1.0, 10, warmup_fraction=0.2)  # 2 warm-up updates, 8 decaying
    np.testing.assert_allclose([lr(n) for n in (0, 1, 2, 6, 10, 12)],
                               [0.0, 0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-7)


def test_learning_raises_the_reward():
    """Reward: 'the completion contains token 5'. A uniform policy gets 1 - (15/16)^3."""
    target, prompts, group = 5, 16, 8
    rows = prompts * group
    cfg = GRPOConfig(group_size=group)
    steps = 20
    optimizer = make_optimizer(0.1, steps, warmup_fraction=0.05)
    step = make_train_step(cfg, logprob_fn, optimizer)
    state = TrainState.create(init_params(jax.random.key(0)), optimizer, jax.random.key(1))
    rewards = []
    for i in range(steps):
        batch = make_batch(state.params, jax.random.key(100 + i), rows, target)
        rewards.append(float(batch["rewards"].mean()))
        state, metrics = step(state, batch, jnp.ones(1))
        assert float(metrics["skipped"]) == 0.0
    assert np.mean(rewards[:3]) < 0.3
    final = make_batch(state.params, jax.random.key(999), 1024, target)
    assert float(final["rewards"].mean()) > 0.8
