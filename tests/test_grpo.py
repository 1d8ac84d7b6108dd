"""GRPO pieces against hand-worked numbers and an independent numpy (loop) reference."""

import functools
import itertools
import math
import re

import chex
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given

from recap_jax import grpo
from recap_jax.grpo import GRPOConfig
from recap_jax.train_step import make_train_step
from tests.test_train_step import fixed_batch, init_params, logprob_fn, new_state

# --------------------------------------------------------------------------- numpy reference


def np_advantages(values, rows, group_size, normalization, eps=1e-4):
    """{row: A} for the given rows, by loops; groups are rows // G."""
    out = {}
    groups = {}
    for b in rows:
        groups.setdefault(b // group_size, []).append(b)
    all_values = [values[b] for b in rows]
    batch_mean = sum(all_values) / len(all_values)
    batch_std = math.sqrt(sum((v - batch_mean) ** 2 for v in all_values)
                          / max(len(all_values) - 1, 1)) if len(all_values) > 1 else 0.0
    for members in groups.values():
        vals = [values[b] for b in members]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) \
            if len(vals) > 1 else 0.0
        for b in members:
            if normalization == "group":
                out[b] = (values[b] - mean) / (std + eps)
            elif normalization == "batch":
                out[b] = (values[b] - mean) / (batch_std + eps)
            else:
                out[b] = values[b] - mean
    return out


def np_surrogate(lp, old, a, eps_low, eps_high, c):
    ratio = math.exp(lp - old)
    loss = max(-a * ratio, -a * min(max(ratio, 1 - eps_low), 1 + eps_high))
    if c is not None and a < 0:
        loss = min(loss, -a * c)
    return loss


def np_kl(lp, ref, estimator):
    log_r = ref - lp
    return {"k1": -log_r, "k2": 0.5 * log_r ** 2, "k3": math.exp(log_r) - 1 - log_r}[estimator]


def np_aggregate(rows, token_loss, mask, mode, max_len):
    """token_loss(b, t) aggregated over `rows` with mask [B][T]; 0 if nothing to average."""
    if mode == "token-mean":
        terms = [token_loss(b, t) for b in rows for t in range(len(mask[b])) if mask[b][t]]
        return sum(terms) / len(terms) if terms else 0.0
    seqs = []
    for b in rows:
        ts = [t for t in range(len(mask[b])) if mask[b][t]]
        if ts:
            total = sum(token_loss(b, t) for t in ts)
            seqs.append(total / (len(ts) if mode == "seq-mean-token-mean" else max_len))
    return sum(seqs) / len(seqs) if seqs else 0.0


def np_loss(cfg, weights, d):
    """The whole weighted loss, by loops over rows, objectives and tokens."""
    rtab, stab = cfg.reward_objective_index, cfg.sft_objective_index
    k_total, (b_total, t_total) = cfg.num_objectives, d["mask"].shape
    max_len = cfg.max_completion_length or t_total
    src = d["source_id"]
    real = [b for b in range(b_total) if 0 <= src[b] < len(stab)]
    rl_rows = [b for b in real if stab[src[b]] < 0]
    agg = functools.partial(np_aggregate, mask=d["mask"], mode=cfg.loss_aggregation,
                            max_len=max_len)
    surrogate = lambda adv: (lambda b, t: np_surrogate(  # noqa: E731
        d["logp"][b, t], d["old"][b, t], adv[b], cfg.epsilon_low, cfg.epsilon_high,
        cfg.dual_clip_c))
    ntp = {}
    for s, k in enumerate(stab):
        if k >= 0:
            rows = [b for b in real if src[b] == s]
            ntp[k] = np_aggregate(rows, lambda b, t: -d["logp"][b, t], d["mask"],
                                  "token-mean", None)
    if cfg.weighting == "reward":
        total_r = {b: sum(weights[k] * d["rewards"][b, f] for f, k in enumerate(rtab[src[b]])
                          if k >= 0) for b in rl_rows}
        adv = np_advantages(total_r, rl_rows, cfg.group_size, cfg.advantage_normalization)
        loss = agg(rl_rows, surrogate(adv)) + sum(weights[k] * v for k, v in ntp.items())
    else:
        per_objective = dict(ntp)
        for s, row in enumerate(rtab):
            for f, k in enumerate(row):
                if k >= 0:
                    rows = [b for b in real if src[b] == s]
                    adv = np_advantages({b: d["rewards"][b, f] for b in rows}, rows,
                                        cfg.group_size, cfg.advantage_normalization) \
                        if rows else {}
                    per_objective[k] = agg(rows, surrogate(adv))
        loss = sum(weights[k] * per_objective[k] for k in range(k_total)) / k_total
    if cfg.beta > 0:
        loss += cfg.beta * agg(rl_rows, lambda b, t: np_kl(d["logp"][b, t], d["ref"][b, t],
                                                          cfg.kl_estimator))
    return loss


