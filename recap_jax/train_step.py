"""The jitted GRPO / RECAP policy-gradient step, independent of the model.

    step = make_train_step(config, logprob_fn, optimizer)
    state, metrics = step(state, batch, weights)      # weights: lambda [K] float32
    step = make_train_step(config, logprob_fn, optimizer, recap=recap_config)
    state, metrics = step(state, batch)               # lambda from state.recap_state + batch
    state, metrics = step(state, batch, reference_params=ref)   # beta > 0: KL to ref inside

`logprob_fn(params, batch) -> (token_logprobs [B, T], token_entropy [B, T] or None)` is the
policy: for the VLM, a forward over prompt + completion that gathers the completion tokens'
log-probs (at the sampler's temperature). It receives the batch dict (or a mini-batch of it)
as given, so it may read any extra fields (input ids, pixels, positions, ...). With
``make_train_step(..., logprob_rng=True)`` it also takes a PRNG key, ``logprob_fn(params,
batch, rng)``, for a stochastic training forward (LoRA dropout): each update's forward gets a
fresh key derived from the state's key; the pre-update and reference forwards get none.

Inside one jit, with the state donated:
  0. with ``recap``: this batch's per-objective signals are appended to RECAP's history
     (state.recap_state) and lambda is recomputed from it, so the batch is weighted by lambda
     that includes its own signal (recap-method.md, "Timing of the weights"). An RL
     objective's signal is its batch-mean raw reward (known before the loss); an SFT
     objective's is its NTP loss under stop_gradient: from the very forward pass that gives
     the gradient when the step makes one update, from a pre-update forward otherwise;
     with ``reference_params``, the reference log-probs (KL term) are computed here too;
  1. advantages from the whole rollout batch (grpo.rollout_advantages, lambda applied there);
  2. old log-probs: the sampler's (`old_logprobs`), or recomputed with the pre-update params
     when config.recompute_old_logprobs;
  3. num_iterations epochs x num_minibatches optimizer updates (lax.scan), each on a slice
     of whole groups; an update whose loss or gradient norm is not finite is skipped
     (params and optimizer state kept) and counted;
  4. metrics, all computed in jit (see `summarise`).

A batch is a mapping of arrays (any extra fields reach ``logprob_fn``) or a `TrainBatch`.
With num_minibatches > 1, a mapping's leaves need the row axis first (shape [B, ...]); a
TrainBatch is split by whole groups: its completion rows [B] and its prompt rows [B / G] go to
the mini-batches, the prompts' image patches (a flat list without a row axis) are shared, so
each mini-batch runs the vision tower over all the step's images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from recap_jax import grpo
from recap_jax import recap as recap_lib
from recap_jax.grpo import GRPOConfig
from recap_jax.train_state import TrainState

LogprobFn = Callable[[Any, Mapping[str, Any]], tuple[jax.Array, jax.Array | None]]
PADDING_SOURCE = -1


@flax.struct.dataclass
class TrainBatch:
    """One train step's batch: B = B_p x G rows, T completion tokens, F reward columns.

    prompt: the B_p prompts' `ModelInputs` (images included, a flat patch list).
    completions [B, T] int32, completion_mask [B, T] (row b G + g: sample g of prompt b; an
      SFT row: its reference answer), source_id [B] int32 (-1: padding), rewards [B, F]
      float32 (raw components in the source's order), old_logprobs [B, T] float32 (the
      sampler's), truncated [B] bool (hit the length limit without EOS).
    Read-only item access (``batch["rewards"]``) serves the loss functions written on
    mappings.
    """

    prompt: Any
    completions: Any
    completion_mask: Any
    source_id: Any
    rewards: Any
    old_logprobs: Any
    truncated: Any

    def __getitem__(self, name: str) -> Any:
        if name not in self:
            raise KeyError(name)
        return getattr(self, name)

    def __contains__(self, name: str) -> bool:
        return name in _BATCH_FIELDS and getattr(self, name) is not None

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name) if name in self else default

    def keys(self):
        return [name for name in _BATCH_FIELDS if name in self]


_BATCH_FIELDS = tuple(f.name for f in flax.struct.dataclasses.fields(TrainBatch))


# --------------------------------------------------------------------------- checks


def _fail(field: str, problem: str) -> None:
    raise ValueError(f"train step: batch[{field!r}] {problem}")


def check_inputs(config: GRPOConfig, batch: Mapping[str, Any], weights: Any,
                 reference: bool = False) -> None:
    """Shape checks (run at trace time; also usable on the host before the first step)."""
    if not isinstance(batch, (Mapping, TrainBatch)):
        raise ValueError(f"train step: batch must be a TrainBatch or a dict of arrays, got "
                         f"{type(batch)}")
    required = ["completion_mask", "source_id", "rewards"]
    required += [] if config.recompute_old_logprobs and config.tis_cap is None \
        else ["old_logprobs"]
    required += ["ref_logprobs"] if config.beta > 0 and not reference else []
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
    if isinstance(batch, TrainBatch):
        prompts = np.shape(batch.prompt.input_ids)[0]
        if prompts * config.group_size != b:
            _fail("prompt", f"holds {prompts} prompts for B={b} rows; expected B / G = "
                            f"{b // config.group_size}")
        if config.shuffle_minibatches:
            raise ValueError("train step: shuffle_minibatches needs a mapping batch (a "
                             "TrainBatch's images are not split by rows)")
    elif config.num_minibatches > 1 or config.shuffle_minibatches:
        for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
            if np.ndim(leaf) == 0 or np.shape(leaf)[0] != b:
                _fail(jax.tree_util.keystr(path), f"has shape {np.shape(leaf)}; mini-batching "
                      f"slices rows, so every leaf needs B={b} rows first")
    k = config.num_objectives
    if weights is not None and tuple(np.shape(weights)) != (k,):
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


def _split_axis(x: Any, num_minibatches: int, axis: int = 0) -> jax.Array:
    """[..., n, ...] -> [M, ..., n / M, ...] (the axis ``axis`` split into M slices)."""
    x = jnp.asarray(x)
    shape = x.shape[:axis] + (num_minibatches, -1) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _split_rows(tree: Any, num_minibatches: int) -> tuple[Any, Any]:
    """(rows, shared): ``rows`` with a leading mini-batch axis [M, ...] (M = 1 included) and
    ``shared``, the leaves every mini-batch reads whole; `_join` rebuilds one mini-batch."""
    m = num_minibatches
    if isinstance(tree, Mapping) and isinstance(tree.get("batch"), TrainBatch):
        batch = tree["batch"]
        prompt = batch.prompt
        split_prompt = prompt._replace(
            input_ids=_split_axis(prompt.input_ids, m), attention_mask=_split_axis(
                prompt.attention_mask, m), position_ids=_split_axis(prompt.position_ids, m, 1),
            feature_index=_split_axis(prompt.feature_index, m),
            rope_deltas=_split_axis(prompt.rope_deltas, m), pixel_values=None, vision=None)
        rest = {k: v for k, v in tree.items() if k != "batch"}
        rows = dict(jax.tree.map(lambda x: _split_axis(x, m), rest), batch=batch.replace(
            prompt=split_prompt, **{name: None if getattr(batch, name) is None else
                                    _split_axis(getattr(batch, name), m)
                                    for name in _BATCH_FIELDS if name != "prompt"}))
        return rows, (prompt.pixel_values, prompt.vision)
    return jax.tree.map(lambda x: _split_axis(x, m), tree), None


def _join(minibatch: Any, shared: Any) -> Any:
    """One mini-batch of `_split_rows` with its shared leaves put back."""
    if shared is None:
        return minibatch
    batch = minibatch["batch"]
    prompt = batch.prompt._replace(pixel_values=shared[0], vision=shared[1])
    return dict(minibatch, batch=batch.replace(prompt=prompt))


def _shuffle_groups(tree: Any, key: jax.Array, group_size: int, rows: int) -> Any:
    order = jax.random.permutation(key, rows // group_size)
    index = (order[:, None] * group_size + jnp.arange(group_size)).reshape(-1)
    return jax.tree.map(lambda x: jnp.take(x, index, axis=0), tree)


def _select(keep_new: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


# --------------------------------------------------------------------------- the step


def _pre_update_logprobs(config: GRPOConfig, logprob_fn: LogprobFn, params: Any,
                         batch: Mapping[str, Any]) -> jax.Array:
    """The log-probs [B, T] of ``params`` (no gradient), one mini-batch at a time."""
    shape = np.shape(batch["completion_mask"])
    rows, shared = _split_rows({"batch": batch}, config.num_minibatches)
    logprobs = jax.lax.map(
        lambda mb: logprob_fn(params, _join(mb, shared)["batch"])[0].astype(jnp.float32), rows)
    return jax.lax.stop_gradient(logprobs.reshape(shape))


def objective_ntp(config: GRPOConfig, logprobs: jax.Array, loss_mask: jax.Array,
                  source_id: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-objective mean NLL per token [K] of the SFT rows (no gradient), and present [K]."""
    member = grpo.membership(config, source_id).sft  # [B, K]
    mask = jnp.asarray(loss_mask, jnp.float32)
    nll = jnp.einsum("bt,bk->k", -jax.lax.stop_gradient(logprobs).astype(jnp.float32) * mask,
                     member)
    count = jnp.einsum("bt,bk->k", mask, member)
    return grpo._safe_divide(nll, count), count > 0


class _Weighting:
    """lambda for one step: fixed (given, or 1), or RECAP's from the history + this batch.

    `weights(ntp, ntp_present)` returns (lambda [K], new RECAP state or None); RL signals
    (batch-mean raw rewards) are fixed at construction, SFT ones come with each call.
    """

    def __init__(self, config: GRPOConfig, recap: recap_lib.RecapConfig | None, recap_state,
                 fixed: jax.Array | None, reward_stats: dict[str, jax.Array]):
        self.config, self.recap, self.recap_state, self.fixed = config, recap, recap_state, fixed
        self.is_sft = jnp.asarray(config.objective_is_sft)
        self.reward_mean = reward_stats["objective_reward_mean"]
        self.reward_present = reward_stats["objective_reward_present"]

    def weights(self, ntp: jax.Array, ntp_present: jax.Array):
        if self.recap is None:
            return self.fixed, None
        signals = jnp.where(self.is_sft, ntp, self.reward_mean)
        present = jnp.where(self.is_sft, ntp_present, self.reward_present)
        new_state, weights = recap_lib.update(self.recap, self.recap_state, signals, present)
        return weights, new_state


def _ratio_stats(logprobs: jax.Array, old_logprobs: jax.Array, rl_mask: jax.Array):
    """max and 99th percentile of the importance ratio pi / pi_old over the RL tokens."""
    log_ratio = jnp.clip(jax.lax.stop_gradient(logprobs).astype(jnp.float32) - old_logprobs,
                         -20.0, 20.0)
    ratio = jnp.where(rl_mask > 0, jnp.exp(log_ratio), jnp.nan)
    any_token = jnp.any(rl_mask > 0)
    return (jnp.where(any_token, jnp.nanmax(ratio), 1.0),
            jnp.where(any_token, jnp.nanquantile(ratio, 0.99), 1.0))


def _make_update(config: GRPOConfig, logprob_fn: LogprobFn,
                 optimizer: optax.GradientTransformation, weighting: _Weighting,
                 whole_batch: Mapping[str, Any], shared: Any, measure_lambda_effect: bool,
                 frozen: tuple[str, Any] | None = None):
    """One optimizer update on one mini-batch (a lax.scan body over (params, opt_state,
    recap_state)).

    The policy's forward (`logprob_fn`) and the loss on its log-probs (`head`) are separate so
    that one forward can serve two backward passes: with ``measure_lambda_effect`` the
    gradient the loss would have with lambda = 1 is computed too, and their cosine logged.
    Without precomputed weights (RECAP with one update per step), lambda and the advantages
    are computed in `head` from this forward's NTP losses (stop_gradient).
    ``frozen`` = (key, value): the carried params lack that entry; the forward sees it added.
    A mini-batch with a ``forward_key`` passes it to ``logprob_fn`` (``logprob_rng``).
    """

    def forward(params, minibatch):
        if frozen is not None:
            params = {**params, frozen[0]: frozen[1]}
        rng = (minibatch["forward_key"],) if "forward_key" in minibatch else ()
        logprobs, entropy = logprob_fn(params, minibatch["batch"], *rng)
        expected = tuple(np.shape(minibatch["loss_mask"]))
        for name, value in (("token_logprobs", logprobs), ("token_entropy", entropy)):
            if value is not None and tuple(value.shape) != expected:
                raise ValueError(f"logprob_fn returned {name} of shape {value.shape}; "
                                 f"expected {expected} (rows x completion tokens)")
        return logprobs, entropy

    def head(logprobs, entropy, minibatch, unit_weights: bool = False):
        batch = minibatch["batch"]
        new_recap = None
        if unit_weights:
            weights = jnp.ones((config.num_objectives,), jnp.float32)
            advantages = minibatch["advantages_unit"] if "advantages_unit" in minibatch else \
                grpo.rollout_advantages(config, whole_batch, weights)[0]
        elif "weights" in minibatch:
            weights, advantages = minibatch["weights"][0], minibatch["advantages"]
        else:  # one update: lambda from this very forward (the whole batch)
            weights, new_recap = weighting.weights(*objective_ntp(
                config, logprobs, minibatch["loss_mask"], batch["source_id"]))
            advantages = grpo.rollout_advantages(config, whole_batch, weights)[0]
        old = minibatch["old_logprobs"]
        reference = minibatch.get("ref_logprobs", batch.get("ref_logprobs"))
        loss, aux = grpo.policy_loss(config, weights, logprobs, old, advantages,
                                     minibatch["loss_mask"], batch["source_id"],
                                     reference if config.beta > 0 else None, entropy,
                                     sampler_logprobs=batch["old_logprobs"]
                                     if config.tis_cap is not None else None)
        rl_rows = grpo.membership(config, batch["source_id"]).rl_row
        aux["ratio_max"], aux["ratio_p99"] = _ratio_stats(
            logprobs, old, minibatch["loss_mask"] * rl_rows[:, None])
        aux["weights"] = weights
        return loss, (aux, new_recap)

    def update(carry, minibatch):
        params, opt_state, recap_state = carry
        minibatch = _join(minibatch, shared)
        (logprobs, entropy), pullback = jax.vjp(lambda p: forward(p, minibatch), params)
        # the entropy is a metric (zero cotangent) unless the loss has an entropy bonus
        with_bonus = config.entropy_coef > 0 and entropy is not None
        argnums = (0, 1) if with_bonus else 0
        no_entropy = None if entropy is None else jnp.zeros_like(entropy)

        def cotangents(unit_weights: bool = False):
            (loss, (aux, new_recap)), grads = jax.value_and_grad(
                head, argnums=argnums, has_aux=True)(logprobs, entropy, minibatch, unit_weights)
            return (loss, aux, new_recap), grads if with_bonus else (grads, no_entropy)

        (loss, aux, new_recap), cotangent = cotangents()
        (grads,) = pullback(cotangent)
        if measure_lambda_effect:
            (unit_grads,) = pullback(cotangents(True)[1])
            aux["lambda_gradient_cosine"] = _cosine(grads, unit_grads)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        params, opt_state = (_select(finite, new_params, params),
                             _select(finite, new_opt_state, opt_state))
        if new_recap is not None:
            recap_state = new_recap
        return (params, opt_state, recap_state), dict(aux, loss=loss, grad_norm=grad_norm,
                                                      skipped=~finite)

    return update


def _cosine(a: Any, b: Any) -> jax.Array:
    """cos(a, b) of two gradient pytrees (1 when either is 0: nothing to compare)."""
    dot = sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    norms = _global_norm(a) * _global_norm(b)
    return jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), 1.0)


