"""GRPO losses with RECAP objective weights: small pure, jittable functions.

Symbols (recap-method.md): G completions per prompt (`group_size`), clip range epsilon
(`epsilon_low`, `epsilon_high`), dual-clip bound c (`dual_clip_c`), KL coefficient beta,
objective weights lambda [K]. Every function here is pure and takes static shapes; options
are Python strings chosen at trace time (a GRPOConfig is hashable and never traced).

Variants (all off by default): GSPO's sequence-level importance ratio
s_i = exp((1/|y_i|) sum_t log(pi_t / pi_old,t)) (Zheng et al. 2025, `importance_ratio`); an
entropy bonus -alpha_H H (`entropy_coef`); DAPO's soft overlong punishment R_length(|y|) over
a buffer L_cache before L_max (Yu et al. 2025, `overlong_buffer`, `overlong_penalty`); and
truncated importance sampling (TIS) of the sampler / trainer mismatch,
w_t = min(pi_old,trainer / pi_sampler, C) (Yao et al. 2025, "Your efficient RL framework
secretly brings you off-policy RL training", `tis_cap`).

Objectives (recap-method.md, "Objectives"): sources s = 0..S-1 are RL sources (F_s <= F
reward functions) or SFT sources. Objective k is one (RL source, reward function) pair or one
SFT source. Two static tables, e.g. from `recap.ObjectiveSet`, map sources to objectives:
    reward_objective_index [S, F] int: objective of source s's f-th reward, -1 if none
    sft_objective_index    [S]    int: objective of SFT source s, -1 for RL sources
Per-objective sums are one-hot contractions over these tables (no gather by data, no loops).

Rollout batch (a dict; B = rows, T = completion length, F = reward columns):
    completion_mask  [B, T]  bool/float  1 on the completion tokens (an SFT row: its answer)
    source_id        [B]     int32       source of the row; outside [0, S) (e.g. -1): padding,
                                         the row contributes nothing anywhere
    rewards          [B, F]  float32     raw reward components in the source's order; columns
                                         a source lacks and SFT rows are ignored (nan included)
    old_logprobs     [B, T]  float32     the sampler's log-probs of the completion tokens;
                                         optional when recompute_old_logprobs
    ref_logprobs     [B, T]  float32     frozen reference log-probs; only read when beta > 0,
                                         so with beta = 0 the batch may omit them
    truncated        [B]     bool        completion hit the length limit without EOS; only
                                         read when mask_truncated_completions
Rows come in groups of G consecutive rows: one prompt's G completions, one source per group.
SFT rows also come in groups of G (any G reference answers); their advantages are unused.

Weighting modes (recap-method.md, "How the weights enter the policy-gradient step"):
    reward  R_b = sum_f lambda_k(s_b, f) r_bf; advantages from R; loss = L_RL + sum over SFT
            objectives of lambda_k NTP_k (+ beta KL).
    loss    one group-normalised advantage per reward component, one clipped surrogate L_k per
            RL objective, NTP_k for SFT objectives; loss = (1/K) sum_k lambda_k L_k (+ beta KL).
            K is the configured number of objectives, also when some are absent from the batch.
The KL term is a regulariser, not an objective: lambda does not scale it, and it covers the
RL rows only (the reference is compared on sampled completions).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ADVANTAGE_NORMALIZATIONS = ("group", "batch", "none")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
WEIGHTINGS = ("reward", "loss")
IMPORTANCE_RATIOS = ("token", "sequence")
_LOG_RATIO_BOUND = 20.0  # |log ratio| clamp (as verl) so exp() stays finite
_ZERO_VARIANCE_TOLERANCE = 1e-6


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"GRPOConfig.{field}={value!r} is invalid; allowed: {allowed}")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO / RECAP step hyper-parameters (frozen and hashable; never traced).

    Attributes:
      group_size: G >= 1, completions per prompt (rows per group).
      advantage_normalization: "group": A = (R - mean_group) / (std_group + advantage_epsilon)
        (GRPO); "batch": the group mean is subtracted and the std is taken over the whole batch
        (per objective); "none": A = R - mean_group (Dr. GRPO). Stds are unbiased (ddof = 1,
        as torch.std in TRL / verl); a group of 1 has std 0.
      advantage_epsilon: the 1e-4 added to the std.
      epsilon_low, epsilon_high: clip range [1 - epsilon_low, 1 + epsilon_high] of the ratio.
      dual_clip_c: None, or c > 1: for A < 0 the per-token loss is capped at -A c (dual clip).
      loss_aggregation: "token-mean" (all valid tokens of the mini-batch), "seq-mean-token-mean"
        (per-sequence token mean, then mean over sequences), "seq-mean-token-sum-norm"
        (per-sequence token sum / max_completion_length, then mean over sequences: Dr. GRPO).
        Sequences without valid tokens are left out of the sequence means. Note verl's
        implementation of the last one sums over sequences instead of averaging (a factor B).
      max_completion_length: the constant divisor of "seq-mean-token-sum-norm"; None uses T
        (the padded completion length of the batch, constant as long as T is).
      beta: KL coefficient (>= 0); 0 disables the KL term and the reference log-probs.
      kl_estimator: Schulman's "k1" (log p - log p_ref), "k2" (0.5 (log r)^2) or "k3"
        (r - 1 - log r), r = p_ref / p, on tokens sampled from the policy.
      weighting: "reward" (released code) or "loss" (paper); see the module docstring.
      reward_objective_index: [S][F] objective k of source s's f-th reward, -1 for none.
      sft_objective_index: [S] objective k of SFT source s, -1 for RL sources. The defaults
        describe one RL source with one reward: plain GRPO, K = 1.
      mask_truncated_completions: truncated completions' tokens contribute nothing (their
        rewards still enter the group statistics, as in DAPO's overlong filtering).
      recompute_old_logprobs: recompute the old log-probs with the pre-update params instead
        of trusting the sampler's (`old_logprobs` in the batch).
      num_iterations: policy epochs over the rollout batch (>= 1).
      num_minibatches: optimizer updates per epoch (>= 1); the batch is split along rows by
        whole groups, so B must be a multiple of num_minibatches * G.
      shuffle_minibatches: permute the groups (with the train state's rng) before each epoch.
      importance_ratio: "token" (PPO / GRPO: r_t = pi_t / pi_old,t per token) or "sequence"
        (GSPO: every token of completion i uses s_i = exp(mean_t log(pi_t / pi_old,t)) over
        its loss-mask tokens, written as sg[s_i] pi_t / sg[pi_t], so that with
        "seq-mean-token-mean" aggregation the gradient is GSPO's grad of s_i; GSPO's paper
        clips s_i with a much smaller range, e.g. epsilon_low=3e-4, epsilon_high=4e-4).
      entropy_coef: alpha_H >= 0; the loss gets -alpha_H H, H the token entropy of the RL
        rows aggregated like the policy loss (a regulariser like the KL term: lambda does not
        scale it). Needs the policy's entropy (`policy_loss(..., entropy=)`) with gradient.
      overlong_buffer: L_cache >= 0 tokens; 0 disables DAPO's soft overlong punishment. With
        L_max = max_completion_length (or T), an RL completion of |y| tokens gets
        overlong_penalty * R_length, R_length = 0 for |y| <= L_max - L_cache,
        ((L_max - L_cache) - |y|) / L_cache above (-1 at |y| = L_max), added to the rewards
        that drive the advantages (see `overlong_reward_penalty`; RECAP's signals and the
        per-objective reward statistics stay the raw rewards).
      overlong_penalty: the penalty's scale (>= 0; DAPO uses 1).
      tis_cap: None, or C > 0: truncated importance sampling of the rollout / trainer mismatch;
        each RL token's policy loss is multiplied by w_t = min(pi_old,trainer / pi_sampler, C)
        (no gradient). Needs recompute_old_logprobs (else pi_old is the sampler's and w = 1)
        and the sampler's log-probs (`policy_loss(..., sampler_logprobs=)`).
    """

    group_size: int = 4
    advantage_normalization: str = "group"
    advantage_epsilon: float = 1e-4
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    dual_clip_c: float | None = None
    loss_aggregation: str = "token-mean"
    max_completion_length: int | None = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    weighting: str = "reward"
    reward_objective_index: tuple[tuple[int, ...], ...] = ((0,),)
    sft_objective_index: tuple[int, ...] = (-1,)
    mask_truncated_completions: bool = False
    recompute_old_logprobs: bool = False
    num_iterations: int = 1
    num_minibatches: int = 1
    shuffle_minibatches: bool = False
    importance_ratio: str = "token"
    entropy_coef: float = 0.0
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    tis_cap: float | None = None

    def __post_init__(self):
        for field, allowed in (("advantage_normalization", ADVANTAGE_NORMALIZATIONS),
                               ("loss_aggregation", LOSS_AGGREGATIONS),
                               ("kl_estimator", KL_ESTIMATORS), ("weighting", WEIGHTINGS),
                               ("importance_ratio", IMPORTANCE_RATIOS)):
            if getattr(self, field) not in allowed:
                _fail(field, getattr(self, field), " | ".join(allowed))
        for field in ("group_size", "num_iterations", "num_minibatches"):
            if not _is_int(getattr(self, field)) or getattr(self, field) < 1:
                _fail(field, getattr(self, field), "an int >= 1")
        if not _is_number(self.advantage_epsilon) or not self.advantage_epsilon >= 0:
            _fail("advantage_epsilon", self.advantage_epsilon, "a number >= 0")
        if not _is_number(self.epsilon_low) or not 0 <= self.epsilon_low < 1:
            _fail("epsilon_low", self.epsilon_low, "a number in [0, 1)")
        if not _is_number(self.epsilon_high) or not 0 <= self.epsilon_high < float("inf"):
            _fail("epsilon_high", self.epsilon_high, "a finite number >= 0")
        if self.dual_clip_c is not None and (not _is_number(self.dual_clip_c)
                                             or not self.dual_clip_c > 1):
            _fail("dual_clip_c", self.dual_clip_c, "None or a number > 1")
        if self.max_completion_length is not None and (
                not _is_int(self.max_completion_length) or self.max_completion_length < 1):
            _fail("max_completion_length", self.max_completion_length, "None or an int >= 1")
        if not _is_number(self.beta) or not 0 <= self.beta < float("inf"):
            _fail("beta", self.beta, "a finite number >= 0")
        for field in ("mask_truncated_completions", "recompute_old_logprobs",
                      "shuffle_minibatches"):
            if not isinstance(getattr(self, field), bool):
                _fail(field, getattr(self, field), "True | False")
        self._check_variants()
        self._check_objective_tables()

    def _check_variants(self):
        for field in ("entropy_coef", "overlong_penalty"):
            value = getattr(self, field)
            if not _is_number(value) or not 0 <= value < float("inf"):
                _fail(field, value, "a finite number >= 0")
        if not _is_int(self.overlong_buffer) or self.overlong_buffer < 0:
            _fail("overlong_buffer", self.overlong_buffer, "an int >= 0 (0: off)")
        if (self.overlong_buffer and self.max_completion_length is not None
                and self.overlong_buffer >= self.max_completion_length):
            _fail("overlong_buffer", self.overlong_buffer,
                  f"an int below max_completion_length={self.max_completion_length}")
        if self.tis_cap is not None:
            if not _is_number(self.tis_cap) or not 0 < self.tis_cap < float("inf"):
                _fail("tis_cap", self.tis_cap, "None or a finite number > 0")
            if not self.recompute_old_logprobs:
                _fail("tis_cap", self.tis_cap, "None unless recompute_old_logprobs=True (without "
                      "recomputation pi_old is the sampler's and the TIS weight is 1)")

    def _check_objective_tables(self):
        try:
            rewards = np.asarray(self.reward_objective_index, dtype=np.int64)
            sft = np.asarray(self.sft_objective_index, dtype=np.int64)
        except (TypeError, ValueError):
            _fail("reward_objective_index", self.reward_objective_index,
                  "an [S][F] table of ints (rows of equal length) and an [S] sft table")
        if rewards.ndim != 2 or rewards.shape[0] < 1 or rewards.shape[1] < 1:
            _fail("reward_objective_index", self.reward_objective_index,
                  "an [S][F] table of ints with S >= 1, F >= 1")
        if sft.shape != (rewards.shape[0],):
            _fail("sft_objective_index", self.sft_objective_index,
                  f"one int per source ({rewards.shape[0]} sources)")
        if (rewards < -1).any() or (sft < -1).any():
            _fail("reward_objective_index", self.reward_objective_index,
                  "objective indices >= 0, or -1 for none")
        for s in range(rewards.shape[0]):
            has_rewards = (rewards[s] >= 0).any()
            if has_rewards == (sft[s] >= 0):
                _fail(f"reward_objective_index[{s}]", tuple(rewards[s]),
                      "a source with reward objectives (RL) or an sft objective, not both "
                      "or neither")
        used = np.concatenate([rewards[rewards >= 0], sft[sft >= 0]])
        if sorted(used.tolist()) != list(range(len(used))):
            _fail("reward_objective_index", self.reward_objective_index,
                  "tables using each objective 0..K-1 exactly once")
        object.__setattr__(self, "reward_objective_index",
                           tuple(tuple(int(v) for v in row) for row in rewards))
        object.__setattr__(self, "sft_objective_index", tuple(int(v) for v in sft))

    @classmethod
    def for_objectives(cls, objectives: Any, **kwargs) -> GRPOConfig:
        """A config whose tables come from `objectives` (e.g. a recap.ObjectiveSet: anything
        with `reward_objective_index` [S, F] and `sft_objective_index` [S] arrays)."""
        return cls(reward_objective_index=tuple(map(tuple, np.asarray(
                       objectives.reward_objective_index).tolist())),
                   sft_objective_index=tuple(np.asarray(
                       objectives.sft_objective_index).tolist()), **kwargs)

    @property
    def num_objectives(self) -> int:
        """K."""
        return int((np.asarray(self.reward_objective_index) >= 0).sum()
                   + (np.asarray(self.sft_objective_index) >= 0).sum())

    @property
    def num_sources(self) -> int:
        return len(self.sft_objective_index)

    @property
    def num_reward_columns(self) -> int:
        """F, the width of `rewards`."""
        return len(self.reward_objective_index[0])

    @property
    def objective_is_sft(self) -> np.ndarray:
        """[K] bool: True for SFT objectives (their signal is a loss, lower is better)."""
        out = np.zeros((self.num_objectives,), bool)
        out[[k for k in self.sft_objective_index if k >= 0]] = True
        return out