def jax_loss(cfg, weights, d):
    batch = {"rewards": d["rewards"], "source_id": d["source_id"]}
    adv, _ = grpo.rollout_advantages(cfg, batch, jnp.asarray(weights, jnp.float32))
    loss, _ = grpo.policy_loss(cfg, jnp.asarray(weights, jnp.float32), d["logp"], d["old"],
                               adv, d["mask"], d["source_id"], d.get("ref"))
    return loss


# Mixed layout: source 0 RL (2 rewards: k0, k1), source 1 SFT (k2), source 2 RL (1 reward: k3).
MIXED = dict(reward_objective_index=((0, 1), (-1, -1), (3, -1)), sft_objective_index=(-1, 2, -1))


def mixed_data(seed, g=3):
    rng = np.random.default_rng(seed)
    source_id = np.repeat(np.array([0, 1, 2, 0, -1], np.int32), g)  # last group: padding
    b, t = source_id.size, 5
    mask = rng.random((b, t)) < 0.7
    mask[0] = [1, 1, 1, 1, 1]
    mask[1] = 0  # an empty completion
    logp = np.log(rng.uniform(0.05, 0.95, (b, t))).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (b, t))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, (b, t))).astype(np.float32)
    rewards = rng.integers(0, 2, (b, 2)).astype(np.float32)
    rewards[3 * g:4 * g, 0] = 0.25  # a zero-variance group for the first component
    rewards[source_id == -1] = np.nan  # padding rows: ignored whatever they hold
    rewards[source_id == 2, 1] = np.nan  # a column source 2 lacks
    return dict(source_id=source_id, mask=mask, logp=logp, old=old, ref=ref, rewards=rewards)


# --------------------------------------------------------------------------- hand-worked values