def advantage_change(config: GRPOConfig, batch: Mapping[str, Any], weights: jax.Array
                     ) -> jax.Array:
    """||A(lambda) - A(1)|| / ||A(1)|| over the batch: how much lambda changes the advantages
    (0 when it cannot, e.g. a common factor on one source's lambdas in `reward` mode)."""
    with_weights = grpo.rollout_advantages(config, batch, weights)[0]
    unit = grpo.rollout_advantages(config, batch, jnp.ones_like(weights))[0]
    return jnp.linalg.norm(with_weights - unit) / jnp.maximum(jnp.linalg.norm(unit), 1e-12)


def _global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32)))
                        for x in jax.tree.leaves(tree)))


def _update_norm(new: Any, old: Any) -> jax.Array:
    """Global L2 norm of the change of the stored parameters (in their own dtype, so an
    update that bf16 rounds away counts 0)."""
    return _global_norm(jax.tree.map(
        lambda n, o: jnp.asarray(n, jnp.float32) - jnp.asarray(o, jnp.float32), new, old))


def make_train_step(config: GRPOConfig, logprob_fn: LogprobFn,
                    optimizer: optax.GradientTransformation, *,
                    recap: recap_lib.RecapConfig | None = None,
                    measure_lambda_effect: bool = False, donate_state: bool = True,
                    frozen_key: str | None = None, logprob_rng: bool = False):
    """The jitted step(state, batch, weights=None, reference_params=None) -> (state, metrics).

    weights: lambda [K] float32, or None for 1 (baselines); with ``recap`` it must be None:
      lambda comes from ``state.recap_state`` (a recap.RecapState) and this batch's signals,
      and the updated RECAP state is returned in the new state.
    reference_params: the frozen reference policy's params when config.beta > 0 and the
      batch holds no ``ref_logprobs``: its log-probs are computed inside the step.
    measure_lambda_effect: also log ``lambda_gradient_cosine``, the cosine between the
      update's gradient and the one lambda = 1 would give (one more backward pass per
      update, no more forward). ``advantage_change`` (||A(lambda) - A(1)|| / ||A(1)||) is
      always logged.
    frozen_key: params is a dict whose entry ``frozen_key`` (LoRA's "base") is a constant of
      the step: neither differentiated nor carried through the updates (no gradient, update
      or copy of it is formed); ``optimizer`` then sees the params without it
      (`lora.adapter_optimizer` takes both forms).
    logprob_rng: ``logprob_fn(params, batch, rng)`` takes a PRNG key (LoRA dropout): the step
      splits the state's key into three (next state, mini-batch shuffling, forwards) and the
      forward of update (epoch e, mini-batch m) gets key [e, m] of a split of the third; the
      pre-update and reference log-probs are computed without a key (no dropout). A step is
      a function of the state, so a resume draws the same keys.
    Compiles once per batch shape / dtype structure. The state is donated.
    """
    single_update = config.num_iterations * config.num_minibatches == 1

    def train_step(state: TrainState, batch: Mapping[str, Any], weights: jax.Array | None = None,
                   reference_params: Any = None):
        check_inputs(config, batch, weights, reference=reference_params is not None)
        if recap is not None and weights is not None:
            raise ValueError("train step: weights are computed by RECAP; pass weights=None")
        k = config.num_objectives
        fixed = jnp.ones((k,), jnp.float32) if weights is None else jnp.asarray(weights,
                                                                                 jnp.float32)
        rows = np.shape(batch["completion_mask"])[0]
        if logprob_rng:
            rng, shuffle_key, forward_key = jax.random.split(state.rng, 3)
        else:
            rng, shuffle_key = jax.random.split(state.rng)
        _, reward_stats = grpo.rollout_advantages(config, batch, fixed)
        weighting = _Weighting(config, recap, state.recap_state, fixed, reward_stats)
        loss_mask = grpo.completion_loss_mask(config, batch)
        samples = {"batch": batch, "loss_mask": loss_mask}
        metrics = {}
        pre_update = None
        if config.recompute_old_logprobs or (recap is not None and not single_update):
            pre_update = _pre_update_logprobs(config, logprob_fn, state.params, batch)
        if config.recompute_old_logprobs:
            samples["old_logprobs"] = pre_update
            if "old_logprobs" in batch:
                metrics["logprob_abs_diff"] = _sampler_vs_trainer(config, batch, pre_update)
        else:
            samples["old_logprobs"] = jnp.asarray(batch["old_logprobs"], jnp.float32)
        if config.beta > 0 and reference_params is not None:
            samples["ref_logprobs"] = _pre_update_logprobs(config, logprob_fn, reference_params,
                                                           batch)
        recap_state = state.recap_state
        if recap is None or not single_update:
            ntp = objective_ntp(config, pre_update, loss_mask, batch["source_id"]) \
                if pre_update is not None else (jnp.zeros((k,)), jnp.zeros((k,), bool))
            step_weights, new_recap = weighting.weights(*ntp)
            recap_state = recap_state if new_recap is None else new_recap
            samples["advantages"] = grpo.rollout_advantages(config, batch, step_weights)[0]
            samples["weights"] = jnp.broadcast_to(step_weights, (rows, k))  # split like rows
            if measure_lambda_effect:
                samples["advantages_unit"] = grpo.rollout_advantages(
                    config, batch, jnp.ones((k,), jnp.float32))[0]
        split_samples, shared = _split_rows(samples, config.num_minibatches)
        carried, frozen = state.params, None
        if frozen_key is not None:
            frozen = (frozen_key, state.params[frozen_key])
            carried = {k: v for k, v in state.params.items() if k != frozen_key}
        update = _make_update(config, logprob_fn, optimizer, weighting, batch, shared,
                              measure_lambda_effect, frozen)

        epochs = {"shuffle": jax.random.split(shuffle_key, config.num_iterations)}
        if logprob_rng:  # one key per update, [num_iterations, num_minibatches]
            epochs["forward"] = jax.random.split(
                forward_key, (config.num_iterations, config.num_minibatches))

        def epoch(carry, keys):
            rows_of = split_samples
            if config.shuffle_minibatches:
                rows_of = _split_rows(_shuffle_groups(samples, keys["shuffle"], config.group_size,
                                                      rows), config.num_minibatches)[0]
            if "forward" in keys:
                rows_of = dict(rows_of, forward_key=keys["forward"])
            return jax.lax.scan(update, carry, rows_of)

        (params, opt_state, recap_state), per_update = jax.lax.scan(
            epoch, (carried, state.opt_state, recap_state), epochs)
        if frozen is not None:
            params = {**params, frozen_key: frozen[1]}
        used = per_update["weights"][0, 0]
        per_update = {name: value for name, value in per_update.items() if name != "weights"}
        metrics = {**summarise(config, per_update, reward_stats, batch, used), **metrics}
        metrics.update(update_norm=_update_norm(params, state.params),
                       param_norm=_global_norm(params),
                       ratio_max=per_update["ratio_max"].max(),
                       ratio_p99=per_update["ratio_p99"].max(),
                       advantage_change=advantage_change(config, batch, used))
        if measure_lambda_effect:
            metrics["lambda_gradient_cosine"] = per_update["lambda_gradient_cosine"].mean()
        if recap is not None:
            metrics.update(recap_c=recap_state.c, recap_i=recap_state.i)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  rng=rng, recap_state=recap_state)
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
