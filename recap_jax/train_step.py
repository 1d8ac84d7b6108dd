"""The jitted GRPO / RECAP policy-gradient step, independent of the model.

    step = make_train_step(config, logprob_fn, optimizer)
    state, metrics = step(state, batch, weights)      # weights: lambda [K] float32

`logprob_fn(params, batch) -> (token_logprobs [B, T], token_entropy [B, T] or None)` is the
policy: for the VLM, a forward over prompt + completion that gathers the completion tokens'
log-probs (at the sampler's temperature). It receives the batch dict (or a mini-batch of it)
as given, so it may read any extra fields (input ids, pixels, positions, ...).

Inside one jit, with the state donated:
  1. advantages from the whole rollout batch (grpo.rollout_advantages, lambda applied there);
  2. old log-probs: the sampler's (`old_logprobs`), or recomputed with the pre-update params
     when config.recompute_old_logprobs;
  3. num_iterations epochs x num_minibatches optimizer updates (lax.scan), each on a slice
     of whole groups; an update whose loss or gradient norm is not finite is skipped
     (params and optimizer state kept) and counted;
  4. metrics, all computed in jit (see `summarise`).

With num_minibatches > 1 or shuffle_minibatches, every batch leaf must have the row axis
first (shape [B, ...]) so it can be sliced: pack per-row data (e.g. image patches) per row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recap_jax import grpo
from recap_jax.grpo import GRPOConfig
from recap_jax.train_state import TrainState

LogprobFn = Callable[[Any, Mapping[str, Any]], tuple[jax.Array, jax.Array | None]]
PADDING_SOURCE = -1


# --------------------------------------------------------------------------- checks


def _fail(field: str, problem: str) -> None:
    raise ValueError(f"train step: batch[{field!r}] {problem}")


def check_inputs(config: GRPOConfig, batch: Mapping[str, Any], weights: Any) -> None:
    """Shape checks (run at trace time; also usable on the host before the first step)."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"train step: batch must be a dict of arrays, got {type(batch)}")
    required = ["completion_mask", "source_id", "rewards"]
    required += [] if config.recompute_old_logprobs else ["old_logprobs"]
    required += ["ref_logprobs"] if config.beta > 0 else []
    required += ["truncated"] if config.mask_truncated_completions else []
    for field in required:
        if field not in batch:
            _fail(field, f"is missing; required by {config.__class__.__name__} "
                         f"(beta={config.beta}, recompute_old_logprobs="
                         f"{config.recompute_old_logprobs}, mask_truncated_completions="
                         f"{config.mask_truncated_completions})")
    mask_shape = tuple(np.shape(batch["completion_mask"]))
    if len(mask_shape) != 2:
        _fail("completion_mask", f"has shape {mask_shape}; expected [B, T]")
    b, t = mask_shape
    f = config.num_reward_columns
    expected = {"source_id": (b,), "rewards": (b, f), "old_logprobs": (b, t),
                "ref_logprobs": (b, t), "truncated": (b,)}
    for field, shape in expected.items():
        if field in required and tuple(np.shape(batch[field])) != shape:
            _fail(field, f"has shape {tuple(np.shape(batch[field]))}; expected {shape} "
                         f"(B={b}, T={t}, F={f} reward columns from the config's tables)")
    if not jnp.issubdtype(jnp.result_type(batch["source_id"]), jnp.integer):
        _fail("source_id", f"has dtype {jnp.result_type(batch['source_id'])}; expected int32")
    rows_per_update = config.group_size * config.num_minibatches
    if b % rows_per_update:
        _fail("completion_mask", f"has B={b} rows; B must be a multiple of group_size x "
                                 f"num_minibatches = {config.group_size} x "
                                 f"{config.num_minibatches}")
    if config.num_minibatches > 1 or config.shuffle_minibatches:
        for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
            if np.ndim(leaf) == 0 or np.shape(leaf)[0] != b:
                _fail(jax.tree_util.keystr(path), f"has shape {np.shape(leaf)}; mini-batching "
                      f"slices rows, so every leaf needs B={b} rows first")
    k = config.num_objectives
    if tuple(np.shape(weights)) != (k,):
        raise ValueError(f"train step: weights have shape {tuple(np.shape(weights))}; "
                         f"expected ({k},), one lambda per objective")