def test_group_advantages_by_hand():
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # group 1: mean 0.5, unbiased std sqrt(1/3)
    np.testing.assert_allclose(grpo.group_advantages(r, 4, "group"),
                               [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(grpo.group_advantages(r, 4, "none"),
                               [.5, -.5, -.5, .5, 0, 0, 0, 0], rtol=1e-6)
    a = 0.5 / (math.sqrt(1 / 7) + 1e-4)  # batch: mean 0.5, sum of squares 1, 7 dof
    np.testing.assert_allclose(grpo.group_advantages(r, 4, "batch"),
                               [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(grpo.zero_variance_groups(r, 4), [False, True])


def test_clipped_surrogate_by_hand():
    ratio = jnp.array([1.5, 0.5, 0.5, 1.5, 4.0, 1.0, 2.0])
    adv = jnp.array([1.0, 1.0, -1.0, -1.0, -1.0, 2.0, 0.0])
    lp = jnp.log(ratio) - 1.0
    loss, clip = grpo.clipped_surrogate(lp, jnp.full(7, -1.0), adv, 0.2, 0.3, dual_clip_c=3.0)
    np.testing.assert_allclose(loss, [-1.3, -0.5, 0.8, 1.5, 3.0, -2.0, 0.0], rtol=1e-5)
    np.testing.assert_array_equal(clip.high, [1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(clip.low, [0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(clip.dual, [0, 0, 0, 0, 1, 0, 0])
    loss, clip = grpo.clipped_surrogate(lp, jnp.full(7, -1.0), adv, 0.2, 0.3)
    np.testing.assert_allclose(loss[4], 4.0, rtol=1e-5)
    assert not clip.dual.any()


def test_aggregation_modes_by_hand():
    loss = jnp.array([[1.0, 2, 3], [4, 5, 6], [100, 100, 100]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the last row has no tokens
    assert grpo.aggregate_loss(loss, mask, "token-mean") == pytest.approx(7 / 3)
    assert grpo.aggregate_loss(loss, mask, "seq-mean-token-mean") == pytest.approx(2.75)
    assert grpo.aggregate_loss(loss, mask, "seq-mean-token-sum-norm") == pytest.approx(7 / 6)
    assert grpo.aggregate_loss(loss, mask, "seq-mean-token-sum-norm",
                               max_completion_length=10) == pytest.approx(0.35)
    assert grpo.sft_loss(-loss, mask) == pytest.approx(7 / 3)
    assert grpo.aggregate_loss(loss, jnp.zeros_like(mask), "token-mean") == 0.0


def test_kl_estimators_by_hand():
    lp, ref = jnp.log(jnp.array([0.5, 0.2])), jnp.log(jnp.array([0.25, 0.4]))
    ln2 = math.log(2)
    np.testing.assert_allclose(grpo.kl_divergence(lp, ref, "k1"), [ln2, -ln2], rtol=1e-5)
    np.testing.assert_allclose(grpo.kl_divergence(lp, ref, "k2"), [ln2 ** 2 / 2] * 2, rtol=1e-5)
    np.testing.assert_allclose(grpo.kl_divergence(lp, ref, "k3"), [ln2 - 0.5, 1 - ln2],
                               rtol=1e-5)
    # gradient of k3 wrt log p is 1 - r (Schulman); the reference gets none.
    grad = jax.grad(lambda x: grpo.kl_divergence(x, ref, "k3").sum())(lp)
    np.testing.assert_allclose(grad, [0.5, -1.0], rtol=1e-5)


def test_reward_mode_by_hand():
    """One source, two rewards, G = 2: R = 2 * r0 + 0.5 * r1."""
    cfg = GRPOConfig(group_size=2, advantage_normalization="none",
                     reward_objective_index=((0, 1),), sft_objective_index=(-1,))
    rewards = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    r = grpo.weighted_rewards(cfg, rewards, jnp.zeros(2, jnp.int32), jnp.array([2.0, 0.5]))
    np.testing.assert_allclose(r, [2.0, 0.5])
    adv, stats = grpo.rollout_advantages(cfg, {"rewards": rewards,
                                               "source_id": jnp.zeros(2, jnp.int32)},
                                         jnp.array([2.0, 0.5]))
    np.testing.assert_allclose(adv[:, 0], [0.75, -0.75])
    np.testing.assert_allclose(stats["objective_reward_mean"], [0.5, 0.5])
    np.testing.assert_allclose(stats["objective_reward_std"], [0.5, 0.5])
    # loss mode at ratio 1, one token each: L_k = -mean_b A_bk; A_0 = (.5, -.5), A_1 = (-.5, .5)
    cfg = GRPOConfig(**{**cfg.__dict__, "weighting": "loss"})
    adv, _ = grpo.rollout_advantages(cfg, {"rewards": rewards,
                                           "source_id": jnp.zeros(2, jnp.int32)},
                                     jnp.ones(2))
    lp = jnp.array([[-1.0], [-2.0]])
    w = jnp.array([2.0, 0.5])
    loss, aux = grpo.policy_loss(cfg, w, lp, lp, adv, jnp.ones((2, 1)), jnp.zeros(2, jnp.int32))
    np.testing.assert_allclose(aux["objective_loss"], [0.0, 0.0], atol=1e-7)
    grads = jax.grad(lambda x: grpo.policy_loss(cfg, w, x, lp, adv, jnp.ones((2, 1)),
                                                jnp.zeros(2, jnp.int32))[0])(lp)
    # d/dlp_b of (1/2)(2 * -(A_0b lp_b)/2 + 0.5 * -(A_1b lp_b)/2) at ratio 1
    np.testing.assert_allclose(grads[:, 0], [-(2 * .5 + .5 * -.5) / 4, -(2 * -.5 + .5 * .5) / 4],
                               rtol=1e-6)


# --------------------------------------------------------------------------- numpy reference


CASES = list(itertools.product(grpo.WEIGHTINGS, grpo.ADVANTAGE_NORMALIZATIONS,
                               grpo.LOSS_AGGREGATIONS))


@pytest.mark.parametrize("weighting,normalization,aggregation", CASES)
def test_loss_matches_numpy_reference(weighting, normalization, aggregation):
    cfg = GRPOConfig(group_size=3, weighting=weighting, advantage_normalization=normalization,
                     loss_aggregation=aggregation, epsilon_low=0.1, epsilon_high=0.25,
                     **MIXED)
    d = mixed_data(0)
    weights = [0.5, 1.5, 2.0, 0.7]
    expected = np_loss(cfg, weights, d)
    assert jax_loss(cfg, weights, d) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("estimator", grpo.KL_ESTIMATORS)
@pytest.mark.parametrize("weighting", grpo.WEIGHTINGS)
def test_kl_dual_clip_and_max_length_match_numpy_reference(estimator, weighting):
    cfg = GRPOConfig(group_size=3, weighting=weighting, beta=0.3, kl_estimator=estimator,
                     dual_clip_c=1.5, loss_aggregation="seq-mean-token-sum-norm",
                     max_completion_length=8, **MIXED)
    d = mixed_data(1)
    d["old"] = d["logp"] - np.abs(d["old"] - d["logp"]) * 3  # ratios well above c
    weights = [1.0, 0.3, 1.2, 2.0]
    assert jax_loss(cfg, weights, d) == pytest.approx(np_loss(cfg, weights, d), rel=1e-5)


def test_objective_statistics_and_padding():
    cfg = GRPOConfig(group_size=3, **MIXED)
    d = mixed_data(2)
    _, stats = grpo.rollout_advantages(cfg, {"rewards": d["rewards"],
                                             "source_id": d["source_id"]}, jnp.ones(4))
    src, r = d["source_id"], d["rewards"]
    np.testing.assert_allclose(stats["objective_reward_mean"],
                               [r[src == 0, 0].mean(), r[src == 0, 1].mean(), 0,
                                r[src == 2, 0].mean()], rtol=1e-6)
    np.testing.assert_allclose(stats["objective_reward_std"],
                               [r[src == 0, 0].std(), r[src == 0, 1].std(), 0,
                                r[src == 2, 0].std()], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(stats["objective_reward_present"], [1, 1, 0, 1])
    zero = lambda x: float(x.max() == x.min())  # noqa: E731
    groups0 = [r[0:3, 0], r[9:12, 0]]  # source 0's two groups
    assert stats["objective_zero_variance_fraction"][0] == pytest.approx(
        np.mean([zero(x) for x in groups0]))
    # padding rows (nan rewards, any log-probs) change nothing
    d2 = dict(d, logp=d["logp"].copy())
    d2["logp"][src == -1] = np.nan
    assert np.isfinite(jax_loss(cfg, [1.0] * 4, d2))
    assert jax_loss(cfg, [1.0] * 4, d2) == pytest.approx(jax_loss(cfg, [1.0] * 4, d))


def test_truncated_rows_contribute_nothing():
    cfg = GRPOConfig(group_size=2, mask_truncated_completions=True)
    batch = {"completion_mask": np.ones((4, 3), bool), "truncated": np.array([0, 1, 0, 0])}
    np.testing.assert_array_equal(grpo.completion_loss_mask(cfg, batch)[:, 0], [1, 0, 1, 1])
    cfg = GRPOConfig(group_size=2)
    np.testing.assert_array_equal(grpo.completion_loss_mask(cfg, batch)[:, 0], [1, 1, 1, 1])


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("field,value,allowed", [
    ("loss_aggregation", "sum", "token-mean"), ("kl_estimator", "k4", "k3"),
    ("weighting", "both", "reward | loss"), ("advantage_normalization", "std", "group"),
    ("group_size", 0, "int >= 1"), ("dual_clip_c", 0.9, "> 1"), ("beta", -1.0, ">= 0"),
    ("epsilon_low", 1.0, "[0, 1)"), ("num_minibatches", 1.5, "int >= 1"),
    ("sft_objective_index", (-1, -1), "one int per source"),
    ("importance_ratio", "seq", "token | sequence"), ("entropy_coef", -0.1, ">= 0"),
    ("overlong_buffer", -1, "int >= 0"), ("overlong_penalty", float("nan"), ">= 0"),
    ("tis_cap", 0.0, "> 0"),
])
def test_config_errors_name_field_and_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"GRPOConfig\.{field}.*allowed:.*{re.escape(allowed)}"):
        GRPOConfig(**{field: value})


def test_objective_tables_are_validated():
    with pytest.raises(ValueError, match="exactly once"):
        GRPOConfig(reward_objective_index=((0, 2),), sft_objective_index=(-1,))
    with pytest.raises(ValueError, match=r"reward_objective_index\[1\].*not both"):
        GRPOConfig(reward_objective_index=((0,), (1,)), sft_objective_index=(-1, 2))
    cfg = GRPOConfig(**MIXED)
    assert (cfg.num_objectives, cfg.num_sources, cfg.num_reward_columns) == (4, 3, 2)
    np.testing.assert_array_equal(cfg.objective_is_sft, [0, 0, 1, 0])


def test_config_from_objective_set_like():
    class Objectives:  # the attributes recap.ObjectiveSet provides
        reward_objective_index = np.array([[0, 1], [-1, -1]])
        sft_objective_index = np.array([-1, 2])
    cfg = GRPOConfig.for_objectives(Objectives(), group_size=2, weighting="loss")
    assert cfg.reward_objective_index == ((0, 1), (-1, -1))
    assert cfg.num_objectives == 3 and cfg.group_size == 2
    hash(cfg)


# --------------------------------------------------------------------------- properties

B, T, G = 8, 4, 4
def floats(low, high):
    """float32 values in [low, high] (bounds rounded to float32)."""
    return st.floats(float(np.float32(low)), float(np.float32(high)), allow_nan=False,
                     allow_infinity=False, width=32)


@st.composite
def rollouts(draw, reward_values=floats(0, 1)):
    rewards = draw(hnp.arrays(np.float32, (B,), elements=reward_values))
    logp = draw(hnp.arrays(np.float32, (B, T), elements=floats(-4, -0.01)))
    shift = draw(hnp.arrays(np.float32, (B, T), elements=floats(-0.5, 0.5)))
    mask = draw(hnp.arrays(np.bool_, (B, T)))
    return rewards, logp, logp + shift, mask


def np_plain_grpo(rewards, logp, old, mask, eps=0.2):
    """Textbook GRPO: group-standardised advantages, clipped surrogate, token mean."""
    grouped = rewards.astype(np.float64).reshape(-1, G)
    adv = ((grouped - grouped.mean(1, keepdims=True))
           / (grouped.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1, 1)
    ratio = np.exp(logp.astype(np.float64) - old)
    per_token = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
    return (per_token * mask).sum() / max(mask.sum(), 1)


@functools.lru_cache(maxsize=None)
def jitted_loss(cfg):
    def loss(weights, rewards, logp, old, mask, source_id):
        batch = {"rewards": rewards, "source_id": source_id}
        adv, _ = grpo.rollout_advantages(cfg, batch, weights)
        return grpo.policy_loss(cfg, weights, logp, old, adv, mask, source_id)[0]
    return jax.jit(loss)


ZERO_IDS = np.zeros(B, np.int32)


@given(rollouts())
def test_all_weights_one_single_reward_is_plain_grpo(data):
    rewards, logp, old, mask = data
    for weighting in grpo.WEIGHTINGS:
        got = jitted_loss(GRPOConfig(group_size=G, weighting=weighting))(
            jnp.ones(1), rewards[:, None], logp, old, mask, ZERO_IDS)
        np.testing.assert_allclose(got, np_plain_grpo(rewards, logp, old, mask),
                                   rtol=2e-4, atol=2e-5)


@given(rollouts(), st.sampled_from(list(itertools.product(grpo.WEIGHTINGS,
                                                          grpo.ADVANTAGE_NORMALIZATIONS))))
def test_equal_rewards_in_a_group_give_zero_policy_gradient(data, modes):
    _, logp, old, mask = data
    rewards = np.repeat(np.array([0.3, 1.0], np.float32), G)
    cfg = GRPOConfig(group_size=G, weighting=modes[0], advantage_normalization=modes[1])
    grad = jax.grad(jitted_loss(cfg), argnums=2)(jnp.ones(1), rewards[:, None], logp, old,
                                                 mask, ZERO_IDS)
    chex.assert_trees_all_close(grad, jnp.zeros_like(grad), atol=1e-7)


@given(hnp.arrays(np.float32, (B,), elements=floats(0, 1)), floats(0.2, 20), floats(-5, 5),
       st.sampled_from(["group", "batch"]))
def test_standardised_advantages_ignore_affine_reward_scaling(rewards, scale, offset, mode):
    grouped = rewards.reshape(-1, G)
    spread = grouped.std(1, ddof=1)
    # keep groups either clearly spread or exactly equal, so the 1e-4 is negligible
    rewards = np.where((spread[:, None] > 0.05) | (spread[:, None] == 0), grouped,
                       grouped[:, :1]).reshape(-1)
    base = grpo.group_advantages(jnp.asarray(rewards), G, mode)
    scaled = grpo.group_advantages(jnp.asarray(rewards * scale + offset), G, mode)
    np.testing.assert_allclose(scaled, base, rtol=5e-3, atol=5e-3)


@given(hnp.arrays(np.float32, (B, T), elements=floats(-4, -0.01)),
       hnp.arrays(np.float32, (B, 1), elements=floats(-3, 3)), floats(0, 0.5), floats(0, 0.5),
       st.one_of(st.none(), floats(1.1, 5)))
def test_at_ratio_one_clipped_equals_unclipped(logp, adv, eps_low, eps_high, c):
    def clipped(x):
        return grpo.clipped_surrogate(x, logp, adv, eps_low, eps_high, c)[0].sum()
    unclipped = lambda x: (-adv * jnp.exp(x - logp)).sum()  # noqa: E731
    np.testing.assert_allclose(clipped(logp), unclipped(logp), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.grad(clipped)(logp), jax.grad(unclipped)(logp),
                               rtol=1e-6, atol=1e-6)


@given(rollouts(), floats(0.1, 5), st.sampled_from(grpo.ADVANTAGE_NORMALIZATIONS))
def test_reward_and_loss_modes_agree_for_one_objective(data, weight, normalization):
    rewards, logp, old, mask = data
    args = (rewards[:, None], logp, old, mask, ZERO_IDS)
    # lambda = 1: identical for every normalisation; any lambda: linear "none" only
    for w in ([1.0, weight] if normalization == "none" else [1.0]):
        losses = [jitted_loss(GRPOConfig(group_size=G, weighting=m,
                                         advantage_normalization=normalization))(
            jnp.array([w]), *args) for m in grpo.WEIGHTINGS]
        np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    # one SFT objective: lambda NTP in both modes
    sft = dict(reward_objective_index=((-1,),), sft_objective_index=(0,), group_size=G)
    losses = [jitted_loss(GRPOConfig(weighting=m, **sft))(jnp.array([weight]), *args)
              for m in grpo.WEIGHTINGS]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    np.testing.assert_allclose(losses[0], weight * -(logp * mask).sum() / max(mask.sum(), 1),
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- GRPO variants


def test_variant_config_errors():
    with pytest.raises(ValueError, match=r"GRPOConfig\.tis_cap.*recompute_old_logprobs=True"):
        GRPOConfig(tis_cap=2.0)
    GRPOConfig(tis_cap=2.0, recompute_old_logprobs=True)
    with pytest.raises(ValueError, match=r"GRPOConfig\.overlong_buffer.*max_completion_length=8"):
        GRPOConfig(overlong_buffer=8, max_completion_length=8)
    defaults = GRPOConfig()  # every variant is off by default
    assert (defaults.importance_ratio, defaults.entropy_coef, defaults.overlong_buffer,
            defaults.tis_cap) == ("token", 0.0, 0, None)


def test_overlong_penalty_by_hand():
    """L_max = 10, L_cache = 4: free up to 6 tokens, then -1/4 per token, -1 from 10 on."""
    lengths = jnp.array([3, 6, 7, 8, 10, 12])
    np.testing.assert_allclose(grpo.overlong_reward_penalty(lengths, 10, 4, 0.5),
                               [0, 0, -0.125, -0.25, -0.5, -0.5], rtol=1e-6)
    np.testing.assert_array_equal(grpo.overlong_reward_penalty(lengths, 10, 0), np.zeros(6))


def test_overlong_penalty_shapes_advantages_not_recap_signals():
    """G = 2, T = L_max = 4, L_cache = 2: lengths 2 and 4 get penalties 0 and -1."""
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
    batch = {"rewards": jnp.array([[1.0], [1.0]]), "source_id": jnp.zeros(2, jnp.int32),
             "completion_mask": mask}
    cfg = GRPOConfig(group_size=2, advantage_normalization="none", overlong_buffer=2)
    adv, stats = grpo.rollout_advantages(cfg, batch, jnp.ones(1))
    np.testing.assert_allclose(adv[:, 0], [0.5, -0.5])  # R + p = (1, 0)
    np.testing.assert_allclose(stats["objective_reward_mean"], [1.0])  # RECAP's signal: raw
    assert float(stats["overlong_penalty_mean"]) == pytest.approx(-0.5)
    assert float(stats["zero_variance_group_fraction"]) == 0.0
    off = GRPOConfig(group_size=2, advantage_normalization="none")
    adv_off, stats_off = grpo.rollout_advantages(off, batch, jnp.ones(1))
    np.testing.assert_array_equal(adv_off, np.zeros((2, 1)))
    assert "overlong_penalty_mean" not in stats_off
    # reward mode: the penalty is not scaled by lambda (lambda = 3 scales the raw reward only)
    batch3 = dict(batch, rewards=jnp.array([[1.0], [0.5]]))
    adv, _ = grpo.rollout_advantages(cfg, batch3, jnp.array([3.0]))
    np.testing.assert_allclose(adv[:, 0], [1.25, -1.25])  # R + p = (3, 0.5)
    # loss mode: each reward component of the row carries the penalty; statistics stay raw
    cfg = GRPOConfig(group_size=2, advantage_normalization="none", overlong_buffer=2,
                     weighting="loss", reward_objective_index=((0, 1),), sft_objective_index=(-1,))
    batch2 = dict(batch, rewards=jnp.array([[1.0, 0.0], [1.0, 1.0]]))
    adv, stats = grpo.rollout_advantages(cfg, batch2, jnp.ones(2))
    np.testing.assert_allclose(adv, [[0.5, 0.0], [-0.5, 0.0]])  # shaped (1, 0), (0, 0)
    np.testing.assert_allclose(stats["objective_reward_mean"], [1.0, 0.5])
    with pytest.raises(ValueError, match="completion_mask.*overlong_buffer=2"):
        grpo.rollout_advantages(cfg, {"rewards": batch2["rewards"],
                                      "source_id": batch2["source_id"]}, jnp.ones(2))


def test_gspo_sequence_ratio_by_hand():
    """Row 0: log ratios (ln 4, 0) -> s = 2, A = +1; row 1: (ln .5, ln .5) -> s = 0.5, A = -1.
    The third token is masked (its huge log ratio must not enter s). With the clip range
    [0.4, 3] nothing clips: per-token losses are -A s, and with seq-mean-token-mean the loss
    is (1/2)(-2 + 0.5) and d/d log pi_{i,t} = -A_i s_i / (2 |y_i|) (GSPO's grad of s_i)."""
    cfg = GRPOConfig(group_size=1, importance_ratio="sequence", epsilon_low=0.6,
                     epsilon_high=2.0, loss_aggregation="seq-mean-token-mean")
    old = jnp.log(jnp.array([[0.1, 0.3, 0.01], [0.4, 0.2, 0.5]]))
    lp = old + jnp.log(jnp.array([[4.0, 1.0, 50.0], [0.5, 0.5, 1.0]]))
    mask = jnp.array([[1, 1, 0], [1, 1, 0]])
    adv = jnp.array([[1.0], [-1.0]])
    np.testing.assert_allclose(jnp.exp(grpo.sequence_log_ratio(lp, old, mask)), [2.0, 0.5],
                               rtol=1e-6)

    def loss(x, config=cfg):
        return grpo.policy_loss(config, jnp.ones(1), x, old, adv, mask,
                                jnp.zeros(2, jnp.int32))[0]

    assert float(loss(lp)) == pytest.approx(-0.75, rel=1e-6)
    np.testing.assert_allclose(jax.grad(loss)(lp), [[-0.5, -0.5, 0], [0.125, 0.125, 0]],
                               rtol=1e-6)
    # the token ratio differs: row 0 tokens give -4 and -1
    token = GRPOConfig(**{**cfg.__dict__, "importance_ratio": "token", "epsilon_high": 5.0})
    assert float(loss(lp, token)) == pytest.approx((-2.5 + 0.5) / 2, rel=1e-6)
    # GSPO clips the whole sequence: with epsilon_high = 0.2 row 0 (s = 2) has no gradient
    clipped = GRPOConfig(**{**cfg.__dict__, "epsilon_high": 0.2})
    np.testing.assert_allclose(jax.grad(lambda x: loss(x, clipped))(lp)[0], [0, 0, 0])


def test_truncated_importance_sampling_by_hand():
    """pi_old,trainer / pi_sampler = (3, 0.5, 1), C = 2 -> w = (2, 0.5, 1); A = 1 at ratio 1:
    token losses -w, token-mean -3.5 / 3, gradients -w / 3."""
    cfg = GRPOConfig(group_size=1, tis_cap=2.0, recompute_old_logprobs=True)
    old = jnp.log(jnp.array([[0.3, 0.1, 0.2]]))
    sampler = old - jnp.log(jnp.array([[3.0, 0.5, 1.0]]))
    mask, src, adv = jnp.ones((1, 3)), jnp.zeros(1, jnp.int32), jnp.ones((1, 1))
    np.testing.assert_allclose(grpo.tis_weights(old, sampler, 2.0, mask), [[2, 0.5, 1]],
                               rtol=1e-6)

    def loss(x):
        return grpo.policy_loss(cfg, jnp.ones(1), x, old, adv, mask, src,
                                sampler_logprobs=sampler)

    value, aux = loss(old)
    assert float(value) == pytest.approx(-3.5 / 3, rel=1e-6)
    assert float(aux["tis_weight_sum"]) == pytest.approx(3.5, rel=1e-6)
    assert float(aux["tis_capped_sum"]) == 1.0
    np.testing.assert_allclose(jax.grad(lambda x: loss(x)[0])(old), [[-2 / 3, -0.5 / 3, -1 / 3]],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="tis_cap=2.0 needs the sampler"):
        grpo.policy_loss(cfg, jnp.ones(1), old, old, adv, mask, src)


def test_entropy_bonus_by_hand():
    """Source 0 RL, source 1 SFT, G = 1; A = 0 so the RL loss is 0. The bonus covers the RL
    row's unmasked tokens only: H = (1 + 2) / 2, loss -= 0.1 H, dL/dH = -0.1 / 2 there."""
    cfg = GRPOConfig(group_size=1, entropy_coef=0.1, reward_objective_index=((0,), (-1,)),
                     sft_objective_index=(-1, 1))
    lp = jnp.log(jnp.array([[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]))
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    src, adv, w = jnp.array([0, 1], jnp.int32), jnp.zeros((2, 1)), jnp.array([1.0, 2.0])
    entropy = jnp.array([[1.0, 2.0, 50.0], [7.0, 7.0, 7.0]])

    def loss(h, config=cfg):
        return grpo.policy_loss(config, w, lp, lp, adv, mask, src, entropy=h)[0]

    ntp = 2.0 * math.log(4)  # lambda_1 x the SFT row's NLL
    assert float(loss(entropy)) == pytest.approx(ntp - 0.1 * 1.5, rel=1e-6)
    np.testing.assert_allclose(jax.grad(loss)(entropy), [[-0.05, -0.05, 0], [0, 0, 0]],
                               rtol=1e-6)
    off = GRPOConfig(**{**cfg.__dict__, "entropy_coef": 0.0})
    assert float(loss(entropy, off)) == pytest.approx(ntp, rel=1e-6)
    with pytest.raises(ValueError, match="entropy_coef=0.1 needs the policy's token entropy"):
        grpo.policy_loss(cfg, w, lp, lp, adv, mask, src)


# --------------------------------------------------------------------------- in the train step


def _toy_step_metrics(cfg, batch):
    step = make_train_step(cfg, logprob_fn, optax.sgd(0.1), donate_state=False)
    return step(new_state(optax.sgd(0.1), init_params(jax.random.key(1), 0.5)), batch)[1]


def test_gspo_and_overlong_run_in_the_train_step():
    batch = fixed_batch(3)
    batch["completion_mask"] = batch["completion_mask"].copy()
    batch["completion_mask"][::2, -1] = False  # lengths 2 and 3 alternate
    m = _toy_step_metrics(GRPOConfig(group_size=4, importance_ratio="sequence",
                                     overlong_buffer=1), batch)
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    assert float(m["overlong_penalty_mean"]) == pytest.approx(-0.5)  # half the rows hit L_max


def test_tis_in_the_train_step_scales_the_first_loss():
    """Stale sampler log-probs (+0.1): w = exp(-0.1) on every token; at the first update the
    ratio is 1, so the gradient is w times the gradient without TIS (the loss itself is ~0
    there: the group-centred advantages sum to zero)."""
    batch = fixed_batch(8)
    stale = dict(batch, old_logprobs=batch["old_logprobs"] + 0.1)
    plain = _toy_step_metrics(GRPOConfig(group_size=4, recompute_old_logprobs=True), stale)
    tis = _toy_step_metrics(GRPOConfig(group_size=4, recompute_old_logprobs=True, tis_cap=2.0),
                            stale)
    assert float(plain["grad_norm"]) > 1e-3
    assert float(tis["grad_norm"]) == pytest.approx(math.exp(-0.1) * float(plain["grad_norm"]), rel=1e-4)


def test_entropy_bonus_has_a_gradient_in_the_train_step():
    """Equal rewards: A = 0, so the only gradient is the entropy bonus's."""
    batch = fixed_batch(4)
    batch["rewards"] = np.ones_like(batch["rewards"])
    m = _toy_step_metrics(GRPOConfig(group_size=4, entropy_coef=0.5), batch)
    assert float(m["grad_norm"]) > 1e-3


def test_entropy_bonus_step_is_the_gradient_of_minus_alpha_mean_entropy():
    """A = 0 (equal rewards): the step's loss is -alpha H, H the masked token mean of the
    entropy, and one SGD step (lr 0.1) moves the params by -0.1 grad(-alpha H), computed here
    independently with jax.grad of the toy model's entropy; the step raises H. With
    entropy_coef = 0 the same batch gives no gradient at all."""
    alpha, lr = 0.5, 0.1
    batch = fixed_batch(4)
    batch["rewards"] = np.ones_like(batch["rewards"])
    batch["completion_mask"] = batch["completion_mask"].copy()
    batch["completion_mask"][::3, -1] = False
    mask = jnp.asarray(batch["completion_mask"], jnp.float32)
    params = init_params(jax.random.key(1), 0.5)

    def mean_entropy(p):
        return jnp.sum(logprob_fn(p, batch)[1] * mask) / mask.sum()

    step = make_train_step(GRPOConfig(group_size=4, entropy_coef=alpha), logprob_fn,
                           optax.sgd(lr), donate_state=False)
    state, m = step(new_state(optax.sgd(lr), params), batch)
    assert float(m["loss"]) == pytest.approx(-alpha * float(mean_entropy(params)), rel=1e-5)
    expected = jax.tree.map(lambda p, g: p - lr * (-alpha) * g, params,
                            jax.grad(mean_entropy)(params))
    chex.assert_trees_all_close(state.params, expected, atol=1e-6)
    assert float(mean_entropy(state.params)) > float(mean_entropy(params))
    off = _toy_step_metrics(GRPOConfig(group_size=4), batch)
    assert float(off["grad_norm"]) == 0.0
