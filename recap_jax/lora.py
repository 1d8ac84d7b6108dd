"""LoRA (Hu et al. 2021) for Qwen2.5-VL without touching the model: adapters are a separate
pytree next to the frozen base parameters, merged into the kernels inside the loss.

For a targeted kernel W with input axes K and output axes N (``layers.matmul`` contracts x's
last axes with W's first ones), the adapter is A [*K, r] and B [r, *N] (with the leading
``layers`` axis of a stacked kernel), and the policy runs with

    W' = W + (alpha / r) A B          (computed in the compute dtype, inside the loss)

B starts at zero, so the adapted model equals the base at initialisation; A ~ N(0, 1/|K|).
The base enters the loss through ``stop_gradient``: only A and B get gradients, and with
`adapter_optimizer` only they have optimizer state. A and B carry logical axes (A: the
kernel's input axes then an unsharded rank axis; B: the rank axis then the kernel's output
axes), so ``parallel.tree_shardings`` shards them like their base kernels.

Targets are regular expressions over parameter paths (`freeze.param_path`, e.g.
``language_model/layers/self_attn/q_proj/kernel``): `DECODER_TARGETS` (attention q, k, v, o
and MLP gate, up, down of every decoder layer) and, with ``vision=True``, `VISION_TARGETS`
(the vision blocks' qkv, proj and MLP).

Cost of merging (instead of x A B inside each layer): each step materialises the adapted
kernels (one copy of the targeted weights in the compute dtype) and the backward forms dL/dW'
of their size before reducing it to dA, dB; `count_params` reports that transient.

Dropout (``dropout`` = p > 0, PEFT's ``lora_dropout``) needs the x A B form: the TRAINING
forward (``logprob_fn(params, batch, rng)`` with a key, which `make_train_step` passes with
``logprob_rng=True``) runs every targeted kernel as a `layers.AdaptedKernel`,

    y = x W + (alpha / r) (dropout_p(x) A) B

with a fresh mask per update, per kernel, per layer and per use (inverted dropout: kept
elements scaled by 1 / (1 - p)), all derived from ``rng`` (the train state's key, so a seed
and a resume give the same masks). Without a key (the pre-update and reference log-probs,
sampling, evaluation, export) the adapters are merged as with p = 0: dropout is off at
inference, as in PEFT. p = 0 never takes the x A B path (bit-identical to the merged form).
Its cost: a random draw per element of each targeted layer's input (each of q, k, v has its
own mask, as PEFT's), the masked input kept for the backward, and two thin matmuls (rows x K
x r, rows x r x N) per targeted kernel and use; but no merged kernel copy and no dL/dW' in
the step (dA, dB come from [rows, r] products): `tools.memory`'s 7B rank-16 plan (2 x 4
completions of 1,024 + 512 tokens) compiles to 37.0 GiB of temporaries with dropout against
46.2 GiB merged.

    lora_config = LoraConfig(rank=16, alpha=32.0)
    adapters = init_adapters(base, lora_config, jax.random.key(0))
    params = {"base": base, "adapters": adapters}                  # the TrainState's params
    logprob_fn = wrap_logprob_fn(sampling.make_logprob_fn(graphdef, G), lora_config, dtype)
    optimizer = adapter_optimizer(make_optimizer(...))             # state for adapters only
    step = make_train_step(grpo_config, logprob_fn, optimizer, frozen_key="base",  # base: a constant
                           logprob_rng=lora_config.dropout > 0)   # dropout's masks from state.rng
    export = merge_into_base(base, adapters, lora_config)          # for final/ (save_pretrained)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recap_jax.freeze import param_path
from recap_jax.models.qwen2_5_vl import layers

__all__ = ["DECODER_TARGETS", "TARGET_GROUPS", "VISION_TARGETS", "LoraConfig", "adapter_optimizer", "count_params",
           "init_adapters", "merge", "merge_into_base", "target_kernels", "target_patterns",
           "with_dropout", "wrap_logprob_fn"]

DECODER_TARGETS = (r"^language_model/layers/self_attn/(q|k|v|o)_proj/kernel$",
                   r"^language_model/layers/mlp/(gate|up|down)_proj/kernel$")
VISION_TARGETS = (r"^visual/blocks/attn/(qkv|proj)/kernel$",
                  r"^visual/blocks/mlp/(gate|up|down)_proj/kernel$")
# the names ``model.lora.targets`` accepts (comma-separated) -> their path patterns
TARGET_GROUPS = {"attention": DECODER_TARGETS[:1], "mlp": DECODER_TARGETS[1:],
                 "vision": VISION_TARGETS}
LAYERS_AXIS = "layers"
_HEADS_FIRST = ("heads", "vision_heads")  # output projections contract (heads, head_dim)


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"model.lora.{field}={value!r} is invalid; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (config section ``model.lora``).

    rank: r >= 1. alpha: the scale numerator (> 0); W' = W + (alpha / r) A B.
    targets: regular expressions (re.search) over parameter paths; each must match a kernel.
    vision: also adapt the vision blocks (`VISION_TARGETS`).
    dropout: p in [0, 1), the probability of dropping an element of a targeted layer's input
      on the adapter's branch during training (0: off; see the module docstring).
    param_dtype: the adapters' storage dtype (float32: they are what the optimizer updates).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DECODER_TARGETS
    vision: bool = False
    dropout: float = 0.0
    param_dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.rank, numbers.Integral) or isinstance(self.rank, bool) or self.rank < 1:
            _fail("rank", self.rank, "an int >= 1")
        if not isinstance(self.alpha, numbers.Real) or isinstance(self.alpha, bool) \
                or not 0 < self.alpha < math.inf:
            _fail("alpha", self.alpha, "a finite number > 0")
        if isinstance(self.targets, str) or not self.targets:
            _fail("targets", self.targets, "a non-empty tuple of path regular expressions")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                _fail("targets", pattern, f"regular expressions ({error})")
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.vision, bool):
            _fail("vision", self.vision, "True | False")
        if not isinstance(self.dropout, numbers.Real) or isinstance(self.dropout, bool) \
                or not 0 <= self.dropout < 1:
            _fail("dropout", self.dropout, "a number in [0, 1) (0: no dropout)")
        try:
            jnp.dtype(self.param_dtype)
        except TypeError:
            _fail("param_dtype", self.param_dtype, "a dtype name such as float32 or bfloat16")

    @property
    def scale(self) -> float:
        """alpha / r."""
        return self.alpha / self.rank

    @property
    def patterns(self) -> tuple[str, ...]:
        return self.targets + (VISION_TARGETS if self.vision else ())


def target_patterns(names: str) -> tuple[str, ...]:
    """The path patterns of comma-separated `TARGET_GROUPS` names ("attention,mlp,vision")."""
    parts = [n.strip() for n in str(names).split(",") if n.strip()]
    unknown = [n for n in parts if n not in TARGET_GROUPS]
    if not parts or unknown or len(set(parts)) != len(parts):
        _fail("targets", names, f"comma-separated distinct names of {', '.join(TARGET_GROUPS)}")
    return tuple(p for n in parts for p in TARGET_GROUPS[n])


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _shape_axes(variable: nnx.Variable) -> tuple[tuple[int, ...], tuple]:
    shape = tuple(np.shape(variable.get_value()))
    axes = variable.get_metadata().get("logical_axes") or (None,) * len(shape)
    return shape, tuple(axes)


@dataclasses.dataclass(frozen=True)
class _Target:
    """One adapted kernel: its shape, logical axes, the stacked flag and the contracted count."""

    shape: tuple[int, ...]
    axes: tuple
    stacked: bool
    contract: int

    def a_shape_axes(self, rank: int):
        lead = 1 if self.stacked else 0
        k = self.shape[lead:lead + self.contract]
        return (self.shape[:lead] + k + (rank,),
                self.axes[:lead] + self.axes[lead:lead + self.contract] + (None,))

    def b_shape_axes(self, rank: int):
        lead = 1 if self.stacked else 0
        return (self.shape[:lead] + (rank,) + self.shape[lead + self.contract:],
                self.axes[:lead] + (None,) + self.axes[lead + self.contract:])

    @property
    def fan_in(self) -> int:
        lead = 1 if self.stacked else 0
        return int(np.prod(self.shape[lead:lead + self.contract]))


def target_kernels(base: Any, config: LoraConfig) -> dict[str, _Target]:
    """{path: target} of the kernels the config adapts (every pattern must match one)."""
    compiled = [re.compile(p) for p in config.patterns]
    used = [False] * len(compiled)
    found = {}
    leaves = jax.tree_util.tree_flatten_with_path(base, is_leaf=_is_variable)[0]
    for path, leaf in leaves:
        name = param_path(path)
        hits = [i for i, p in enumerate(compiled) if p.search(name)]
        if not hits:
            continue
        for i in hits:
            used[i] = True
        if not _is_variable(leaf):
            raise ValueError(f"lora: {name} is not an nnx.Param (pass nnx.state(model))")
        shape, axes = _shape_axes(leaf)
        stacked = bool(axes) and axes[0] == LAYERS_AXIS
        rest = axes[1:] if stacked else axes
        if len(rest) < 2:
            raise ValueError(f"model.lora.targets: {name} of shape {shape} is not a kernel")
        found[name] = _Target(shape, axes, stacked, 2 if rest[0] in _HEADS_FIRST else 1)
    unused = [p.pattern for p, u in zip(compiled, used) if not u]
    if unused:
        raise ValueError(f"model.lora.targets: pattern(s) {unused} match no parameter; paths look "
                         "like 'language_model/layers/self_attn/q_proj/kernel'")
    return found


def init_adapters(base: Any, config: LoraConfig, rng: jax.Array) -> dict[str, dict[str, nnx.Param]]:
    """{path: {"a": A, "b": B}}: nnx.Params with logical axes; A ~ N(0, 1/|K|), B = 0."""
    dtype = jnp.dtype(config.param_dtype)
    out = {}
    targets = target_kernels(base, config)
    for key, (name, target) in zip(jax.random.split(rng, max(len(targets), 1)), sorted(targets.items())):
        a_shape, a_axes = target.a_shape_axes(config.rank)
        b_shape, b_axes = target.b_shape_axes(config.rank)
        a = jax.random.normal(key, a_shape, jnp.float32) / math.sqrt(target.fan_in)
        out[name] = {"a": nnx.Param(a.astype(dtype), logical_axes=a_axes),
                     "b": nnx.Param(jnp.zeros(b_shape, dtype), logical_axes=b_axes)}
    return out


def _delta(target: _Target, a: jax.Array, b: jax.Array, scale: float, dtype: Any) -> jax.Array:
    """(alpha / r) A B in ``dtype``, with the kernel's shape."""
    lead = 1 if target.stacked else 0
    a2 = a.astype(dtype).reshape(a.shape[:lead] + (-1, a.shape[-1]))
    b2 = b.astype(dtype).reshape(b.shape[:lead + 1] + (-1,))
    spec = "lkr,lrn->lkn" if target.stacked else "kr,rn->kn"
    return (jnp.einsum(spec, a2, b2) * jnp.asarray(scale, dtype)).reshape(target.shape)


