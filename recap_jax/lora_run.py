"""LoRA in a training run (``model.lora.rank > 0``): the train state, the sampler's params, the
checkpointed part and the export of a run whose policy is a frozen base plus adapters.

    params = init_params(base, lora_config, seed, mesh)    # {"base": base, "adapters": A, B}
    state = create_state(params, optimizer, rng, recap_state, mesh)  # optimizer: adapters only
    merged = policy_params(state.params, lora_config)      # W + (alpha/r) A B: sampler, eval, export
    run.checkpoints.save(step, checkpoint_view(state), meta)   # the adapters, not the base
    state = with_base(restored.state, base)                # after a restore
    export_adapters(adapters, lora_config, directory, base_directory)   # merge_on_export=False

The base is what the stage starts from (model.path, the seeded random init, or WORKDIR/warmstart
after an SFT warm-start with LoRA, which exports the merged policy) and is never written to a
checkpoint: a resume rebuilds it the way the run built it. The adapters are created directly
on the shardings their logical axes give (`lora.init_adapters`: A like the kernel's input
axes, B like its output axes, so an fsdp x tensor mesh shards them as their kernel).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from recap_jax import lora, parallel
from recap_jax.train_state import TrainState

__all__ = ["ADAPTERS_FILE", "LORA_FILE", "checkpoint_view", "create_state", "export_adapters",
           "init_params", "load_adapters", "policy_params", "with_base"]

ADAPTERS_FILE = "adapters.safetensors"
LORA_FILE = "lora.json"


def init_params(base: Any, config: lora.LoraConfig, seed: int, mesh=None) -> dict[str, Any]:
    """{"base": base, "adapters": fresh adapters (B = 0)}, the adapters on their shardings."""
    key = jax.random.key(seed)

    def make(b):
        return lora.init_adapters(b, config, key)

    if mesh is None:
        adapters = jax.jit(make)(base)
    else:
        with parallel.use_mesh(mesh):
            adapters = parallel.create_sharded(make, base, mesh=mesh, strict=False)
    return {"base": base, "adapters": adapters}


def create_state(params: dict[str, Any], optimizer, rng: jax.Array, recap_state: Any = None,
                 mesh=None) -> TrainState:
    """The train state of LoRA params: the optimizer state (adapters only) built on its
    shardings without copying the base (the base enters the jit as an argument, not an output)."""
    if mesh is None:
        return TrainState.create(params, optimizer, rng, recap_state)

    def parts(p):
        fresh = TrainState.create(p, optimizer, rng, recap_state)
        return fresh.replace(params={"adapters": p["adapters"]})

    with parallel.use_mesh(mesh):
        built = parallel.create_sharded(parts, params, mesh=mesh, strict=False)
    return with_base(built, params["base"])


def checkpoint_view(state: TrainState) -> TrainState:
    """The part of a LoRA train state a checkpoint holds: everything but the frozen base."""
    return state.replace(params={"adapters": state.params["adapters"]})


def with_base(state: TrainState, base: Any) -> TrainState:
    """A `checkpoint_view` (e.g. restored) with the frozen base put back."""
    return state.replace(params={"base": base, "adapters": state.params["adapters"]})


_merge_into_base = jax.jit(lora.merge_into_base, static_argnums=2)


def policy_params(params: Any, config: lora.LoraConfig | None) -> Any:
    """The policy's params as one model state: the LoRA params merged (W + (alpha/r) A B, in
    each kernel's dtype), what the sampler, the evaluator and the export read; other params as
    they are."""
    if config is None:
        return params
    return _merge_into_base(params["base"], params["adapters"], config)


def _numpy_adapters(adapters: dict) -> dict[str, np.ndarray]:
    """{"<path>.lora_a": A, "<path>.lora_b": B} as host float32 arrays (all processes gather)."""
    values = {f"{name}.lora_{part}": leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
              for name, ab in adapters.items() for part, leaf in ab.items()}
    if jax.process_count() > 1:
        values = multihost_utils.process_allgather(values, tiled=True)
    return {k: np.asarray(jax.device_get(v), np.float32) for k, v in values.items()}


def export_adapters(adapters: dict, config: lora.LoraConfig, directory: str,
                    base_directory: str, processor=None) -> None:
    """The adapters only (``model.lora.merge_on_export=False``): ``adapters.safetensors`` (A and
    B per targeted kernel path, float32) and ``lora.json`` (rank, alpha, scale, target patterns,
    the base directory they apply to, "" for a random base of the seed) in ``directory``; the
    tokenizer too when ``processor`` is given. Process 0 writes."""
    from safetensors.numpy import save_file

    tensors = _numpy_adapters(adapters)
    if jax.process_index() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ADAPTERS_FILE))
    with open(os.path.join(directory, LORA_FILE), "w", encoding="utf-8") as handle:
        json.dump({"rank": config.rank, "alpha": config.alpha, "scale": config.scale,
                   "targets": list(config.patterns), "base": base_directory,
                   "formula": "W + scale * A B (A: [*in, r], B: [r, *out], stacked over layers)"},
                  handle, indent=1)
    if processor is not None:
        processor.tokenizer.save_pretrained(directory)


def load_adapters(directory: str, like: dict) -> dict:
    """The adapters `export_adapters` wrote, in the structure (and dtypes) of ``like``."""
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(directory, ADAPTERS_FILE))
    out = {}
    for name, ab in like.items():
        out[name] = {part: leaf.replace(np.asarray(tensors[f"{name}.lora_{part}"]).astype(leaf.get_value().dtype))
                     for part, leaf in ab.items()}
    return out
