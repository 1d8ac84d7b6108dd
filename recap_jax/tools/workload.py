"""The workload of a GRPO train step (B prompts x G completions, lengths, images), its batch
(concrete, `example_batch`, or abstract, `batch_shapes`, placed as `parallel.shard_batch`
would place it) and the bytes it takes per device; used by the memory planner
(recap_jax.tools.memory), the benchmarks and the tests.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recap_jax import parallel
from recap_jax.models.qwen2_5_vl import config as config_lib
from recap_jax.models.qwen2_5_vl import model as model_lib
from recap_jax.models.qwen2_5_vl import text as text_lib
from recap_jax.models.qwen2_5_vl import vision as vision_lib

# ----------------------------------------------------------------------------- the batch
# Row axis of every batch leaf (None: replicated; the vision patches of all prompts are
# concatenated, so every process must feed all of them).
POLICY_BATCH_AXES = {
    "prompt": model_lib.ModelInputs(input_ids=0, attention_mask=0, position_ids=1, feature_index=0,
                                    pixel_values=None, vision=None, rope_deltas=0),
    "completions": 0, "completion_mask": 0, "source_id": 0, "rewards": 0, "old_logprobs": 0,
}
# with the `truncated` flags (GRPOConfig.mask_truncated_completions)
POLICY_BATCH_AXES_TRUNCATED = dict(POLICY_BATCH_AXES, truncated=0)


@dataclasses.dataclass(frozen=True)
class Workload:
    """Sizes of one train step: B prompts x G completions, lengths in tokens, square images."""

    batch: int = 8
    group_size: int = 8
    prompt_len: int = 1024
    completion_len: int = 1024
    images: int = 1
    image_size: int = 448

    def check(self, config: config_lib.Qwen2_5_VLConfig) -> None:
        for name in ("batch", "group_size", "prompt_len", "completion_len", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.images < 0:
            raise ValueError(f"--images: must be >= 0, got {self.images}")
        unit = config.vision.patch_size * config.vision.spatial_merge_size
        if self.images and self.image_size % unit:
            raise ValueError(f"--image-size: {self.image_size} px must be a multiple of patch_size x "
                             f"spatial_merge_size = {unit}")
        needed = self.images * (self.tokens_per_image(config) + 2) + 1
        if self.prompt_len < needed:
            raise ValueError(f"--prompt-len: {self.prompt_len} tokens cannot hold {self.images} image(s) of "
                             f"{self.tokens_per_image(config)} tokens (+2 delimiters each) and one text token")

    def grid(self, config) -> tuple[int, int, int]:
        side = self.image_size // config.vision.patch_size
        return (1, side, side)

    def patches_per_image(self, config) -> int:
        return math.prod(self.grid(config))

    def tokens_per_image(self, config) -> int:
        return self.patches_per_image(config) // config.vision.merge_unit


def example_batch(config: config_lib.Qwen2_5_VLConfig, workload: Workload, seed: int = 0) -> dict[str, Any]:
    """A concrete random batch (numpy) of the workload's sizes, built with model.prepare_inputs."""
    workload.check(config)
    rng = np.random.default_rng(seed)
    b, g, t = workload.batch, workload.group_size, workload.completion_len
    text_vocab = min(config.image_token_id, config.vision_start_token_id, config.text.vocab_size) - 8
    image = [config.vision_start_token_id] + [config.image_token_id] * workload.tokens_per_image(config) + \
        [config.vision_end_token_id]
    rows = []
    for _ in range(b):
        head = image * workload.images
        rows.append(head + rng.integers(0, text_vocab, workload.prompt_len - len(head)).tolist())
    ids = np.asarray(rows, np.int32)
    pixels = grid = None
    if workload.images:
        grid = np.asarray([workload.grid(config)] * (b * workload.images), np.int64)
        pixels = rng.normal(size=(b * workload.images * workload.patches_per_image(config),
                                  config.vision.patch_dim)).astype(np.float32)
    inputs = model_lib.prepare_inputs(config, ids, np.ones_like(ids), pixels, grid)
    mask = np.ones((b * g, t), np.int32)
    mask[:, t - t // 4:] = rng.random((b * g, 1)) < 0.5  # some completions end early
    return {
        "prompt": inputs,
        "completions": rng.integers(0, text_vocab, (b * g, t)).astype(np.int32),
        "completion_mask": mask,
        "source_id": np.zeros(b * g, np.int32),
        "rewards": rng.random((b * g, 1)).astype(np.float32),
        "old_logprobs": (-rng.random((b * g, t)) * 3).astype(np.float32),
    }


def batch_shapes(config: config_lib.Qwen2_5_VLConfig, workload: Workload, *, reward_columns: int = 1,
                 truncated: bool = False) -> dict[str, Any]:
    """ShapeDtypeStructs of `example_batch` (without building it: large workloads fit); ``reward_columns``
    F of the rewards [rows, F], and the [rows] ``truncated`` flags when the loss reads them."""
    workload.check(config)
    b, s, rows, t = workload.batch, workload.prompt_len, workload.batch * workload.group_size, workload.completion_len
    i32, f32 = jnp.int32, jnp.float32
    sds = jax.ShapeDtypeStruct
    pixels = vision = None
    if workload.images:
        n = b * workload.images * workload.patches_per_image(config)
        units = n // config.vision.merge_unit
        pixels = sds((n, config.vision.patch_dim), f32)
        vision = vision_lib.VisionInputs(sds((units,), i32), sds((units,), i32), sds((n, 2), i32), sds((n,), i32),
                                         sds((n,), i32))
    inputs = model_lib.ModelInputs(sds((b, s), i32), sds((b, s), i32), sds((3, b, s), i32), sds((b, s), i32),
                                   pixels, vision, sds((b, 1), i32))
    shapes = {"prompt": inputs, "completions": sds((rows, t), i32), "completion_mask": sds((rows, t), i32),
              "source_id": sds((rows,), i32), "rewards": sds((rows, reward_columns), f32),
              "old_logprobs": sds((rows, t), f32)}
    if truncated:
        shapes["truncated"] = sds((rows,), jnp.bool_)
    return shapes


def with_batch_shardings(shapes: Any, mesh, rules=None, batch_axes: Any = POLICY_BATCH_AXES) -> Any:
    """ShapeDtypeStructs placed as `parallel.shard_batch` would place the real batch."""

    def place(axis, subtree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(
            mesh, parallel.batch_spec(len(x.shape), axis, mesh, rules))), subtree)

    return jax.tree.map(place, batch_axes, shapes, is_leaf=lambda x: x is None)


# ----------------------------------------------------------------------------- sizes
def _itemsize(dtype) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8  # threefry: two uint32 words
    return np.dtype(dtype).itemsize


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of the (abstract or concrete) sharded arrays of ``tree``.

    Uses the largest shard (shards are even when the mesh divides the dimensions).
    """
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * _itemsize(x.dtype)
    return total


def kv_cache_bytes_per_device(config: config_lib.Qwen2_5_VLConfig, workload: Workload, mesh, dtype,
                              rules=None) -> int:
    """k and v as `sampling.generate` holds them: the prompt's cache once per prompt (shared by
    its G samples as a prefix) and each of the B*G samples' completion slots."""

    def cache_bytes(rows: int, length: int) -> int:
        shape = text_lib.kv_cache_shape(config.text, rows, length)
        spec = parallel.logical_to_spec(text_lib.KV_CACHE_AXES, shape, mesh, rules, strict=False)
        shard = jax.sharding.NamedSharding(mesh, spec).shard_shape(shape)
        return 2 * math.prod(shard) * np.dtype(dtype).itemsize

    return (cache_bytes(workload.batch, workload.prompt_len)
            + cache_bytes(workload.batch * workload.group_size, workload.completion_len))