def check_batch_values(config: GRPOConfig, batch: Mapping[str, Any]) -> None:
    """Host-side value checks a jitted step cannot make (call on numpy data, e.g. in tests or
    the input pipeline): source ids in [0, S) or -1 (padding), one source per group."""
    check_inputs(config, batch, np.ones((config.num_objectives,), np.float32))
    ids = np.asarray(batch["source_id"])
    bad = np.flatnonzero((ids != PADDING_SOURCE) & ((ids < 0) | (ids >= config.num_sources)))
    if bad.size:
        _fail("source_id", f"row {bad[0]} has source {ids[bad[0]]}; expected 0.."
                           f"{config.num_sources - 1} or {PADDING_SOURCE} (padding)")
    groups = ids.reshape(-1, config.group_size)
    mixed = np.flatnonzero((groups != groups[:, :1]).any(axis=1))
    if mixed.size:
        g = mixed[0]
        _fail("source_id", f"group {g} (rows {g * config.group_size}.."
                           f"{(g + 1) * config.group_size - 1}) mixes sources {groups[g]}; "
                           "a group's G rows share one source")


# --------------------------------------------------------------------------- row slicing


def _split_rows(tree: Any, num_minibatches: int) -> Any:
    """[B, ...] leaves -> [M, B / M, ...] (M = 1: a leading axis of 1, any leaf shape)."""
    if num_minibatches == 1:
        return jax.tree.map(lambda x: jnp.asarray(x)[None], tree)
    return jax.tree.map(lambda x: x.reshape((num_minibatches, -1) + x.shape[1:]), tree)