def _value(x: Any) -> jax.Array:
    return x.get_value() if _is_variable(x) else x


def _checked_targets(base: Any, adapters: dict, config: LoraConfig) -> dict[str, _Target]:
    targets = target_kernels(base, config)
    missing = sorted(set(targets) - set(adapters))
    extra = sorted(set(adapters) - set(targets))
    if missing or extra:
        raise ValueError(f"lora: adapters do not match the targets (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); build them with init_adapters and this config")
    return targets


def _merged(base: Any, adapters: dict, config: LoraConfig, dtype_of: Callable[[Any], Any]) -> Any:
    targets = _checked_targets(base, adapters, config)

    def merge_one(path, leaf):
        name = param_path(path)
        if name not in targets:
            return leaf
        w = _value(leaf)
        dtype = dtype_of(w)
        delta = _delta(targets[name], _value(adapters[name]["a"]), _value(adapters[name]["b"]),
                       config.scale, dtype)
        merged = w.astype(dtype) + delta
        return leaf.replace(merged) if _is_variable(leaf) else merged

    return jax.tree_util.tree_map_with_path(merge_one, base, is_leaf=_is_variable)


def merge(base: Any, adapters: dict, config: LoraConfig, dtype: Any = None) -> Any:
    """The base params with W + (alpha / r) A B in the targeted kernels, in ``dtype`` (the
    model's compute dtype; None: each kernel's own dtype). Use inside the loss."""
    return _merged(base, adapters, config, lambda w: w.dtype if dtype is None else dtype)


