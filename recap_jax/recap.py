"""RECAP: online reweighting of the objectives of RLVR training with replay.

Symbols follow recap-method.md (the paper arXiv 2510.21978, Eq. 1, and its released code).
K objectives; per objective and step one scalar *signal* (an RL objective's batch-mean raw
reward, higher is better; an SFT objective's batch-mean NTP loss, lower is better). From the
last 2W signals of each objective RECAP computes a convergence rate c_k, an instability
i_k, and the weights lambda (shape [K]) that the next train step uses.

Public API
    objectives = ObjectiveSet([("reasoning", "rl", ("accuracy", "format_think")),
                               ("ocr", "sft", ())])   # names "reasoning/accuracy", "ocr/ntp"
    config = objectives.recap_config(variant="released", window=10, alpha=0.5)
    state = init(config, objectives.num_objectives)
    # each train step (all jittable): the previous update's weights weight this step
    per_sample = objectives.sample_weights(state.weights, source_ids)  # `reward` mode
    signals, present = objectives.objective_means(source_ids, rewards, ntp_losses)
    state, weights = update(config, state, signals, present)  # weights for the next step
    state.c, state.i, state.s; objectives.metrics(state)       # latest diagnostics

`update` is pure and jittable (`jax.jit(update, static_argnums=0)`, or close over the config);
`config` is a frozen, hashable dataclass and is never traced. `present[k]` marks the
objectives observed this step: the others keep their history untouched. `ordered_history`
gives the ring buffer oldest-first.

Variants (see recap-method.md, "Weight update")
    released  c_k from the newest 2m values (m = n // 2), split old | new:
              reward: c = sum(old) / sum(new), loss: c = sum(new) / sum(old);
              i_k = population std / mean over the same values (coefficient of variation);
              lambda = K_seen * (alpha softmax(c / T) + (1 - alpha) softmax(i / T)) over the
              objectives seen so far; no warm-up. Logged s = alpha c + (1 - alpha) i.
    paper     on losses (reward r enters as L = r_max - r): mu / mu_old = means of the newest
              W / the W before; c = mu_old / mu; i = sigma / (mu + mu_old) with sigma^2 =
              sum over the 2W values of (L - centre)^2 / (2W - 1), centre = mu (Eq. 1 and
              Algorithm 1, `paper_sigma="window"`, the default) or the mean of all 2W values
              (Algorithm 2's pseudocode, `paper_sigma="2w"`);
              s = alpha c + (1 - alpha) i; lambda = K_ready * softmax(s / T) over objectives
              with 2W values; an objective still in warm-up has weight 1.
    dwa       (Liu et al., 2019) r_k = L(t-1) / L(t-2) for losses, R(t-2) / R(t-1) for rewards
              (so r > 1 means "got worse", as for released c); lambda = K_ready softmax(r / T)
              over objectives with 2 values, others 1. Default T = 2. Logged c = s = r, i = 0.
    static    the configured weights (default all 1): "no reweighting". Logs the released
              c, i and s as diagnostics only.
alpha = "anneal" means alpha = clip(1 - step / max_steps, 0, 1), with step the number of
`update` calls before this one (so the first call uses alpha = 1).

Where the released code and the paper disagree, and what we do
    - Direction. Eq. 1 is written on losses and up-weights objectives whose loss falls fast
      (c = mu_old / mu > 1). The released code computes c = sum(old) / sum(new) on rewards,
      which up-weights objectives that got *worse* lately. `paper` follows Eq. 1 (rewards
      converted to losses with L = r_max - r, a conversion of ours); `released` follows the
      code that produced the published tables.
    - Mixed directions. The released code applies the RL formula to every objective during
      RL batches and the SFT formula during SFT batches, so rewards and losses are mixed up
      inside one normalisation. We give every objective its own direction (reward: higher
      is better, loss: lower is better; `RecapConfig.directions`, derived from the objective
      kind by `ObjectiveSet`), in every variant.
    - Instability. The paper divides an unbiased std over 2W values by mu + mu_old; the code
      takes the coefficient of variation (population std / mean). Each variant keeps its own.
    - Sigma's centre (`paper` only). Eq. 1 and Algorithm 1 centre sigma on the current
      window's mean mu; Algorithm 2's pseudocode on the mean of all 2W values. Both are
      offered (`RecapConfig.paper_sigma`); the equation is the default.
    - Saturation (`paper` only). With L = r_max - r, a reward approaching r_max drives mu
      towards 0, so c = mu_old / mu and i = sigma / (mu + mu_old) grow without bound (the
      worked example's format reward, 0.2 -> 0.97, gives c = 8.33): softmax(s / T) then puts
      nearly all K of the weight on the saturated objective, for as long as the newest window
      stays near r_max. The released variant has no such pole (its c is a ratio of rewards).
    - Warm-up. The paper waits for 2W values; the code has none. Each variant keeps its own;
      with round-robin sources, warm-up is per objective (see `paper` above).

Numerical safeguards (all variants give finite weights >= 0 for any input)
    - A non-finite signal (nan, inf) of a present objective is skipped (history unchanged)
      and counted in `state.skipped`.
    - c and i are scale-invariant, so each objective's window is divided by its largest
      magnitude first: tiny and huge signals behave like moderate ones, sums cannot overflow.
    - Every ratio floors |denominator| at `eps` (relative to that largest magnitude, sign
      kept); 0 / 0 is 1 for rates (c, dwa r: "no change") and 0 for i ("no variation").
      Ratios, scores and logits are clipped to +-1e30, so softmax(s / T) stays finite even
      for T -> 0; the softmax is max-shifted and masked to the participating objectives.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = ("released", "paper", "static", "dwa")
PAPER_SIGMA_CENTRES = ("window", "2w")
DIRECTIONS = ("reward", "loss")  # reward: higher is better; loss: lower is better
KINDS = ("rl", "sft")
DEFAULT_TEMPERATURE = {"released": 5.0, "paper": 5.0, "static": 5.0, "dwa": 2.0}
_MAX_ABS = 1e30  # clip bound for ratios, scores and logits
_F32_MAX = float(np.finfo(np.float32).max)


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"RecapConfig.{field}={value!r} is invalid; allowed: {allowed}")


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class RecapConfig:
    """Hyper-parameters of the RECAP weight update (hashable: a static jit argument).

    Attributes:
      variant: "released" (default), "paper", "static" or "dwa"; see the module docstring.
      window: W >= 1; the state keeps the last 2W signals per objective.
      temperature: T > 0 (inf allowed: uniform weights); None means 5.0, or 2.0 for dwa.
      alpha: mixing weight in [0, 1] between convergence c and instability i, or "anneal"
        for alpha = 1 - step / max_steps (clipped to [0, 1]).
      max_steps: positive int; required when alpha == "anneal".
      directions: per objective "reward" (higher is better) or "loss" (lower is better);
        None means every objective is a reward.
      reward_upper_bounds: per objective r_max for the `paper` conversion L = r_max - r
        (ignored for losses); None means 1.0 for each (true of every built-in reward).
      static_weights: per objective weights (finite, >= 0) of the `static` variant; None
        means all 1.
      eps: relative floor of |denominator| in every ratio, in (0, 1); see module docstring.
      paper_sigma: `paper` only, the centre of sigma: "window" (Eq. 1 / Algorithm 1: the
        newest window's mean mu; default) or "2w" (Algorithm 2: the mean of all 2W values).
    """

    variant: str = "released"
    window: int = 10
    temperature: float | None = None
    alpha: float | str = 0.5
    max_steps: int | None = None
    directions: tuple[str, ...] | None = None
    reward_upper_bounds: tuple[float, ...] | None = None
    static_weights: tuple[float, ...] | None = None
    eps: float = 1e-6
    paper_sigma: str = "window"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if self.variant not in VARIANTS:
            _fail("variant", self.variant, " | ".join(VARIANTS))
        if not isinstance(self.window, numbers.Integral) or isinstance(self.window, bool) \
                or self.window < 1:
            _fail("window", self.window, "an int >= 1")
        set_("window", int(self.window))
        if self.temperature is None:
            set_("temperature", DEFAULT_TEMPERATURE[self.variant])
        if not _is_number(self.temperature) or not self.temperature > 0:
            _fail("temperature", self.temperature, "a number > 0 (inf allowed), or None")
        set_("temperature", float(self.temperature))
        if isinstance(self.alpha, str):
            if self.alpha != "anneal":
                _fail("alpha", self.alpha, "a number in [0, 1] or 'anneal'")
        elif not _is_number(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            _fail("alpha", self.alpha, "a number in [0, 1] or 'anneal'")
        else:
            set_("alpha", float(self.alpha))
        if self.max_steps is not None and (
                not isinstance(self.max_steps, numbers.Integral)
                or isinstance(self.max_steps, bool) or self.max_steps < 1):
            _fail("max_steps", self.max_steps, "an int >= 1, or None")
        if self.alpha == "anneal" and self.max_steps is None:
            _fail("max_steps", None, "an int >= 1 (required when alpha='anneal')")
        if self.max_steps is not None:
            set_("max_steps", int(self.max_steps))
        if self.paper_sigma not in PAPER_SIGMA_CENTRES:
            _fail("paper_sigma", self.paper_sigma, " | ".join(PAPER_SIGMA_CENTRES))
        if not _is_number(self.eps) or not 0.0 < self.eps < 1.0:
            _fail("eps", self.eps, "a number in (0, 1)")
        set_("eps", float(self.eps))
        set_("directions", self._per_objective(
            "directions", lambda d: d in DIRECTIONS, str, "'reward' | 'loss' each"))
        set_("reward_upper_bounds", self._per_objective(
            "reward_upper_bounds", lambda b: _is_number(b) and math.isfinite(b), float,
            "finite numbers"))
        set_("static_weights", self._per_objective(
            "static_weights", lambda w: _is_number(w) and math.isfinite(w) and w >= 0, float,
            "finite numbers >= 0"))
        lengths = {name: len(getattr(self, name)) for name in
                   ("directions", "reward_upper_bounds", "static_weights")
                   if getattr(self, name) is not None}
        if len(set(lengths.values())) > 1:
            _fail(next(iter(lengths)), lengths, "per-objective fields of equal length")

    def _per_objective(self, field, is_valid, convert, allowed):
        values = getattr(self, field)
        if values is None:
            return None
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) \
                or len(values) == 0:
            _fail(field, values, f"None or a non-empty sequence of {allowed}")
        for k, v in enumerate(values):
            if not is_valid(v):
                _fail(f"{field}[{k}]", v, allowed)
        return tuple(convert(v) for v in values)

    def check_num_objectives(self, num_objectives: int) -> None:
        """Raises ValueError if a per-objective field's length is not num_objectives."""
        for field in ("directions", "reward_upper_bounds", "static_weights"):
            values = getattr(self, field)
            if values is not None and len(values) != num_objectives:
                _fail(field, values, f"exactly {num_objectives} entries (one per objective)")


@flax.struct.dataclass
class RecapState:
    """RECAP state of K objectives (a pytree; lives in the train state and checkpoints).

    history: [K, 2W] float32 ring buffer; the j-th signal of objective k is stored at slot
      j % 2W. `ordered_history` returns it oldest-first.
    count: [K] int32, signals recorded so far per objective (fill = min(count, 2W)).
    skipped: [K] int32, non-finite signals dropped per objective.
    step: [] int32, `update` calls so far.
    weights: [K] float32, lambda from the latest update (the next step's weights).
    c, i, s: [K] float32, the latest convergence rate c_k, instability i_k and score s_k.
    """

    history: jax.Array
    count: jax.Array
    skipped: jax.Array
    step: jax.Array
    weights: jax.Array
    c: jax.Array
    i: jax.Array
    s: jax.Array


def init(config: RecapConfig, num_objectives: int) -> RecapState:
    """Empty state for `num_objectives` objectives; weights start at 1 (static: configured)."""
    if not isinstance(num_objectives, numbers.Integral) or num_objectives < 1:
        raise ValueError(f"recap.init: num_objectives={num_objectives!r}; need an int >= 1")
    config.check_num_objectives(num_objectives)
    k = int(num_objectives)
    ones = jnp.ones((k,), jnp.float32)
    weights = _static_weights(config, k)
    alpha = _alpha(config, jnp.zeros((), jnp.int32))
    return RecapState(
        history=jnp.zeros((k, 2 * config.window), jnp.float32),
        count=jnp.zeros((k,), jnp.int32), skipped=jnp.zeros((k,), jnp.int32),
        step=jnp.zeros((), jnp.int32), weights=weights, c=ones,
        i=jnp.zeros((k,), jnp.float32), s=alpha * ones)


def ordered_history(state: RecapState) -> tuple[jax.Array, jax.Array]:
    """The ring buffer as [K, 2W] oldest-first (newest last), and its [K, 2W] fill mask."""
    n = state.history.shape[-1]
    slots = (state.count[..., None] + jnp.arange(n, dtype=jnp.int32)) % n
    ordered = jnp.take_along_axis(state.history, slots, axis=-1)
    age = n - 1 - jnp.arange(n)  # 0 = newest
    return ordered, age < jnp.minimum(state.count, n)[..., None]


def update(config: RecapConfig, state: RecapState, signals: jax.Array,
           present: jax.Array) -> tuple[RecapState, jax.Array]:
    """Records this step's signals [K] of the `present` [K] objectives; returns (state, lambda).

    Pure and jittable; the latest c, i, s are in the returned state. Absent objectives (and
    present ones whose signal is not finite, counted in `skipped`) keep their history.
    """
    k, n = state.history.shape[-2:]
    if n != 2 * config.window:
        raise ValueError(f"recap.update: state holds {n} signals per objective but "
                         f"RecapConfig.window={config.window} needs {2 * config.window}")
    for name, x in (("signals", signals), ("present", present)):
        if jnp.shape(x) != (k,):
            raise ValueError(f"recap.update: {name} has shape {jnp.shape(x)}; need ({k},)")
    config.check_num_objectives(k)
    signals = jnp.asarray(signals, jnp.float32)
    present = jnp.asarray(present).astype(bool)
    observed = present & jnp.isfinite(signals)
    slot = (state.count % n)[:, None] == jnp.arange(n, dtype=jnp.int32)
    history = jnp.where(slot & observed[:, None], signals[:, None], state.history)
    state = state.replace(
        history=history, count=state.count + observed.astype(jnp.int32),
        skipped=state.skipped + (present & ~observed).astype(jnp.int32))
    alpha = _alpha(config, state.step)
    weights, c, i, s = _weights(config, state, alpha)
    state = state.replace(step=state.step + 1, weights=weights, c=c, i=i, s=s)
    return state, weights


# --------------------------------------------------------------------------- formulas


def _alpha(config: RecapConfig, step: jax.Array) -> jax.Array:
    if config.alpha == "anneal":
        return jnp.clip(1.0 - step.astype(jnp.float32) / config.max_steps, 0.0, 1.0)
    return jnp.asarray(config.alpha, jnp.float32)


def _static_weights(config: RecapConfig, k: int) -> jax.Array:
    if config.variant == "static" and config.static_weights is not None:
        return jnp.asarray(config.static_weights, jnp.float32)
    return jnp.ones((k,), jnp.float32)


def _is_reward(config: RecapConfig, k: int) -> np.ndarray:
    if config.directions is None:
        return np.ones((k,), bool)
    return np.array([d == "reward" for d in config.directions])


def _ratio(num: jax.Array, den: jax.Array, eps: float, zero_over_zero: float) -> jax.Array:
    """num / den with |den| floored at eps (sign kept), 0/0 -> zero_over_zero, clipped."""
    small = jnp.abs(den) < eps
    safe_den = jnp.where(small, jnp.where(den < 0, -eps, eps), den)
    ratio = jnp.clip(num / safe_den, -_MAX_ABS, _MAX_ABS)
    return jnp.where(small & (jnp.abs(num) < eps), zero_over_zero, ratio)


def _normalise(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Divides each row by its largest |value| under mask (rows of zeros stay zero)."""
    scale = jnp.max(jnp.where(mask, jnp.abs(values), 0.0), axis=-1, keepdims=True)
    return values / jnp.where(scale > 0, scale, 1.0)


def _masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, values, 0.0), axis=-1)


def _masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Max-shifted softmax over the entries in mask (0 elsewhere; all 0 if mask is empty)."""
    logits = jnp.clip(logits, -_MAX_ABS, _MAX_ABS)  # also maps +-inf from s / T
    top = jnp.max(jnp.where(mask, logits, -_MAX_ABS))
    exp = jnp.where(mask, jnp.exp(logits - top), 0.0)
    total = jnp.sum(exp)
    return exp / jnp.where(total > 0, total, 1.0)


def _spread(probs: jax.Array, ready: jax.Array) -> jax.Array:
    """lambda = K_ready * probs on the ready objectives, 1 on the others."""
    return jnp.where(ready, jnp.sum(ready) * probs, 1.0)


def _released_rates(config, h, fill, is_reward):
    """c_k = sum(old)/sum(new) (rewards) or its inverse (losses); i_k = std/mean (CV)."""
    n = h.shape[-1]
    age = n - 1 - jnp.arange(n)
    m = (fill // 2)[:, None]
    used, new = age < 2 * m, age < m
    hn = _normalise(h, used)
    sum_old, sum_new = _masked_sum(hn, used & ~new), _masked_sum(hn, new)
    c = jnp.where(is_reward, _ratio(sum_old, sum_new, config.eps, 1.0),
                  _ratio(sum_new, sum_old, config.eps, 1.0))
    n_used = jnp.maximum(2 * m[:, 0], 1).astype(jnp.float32)
    mean = (sum_old + sum_new) / n_used
    std = jnp.sqrt(_masked_sum(jnp.square(hn - mean[:, None]), used) / n_used)
    i = _ratio(std, mean, config.eps, 0.0)
    has_pair = m[:, 0] > 0
    return jnp.where(has_pair, c, 1.0), jnp.where(has_pair, i, 0.0)


def _paper_rates(config, h, is_reward):
    """Eq. 1 on losses L (L = r_max - r for rewards): c = mu_old / mu, i = sigma/(mu+mu_old);
    sigma is centred on mu (`paper_sigma="window"`) or on the 2W mean ("2w"), over 2W - 1."""
    w = config.window
    k = h.shape[0]
    bounds = (np.ones((k,), np.float32) if config.reward_upper_bounds is None
              else np.asarray(config.reward_upper_bounds, np.float32))
    losses = jnp.clip(jnp.where(is_reward[:, None], bounds[:, None] - h, h), -_F32_MAX, _F32_MAX)
    ln = _normalise(losses, jnp.ones_like(losses, bool))
    mu_old, mu = jnp.mean(ln[:, :w], axis=-1), jnp.mean(ln[:, w:], axis=-1)
    centre = mu if config.paper_sigma == "window" else jnp.mean(ln, axis=-1)
    sigma = jnp.sqrt(jnp.sum(jnp.square(ln - centre[:, None]), axis=-1) / (2 * w - 1))
    return (_ratio(mu_old, mu, config.eps, 1.0),
            _ratio(sigma, mu + mu_old, config.eps, 0.0))


def _dwa_rates(config, h, is_reward):
    """r_k = L(t-1)/L(t-2) for losses, R(t-2)/R(t-1) for rewards (> 1: got worse)."""
    last_two = _normalise(h[:, -2:], jnp.ones_like(h[:, -2:], bool))
    older, newer = last_two[:, 0], last_two[:, 1]
    return jnp.where(is_reward, _ratio(older, newer, config.eps, 1.0),
                     _ratio(newer, older, config.eps, 1.0))


def _weights(config: RecapConfig, state: RecapState, alpha: jax.Array):
    """(lambda, c, i, s) from the state's history (signals of this step included)."""
    k, n = state.history.shape
    h, _ = ordered_history(state)
    fill = jnp.minimum(state.count, n)
    is_reward = _is_reward(config, k)
    temp = config.temperature
    if config.variant == "dwa":
        ready = fill >= 2
        r = jnp.where(ready, _dwa_rates(config, h, is_reward), 1.0)
        weights = _spread(_masked_softmax(r / temp, ready), ready)
        return weights, r, jnp.zeros_like(r), r
    if config.variant == "paper":
        ready = fill >= n
        c, i = _paper_rates(config, h, is_reward)
        c, i = jnp.where(ready, c, 1.0), jnp.where(ready, i, 0.0)
        s = jnp.clip(alpha * c + (1 - alpha) * i, -_MAX_ABS, _MAX_ABS)
        return _spread(_masked_softmax(s / temp, ready), ready), c, i, s
    seen = fill >= 1
    c, i = _released_rates(config, h, fill, is_reward)
    s = jnp.clip(alpha * c + (1 - alpha) * i, -_MAX_ABS, _MAX_ABS)
    if config.variant == "static":
        return _static_weights(config, k), c, i, s
    probs = (alpha * _masked_softmax(c / temp, seen)
             + (1 - alpha) * _masked_softmax(i / temp, seen))
    return _spread(probs, seen), c, i, s


# --------------------------------------------------------------------------- objectives

SFT_OBJECTIVE = "ntp"  # the objective name of an SFT source: "<source>/ntp"


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A training source: `kind` "rl" with its reward function names, or "sft" (no rewards)."""

    name: str
    kind: str
    rewards: tuple[str, ...] = ()

    def __post_init__(self):
        where = f"SourceSpec(name={self.name!r})"
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"{where}.name must be a non-empty string without '/'")
        if self.kind not in KINDS:
            raise ValueError(f"{where}.kind={self.kind!r} is invalid; allowed: rl | sft")
        if isinstance(self.rewards, str) or not isinstance(self.rewards, Sequence):
            raise ValueError(f"{where}.rewards={self.rewards!r} must be a sequence of names")
        rewards = tuple(self.rewards)
        object.__setattr__(self, "rewards", rewards)
        if self.kind == "sft" and rewards:
            raise ValueError(f"{where}.rewards={rewards!r}: an sft source has no rewards")
        if self.kind == "rl" and not rewards:
            raise ValueError(f"{where}.rewards is empty: an rl source needs >= 1 reward")
        for r in rewards:
            if not isinstance(r, str) or not r or "/" in r:
                raise ValueError(f"{where}.rewards: {r!r} is not a name without '/'")
        if len(set(rewards)) != len(rewards):
            raise ValueError(f"{where}.rewards={rewards!r} has duplicates")

    @property
    def objective_names(self) -> tuple[str, ...]:
        tails = self.rewards if self.kind == "rl" else (SFT_OBJECTIVE,)
        return tuple(f"{self.name}/{t}" for t in tails)


class SampleWeights(NamedTuple):
    """Per-sample lambda of `reward` mode: reward [B, R], reward_mask [B, R], sft [B]."""

    reward: jax.Array
    reward_mask: jax.Array
    sft: jax.Array


@dataclasses.dataclass(frozen=True)
class ObjectiveSet:
    """The K objectives of a run, in order: each source's rewards, or `<source>/ntp`.

    Build from SourceSpecs or plain (source, kind, rewards) tuples, e.g.
    `ObjectiveSet([("reasoning", "rl", ("accuracy", "format_think")), ("ocr", "sft", ())])`.
    Source ids are positions in `sources`; a sample's reward columns follow its source's
    `rewards` order, padded to `max_rewards_per_source`. Hashable (a static jit argument).
    """

    sources: tuple[SourceSpec, ...]

    def __post_init__(self):
        specs = []
        for s, spec in enumerate(self.sources):
            try:
                specs.append(spec if isinstance(spec, SourceSpec) else SourceSpec(*spec))
            except (TypeError, ValueError) as err:
                raise ValueError(f"ObjectiveSet.sources[{s}]={spec!r}: {err}") from None
        if not specs:
            raise ValueError("ObjectiveSet.sources is empty; need at least one source")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"ObjectiveSet.sources: duplicate source names in {names}")
        object.__setattr__(self, "sources", tuple(specs))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for s in self.sources for n in s.objective_names)

    @property
    def directions(self) -> tuple[str, ...]:
        """"reward" (higher is better) for RL objectives, "loss" for SFT ones."""
        return tuple("reward" if s.kind == "rl" else "loss"
                     for s in self.sources for _ in s.objective_names)

    @property
    def num_objectives(self) -> int:
        return len(self.names)

    @property
    def max_rewards_per_source(self) -> int:
        return max(len(s.rewards) for s in self.sources)

    def objective_index(self, name: str) -> int:
        if name not in self.names:
            raise ValueError(f"unknown objective {name!r}; known: {', '.join(self.names)}")
        return self.names.index(name)

    def source_id(self, name: str) -> int:
        source_names = [s.name for s in self.sources]
        if name not in source_names:
            raise ValueError(f"unknown source {name!r}; known: {', '.join(source_names)}")
        return source_names.index(name)

    @property
    def column_objective_index(self) -> np.ndarray:
        """[S, R + 1] int32: objective of source s's reward column r < R, and of its NTP loss
        (column R); -1 where there is none. Slices: reward_objective_index [S, R],
        sft_objective_index [S] (e.g. for the `loss` mode's per-component losses)."""
        r = self.max_rewards_per_source
        table = np.full((len(self.sources), r + 1), -1, np.int32)
        start = 0
        for s, spec in enumerate(self.sources):
            columns = list(range(len(spec.rewards))) if spec.kind == "rl" else [r]
            table[s, columns] = np.arange(start, start + len(columns))
            start += len(columns)
        return table

    reward_objective_index = property(lambda self: self.column_objective_index[:, :-1])
    sft_objective_index = property(lambda self: self.column_objective_index[:, -1])

    def recap_config(self, **kwargs) -> RecapConfig:
        """A RecapConfig whose `directions` follow the objective kinds."""
        return RecapConfig(directions=self.directions, **kwargs)

    def sample_weights(self, weights: jax.Array, source_ids: jax.Array) -> SampleWeights:
        """Per-sample weights of `reward` mode from lambda [K] and source ids [B] (jittable).

        reward[b, r] = lambda of the r-th reward of sample b's source (0 where reward_mask is
        False: padding, SFT samples); sft[b] = lambda of an SFT sample's source, 0 for RL
        samples. Ids outside [0, S) (e.g. -1 for padded samples) get all-zero weights.
        """
        weights = self._check_vector("weights", weights)
        index, valid = self._column_index(source_ids)
        mask = (index >= 0) & valid[:, None]
        per_column = jnp.where(mask, weights[jnp.maximum(index, 0)], 0.0)
        return SampleWeights(per_column[:, :-1], mask[:, :-1], per_column[:, -1])

    def objective_means(self, source_ids: jax.Array, reward_values: jax.Array | None = None,
                        sft_values: jax.Array | None = None,
                        sample_weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Per-objective weighted means [K] of per-sample values, and present [K] (jittable).

        reward_values [B, R] hold each sample's raw reward components in its source's order
        (padding columns are ignored, nan included); sft_values [B] hold SFT samples' NTP
        losses (ignored for RL samples); sample_weight [B] >= 0 (default 1; 0 masks a sample;
        token counts give token-weighted means). present[k] is False where objective k got no
        weight; its mean is then 0. One-hot contraction, static shapes: the signals of
        `update` are `objective_means(...)` of the raw rewards / NTP losses.
        """
        index, valid = self._column_index(source_ids)  # [B, R + 1], [B]
        b, r = index.shape[0], self.max_rewards_per_source
        rewards = (jnp.zeros((b, r), jnp.float32) if reward_values is None
                   else jnp.asarray(reward_values, jnp.float32))
        sft = (jnp.zeros((b,), jnp.float32) if sft_values is None
               else jnp.asarray(sft_values, jnp.float32))
        if rewards.shape != (b, r) or sft.shape != (b,):
            raise ValueError(f"objective_means: reward_values {rewards.shape} / sft_values "
                             f"{sft.shape} do not match ({b}, {r}) / ({b},)")
        weight = valid.astype(jnp.float32)
        if sample_weight is not None:
            weight = weight * jnp.asarray(sample_weight, jnp.float32)
        values = jnp.concatenate([rewards, sft[:, None]], axis=1)  # [B, R + 1]
        # padding, masked and invalid samples may hold nan: keep them out of the sums
        values = jnp.where((index >= 0) & (weight > 0)[:, None], values, 0.0)
        onehot = index[..., None] == jnp.arange(self.num_objectives)  # [B, R + 1, K]
        contrib = onehot * weight[:, None, None]
        totals = jnp.einsum("bj,bjk->k", values, contrib)
        counts = jnp.sum(contrib, axis=(0, 1))
        present = counts > 0
        return jnp.where(present, totals / jnp.where(present, counts, 1.0), 0.0), present

    def metrics(self, state: RecapState, prefix: str = "recap") -> dict[str, jax.Array]:
        """{prefix}/{weight,c,i,s}/{objective name} -> scalar, for logging (jittable)."""
        out = {}
        for field in ("weights", "c", "i", "s"):
            values = getattr(state, field)
            label = "weight" if field == "weights" else field
            out.update({f"{prefix}/{label}/{n}": values[k] for k, n in enumerate(self.names)})
        return out

    def _column_index(self, source_ids):
        """Per-sample [B, R + 1] objective index of each value column, and id validity [B]."""
        ids = jnp.asarray(source_ids)
        if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"source_ids must be a 1-D int array; got {ids.dtype}{ids.shape}")
        valid = (ids >= 0) & (ids < len(self.sources))
        return jnp.asarray(self.column_objective_index)[jnp.where(valid, ids, 0)], valid

    def _check_vector(self, name, x):
        x = jnp.asarray(x, jnp.float32)
        if x.shape != (self.num_objectives,):
            raise ValueError(f"{name} has shape {x.shape}; need ({self.num_objectives},) "
                             f"for objectives {self.names}")
        return x