# --------------------------------------------------------------------------- membership


class Membership(NamedTuple):
    """One-hot maps from rows to objectives (float32, 0 for padding rows)."""

    reward: jax.Array  # [B, F, K]: row b's reward column f belongs to objective k
    sft: jax.Array  # [B, K]: row b is a sample of SFT objective k
    rl_row: jax.Array  # [B]: row b is a sample of an RL source


def membership(config: GRPOConfig, source_id: jax.Array) -> Membership:
    """Objective membership of each row from its source id (out-of-range ids: padding)."""
    k, s = config.num_objectives, config.num_sources
    valid = (source_id >= 0) & (source_id < s)
    safe = jnp.where(valid, source_id, 0)
    reward_k = jnp.asarray(np.asarray(config.reward_objective_index, np.int32))[safe]
    sft_k = jnp.asarray(np.asarray(config.sft_objective_index, np.int32))[safe]
    reward_k = jnp.where(valid[:, None], reward_k, -1)
    sft_k = jnp.where(valid, sft_k, -1)
    return Membership(reward=jax.nn.one_hot(reward_k, k, dtype=jnp.float32),
                      sft=jax.nn.one_hot(sft_k, k, dtype=jnp.float32),
                      rl_row=(valid & (sft_k < 0)).astype(jnp.float32))


