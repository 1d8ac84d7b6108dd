"""The tiny Qwen2.5-VL and one prompt + G completions batch that the LoRA tests share."""

import jax
import jax.numpy as jnp
from flax import nnx

from recap_jax.models.qwen2_5_vl import config as C
from recap_jax.models.qwen2_5_vl import model as M
from recap_jax.tools import memory

GROUP = 2
CFG = C.tiny(vocab_size=256, text_layers=1, vision_depth=2, fullatt_block_indexes=(1,))
WORKLOAD = memory.Workload(batch=2, group_size=GROUP, prompt_len=12, completion_len=6, images=1,
                           image_size=56)


def graphdef_and_params():
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: M.init_model(CFG, seed=0)))
    params = jax.jit(lambda: nnx.state(M.init_model(CFG, seed=0)))()
    return graphdef, params


def prompt_and_completions(seed: int = 1) -> dict:
    b = memory.example_batch(CFG, WORKLOAD, seed=seed)
    return jax.tree.map(jnp.asarray, {"prompt": b["prompt"], "completions": b["completions"],
                                      "completion_mask": b["completion_mask"]})
