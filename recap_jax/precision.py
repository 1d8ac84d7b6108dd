"""Precision and rematerialisation policies: parameters float32 or bf16, compute bf16,
optimizer state float32, and which activations the backward pass keeps.

    precision = PrecisionConfig(param_dtype="bfloat16", compute_dtype="bfloat16", remat="full")
    model = init_model(config, **precision.model_kwargs())           # or from_pretrained(...)
    optimizer = precision.wrap_optimizer(make_optimizer(lr, total_updates))
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from recap_jax.parallel import dataclass_from_config

# the policies of models.qwen2_5_vl.layers.REMAT_POLICIES (named here: no model import)
REMAT_NAMES = ("none", "full", "save_dots")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    """Precision and rematerialisation policy of the model and optimizer.

    param_dtype: storage dtype of the parameters, "float32" (default; the parameters are the
      master copy) or "bfloat16" (half the parameter memory and all-gather traffic; the
      optimizer then keeps a float32 master copy, see `float32_master`).
    compute_dtype: dtype of matmuls and activations ("bfloat16" or "float32"); norms,
      softmax and log-probs are float32 regardless.
    remat: rematerialisation of the decoder and vision blocks in the backward pass: "none"
      (keep every activation), "full" (keep only the block inputs, recompute the rest),
      "save_dots" (keep matmul outputs, recompute the cheap elementwise ops).
    The optimizer state (AdamW moments) is always float32.
    """

    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    remat: str = "none"

    def __post_init__(self):
        for name, allowed in (("param_dtype", ("float32", "bfloat16")),
                              ("compute_dtype", ("float32", "bfloat16", "float16")),
                              ("remat", REMAT_NAMES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"precision.{name}: {getattr(self, name)!r} is not one of {list(allowed)}")

    @classmethod
    def from_config(cls, config: Any = None) -> "PrecisionConfig":
        return dataclass_from_config(cls, config, "precision")

    def model_kwargs(self) -> dict[str, Any]:
        """``dtype``, ``param_dtype``, ``remat`` for the model constructors / from_pretrained."""
        return {"dtype": DTYPES[self.compute_dtype], "param_dtype": DTYPES[self.param_dtype], "remat": self.remat}

    def wrap_optimizer(self, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
        """``optimizer`` with float32 state (a float32 master copy when parameters are bf16)."""
        return float32_master(optimizer) if self.param_dtype != "float32" else optimizer


class Float32MasterState(NamedTuple):
    """State of `float32_master`: the float32 master parameters and the inner optimizer's state."""

    master: Any
    inner: Any


def _to_float32(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def float32_master(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``inner`` on a float32 master copy of low-precision parameters.

    Choice: a master copy rather than only float32 moments (optax's ``mu_dtype``), because a
    typical RL update (lr ~1e-6 times an Adam step of ~1) is far below bfloat16's resolution
    (2^-8 relative) and would be rounded away in bf16 parameters; the master accumulates
    it. Cost: 4 extra bytes per parameter. The returned update is ``master_new - params`` in
    float32, so ``optax.apply_updates`` rounds the new master to the parameter dtype.
    """

    def init(params):
        master = _to_float32(params)
        return Float32MasterState(master, inner.init(master))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("float32_master: update needs the current params")
        updates, inner_state = inner.update(_to_float32(grads), state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        deltas = jax.tree.map(lambda m, p: m - jnp.asarray(p, jnp.float32), master, params)
        return deltas, Float32MasterState(master, inner_state)

    return optax.GradientTransformation(init, update)


def get_config():
    """The precision block of an experiment config (an ml_collections.ConfigDict; see `PrecisionConfig`)."""
    import ml_collections

    return ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(PrecisionConfig)})