def _safe_divide(total: jax.Array, count: jax.Array) -> jax.Array:
    """total / count, 0 where count == 0."""
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


# --------------------------------------------------------------------------- advantages


def _grouped(x: jax.Array, group_size: int) -> jax.Array:
    if x.shape[0] % group_size:
        raise ValueError(f"batch of {x.shape[0]} rows is not a multiple of the group size "
                         f"G={group_size}")
    return x.reshape((x.shape[0] // group_size, group_size) + x.shape[1:])


def _unbiased_std(x: jax.Array, weight: jax.Array, axis) -> jax.Array:
    """Weighted unbiased std (weights 0/1); 0 for fewer than 2 members."""
    n = weight.sum(axis)
    mean = _safe_divide((x * weight).sum(axis), n)
    sq = (jnp.square(x - jnp.expand_dims(mean, axis)) * weight).sum(axis)
    return jnp.sqrt(_safe_divide(sq, n - 1.0))


def group_advantages(rewards: jax.Array, group_size: int, normalization: str = "group",
                     epsilon: float = 1e-4,
                     membership: jax.Array | None = None) -> jax.Array:
    """A = (R - mean_group) / (std_group + epsilon) over groups of G consecutive rows.

    rewards: [B] or [B, F] (each column its own reward). normalization: "group" (GRPO),
    "batch" (group mean subtracted, std over the batch), "none" (Dr. GRPO: no division).
    membership: optional [B, F, K] 0/1 map from entries to objectives: the batch std is then
    taken per objective over its member entries, and non-member entries get A = 0.
    """
    if normalization not in ADVANTAGE_NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}; allowed: "
                         f"{' | '.join(ADVANTAGE_NORMALIZATIONS)}")
    vector = rewards.ndim == 1
    r = jnp.asarray(rewards, jnp.float32).reshape(rewards.shape[0], -1)
    b, f = r.shape
    if membership is None:
        member = jnp.broadcast_to(jnp.eye(f, dtype=jnp.float32), (b, f, f))
    else:
        member = jnp.asarray(membership, jnp.float32).reshape(b, f, -1)
    grouped = _grouped(r, group_size)  # [B/G, G, F]
    centred = (grouped - grouped.mean(axis=1, keepdims=True)).reshape(b, f)
    if normalization == "group":
        std = _unbiased_std(grouped, jnp.ones_like(grouped), axis=1)  # [B/G, F]
        adv = centred / (jnp.repeat(std, group_size, axis=0) + epsilon)
    elif normalization == "batch":
        per_objective = jax.vmap(lambda m: _unbiased_std(r, m, axis=(0, 1)),
                                 in_axes=2)(member)  # [K]
        adv = centred / (jnp.einsum("bfk,k->bf", member, per_objective) + epsilon)
    else:
        adv = centred
    if membership is not None:
        adv = jnp.where(member.sum(-1) > 0, adv, 0.0)
    return adv[:, 0] if vector else adv