def _shuffle_groups(tree: Any, key: jax.Array, group_size: int, rows: int) -> Any:
    order = jax.random.permutation(key, rows // group_size)
    index = (order[:, None] * group_size + jnp.arange(group_size)).reshape(-1)
    return jax.tree.map(lambda x: jnp.take(x, index, axis=0), tree)


def _select(keep_new: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


# --------------------------------------------------------------------------- the step


def _recompute_old_logprobs(config: GRPOConfig, logprob_fn: LogprobFn, params: Any,
                            batch: Mapping[str, Any]) -> jax.Array:
    """The pre-update policy's log-probs [B, T], one mini-batch at a time."""
    shape = np.shape(batch["completion_mask"])
    logprobs = jax.lax.map(lambda mb: logprob_fn(params, mb)[0].astype(jnp.float32),
                           _split_rows(batch, config.num_minibatches))
    return jax.lax.stop_gradient(logprobs.reshape(shape))


def _make_update(config: GRPOConfig, logprob_fn: LogprobFn,
                 optimizer: optax.GradientTransformation, weights: jax.Array):
    """One optimizer update on one mini-batch (a lax.scan body over (params, opt_state))."""

    def loss_fn(params, minibatch):
        batch = minibatch["batch"]
        logprobs, entropy = logprob_fn(params, batch)
        expected = tuple(np.shape(minibatch["loss_mask"]))
        for name, value in (("token_logprobs", logprobs), ("token_entropy", entropy)):
            if value is not None and tuple(value.shape) != expected:
                raise ValueError(f"logprob_fn returned {name} of shape {value.shape}; "
                                 f"expected {expected} (rows x completion tokens)")
        old = minibatch["old_logprobs"] if config.recompute_old_logprobs \
            else batch["old_logprobs"]
        return grpo.policy_loss(config, weights, logprobs, old, minibatch["advantages"],
                                minibatch["loss_mask"], batch["source_id"],
                                batch.get("ref_logprobs") if config.beta > 0 else None,
                                entropy)

    def update(carry, minibatch):
        params, opt_state = carry
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, minibatch)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        carry = (_select(finite, new_params, params), _select(finite, new_opt_state, opt_state))
        return carry, dict(aux, loss=loss, grad_norm=grad_norm, skipped=~finite)

    return update


def make_train_step(config: GRPOConfig, logprob_fn: LogprobFn,
                    optimizer: optax.GradientTransformation, *, donate_state: bool = True
                    ) -> Callable[[TrainState, Mapping[str, Any], jax.Array],
                                  tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted step(state, batch, weights) -> (state, metrics); the state is donated.

    Compiles once per batch shape / dtype structure; pass weights as a float32 [K] array.
    """

    def train_step(state: TrainState, batch: Mapping[str, Any], weights: jax.Array):
        check_inputs(config, batch, weights)
        weights = jnp.asarray(weights, jnp.float32)
        rows = np.shape(batch["completion_mask"])[0]
        rng, shuffle_key = jax.random.split(state.rng)
        advantages, reward_stats = grpo.rollout_advantages(config, batch, weights)
        loss_mask = grpo.completion_loss_mask(config, batch)
        samples = {"batch": batch, "advantages": advantages, "loss_mask": loss_mask}
        metrics = {}
        if config.recompute_old_logprobs:
            samples["old_logprobs"] = _recompute_old_logprobs(config, logprob_fn, state.params,
                                                              batch)
            if "old_logprobs" in batch:
                metrics["logprob_abs_diff"] = _sampler_vs_trainer(config, batch,
                                                                  samples["old_logprobs"])
        update = _make_update(config, logprob_fn, optimizer, weights)

        def epoch(carry, key):
            epoch_rows = (_shuffle_groups(samples, key, config.group_size, rows)
                          if config.shuffle_minibatches else samples)
            return jax.lax.scan(update, carry, _split_rows(epoch_rows, config.num_minibatches))

        (params, opt_state), per_update = jax.lax.scan(
            epoch, (state.params, state.opt_state),
            jax.random.split(shuffle_key, config.num_iterations))
        metrics = {**summarise(config, per_update, reward_stats, batch, weights), **metrics}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  rng=rng)
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=(0,) if donate_state else ())


def _sampler_vs_trainer(config: GRPOConfig, batch: Mapping[str, Any],
                        recomputed: jax.Array) -> jax.Array:
    """Mean |sampler log-prob - recomputed log-prob| over the RL completion tokens."""
    rl = grpo.membership(config, batch["source_id"]).rl_row
    mask = jnp.asarray(batch["completion_mask"]).astype(jnp.float32) * rl[:, None]
    diff = jnp.where(mask > 0, jnp.abs(batch["old_logprobs"] - recomputed), 0.0)
    return grpo._safe_divide(diff.sum(), mask.sum())


def summarise(config: GRPOConfig, per_update: dict[str, jax.Array],
              reward_stats: dict[str, jax.Array], batch: Mapping[str, Any],
              weights: jax.Array) -> dict[str, jax.Array]:
    """Step metrics from the per-update outputs ([num_iterations, num_minibatches, ...]).

    Scalars: loss, policy_loss, kl (beta > 0), grad_norm (before clipping) and the means over
    updates; clip_fraction_{low,high,dual} and entropy over all RL tokens of all updates;
    logprob_abs_diff (sampler vs trainer, first epoch); skipped (1.0 if any update was
    skipped) and skipped_updates; completion_length_{mean,max} and truncated_fraction over
    RL rows; zero_variance_group_fraction. Per objective [K]: objective_reward_{mean,std},
    objective_ntp_loss (first epoch, pre-update for its first mini-batch),
    objective_zero_variance_fraction, objective_loss (mean over updates), objective_weight,
    and objective_signal / objective_present: the inputs of recap.update (raw reward mean
    for RL objectives, NTP loss for SFT ones).
    """
    ratio = grpo._safe_divide
    total = lambda name: per_update[name].sum(axis=(0, 1))  # noqa: E731
    first_epoch = lambda name: per_update[name][0].sum(axis=0)  # noqa: E731
    ntp = ratio(first_epoch("ntp_sum"), first_epoch("ntp_count"))
    is_sft = jnp.asarray(config.objective_is_sft)
    out = {"loss": per_update["loss"].mean(), "policy_loss": per_update["policy_loss"].mean(),
           "grad_norm": per_update["grad_norm"].mean(),
           "skipped": per_update["skipped"].any().astype(jnp.float32),
           "skipped_updates": per_update["skipped"].sum().astype(jnp.int32),
           "objective_loss": per_update["objective_loss"].mean(axis=(0, 1)),
           "objective_ntp_loss": ntp, "objective_weight": weights,
           "objective_signal": jnp.where(is_sft, ntp, reward_stats["objective_reward_mean"]),
           "objective_present": jnp.where(is_sft, first_epoch("ntp_count") > 0,
                                          reward_stats["objective_reward_present"])}
    for name in ("low", "high", "dual"):
        out[f"clip_fraction_{name}"] = ratio(total(f"clip_{name}_sum"), total("clip_count"))
    if "entropy_sum" in per_update:
        out["entropy"] = ratio(total("entropy_sum"), total("rl_token_count"))
    if "kl" in per_update:
        out["kl"] = per_update["kl"].mean()
    if not config.recompute_old_logprobs:
        out["logprob_abs_diff"] = ratio(first_epoch("logprob_abs_diff_sum"),
                                        first_epoch("rl_token_count"))
    rl = grpo.membership(config, batch["source_id"]).rl_row
    lengths = jnp.asarray(batch["completion_mask"]).astype(jnp.float32).sum(axis=1)
    out["completion_length_mean"] = ratio((lengths * rl).sum(), rl.sum())
    out["completion_length_max"] = jnp.where(rl > 0, lengths, 0.0).max()
    if "truncated" in batch:
        out["truncated_fraction"] = ratio(
            (jnp.asarray(batch["truncated"], jnp.float32) * rl).sum(), rl.sum())
    out.update({name: value for name, value in reward_stats.items()
                if name != "objective_reward_present"})
    return out
