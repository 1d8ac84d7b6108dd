"""The Qwen2.5-VL vision tower: patch embedding, window/full attention blocks, 2D RoPE, merger.

Numerically mirrors transformers' ``Qwen2_5_VisionTransformerPretrainedModel``:

* patches (rows of ``C*T*P*P`` pixels, flattened in C, T, P, P order) are embedded by one
  linear map (the reference's stride-equals-kernel Conv3d);
* the sequence is permuted into *window order* over merge units (``spatial_merge_size**2``
  neighbouring patches), exactly as ``transformers.vision_utils.get_vision_window_index``;
* each block attends within its window, except the blocks in ``fullatt_block_indexes``,
  which attend within their frame (the reference's ``cu_seqlens`` are per temporal frame);
* the merger folds each merge unit into one token of ``out_hidden_size`` and the result is
  put back into the original (merge-unit raster) order.

Everything data-dependent (window order, positions, segments) is computed on the host by
`vision_inputs` with static shapes given ``num_patches``, so one compiled forward serves
every image set padded to the same bucket. Variable-length attention is expressed as a
segment mask: a patch attends to the patches sharing its segment id; padding patches have
segment id ``PAD_SEGMENT`` and attend only to each other. The window blocks compute only
the scores near the diagonal (`window_attention`: windows are contiguous in window order and
at most window_units^2 merge units long), the full-attention blocks all N x N
(`segment_attention`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recap_jax import parallel
from recap_jax.models.qwen2_5_vl import attention
from recap_jax.models.qwen2_5_vl.config import VisionConfig
from recap_jax.models.qwen2_5_vl.layers import (
    Linear,
    RMSNorm,
    SwiGLU,
    TensorSpec,
    apply_rotary,
    export_to_specs,
    load_from_specs,
    make_param,
    matmul,
    scan_layers,
)

PAD_SEGMENT = -1
# Logical axes of the patch stream [num_patches, hidden]: patches split over the batch mesh axes.
HIDDEN_AXES = ("vision_tokens", "activation_embed")


# ---------------------------------------------------------------------- host-side metadata
class VisionInputs(NamedTuple):
    """Per-call metadata of the vision tower (numpy on the host; a pytree, so jit takes it).

    With N = num_patches and U = N // merge_unit (merge units), all in *window order* except
    ``reverse_index``'s output:
      window_index: [U] int32, original merge-unit index of each window-ordered unit
        (the reference's ``window_index``; padding units keep their own index, at the end).
      reverse_index: [U] int32, ``argsort(window_index)``: gathers merger outputs back into
        the original order.
      position_ids: [N, 2] int32, (h, w) grid position of each patch (0 for padding).
      window_segment_ids: [N] int32, which attention window a patch is in (window blocks).
      full_segment_ids: [N] int32, which frame (image, or one temporal patch of a video) a
        patch is in (full-attention blocks). Padding patches are ``PAD_SEGMENT`` in both.
    """

    window_index: np.ndarray
    reverse_index: np.ndarray
    position_ids: np.ndarray
    window_segment_ids: np.ndarray
    full_segment_ids: np.ndarray


def _check_grid(grid_thw: np.ndarray, config: VisionConfig) -> np.ndarray:
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"grid_thw: expected shape [num_images, 3], got {grid.shape}")
    if not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"grid_thw: expected integers, got dtype {grid.dtype}")
    m = config.spatial_merge_size
    for row, (t, h, w) in enumerate(grid.tolist()):
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"grid_thw[{row}] = {[t, h, w]}: every entry must be positive")
        if h % m or w % m:
            raise ValueError(f"grid_thw[{row}] = {[t, h, w]}: h and w must be multiples of "
                             f"spatial_merge_size={m}")
    return grid.astype(np.int64)


def _image_window_order(t: int, h: int, w: int, m: int, units_per_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Window order of one image/video's merge units (get_vision_window_index, one entry).

    Returns (unit, window): the frame-local-raster unit index of each window-ordered unit
    and the (not necessarily consecutive) window number it belongs to.
    """
    lh, lw = h // m, w // m
    nwh, nww = -(-lh // units_per_side), -(-lw // units_per_side)
    index = np.full((t, nwh * units_per_side, nww * units_per_side), -1, np.int64)
    index[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
    index = index.reshape(t, nwh, units_per_side, nww, units_per_side).transpose(0, 1, 3, 2, 4)
    index = index.reshape(t, nwh * nww, units_per_side * units_per_side)
    window = np.broadcast_to(np.arange(t * nwh * nww).reshape(t, nwh * nww, 1), index.shape)
    valid = index >= 0
    return index[valid], window[valid]


def window_units(config: VisionConfig) -> int:
    """Merge units per side of an attention window (a window holds at most this squared)."""
    return config.window_size // config.spatial_merge_size // config.patch_size


def vision_inputs(grid_thw: np.ndarray, config: VisionConfig, num_patches: int | None = None) -> VisionInputs:
    """Window order, 2D positions and attention segments for the patches of ``grid_thw``.

    grid_thw: [num_images, 3] (t, h, w) patch grid of each image or video, in the order their
      patches are concatenated in ``pixel_values``.
    num_patches: static bucket size (a multiple of merge_unit, >= sum(t*h*w)); padding
      patches go last. Defaults to the real count.
    """
    grid = _check_grid(grid_thw, config)
    m, mu = config.spatial_merge_size, config.merge_unit
    units_per_side = window_units(config)
    real_patches = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    if num_patches is None:
        num_patches = real_patches
    if num_patches < real_patches or num_patches % mu:
        raise ValueError(f"num_patches={num_patches}: must be a multiple of merge_unit={mu} and at "
                         f"least the {real_patches} patches of grid_thw {grid.tolist()}")

    units, windows, frames, rows, cols = [], [], [], [], []
    unit_offset = window_offset = frame_offset = 0
    for t, h, w in grid.tolist():
        lh, lw = h // m, w // m
        unit, window = _image_window_order(t, h, w, m, units_per_side)
        units.append(unit + unit_offset)
        windows.append(window + window_offset)
        frames.append(unit // (lh * lw) + frame_offset)
        rows.append(unit % (lh * lw) // lw)
        cols.append(unit % lw)
        unit_offset += t * lh * lw
        window_offset += int(window.max()) + 1
        frame_offset += t

    total_units, real_units = num_patches // mu, real_patches // mu
    pad_units = total_units - real_units
    window_index = np.concatenate(units + [np.arange(real_units, total_units)])
    window_ids = np.unique(np.concatenate(windows), return_inverse=True)[1]  # consecutive from 0
    pad = np.full(pad_units, PAD_SEGMENT, np.int64)
    window_segment = np.concatenate([window_ids, pad])
    full_segment = np.concatenate(frames + [pad])

    # Patch q of a merge unit sits at (q // m, q % m) inside its m x m block.
    inner_h, inner_w = np.divmod(np.arange(mu), m)
    block_h = np.concatenate(rows + [np.zeros(pad_units, np.int64)])
    block_w = np.concatenate(cols + [np.zeros(pad_units, np.int64)])
    is_real = np.arange(total_units) < real_units
    pos_h = (block_h[:, None] * m + inner_h) * is_real[:, None]
    pos_w = (block_w[:, None] * m + inner_w) * is_real[:, None]

    return VisionInputs(
        window_index=window_index.astype(np.int32),
        reverse_index=np.argsort(window_index, kind="stable").astype(np.int32),
        position_ids=np.stack([pos_h.reshape(-1), pos_w.reshape(-1)], axis=-1).astype(np.int32),
        window_segment_ids=np.repeat(window_segment, mu).astype(np.int32),
        full_segment_ids=np.repeat(full_segment, mu).astype(np.int32),
    )


# ---------------------------------------------------------------------- jitted pieces
def vision_rotary_tables(position_ids: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [N, head_dim] float32 of the axial 2D RoPE (Qwen2_5_VLVisionRotaryEmbedding).

    inv_freq has head_dim/4 entries; the angles are [h*inv_freq, w*inv_freq], repeated twice
    (the rotate-half layout).
    """
    spatial = head_dim // 2
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)))
    freqs = jnp.asarray(position_ids, jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    freqs = freqs.reshape(freqs.shape[0], spatial)  # [N, (h, w) x head_dim/4]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[N, N] boolean: patch i may attend to patch j iff they share a segment id."""
    return segment_ids[:, None] == segment_ids[None, :]


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Non-causal attention restricted to segments (the reference's cu_seqlens chunks).

    q, k, v: [N, heads, head_dim]; segment_ids: [N]. The full-attention blocks' path
    (segments = frames, of any length): `attention.segment_attention` with the segment ids
    (the reference computes all N x N scores and masks them, cuDNN takes an N x N mask, the
    Pallas kernels take the ids).
    """
    return attention.segment_attention(q[None], k[None], v[None], segment_ids[None])[0]


# Segment ids of the padding `window_attention` adds: the tail that rounds N up to whole
# blocks, and the key blocks before the first and after the last (never attended).
_TAIL_SEGMENT, _OUTSIDE_SEGMENT = PAD_SEGMENT - 1, PAD_SEGMENT - 2


def window_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int) -> jax.Array:
    """`segment_attention` for segments that are contiguous runs of at most ``block`` patches
    (the attention windows, in window order), at N x 3 ``block`` scores instead of N x N.

    The sequence is cut into blocks of ``block`` patches; a run of at most ``block`` patches
    that holds a query lies within the query's block and its two neighbours, so each query
    block attends to those three key blocks, masked by segment. Equal to `segment_attention`
    for such segments (the windows of `vision_inputs`: at most window_units^2 merge units
    each); padding patches attend only to padding patches nearby (finite, meaningless rows).
    """
    n = q.shape[0]
    count = -(-n // block)

    def blocks(x, fill):  # [N, ...] -> [count, block, ...]
        x = jnp.pad(x, [(0, count * block - n)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return x.reshape(count, block, *x.shape[1:])

    def with_neighbours(x, fill):  # [count, block, ...] -> [count, 3 block, ...]: blocks i-1, i, i+1
        edge = jnp.full((1, *x.shape[1:]), fill, x.dtype)
        x = jnp.concatenate([edge, x, edge])
        return jnp.concatenate([x[:-2], x[1:-1], x[2:]], axis=1)

    query_segments = blocks(segment_ids, _TAIL_SEGMENT)
    key_segments = with_neighbours(query_segments, _OUTSIDE_SEGMENT)
    out = attention.segment_attention(blocks(q, 0), with_neighbours(blocks(k, 0), 0),
                                      with_neighbours(blocks(v, 0), 0), query_segments, key_segments)
    return out.reshape(count * block, *q.shape[1:])[:n]


# ---------------------------------------------------------------------- modules
class HeadsProjection(nnx.Module):
    """y = x @ kernel + bias, contracting x's last ``contract`` axes (`layers.matmul`): the
    projections with a separate heads axis ([d] -> [3, heads, head_dim] and back)."""

    def __init__(self, contract: int, kernel_shape: tuple[int, ...], kernel_axes: tuple[str | None, ...],
                 bias_shape: tuple[int, ...], bias_axes: tuple[str | None, ...], *, rngs: nnx.Rngs,
                 param_dtype: Any, stack: int | None):
        self.contract = contract
        self.kernel = make_param(rngs.params(), kernel_shape, kernel_axes, dtype=param_dtype, stack=stack)
        self.bias = make_param(None, bias_shape, bias_axes, dtype=param_dtype, stack=stack, init="zeros")

    def __call__(self, x: jax.Array, dtype: Any) -> jax.Array:
        y = matmul(x.astype(dtype), self.kernel[...].astype(dtype), contract=self.contract)
        return y + self.bias[...].astype(dtype)


class VisionAttention(nnx.Module):
    """qkv projection -> 2D RoPE on q, k -> segment attention -> output projection."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, param_dtype: Any, stack: int | None):
        d, h, hd = config.hidden_size, config.num_heads, config.head_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype, stack=stack)
        self.qkv = HeadsProjection(1, (d, 3, h, hd), ("vision_embed", None, "vision_heads", "vision_head_dim"),
                                   (3, h, hd), (None, "vision_heads", "vision_head_dim"), **kw)
        self.proj = HeadsProjection(2, (h, hd, d), ("vision_heads", "vision_head_dim", "vision_embed"),
                                    (d,), ("vision_embed",), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, attend: Callable, dtype: Any) -> jax.Array:
        """attend(q, k, v) -> [N, heads, head_dim]: the block's attention pattern (window or frame)."""
        qkv = self.qkv(x, dtype)  # [N, 3, heads, head_dim]
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q = apply_rotary(q, cos[:, None, :], sin[:, None, :])
        k = apply_rotary(k, cos[:, None, :], sin[:, None, :])
        return self.proj(attend(q, k, v), dtype)


class VisionBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, param_dtype: Any, stack: int | None):
        d = config.hidden_size
        kw = dict(rngs=rngs, param_dtype=param_dtype, stack=stack)
        self.norm1 = RMSNorm(d, eps=config.rms_norm_eps, axis_name="vision_embed", **kw)
        self.attn = VisionAttention(config, **kw)
        self.norm2 = RMSNorm(d, eps=config.rms_norm_eps, axis_name="vision_embed", **kw)
        self.mlp = SwiGLU(d, config.intermediate_size, use_bias=True, embed_axis="vision_embed",
                          mlp_axis="vision_mlp", **kw)

    def __call__(self, x, cos, sin, attend, dtype):
        x = x + self.attn(self.norm1(x), cos, sin, attend, dtype)
        return x + self.mlp(self.norm2(x), dtype)


class PatchEmbed(nnx.Module):
    """One linear map of each flattened C*T*P*P patch (the reference's stride=kernel Conv3d)."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, param_dtype: Any):
        self.proj = Linear(config.patch_dim, config.hidden_size, use_bias=False,
                           axes=("vision_patch", "vision_embed"), rngs=rngs, param_dtype=param_dtype)

    def __call__(self, pixel_values: jax.Array, dtype: Any) -> jax.Array:
        return self.proj(pixel_values, dtype)


class PatchMerger(nnx.Module):
    """RMSNorm, fold merge_unit patches into one row, Linear-GELU-Linear to out_hidden_size."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, param_dtype: Any):
        d, merged = config.hidden_size, config.hidden_size * config.merge_unit
        self.merged_size = merged
        self.ln_q = RMSNorm(d, eps=config.rms_norm_eps, axis_name="vision_embed", rngs=rngs, param_dtype=param_dtype)
        self.mlp_0 = Linear(merged, merged, use_bias=True, axes=("vision_merge", "vision_merge_hidden"),
                            rngs=rngs, param_dtype=param_dtype)
        self.mlp_2 = Linear(merged, config.out_hidden_size, use_bias=True, axes=("vision_merge_hidden", "embed"),
                            rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, dtype: Any) -> jax.Array:
        x = self.ln_q(x)
        x = x.reshape(-1, self.merged_size)
        hidden = self.mlp_0(x, dtype)
        hidden = jax.nn.gelu(hidden.astype(jnp.float32), approximate=False).astype(dtype)  # exact erf, as nn.GELU()
        return self.mlp_2(hidden, dtype)


class VisionTransformer(nnx.Module):
    """Qwen2.5-VL's ViT: pixel patches [N, C*T*P*P] -> merged tokens [N // merge_unit, out_hidden_size]."""

    def __init__(self, config: VisionConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 remat: str = "none", rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.patch_embed = PatchEmbed(config, rngs=rngs, param_dtype=param_dtype)
        self.blocks = VisionBlock(config, rngs=rngs, param_dtype=param_dtype, stack=config.depth)
        self.merger = PatchMerger(config, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, pixel_values: jax.Array, inputs: VisionInputs) -> jax.Array:
        """Returns the merged tokens in the original order (the reference's ``pooler_output``).

        Rows of padding units come last and are finite but meaningless.
        """
        config, dtype = self.config, self.dtype
        num_units = inputs.window_index.shape[0]
        if pixel_values.ndim != 2 or pixel_values.shape != (num_units * config.merge_unit, config.patch_dim):
            raise ValueError(f"pixel_values: expected shape {(num_units * config.merge_unit, config.patch_dim)} "
                             f"(num_patches from VisionInputs, patch_dim C*T*P*P), got {pixel_values.shape}")
        x = self.patch_embed(pixel_values, dtype)
        x = x.reshape(num_units, config.merge_unit, -1)[inputs.window_index].reshape(x.shape)
        cos, sin = vision_rotary_tables(inputs.position_ids, config.head_dim, config.rope_theta)
        full_segments = jnp.asarray(inputs.full_segment_ids)
        window_segments = jnp.asarray(inputs.window_segment_ids)
        is_full = jnp.asarray([i in config.fullatt_block_indexes for i in range(config.depth)])

        window_patches = window_units(config) ** 2 * config.merge_unit  # the largest window

        def body(block, x, full_attention):
            def attend(q, k, v):
                return jax.lax.cond(full_attention, lambda: segment_attention(q, k, v, full_segments),
                                    lambda: window_attention(q, k, v, window_segments, window_patches))

            return block(parallel.constrain(x, HIDDEN_AXES), cos, sin, attend, dtype), None

        x, _ = scan_layers(self.blocks, body, x, is_full, remat=self.remat)
        return self.merger(x, dtype)[inputs.reverse_index]


# ---------------------------------------------------------------------- checkpoint mapping
def _same(x):
    return np.asarray(x)


def _transpose(x):
    return np.ascontiguousarray(np.asarray(x).T)


def vision_tensor_specs(config: VisionConfig) -> list[TensorSpec]:
    """Every tensor of transformers' vision tower (names relative to its prefix) and our layout."""
    d, h, hd = config.hidden_size, config.num_heads, config.head_dim
    c, t, p = config.in_channels, config.temporal_patch_size, config.patch_size
    specs = [TensorSpec("patch_embed.proj.weight", ("patch_embed", "proj", "kernel"),
                        to_ours=lambda w: _transpose(np.asarray(w).reshape(d, -1)),
                        to_hf=lambda k: _transpose(k).reshape(d, c, t, p, p))]
    block = [
        ("norm1.weight", ("norm1", "scale"), _same, _same),
        ("norm2.weight", ("norm2", "scale"), _same, _same),
        ("attn.qkv.weight", ("attn", "qkv", "kernel"),
         lambda w: _transpose(w).reshape(d, 3, h, hd), lambda k: _transpose(np.asarray(k).reshape(d, 3 * d))),
        ("attn.qkv.bias", ("attn", "qkv", "bias"),
         lambda b: np.asarray(b).reshape(3, h, hd), lambda b: np.asarray(b).reshape(3 * d)),
        ("attn.proj.weight", ("attn", "proj", "kernel"),
         lambda w: _transpose(w).reshape(h, hd, d), lambda k: _transpose(np.asarray(k).reshape(d, d))),
        ("attn.proj.bias", ("attn", "proj", "bias"), _same, _same),
    ]
    for name in ("gate_proj", "up_proj", "down_proj"):
        block.append((f"mlp.{name}.weight", ("mlp", name, "kernel"), _transpose, _transpose))
        block.append((f"mlp.{name}.bias", ("mlp", name, "bias"), _same, _same))
    specs += [TensorSpec(f"blocks.{{i}}.{hf}", ("blocks", *path), to_ours, to_hf, stacked=True)
              for hf, path, to_ours, to_hf in block]
    specs += [
        TensorSpec("merger.ln_q.weight", ("merger", "ln_q", "scale"), _same, _same),
        TensorSpec("merger.mlp.0.weight", ("merger", "mlp_0", "kernel"), _transpose, _transpose),
        TensorSpec("merger.mlp.0.bias", ("merger", "mlp_0", "bias"), _same, _same),
        TensorSpec("merger.mlp.2.weight", ("merger", "mlp_2", "kernel"), _transpose, _transpose),
        TensorSpec("merger.mlp.2.bias", ("merger", "mlp_2", "bias"), _same, _same),
    ]
    return specs


def load_vision_weights(model: VisionTransformer, tensors: Mapping[str, Any], prefix: str = "") -> None:
    """Fills ``model``'s parameters in place from transformers-named tensors (e.g. a torch
    state_dict converted to numpy); see `layers.load_from_specs` for the errors."""
    load_from_specs(model, vision_tensor_specs(model.config), tensors, model.config.depth, prefix=prefix,
                    what="vision weights")


def vision_weights_to_hf(model: VisionTransformer, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of `load_vision_weights`: transformers-named numpy tensors of ``model``."""
    return export_to_specs(model, vision_tensor_specs(model.config), model.config.depth, prefix=prefix)