def zero_variance_groups(rewards: jax.Array, group_size: int) -> jax.Array:
    """[B/G] (or [B/G, F]) bool: the group's rewards are all equal (no policy gradient)."""
    grouped = _grouped(jnp.asarray(rewards, jnp.float32), group_size)
    return grouped.max(axis=1) - grouped.min(axis=1) <= _ZERO_VARIANCE_TOLERANCE


def overlong_reward_penalty(lengths: jax.Array, max_length: int, buffer: int,
                            penalty: float = 1.0) -> jax.Array:
    """DAPO's soft overlong punishment, penalty * R_length(|y|), per completion [B] (<= 0).

    With L_max = max_length and L_cache = buffer: R_length = 0 for |y| <= L_max - L_cache,
    ((L_max - L_cache) - |y|) / L_cache for L_max - L_cache < |y| <= L_max, and -1 beyond
    (Yu et al. 2025, eq. 13). buffer 0 gives zeros.
    """
    lengths = jnp.asarray(lengths, jnp.float32)
    if not buffer:
        return jnp.zeros_like(lengths)
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong_buffer={buffer} must be in (0, L_max={max_length}]")
    start = float(max_length - buffer)
    r_length = jnp.clip((start - lengths) / float(buffer), -1.0, 0.0)
    return penalty * r_length


