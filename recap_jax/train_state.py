"""The train state (one pytree: params, optimizer state, step, RNG, RECAP state) and the
paper's optimizer: AdamW (0.9, 0.999, 1e-8), linear warm-up over 10% of the updates, then
linear decay to 0, after clipping the gradients by global norm."""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes; checkpoint it whole.

    step: [] int32, train steps taken (skipped updates included).
    params: the policy parameters (any pytree, e.g. an nnx.State).
    opt_state: the optax state of `params`.
    rng: a PRNG key (typed or raw), split once per step.
    recap_state: any pytree the caller keeps with the state (e.g. recap.RecapState); the train
      step passes it through untouched. None when unused.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    recap_state: Any = None

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation, rng: jax.Array,
               recap_state: Any = None) -> TrainState:
        """A fresh state, on the device of ``params`` when they all sit on one device.

        The new leaves (the step, optax's counters) start uncommitted while the jitted step's
        outputs are committed, so without this placement the second step would compile again.
        For params sharded over several devices, build the state with `parallel.create_sharded`.
        """
        state = cls(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=rng, recap_state=recap_state)
        device = _single_device(params)
        return state if device is None else jax.device_put(state, device)


def _single_device(tree: Any) -> jax.Device | None:
    """The one device every leaf of ``tree`` is committed to, or None (tracers, several devices,
    uncommitted or non-array leaves)."""
    devices = set()
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer) or not leaf.committed:
            return None
        devices |= leaf.devices()
    return devices.pop() if len(devices) == 1 else None


def make_lr_schedule(learning_rate: float, total_updates: int,
                     warmup_fraction: float = 0.1) -> optax.Schedule:
    """lr(n) = peak n / n_w for n < n_w, then peak (N - n) / (N - n_w), floored at 0.

    N = total_updates optimizer updates, n_w = ceil(warmup_fraction N) (as transformers'
    linear schedule with warm-up; note lr(0) = 0 when n_w > 0).
    """
    if not learning_rate > 0 or not math.isfinite(learning_rate):
        raise ValueError(f"make_lr_schedule: learning_rate={learning_rate!r}; need a finite "
                         "number > 0")
    if not isinstance(total_updates, int) or total_updates < 1:
        raise ValueError(f"make_lr_schedule: total_updates={total_updates!r}; need an int >= 1")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"make_lr_schedule: warmup_fraction={warmup_fraction!r}; need a "
                         "number in [0, 1)")
    warmup = math.ceil(warmup_fraction * total_updates)

    def schedule(count):
        n = jnp.asarray(count, jnp.float32)
        rising = n / max(warmup, 1)
        falling = (total_updates - n) / max(total_updates - warmup, 1)
        return learning_rate * jnp.clip(jnp.where(n < warmup, rising, falling), 0.0, 1.0)

    return schedule


def make_optimizer(learning_rate: float, total_updates: int, *,
                   warmup_fraction: float = 0.1, max_grad_norm: float | None = 1.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
    """clip_by_global_norm(max_grad_norm) then AdamW on `make_lr_schedule`.

    total_updates counts optimizer updates: train steps x num_iterations x num_minibatches.
    max_grad_norm None disables clipping.
    """
    adamw = optax.adamw(make_lr_schedule(learning_rate, total_updates, warmup_fraction),
                        b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if max_grad_norm is None:
        return adamw
    if not max_grad_norm > 0:
        raise ValueError(f"make_optimizer: max_grad_norm={max_grad_norm!r}; need > 0 or None")
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