def merge_into_base(base: Any, adapters: dict, config: LoraConfig) -> Any:
    """For export: W + (alpha / r) A B computed in float32 and stored in W's own dtype."""
    merged = _merged(base, adapters, config, lambda w: jnp.float32)
    dtypes = jax.tree.map(lambda leaf: _value(leaf).dtype, base, is_leaf=_is_variable)
    return jax.tree.map(lambda leaf, dt: leaf.replace(_value(leaf).astype(dt)) if _is_variable(leaf)
                        else leaf.astype(dt), merged, dtypes, is_leaf=_is_variable)


def with_dropout(base: Any, adapters: dict, config: LoraConfig, rng: jax.Array) -> Any:
    """The base params with each targeted kernel's value a `layers.AdaptedKernel` (W, A, B and
    the keys of its dropout masks: one per layer of a stacked kernel), for a training forward
    with dropout ``config.dropout`` > 0, run inside `layers.adapter_scope`. Kernels are
    numbered in sorted path order and the k-th gets ``fold_in(rng, k)`` (split over the layers
    when stacked); its n-th use in the forward folds in n."""
    if not config.dropout > 0:
        raise ValueError(f"lora.with_dropout: model.lora.dropout={config.dropout}; the x A B "
                         "form is for dropout > 0 (use merge)")
    targets = _checked_targets(base, adapters, config)
    keys = {name: jax.random.fold_in(rng, k) for k, name in enumerate(sorted(targets))}

    def adapt(path, leaf):
        name = param_path(path)
        if name not in targets:
            return leaf
        target = targets[name]
        key = jax.random.split(keys[name], target.shape[0]) if target.stacked else keys[name]
        kernel = layers.AdaptedKernel(_value(leaf), _value(adapters[name]["a"]), _value(adapters[name]["b"]),
                               key, config.scale, config.dropout)
        return leaf.replace(kernel) if _is_variable(leaf) else kernel

    return jax.tree_util.tree_map_with_path(adapt, base, is_leaf=_is_variable)