def sequence_log_ratio(logprobs: jax.Array, old_logprobs: jax.Array,
                       mask: jax.Array) -> jax.Array:
    """GSPO's log s_i = (1/|y_i|) sum_t (log pi_t - log pi_old,t) over the mask's tokens [B]
    (0 for a row without tokens); gradients flow into logprobs."""
    mask = jnp.asarray(mask, jnp.float32)
    diff = jnp.where(mask > 0, logprobs - jax.lax.stop_gradient(old_logprobs), 0.0)
    return _safe_divide(diff.sum(axis=-1), mask.sum(axis=-1))


def gspo_token_old_logprobs(logprobs: jax.Array, old_logprobs: jax.Array,
                            mask: jax.Array) -> jax.Array:
    """Old log-probs [B, T] that make `clipped_surrogate`'s per-token ratio GSPO's
    s_i,t = sg[s_i] pi_t / sg[pi_t] (value s_i, gradient s_i grad log pi_t): the returned
    constants are sg[log pi_t] - sg[log s_i]."""
    log_s = jax.lax.stop_gradient(sequence_log_ratio(logprobs, old_logprobs, mask))
    return jax.lax.stop_gradient(logprobs) - log_s[:, None]


def tis_weights(old_logprobs: jax.Array, sampler_logprobs: jax.Array, cap: float,
                mask: jax.Array) -> jax.Array:
    """Truncated importance sampling weights w_t = min(pi_old,trainer / pi_sampler, C) [B, T]
    on the mask's tokens (1 elsewhere), constants (no gradient)."""
    log_w = jnp.clip(jnp.asarray(old_logprobs, jnp.float32)
                     - jnp.asarray(sampler_logprobs, jnp.float32),
                     -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    w = jnp.minimum(jnp.exp(log_w), cap)
    return jax.lax.stop_gradient(jnp.where(jnp.asarray(mask) > 0, w, 1.0))


# --------------------------------------------------------------------------- token losses


class ClipIndicators(NamedTuple):
    """Where the clipped branch was taken (bool, shape of the token loss).

    low: A < 0 and ratio < 1 - epsilon_low; high: A > 0 and ratio > 1 + epsilon_high;
    dual: A < 0 and ratio > c (the loss is capped at -A c).
    """

    low: jax.Array
    high: jax.Array
    dual: jax.Array


def clipped_surrogate(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                      epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                      dual_clip_c: float | None = None) -> tuple[jax.Array, ClipIndicators]:
    """Per-token PPO loss max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r = pi / pi_old.

    With dual_clip_c = c > 1, tokens with A < 0 get min(that, -A c) (verl's dual-clip PPO).
    advantages broadcast against the log-probs (e.g. [B, 1] against [B, T]). The old
    log-probs are constants (no gradient flows into them).
    """
    log_ratio = jnp.clip(logprobs - jax.lax.stop_gradient(old_logprobs),
                         -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    took_clip = clipped > unclipped  # a tie keeps the unclipped branch and its full gradient
    loss = jnp.where(took_clip, clipped, unclipped)
    low, high = took_clip & (advantages < 0), took_clip & (advantages > 0)
    if dual_clip_c is None:
        return loss, ClipIndicators(low, high, jnp.zeros_like(low))
    cap = -advantages * dual_clip_c
    dual = (advantages < 0) & (loss > cap)
    return jnp.where(dual, cap, loss), ClipIndicators(low, high, dual)


def kl_divergence(logprobs: jax.Array, ref_logprobs: jax.Array,
                  estimator: str = "k3") -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi (Schulman, 2020).

    With log r = log pi_ref - log pi: k1 = -log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r.
    Gradients flow into logprobs only.
    """
    log_r = jnp.clip(jax.lax.stop_gradient(ref_logprobs) - logprobs,
                     -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * jnp.square(log_r)
    if estimator == "k3":
        return jnp.expm1(log_r) - log_r
    raise ValueError(f"estimator={estimator!r}; allowed: {' | '.join(KL_ESTIMATORS)}")


# --------------------------------------------------------------------------- aggregation


def aggregate_per_objective(token_loss: jax.Array, mask: jax.Array, member: jax.Array,
                            mode: str = "token-mean",
                            max_completion_length: int | None = None
                            ) -> tuple[jax.Array, jax.Array]:
    """Per-objective aggregate [K] of token losses [B, T, F] over member rows, and present [K].

    member [B, F, K] (0/1) says which objective row b's column f feeds; an objective with no
    valid token (or sequence) gets 0 and present False. Modes: see GRPOConfig.
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"mode={mode!r}; allowed: {' | '.join(LOSS_AGGREGATIONS)}")
    mask = jnp.asarray(mask).astype(jnp.float32)
    token_loss = jnp.where(mask[..., None] > 0, token_loss, 0.0)
    tokens = mask.sum(axis=1)  # [B]
    if mode == "token-mean":
        total = jnp.einsum("btf,bfk->k", token_loss, member)
        count = jnp.einsum("b,bfk->k", tokens, member)
    else:
        norm = tokens if mode == "seq-mean-token-mean" else float(
            max_completion_length or mask.shape[1])
        per_sequence = token_loss.sum(axis=1) / jnp.maximum(norm, 1.0)[..., None]  # [B, F]
        has_tokens = (tokens > 0).astype(jnp.float32)
        total = jnp.einsum("bf,b,bfk->k", per_sequence, has_tokens, member)
        count = jnp.einsum("b,bfk->k", has_tokens, member)
    return _safe_divide(total, count), count > 0


def aggregate_loss(token_loss: jax.Array, mask: jax.Array, mode: str = "token-mean",
                   max_completion_length: int | None = None) -> jax.Array:
    """Scalar loss from token losses [B, T] and the completion mask [B, T] (see GRPOConfig)."""
    ones = jnp.ones((token_loss.shape[0], 1, 1), jnp.float32)
    return aggregate_per_objective(token_loss[..., None], mask, ones, mode,
                                   max_completion_length)[0][0]


def sft_loss(logprobs: jax.Array, mask: jax.Array) -> jax.Array:
    """SFT next-token loss: mean negative log-likelihood over the answer tokens [B, T]."""
    return aggregate_loss(-logprobs, mask, "token-mean")


# --------------------------------------------------------------------------- RECAP modes


def weighted_rewards(config: GRPOConfig, rewards: jax.Array, source_id: jax.Array,
                     weights: jax.Array) -> jax.Array:
    """`reward` mode's R_b = sum_f lambda_k(s_b, f) r_bf [B] (0 for SFT and padding rows)."""
    member = membership(config, source_id).reward
    present = member.sum(-1) > 0
    r = jnp.where(present, jnp.asarray(rewards, jnp.float32), 0.0)
    return jnp.einsum("bf,bfk,k->b", r, member, weights)


def overlong_penalty(config: GRPOConfig, batch: dict) -> jax.Array:
    """[B] DAPO overlong penalty of each row from its completion length (the completion
    mask's token count) and L_max = max_completion_length or T; zeros when off."""
    if not config.overlong_buffer:
        return jnp.zeros(np.shape(batch["source_id"]), jnp.float32)
    if "completion_mask" not in batch:
        raise ValueError("rollout_advantages: batch['completion_mask'] is missing; required by "
                         f"GRPOConfig.overlong_buffer={config.overlong_buffer}")
    mask = jnp.asarray(batch["completion_mask"]).astype(jnp.float32)
    max_length = config.max_completion_length or mask.shape[1]
    if config.overlong_buffer > max_length:
        raise ValueError(f"GRPOConfig.overlong_buffer={config.overlong_buffer} exceeds L_max="
                         f"{max_length} (the batch's completion length T)")
    return overlong_reward_penalty(mask.sum(axis=1), max_length, config.overlong_buffer,
                                   config.overlong_penalty)


def rollout_advantages(config: GRPOConfig, batch: dict, weights: jax.Array
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Advantages [B, 1] (`reward` mode) or [B, F] (`loss` mode), and reward statistics.

    Statistics: per-objective raw reward mean / std (population) over that objective's rows,
    present [K], the fraction of each objective's groups with zero reward variance, and the
    fraction of RL groups with zero variance in the rewards that drive the advantages (R in
    `reward` mode; every component in `loss` mode).

    DAPO's overlong penalty p_b (config.overlong_buffer > 0; needs ``completion_mask``) shapes
    only the rewards that drive the advantages: `reward` mode uses R_b + p_b (p is not scaled
    by lambda: a shaping term, not an objective), `loss` mode r_bf + p_b for each of the
    row's reward components (so each objective's advantage sees it). RECAP's signals (the
    per-objective raw reward means) and the per-objective statistics stay the raw rewards;
    `overlong_penalty_mean` (over RL rows) is added to the statistics when the penalty is on.
    """
    g = config.group_size
    m = membership(config, batch["source_id"])
    present = m.reward.sum(-1) > 0  # [B, F]
    raw = jnp.where(present, jnp.asarray(batch["rewards"], jnp.float32), 0.0)
    count = m.reward.sum(axis=(0, 1))
    mean = _safe_divide(jnp.einsum("bf,bfk->k", raw, m.reward), count)
    var = _safe_divide(jnp.einsum("bfk,bfk->k", jnp.square(raw[..., None] - mean), m.reward),
                       count)
    zero_var = zero_variance_groups(raw, g)  # [B/G, F]
    group_member = m.reward[::g]  # one source per group
    stats = {"objective_reward_mean": mean, "objective_reward_std": jnp.sqrt(var),
             "objective_reward_present": count > 0,
             "objective_zero_variance_fraction": _safe_divide(
                 jnp.einsum("gf,gfk->k", zero_var.astype(jnp.float32), group_member),
                 group_member.sum(axis=(0, 1)))}
    rl_groups = m.rl_row[::g]
    penalty = overlong_penalty(config, batch) * m.rl_row  # [B], 0 when off
    if config.overlong_buffer:
        stats["overlong_penalty_mean"] = _safe_divide(penalty.sum(), m.rl_row.sum())
    if config.weighting == "reward":
        r = weighted_rewards(config, batch["rewards"], batch["source_id"], weights) + penalty
        adv = group_advantages(r[:, None], g, config.advantage_normalization,
                               config.advantage_epsilon, m.rl_row[:, None, None])
        group_zero = zero_variance_groups(r, g)
    else:
        shaped = jnp.where(present, raw + penalty[:, None], 0.0)
        adv = group_advantages(shaped, g, config.advantage_normalization,
                               config.advantage_epsilon, m.reward)
        shaped_zero = zero_variance_groups(shaped, g) if config.overlong_buffer else zero_var
        group_zero = jnp.all(shaped_zero | (group_member.sum(-1) == 0), axis=1)
    stats["zero_variance_group_fraction"] = _safe_divide(
        (group_zero * rl_groups).sum(), rl_groups.sum())
    return adv, stats


def completion_loss_mask(config: GRPOConfig, batch: dict) -> jax.Array:
    """[B, T] float32: the completion mask, without truncated rows when so configured."""
    mask = jnp.asarray(batch["completion_mask"]).astype(jnp.float32)
    if config.mask_truncated_completions:
        mask = mask * (1.0 - jnp.asarray(batch["truncated"], jnp.float32))[:, None]
    return mask


def policy_loss(config: GRPOConfig, weights: jax.Array, logprobs: jax.Array,
                old_logprobs: jax.Array, advantages: jax.Array, loss_mask: jax.Array,
                source_id: jax.Array, ref_logprobs: jax.Array | None = None,
                entropy: jax.Array | None = None, sampler_logprobs: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted GRPO / SFT loss of one mini-batch, and auxiliary sums for metrics.

    logprobs [B, T] come from the policy being trained (gradients flow through them);
    old_logprobs [B, T] and advantages ([B, 1] or [B, F], from `rollout_advantages`) are
    constants; loss_mask [B, T] is the completion mask (truncated rows already removed);
    ref_logprobs [B, T] are read only when beta > 0. entropy [B, T]: the policy's token
    entropy (a metric; with entropy_coef > 0 also the bonus, whose gradient flows through
    it). sampler_logprobs [B, T]: the sampler's log-probs, read only with tis_cap (then
    old_logprobs are the recomputed pi_old,trainer). Returns (loss, aux): aux holds the
    policy and KL terms, per-objective losses [K], and sums / counts (clip indicators,
    entropy, SFT NLL, TIS weights) that add up across mini-batches.

    Variants: importance_ratio="sequence" replaces the token ratio by GSPO's s_i,t
    (`gspo_token_old_logprobs`); tis_cap multiplies each RL token's clipped loss by
    `tis_weights`; entropy_coef subtracts alpha_H H (`aggregate_loss` of the RL tokens'
    entropy, the config's aggregation mode).
    """
    k = config.num_objectives
    m = membership(config, source_id)
    real_row = m.rl_row + m.sft.sum(-1)  # 0 for padding rows, whatever they hold
    mask = jnp.asarray(loss_mask).astype(jnp.float32) * real_row[:, None]
    rl_mask = mask * m.rl_row[:, None]
    logprobs = jnp.where(mask > 0, logprobs.astype(jnp.float32), 0.0)
    frozen = jax.lax.stop_gradient(logprobs)
    # Non-RL and masked tokens get ratio 1 whatever the batch holds there.
    old = jnp.where(rl_mask > 0, jnp.asarray(old_logprobs, jnp.float32), frozen)
    ratio_old = old
    if config.importance_ratio == "sequence":
        ratio_old = gspo_token_old_logprobs(logprobs, old, rl_mask)
    token_loss, clip = clipped_surrogate(logprobs[..., None], ratio_old[..., None],
                                         advantages[:, None, :], config.epsilon_low,
                                         config.epsilon_high, config.dual_clip_c)
    tis = None
    if config.tis_cap is not None:
        if sampler_logprobs is None:
            raise ValueError(f"policy_loss: GRPOConfig.tis_cap={config.tis_cap} needs the "
                             "sampler's log-probs (sampler_logprobs=, the batch's old_logprobs)")
        tis = tis_weights(old, sampler_logprobs, config.tis_cap, rl_mask)
        token_loss = token_loss * tis[..., None]
    agg = dict(mode=config.loss_aggregation,
               max_completion_length=config.max_completion_length)
    nll_total = jnp.einsum("bt,bk->k", -logprobs * mask, m.sft)
    nll_count = jnp.einsum("bt,bk->k", mask, m.sft)
    ntp = _safe_divide(nll_total, nll_count)  # [K], SFT objectives only
    if config.weighting == "reward":
        policy = aggregate_per_objective(token_loss, mask, m.rl_row[:, None, None], **agg)[0][0]
        per_source, _ = aggregate_per_objective(
            jnp.broadcast_to(token_loss, token_loss.shape[:2] + m.reward.shape[1:2]), mask,
            m.reward, **agg)
        objective_loss = per_source + ntp
        loss = policy + jnp.dot(weights, ntp)
        clip_weight = rl_mask[..., None]
    else:
        rl_objective, _ = aggregate_per_objective(token_loss, mask, m.reward, **agg)
        objective_loss = rl_objective + ntp
        policy = jnp.dot(weights, rl_objective) / k
        loss = jnp.dot(weights, objective_loss) / k
        clip_weight = mask[..., None] * (m.reward.sum(-1) > 0)[:, None, :]
    aux = {"policy_loss": policy, "objective_loss": objective_loss,
           "ntp_sum": nll_total, "ntp_count": nll_count,
           "clip_count": clip_weight.sum(), "rl_token_count": rl_mask.sum(),
           "logprob_abs_diff_sum": jnp.sum(jnp.abs(frozen - old) * rl_mask)}
    for name, hit in clip._asdict().items():
        aux[f"clip_{name}_sum"] = (hit * clip_weight).sum()
    if config.beta > 0:
        ref = jnp.where(rl_mask > 0, jnp.asarray(ref_logprobs, jnp.float32), frozen)
        kl = aggregate_per_objective(kl_divergence(logprobs, ref, config.kl_estimator)[..., None],
                                     mask, m.rl_row[:, None, None], **agg)[0][0]
        loss = loss + config.beta * kl
        aux["kl"] = kl
    if config.entropy_coef > 0:
        if entropy is None:
            raise ValueError(f"policy_loss: GRPOConfig.entropy_coef={config.entropy_coef} needs "
                             "the policy's token entropy (entropy=)")
        bonus = aggregate_per_objective(
            jnp.where(rl_mask > 0, entropy.astype(jnp.float32), 0.0)[..., None], rl_mask,
            m.rl_row[:, None, None], **agg)[0][0]
        loss = loss - config.entropy_coef * bonus
        aux["entropy_bonus"] = bonus
    if entropy is not None:
        aux["entropy_sum"] = jnp.sum(jnp.where(rl_mask > 0, entropy, 0.0).astype(jnp.float32))
    if tis is not None:
        aux["tis_weight_sum"] = jnp.sum(tis * rl_mask)
        aux["tis_capped_sum"] = jnp.sum((tis >= config.tis_cap) * rl_mask)
    aux = {name: jax.lax.stop_gradient(value) for name, value in aux.items()}
    return loss, aux
