"""The Qwen2.5-VL model: vision tower features spliced into the text decoder's embeddings.

Two levels:
* `prepare_inputs` (host, numpy): everything data-dependent — M-RoPE positions
  (`get_rope_index`), the vision tower's window order and segment ids, and for each text
  position the row of the vision features it takes (``feature_index``, -1 for text). It
  also checks that image-token counts match ``image_grid_thw``.
* `Qwen2_5_VLForConditionalGeneration.forward(inputs, cache)` (jittable, static shapes):
  logits and an updated KV cache.

``model(input_ids, attention_mask, pixel_values, image_grid_thw)`` takes transformers'
argument names and meanings and runs both, jitted.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recap_jax.models.qwen2_5_vl import rope, text, vision
from recap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from recap_jax.models.qwen2_5_vl.layers import make_param, matmul


class InputError(ValueError):
    """Model inputs that contradict each other (e.g. image tokens vs image_grid_thw)."""


class ModelInputs(NamedTuple):
    """Host-prepared, fixed-shape inputs of one forward pass (a pytree of arrays)."""

    input_ids: Any  # [B, S] int32
    attention_mask: Any  # [B, S] int32, 1 = real token
    position_ids: Any  # [3, B, S] int32, M-RoPE (temporal, height, width)
    feature_index: Any  # [B, S] int32: row of the vision features for image/video tokens, -1 for text
    pixel_values: Any = None  # [num_patches, C*T*P*P] float32, images then videos, padded
    vision: Any = None  # vision.VisionInputs for pixel_values
    rope_deltas: Any = None  # [B, 1] int32: decode position = cache index + delta


def _as_numpy(x, dtype=None):
    if x is None:
        return None
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x.astype(dtype) if dtype is not None else x


def _feature_index(input_ids: np.ndarray, token_id: int, num_features: int, offset: int, kind: str) -> np.ndarray:
    """Row of the (concatenated) vision features that each ``token_id`` position takes."""
    is_token = input_ids == token_id
    count = int(is_token.sum())
    if count != num_features:
        raise InputError(
            f"{kind}: the prompts hold {count} {kind} tokens but the {kind}_grid_thw describes "
            f"{num_features} merged patches; each image/video placeholder must be expanded to "
            "grid_t * grid_h * grid_w / spatial_merge_size**2 tokens")
    order = np.cumsum(is_token.reshape(-1)).reshape(input_ids.shape) - 1
    return np.where(is_token, order + offset, -1).astype(np.int32)


def prepare_inputs(config: Qwen2_5_VLConfig, input_ids, attention_mask=None, pixel_values=None,
                   image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                   second_per_grid_ts=None, position_ids=None, num_patches: int | None = None) -> ModelInputs:
    """Host-side preparation of one batch (numpy; see the module docstring).

    ``num_patches`` pads the vision input to a fixed bucket (images and videos together) so
    that different image sizes reuse one compiled forward.
    """
    ids = _as_numpy(input_ids, np.int32)
    if ids.ndim != 2:
        raise InputError(f"input_ids: expected [batch, length], got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else _as_numpy(attention_mask, np.int32)
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask: shape {mask.shape} differs from input_ids {ids.shape}")
    image_pixels, image_grid = _vision_part(config, pixel_values, image_grid_thw, "pixel_values", "image_grid_thw")
    video_pixels, video_grid = _vision_part(config, pixel_values_videos, video_grid_thw, "pixel_values_videos",
                                            "video_grid_thw")
    merge = config.vision.merge_unit
    num_image_features = 0 if image_grid is None else int(image_grid.prod(-1).sum()) // merge
    num_video_features = 0 if video_grid is None else int(video_grid.prod(-1).sum()) // merge
    pieces = [p for p in (image_pixels, video_pixels) if p is not None]
    grids = [g for g in (image_grid, video_grid) if g is not None]

    feature_index = np.maximum(
        _feature_index(ids, config.image_token_id, num_image_features, 0, "image"),
        _feature_index(ids, config.video_token_id, num_video_features, num_image_features, "video"))

    if position_ids is None:
        positions, deltas = rope.get_rope_index(ids, image_grid, video_grid, second_per_grid_ts, mask, config)
    else:
        positions = _as_numpy(position_ids)
        if positions.ndim == 2:
            positions = np.broadcast_to(positions[None], (3, *positions.shape))
        deltas = np.zeros((ids.shape[0], 1), np.int64)

    pixels = vision_inputs = None
    if pieces:
        pixels = np.concatenate(pieces, axis=0)
        grid = np.concatenate(grids, axis=0)
        if num_patches is not None:
            if num_patches < len(pixels):
                raise InputError(f"num_patches: bucket {num_patches} is smaller than the {len(pixels)} patches given")
            pixels = np.concatenate([pixels, np.zeros((num_patches - len(pixels), pixels.shape[1]), np.float32)])
        vision_inputs = vision.vision_inputs(grid, config.vision, num_patches=len(pixels))
    return ModelInputs(ids, mask, np.asarray(positions, np.int32), feature_index, pixels, vision_inputs,
                       np.asarray(deltas, np.int32).reshape(-1, 1))


def _vision_part(config: Qwen2_5_VLConfig, pixels, grid_thw, pixels_name: str, grid_name: str):
    """(pixels [patches, patch_dim], grid [n, 3]) of the images or of the videos, checked; Nones if absent."""
    grid = None if grid_thw is None else _as_numpy(grid_thw, np.int64).reshape(-1, 3)
    if grid is None or not len(grid):
        if pixels is not None:
            raise InputError(f"{grid_name}: missing although {pixels_name} is given")
        return None, None
    if pixels is None:
        raise InputError(f"{pixels_name}: missing although {grid_name} is given")
    pixels = _as_numpy(pixels, np.float32)
    _check_pixels(pixels, grid, config, pixels_name)
    return pixels, grid


def _check_pixels(pixels: np.ndarray, grid: np.ndarray, config: Qwen2_5_VLConfig, name: str) -> None:
    if pixels.ndim != 2 or pixels.shape[1] != config.vision.patch_dim:
        raise InputError(f"{name}: expected [num_patches, {config.vision.patch_dim}], got {pixels.shape}")
    expected = int(grid.prod(-1).sum())
    if pixels.shape[0] != expected:
        raise InputError(f"{name}: {pixels.shape[0]} patches, but the grid_thw rows describe {expected}")
    if np.any(grid[:, 1:] % config.vision.spatial_merge_size):
        raise InputError(f"{name}: grid_thw heights/widths {grid[:, 1:].tolist()} must be multiples of "
                         f"spatial_merge_size={config.vision.spatial_merge_size}")


class LMHead(nnx.Module):
    """The untied output projection: kernel [hidden, vocab] (transformers' lm_head.weight transposed)."""

    def __init__(self, hidden_size: int, vocab_size: int, *, param_dtype: Any, rngs: nnx.Rngs):
        self.kernel = make_param(rngs.params(), (hidden_size, vocab_size), ("embed", "vocab"), dtype=param_dtype)


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
    """Vision tower (``visual``), text decoder (``language_model``) and output projection."""

    def __init__(self, config: Qwen2_5_VLConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 remat: str = "none", rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.visual = vision.VisionTransformer(config.vision, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                               rngs=rngs)
        self.language_model = text.TextModel(config.text, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                             rngs=rngs)
        if config.text.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = LMHead(config.text.hidden_size, config.text.vocab_size, param_dtype=param_dtype, rngs=rngs)

    # ------------------------------------------------------------ jittable parts
    def embed(self, inputs: ModelInputs) -> jax.Array:
        """Token embeddings with vision features written over the image/video placeholders."""
        embeds = self.language_model.embed(inputs.input_ids)
        if inputs.pixel_values is None:
            return embeds
        features = self.visual(inputs.pixel_values, inputs.vision).astype(embeds.dtype)
        index = inputs.feature_index
        taken = jnp.take(features, jnp.maximum(index, 0), axis=0)
        return jnp.where((index >= 0)[..., None], taken, embeds)

    def hidden_states(self, inputs: ModelInputs, cache: text.KVCache | None = None,
                      embeds: jax.Array | None = None) -> tuple[jax.Array, text.KVCache | None]:
        if embeds is None:
            embeds = self.embed(inputs)
        return self.language_model(embeds, inputs.position_ids, inputs.attention_mask, cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Output projection in float32 accumulation: [..., hidden] -> [..., vocab]."""
        if self.lm_head is None:
            kernel = self.language_model.embed_tokens.embedding[...].T
        else:
            kernel = self.lm_head.kernel[...]
        return matmul(hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)

    def forward(self, inputs: ModelInputs, cache: text.KVCache | None = None) -> tuple[jax.Array, Any]:
        hidden, cache = self.hidden_states(inputs, cache)
        return self.logits(hidden), cache

    # --------------------------------------------------- transformers-style call
    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, position_ids=None):
        """Logits [batch, length, vocab] (float32), with transformers' argument names and meanings."""
        inputs = prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                                pixel_values_videos, video_grid_thw, second_per_grid_ts, position_ids)
        graphdef, state = nnx.split(self)
        return _jitted_forward(graphdef, state, jax.tree.map(jnp.asarray, inputs))


@functools.partial(jax.jit, static_argnums=0)
def _jitted_forward(graphdef, state, inputs: ModelInputs) -> jax.Array:
    logits, _ = nnx.merge(graphdef, state).forward(inputs)
    return logits


def init_model(config: Qwen2_5_VLConfig, *, seed: int = 0, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, remat: str = "none") -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised model (for tests, demos and training from scratch)."""
    return Qwen2_5_VLForConditionalGeneration(config, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                              rngs=nnx.Rngs(seed))