def wrap_logprob_fn(logprob_fn: Callable, config: LoraConfig, dtype: Any = None) -> Callable:
    """``logprob_fn(params, batch, rng=None)`` for params ``{"base": ..., "adapters": ...}``: the
    base is a constant (stop_gradient). With ``rng`` and dropout > 0 (a training forward,
    `make_train_step(..., logprob_rng=True)`), the targeted kernels run as x W + s
    (dropout(x) A) B (`with_dropout`, masks from ``rng``); otherwise the adapters are merged
    in ``dtype`` (the compute dtype): dropout is off, and p = 0 ignores ``rng``."""
    def lora_logprob_fn(params, batch, rng=None):
        base = jax.lax.stop_gradient(params["base"])
        if rng is not None and config.dropout > 0:
            with layers.adapter_scope():  # the n-th use of a kernel draws mask n
                return logprob_fn(with_dropout(base, params["adapters"], config, rng), batch)
        return logprob_fn(merge(base, params["adapters"], config, dtype), batch)

    return lora_logprob_fn


def adapter_optimizer(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` on params["adapters"] (its state holds the adapters only); every other
    entry of the params dict (the frozen "base") gets zero updates. Also takes a params dict
    without the base (the train step's ``frozen_key="base"`` carries only the adapters)."""
    def init(params):
        return optimizer.init(params["adapters"])

    def update(grads, state, params=None):
        updates, state = optimizer.update(grads["adapters"], state,
                                          None if params is None else params["adapters"])
        zeros = {key: jax.tree.map(jnp.zeros_like, value) for key, value in grads.items()
                 if key != "adapters"}
        return {**zeros, "adapters": updates}, state

    return optax.GradientTransformation(init, update)


def count_params(base: Any, config: LoraConfig) -> dict[str, int]:
    """Sizes for the memory planner (works on abstract params, e.g. from nnx.eval_shape):
    adapter (trainable, with optimizer state), base (frozen, no optimizer state), targeted
    (elements of the adapted kernels: the merged copy made per step, in the compute dtype, and
    the sampler's merged copy; a training forward with dropout makes no merged copy)."""
    targets = target_kernels(base, config)
    adapter = sum(int(np.prod(t.a_shape_axes(config.rank)[0])) + int(np.prod(t.b_shape_axes(config.rank)[0]))
                  for t in targets.values())
    leaves = jax.tree.leaves(base, is_leaf=_is_variable)
    total = sum(int(np.prod(np.shape(_value(leaf)))) for leaf in leaves)
    targeted = sum(int(np.prod(t.shape)) for t in targets.values())
    return {"adapter": adapter, "base": total, "targeted": targeted}
