"""Sharded initialisation of the model: each parameter created directly on its shards."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from recap_jax import parallel
from recap_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

__all__ = ["init_sharded_model"]


def init_sharded_model(config, mesh: jax.sharding.Mesh, *, seed: int = 0, dtype: Any = jnp.float32,
                       param_dtype: Any = jnp.float32, remat: str = "none",
                       rules: parallel.Rules | None = None, strict: bool = True):
    """A randomly initialised Qwen2.5-VL whose parameters are created directly on their shards.

    The shapes come from ``nnx.eval_shape`` and one jit with ``out_shardings`` runs the
    initialisers, so no device ever holds a full copy of a sharded parameter. The values are
    those of ``model.init_model(config, seed=seed, ...)`` run under jit (eagerly run, a few
    normal draws differ in the last bit).
    """

    def create():
        return Qwen2_5_VLForConditionalGeneration(config, dtype=dtype, param_dtype=param_dtype,
                                                  remat=remat, rngs=nnx.Rngs(seed))

    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    shardings = parallel.param_shardings(abstract_state, mesh, rules, strict=strict)
    state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)
