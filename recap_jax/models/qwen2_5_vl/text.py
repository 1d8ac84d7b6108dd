"""The Qwen2 text decoder of Qwen2.5-VL: GQA with q/k/v biases, M-RoPE, RMSNorm, SwiGLU, KV cache.

Numerically it follows transformers' ``Qwen2_5_VLTextModel`` (eager attention): the same
multimodal rotary recomposition, the same float32 RMSNorm statistics and float32 softmax.
Parameter names mirror transformers' (``layers.self_attn.q_proj.kernel`` ...), with the
decoder layers stacked on a leading ``layers`` axis and the attention heads kept as their
own axis (q_proj kernel ``[embed, heads, head_dim]``) so that tensor parallelism can shard
heads. The output projection (lm_head) is not here: ``model.py`` owns it.

KV cache: static-shape buffers per layer, keys ``[B, kv_heads, head_dim, max_len]`` and
values ``[B, kv_heads, max_len, head_dim]``: separate buffers, so that decoding updates each
in place, in the layouts that attention reads with plain batched matmuls (`cached_attention`),
copying nothing. A call with a cache writes its S new tokens at slots
``[index, index + S)``, so one compiled function serves prefill (S = prompt length) and decode
(S = 1). Slot order is time order; rotary positions come from ``position_ids`` and are
independent of slots. With a cache the layers run as an unrolled Python loop (see
`TextModel.__call__`), without one as a ``lax.scan`` over the stacked layers.

Training on G completions of one prompt: `TextModel.with_shared_prefix` runs the prompt once
and lets its G continuations attend to its keys and values (the same prefix attention as
decoding), so the prompt's tokens are not pushed through the decoder G times.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recap_jax import parallel
from recap_jax.models.qwen2_5_vl import attention
from recap_jax.models.qwen2_5_vl.config import TextConfig
from recap_jax.models.qwen2_5_vl.layers import (
    LAYERS_AXIS,
    REMAT_POLICIES,
    RMSNorm,
    SwiGLU,
    TensorSpec,
    apply_rotary,
    cached_attention,
    export_to_specs,
    load_from_specs,
    make_param,
    matmul,
    scan_layers,
)

# Logical axis names of the cached values stacked over layers, shape `kv_cache_shape` (the keys
# swap the last two), for sharding rules in parallel.py; one layer's buffer drops the first.
KV_CACHE_AXES = (LAYERS_AXIS, "batch", "kv_heads", "cache_length", "head_dim")
# Logical axes of the residual stream [B, S, hidden]: rows split over the batch mesh axes.
HIDDEN_AXES = ("batch", "length", "activation_embed")


# ---------------------------------------------------------------------------- rotary
def rope_inverse_frequencies(config: TextConfig) -> np.ndarray:
    """inv_freq[j] = 1 / theta^(2j / head_dim), j < head_dim / 2, float32.

    Same order of float32 roundings as transformers (exponent, power, reciprocal), with a
    correctly rounded power; this reproduces torch's table bit for bit in almost every entry
    (at most 1 ulp apart).
    """
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float32) / np.float32(config.head_dim)
    powers = (float(config.rope_theta) ** exponents.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / powers


def mrope_section_rows(config: TextConfig) -> np.ndarray:
    """For each rotary frequency, which row of ``position_ids`` (0 = t, 1 = h, 2 = w) drives it.

    The frequencies are split into consecutive sections of sizes ``mrope_section``; section i
    takes its positions from row ``i % 3``.
    """
    return np.concatenate([np.full(size, i % 3, dtype=np.int32)
                           for i, size in enumerate(config.mrope_section)])


def mrope_cos_sin(position_ids: jax.Array, config: TextConfig) -> tuple[jax.Array, jax.Array]:
    """Multimodal RoPE tables: position_ids [3, B, S] int -> (cos, sin), each [B, S, head_dim] float32.

    Frequency j uses position ``position_ids[row_j]`` (see `mrope_section_rows`); the half
    table is concatenated with itself to cover head_dim, as in transformers'
    ``Qwen2_5_VLRotaryEmbedding.recomposition_frequencies``.
    """
    position_ids = jnp.asarray(position_ids)
    if position_ids.ndim != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids: expected shape [3, batch, seq] (t, h, w rows), got {position_ids.shape}")
    inv_freq = jnp.asarray(rope_inverse_frequencies(config))
    # [B, S, head_dim / 2]
    positions = jnp.moveaxis(position_ids[mrope_section_rows(config)], 0, -1).astype(jnp.float32)
    angles = positions * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


# ---------------------------------------------------------------------------- KV cache
class KVCache(NamedTuple):
    """Per-layer keys/values of the tokens seen so far (a pytree; static shapes).

    k: tuple of num_layers arrays [B, kv_heads, head_dim, max_len] (keys after RoPE,
      transposed: ``k[i][b, h, :, t]`` is the key of head h at slot t in layer i);
    v: tuple of num_layers arrays [B, kv_heads, max_len, head_dim]; both in the compute dtype.
    valid: [B, max_len] bool; True where a real (non-padding) token has been written.
    index: int32 scalar; the next free slot (the number of slots written so far).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


def kv_cache_shape(config: TextConfig, batch: int, max_len: int) -> tuple[int, ...]:
    """Shape of the cached values of all layers stacked, in `KV_CACHE_AXES` order (the keys
    have the same size, with the last two axes swapped)."""
    return (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)


def _layer_cache_shapes(config: TextConfig, batch: int, max_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    values = kv_cache_shape(config, batch, max_len)[1:]
    return (*values[:2], values[3], values[2]), values


def init_cache(config: TextConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens."""
    k_shape, v_shape = _layer_cache_shapes(config, batch, max_len)
    layers = range(config.num_hidden_layers)
    return KVCache(k=tuple(jnp.zeros(k_shape, dtype) for _ in layers),
                   v=tuple(jnp.zeros(v_shape, dtype) for _ in layers),
                   valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


# ---------------------------------------------------------------------------- modules
class Embed(nnx.Module):
    """Token embedding table ``embedding`` [vocab, embed]."""

    def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32):
        self.embedding = make_param(rngs.params(), (vocab_size, dim), ("vocab", "embed"), dtype=param_dtype)

    def __call__(self, ids: jax.Array, dtype: Any) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)


class HeadsProjection(nnx.Module):
    """x [..., embed] -> [..., heads, head_dim]: kernel [embed, heads, head_dim], bias [heads, head_dim]."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, heads_axis: str, rngs: nnx.Rngs,
                 param_dtype: Any, stack: int | None):
        self.kernel = make_param(rngs.params(), (dim, num_heads, head_dim), ("embed", heads_axis, "head_dim"),
                                 dtype=param_dtype, stack=stack)
        self.bias = make_param(None, (num_heads, head_dim), (heads_axis, "head_dim"), dtype=param_dtype,
                               stack=stack, init="zeros")

    def __call__(self, x: jax.Array, dtype: Any) -> jax.Array:
        y = matmul(x.astype(dtype), self.kernel[...].astype(dtype))
        return y + self.bias[...].astype(dtype)


class OutputProjection(nnx.Module):
    """[..., heads, head_dim] -> [..., embed]: kernel [heads, head_dim, embed], no bias."""

    def __init__(self, num_heads: int, head_dim: int, dim: int, *, rngs: nnx.Rngs, param_dtype: Any,
                 stack: int | None):
        self.kernel = make_param(rngs.params(), (num_heads, head_dim, dim), ("heads", "head_dim", "embed"),
                                 dtype=param_dtype, stack=stack)

    def __call__(self, x: jax.Array, dtype: Any) -> jax.Array:
        return matmul(x.astype(dtype), self.kernel[...].astype(dtype), contract=2)


class Attention(nnx.Module):
    """Grouped-query self-attention with M-RoPE on q and k, optionally through a KV cache."""

    def __init__(self, config: TextConfig, *, rngs: nnx.Rngs, param_dtype: Any, stack: int | None):
        c = config
        kw = dict(rngs=rngs, param_dtype=param_dtype, stack=stack)
        self.q_proj = HeadsProjection(c.hidden_size, c.num_attention_heads, c.head_dim, heads_axis="heads", **kw)
        self.k_proj = HeadsProjection(c.hidden_size, c.num_key_value_heads, c.head_dim, heads_axis="kv_heads", **kw)
        self.v_proj = HeadsProjection(c.hidden_size, c.num_key_value_heads, c.head_dim, heads_axis="kv_heads", **kw)
        self.o_proj = OutputProjection(c.num_attention_heads, c.head_dim, c.hidden_size, **kw)

    def __call__(self, x, cos, sin, valid, layer_cache, cache, dtype, prefix=None):
        """x [B, S, E]; cos/sin [B, S, 1, D]; valid [B, S] bool: the new tokens' real positions.

        layer_cache: None (causal self-attention over the S tokens, `attention.causal_attention`),
        or (k, v) of this layer, [B, Hkv, D, max_len] and [B, Hkv, max_len, D]; then ``cache``
        is (cache_valid [B, max_len] after this write, index: the first slot written): the new
        keys and values are written at slots [index, index + S) (in place) and each query
        attends to the valid slots up to its own, after ``prefix`` (a shared, read-only
        (k, v, valid) of this layer, see `layers.cached_attention`) when given.
        Returns (output [B, S, E], updated (k, v) or None).
        """
        q, k, v = self.project(x, cos, sin, dtype)
        if layer_cache is None:
            return self.o_proj(attention.causal_attention(q, k, v, valid), dtype), None
        cache_valid, index = cache
        cached_k, cached_v = layer_cache
        new_k, new_v = k, v
        k = jax.lax.dynamic_update_slice(cached_k, k.transpose(0, 2, 3, 1).astype(cached_k.dtype),
                                         (0, 0, 0, index))
        v = jax.lax.dynamic_update_slice(cached_v, v.transpose(0, 2, 1, 3).astype(cached_v.dtype),
                                         (0, 0, index, 0))
        if prefix is not None:
            prefix = (prefix[0].astype(dtype), prefix[1].astype(dtype), prefix[2])
        out = _cached_attention(q, new_k, new_v, k.astype(dtype), v.astype(dtype), valid, cache_valid, index, prefix)
        return self.o_proj(out, dtype), (k, v)

    def project(self, x, cos, sin, dtype):
        """Queries, keys (both rotated) and values: [B, S, heads, head_dim] each."""
        q = apply_rotary(self.q_proj(x, dtype), cos, sin)
        k = apply_rotary(self.k_proj(x, dtype), cos, sin)
        return q, k, self.v_proj(x, dtype)

    def with_shared_prefix(self, x_prefix, x, prefix_rotary, rotary, prefix_valid, valid, dtype):
        """Self-attention of Bp prefixes and of B = Bp * G continuations that each attend to
        their prefix (row r to prefix row r // G) and then causally to themselves.

        x_prefix [Bp, P, E], x [B, S, E]; *_rotary: (cos, sin) [.., 1, D]; prefix_valid [Bp, P]
        / valid [B, S]: the real tokens of each part. The prefix's keys and values are computed
        once (`attention.prefix_attention`: the reference reads them once per group, the fused
        kernels repeat them per row). Returns (prefix output, output).
        """
        qp, kp, vp = self.project(x_prefix, *prefix_rotary, dtype)
        q, k, v = self.project(x, *rotary, dtype)
        prefix_out = attention.causal_attention(qp, kp, vp, prefix_valid)
        out = attention.prefix_attention(q, k, v, valid, kp, vp, prefix_valid)
        return self.o_proj(prefix_out, dtype), self.o_proj(out, dtype)


class DecoderLayer(nnx.Module):
    """Pre-norm block: h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, config: TextConfig, *, rngs: nnx.Rngs, param_dtype: Any, stack: int | None):
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, axis_name="embed", rngs=rngs,
                                       param_dtype=param_dtype, stack=stack)
        self.self_attn = Attention(c, rngs=rngs, param_dtype=param_dtype, stack=stack)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, axis_name="embed", rngs=rngs,
                                                param_dtype=param_dtype, stack=stack)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, use_bias=False, embed_axis="embed", mlp_axis="mlp",
                          rngs=rngs, param_dtype=param_dtype, stack=stack)

    def __call__(self, h, cos, sin, valid, layer_cache, cache, dtype, prefix=None):
        attn, layer_cache = self.self_attn(self.input_layernorm(h), cos, sin, valid, layer_cache, cache, dtype, prefix)
        h = h + attn
        return self.feed_forward(h, dtype), layer_cache

    def feed_forward(self, h, dtype):
        return h + self.mlp(self.post_attention_layernorm(h), dtype)

    def with_shared_prefix(self, h_prefix, h, prefix_rotary, rotary, prefix_valid, valid, dtype):
        """The block on prefixes [Bp, P, E] and their continuations [B, S, E]
        (`Attention.with_shared_prefix`); returns both residual streams."""
        attn_prefix, attn = self.self_attn.with_shared_prefix(
            self.input_layernorm(h_prefix), self.input_layernorm(h), prefix_rotary, rotary, prefix_valid, valid, dtype)
        return self.feed_forward(h_prefix + attn_prefix, dtype), self.feed_forward(h + attn, dtype)


class TextModel(nnx.Module):
    """The Qwen2 decoder stack (embedding, L decoder layers, final RMSNorm); no lm_head.

    dtype: compute dtype (activations, KV cache); param_dtype: storage dtype of parameters.
    remat: rematerialisation policy of the layer scan, a key of ``layers.REMAT_POLICIES``.
    """

    def __init__(self, config: TextConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 remat: str = "none", rngs: nnx.Rngs):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat: {remat!r} is not one of {sorted(REMAT_POLICIES)}")
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, rngs=rngs, param_dtype=param_dtype)
        self.layers = DecoderLayer(config, rngs=rngs, param_dtype=param_dtype, stack=config.num_hidden_layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, axis_name="embed", rngs=rngs,
                            param_dtype=param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids [B, S] -> token embeddings [B, S, hidden] in the compute dtype."""
        return self.embed_tokens(input_ids, self.dtype)

    def split_layers(self) -> tuple[DecoderLayer, ...]:
        """The stacked decoder layers as L separate modules (each parameter sliced out of the stack).

        Slicing copies the weights (memory for one more copy of the decoder). A decode loop that
        calls this once, outside the loop, and passes the result as ``layers`` reads each weight
        in place at every step; slicing the stack inside the loop copies every weight at every
        step on XLA:CPU (it does not fuse a slice into a matmul), doubling what a step reads.
        """
        graphdef, state = nnx.split(self.layers)
        return tuple(nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                     for i in range(self.config.num_hidden_layers))

    def __call__(self, inputs_embeds: jax.Array, position_ids: jax.Array, attention_mask: jax.Array | None = None,
                 cache: KVCache | None = None, *, layers: tuple[DecoderLayer, ...] | None = None,
                 prefix: KVCache | None = None,
                 rotary: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, KVCache | None]:
        """Runs the decoder.

        inputs_embeds: [B, S, hidden]; position_ids: [3, B, S] (t, h, w rows of M-RoPE);
        attention_mask: [B, S], 1 = real token, 0 = padding (None = all real).
        Without a cache: causal attention restricted to real keys. With a cache: the S tokens
        are written at slots [cache.index, cache.index + S) and each query attends to the
        valid slots up to its own; the layers run as an unrolled loop (``layers``: the result of
        `split_layers`, default sliced here), each reading and updating its own cache buffer in
        place, and ``remat`` does not apply.
        prefix: with a cache, an optional read-only cache of Bp sequences shared by groups of
          B / Bp consecutive rows (row r continues prefix row r // (B / Bp)): every query
          attends to the prefix's valid slots, then to its own cache. Sampling G completions
          of one prompt keeps the prompt's keys once, not G times.
        rotary: optional precomputed ``mrope_cos_sin(position_ids, config)``, [B, S, head_dim]
          each (a decode loop computes the tables of all its steps once).
        Returns (hidden_states [B, S, hidden] after the final norm, the updated cache or None).
        """
        batch, seq_len = _check_inputs(inputs_embeds, position_ids, attention_mask, self.config)
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq_len), bool)
        attention_mask = jnp.asarray(attention_mask).astype(bool)
        cos, sin = self._rotary(position_ids, rotary)
        h = parallel.constrain(inputs_embeds.astype(self.dtype), HIDDEN_AXES)
        dtype = self.dtype

        if cache is None:
            def body(layer, h, _):
                h, _ = layer(parallel.constrain(h, HIDDEN_AXES), cos, sin, attention_mask, None, None, dtype)
                return h, None

            h, _ = scan_layers(self.layers, body, h, remat=self.remat)
            return self.norm(h), None

        _check_cache(cache, batch, seq_len, self.config)
        if prefix is not None:
            _check_prefix(prefix, batch, self.config)
        index = cache.index
        valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, index))

        new_k, new_v = [], []
        for i, (layer, k, v) in enumerate(zip(self.split_layers() if layers is None else layers, cache.k, cache.v)):
            shared = None if prefix is None else (prefix.k[i], prefix.v[i], prefix.valid)
            h, (k, v) = layer(parallel.constrain(h, HIDDEN_AXES), cos, sin, attention_mask, (k, v), (valid, index),
                              dtype, shared)
            new_k.append(k)
            new_v.append(v)
        new_cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid=valid, index=(index + seq_len).astype(jnp.int32))
        return self.norm(h), new_cache

    def with_shared_prefix(self, prefix_embeds: jax.Array, prefix_position_ids: jax.Array,
                           prefix_attention_mask: jax.Array, inputs_embeds: jax.Array, position_ids: jax.Array,
                           attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The decoder over Bp prefixes and B = Bp * G continuations, without a cache:
        continuation row r extends prefix row r // G (the G sampled completions of a prompt).

        Equal to running `__call__` on the B concatenations [prefix row r // G, row r] (up to
        float rounding), but each prefix's tokens go through every layer once, not G times:
        the continuations attend to their prefix's keys and values, and gradients from all G
        continuations flow back into the one prefix. prefix_embeds [Bp, P, E],
        prefix_position_ids [3, Bp, P], prefix_attention_mask [Bp, P] (1 = real, padding
        anywhere); inputs_embeds [B, S, E], position_ids [3, B, S], attention_mask [B, S]
        (1 = real; the continuation's own keys). Runs as a ``lax.scan`` over the layers,
        with ``remat``. Returns (prefix hidden [Bp, P, E], hidden [B, S, E]), both after the
        final norm.
        """
        groups, _ = _check_inputs(prefix_embeds, prefix_position_ids, prefix_attention_mask, self.config)
        batch, _ = _check_inputs(inputs_embeds, position_ids, attention_mask, self.config)
        if batch % groups:
            raise ValueError(f"with_shared_prefix: {groups} prefixes do not divide the batch of {batch} rows")
        prefix_valid = jnp.asarray(prefix_attention_mask).astype(bool)
        valid = jnp.asarray(attention_mask).astype(bool)
        prefix_rotary = self._rotary(prefix_position_ids)
        rotary = self._rotary(position_ids)
        dtype = self.dtype

        def body(layer, carry, _):
            h_prefix, h = (parallel.constrain(x, HIDDEN_AXES) for x in carry)
            return layer.with_shared_prefix(h_prefix, h, prefix_rotary, rotary, prefix_valid, valid, dtype), None

        start = (prefix_embeds.astype(dtype), inputs_embeds.astype(dtype))
        (h_prefix, h), _ = scan_layers(self.layers, body, start, remat=self.remat)
        return self.norm(h_prefix), self.norm(h)

    def _rotary(self, position_ids: jax.Array, rotary: tuple[jax.Array, jax.Array] | None = None):
        """(cos, sin) [B, S, 1, head_dim]: ``rotary`` if given, else from ``position_ids``."""
        cos, sin = mrope_cos_sin(position_ids, self.config) if rotary is None else rotary
        return cos[:, :, None, :], sin[:, :, None, :]


def _cached_attention(q, new_k, new_v, keys_t, values, valid, cache_valid, index, prefix):
    """Attention of S new tokens after they were written to the cache at slots [index, index + S).

    q, new_k, new_v [B, S, H(kv), D]: the new tokens' projections; keys_t / values: the whole
    (updated) buffers in the compute dtype; valid [B, S], cache_valid [B, max_len].
    * S = max_len without a prefix (a prefill that fills the cache, so index is 0): causal
      self-attention of the new tokens (`attention.causal_attention`, a fused kernel where
      there is one);
    * S = 1 (a decode step): `attention.decode_attention` (which reads only the filled slots
      outside the reference);
    * otherwise, and always under the ``xla`` implementation: the reference
      `layers.cached_attention` over the whole buffer, masked to valid slots <= the query's.
    """
    seq_len, max_len = q.shape[1], keys_t.shape[-1]
    fused = attention.resolve() != "xla"
    if fused and seq_len == max_len and prefix is None:
        return attention.causal_attention(q, new_k.astype(q.dtype), new_v.astype(q.dtype), valid)
    if seq_len == 1:
        return attention.decode_attention(q, keys_t, values, cache_valid, index, prefix)
    slots = jnp.arange(max_len)
    query_slots = index + jnp.arange(seq_len)
    mask = cache_valid[:, None, None, :] & (slots[None, :] <= query_slots[:, None])[None, None]
    return cached_attention(q, keys_t, values, mask, prefix)


def _check_inputs(inputs_embeds, position_ids, attention_mask, config: TextConfig) -> tuple[int, int]:
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size:
        raise ValueError(f"inputs_embeds: expected [batch, seq, {config.hidden_size}], got {inputs_embeds.shape}")
    batch, seq_len = inputs_embeds.shape[:2]
    if position_ids.shape != (3, batch, seq_len):
        raise ValueError(f"position_ids: expected shape (3, {batch}, {seq_len}) to match inputs_embeds, "
                         f"got {position_ids.shape}")
    if attention_mask is not None and attention_mask.shape != (batch, seq_len):
        raise ValueError(f"attention_mask: expected shape ({batch}, {seq_len}), got {attention_mask.shape}")
    return batch, seq_len


def _check_cache(cache: KVCache, batch: int, seq_len: int, config: TextConfig, what: str = "cache") -> None:
    for name, buffers, expected in zip(("k", "v"), (cache.k, cache.v),
                                       _layer_cache_shapes(config, batch, cache.max_len)):
        shapes = tuple(tuple(b.shape) for b in buffers)
        if len(shapes) != config.num_hidden_layers or any(s != expected for s in shapes):
            raise ValueError(f"{what}: {name} must be {config.num_hidden_layers} layer buffers of shape "
                             f"{expected}, got {shapes}")
    if seq_len > cache.max_len:
        raise ValueError(f"{what}: {seq_len} new tokens do not fit in max_len={cache.max_len}")
    try:  # checkable only outside jit; inside jit the caller keeps index + S <= max_len
        index = int(cache.index)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return
    if index + seq_len > cache.max_len:
        raise ValueError(f"{what}: writing {seq_len} tokens at slot {index} overflows max_len={cache.max_len}")


def _check_prefix(prefix: KVCache, batch: int, config: TextConfig) -> None:
    groups = prefix.valid.shape[0]
    if batch % groups:
        raise ValueError(f"prefix: {groups} shared sequences do not divide the batch of {batch} rows")
    _check_cache(prefix, groups, 0, config, what="prefix")


# ---------------------------------------------------------------------------- checkpoint mapping
def text_tensor_specs(config: TextConfig) -> list[TensorSpec]:
    """Every tensor of transformers' text model and its place in `TextModel`.

    Names are relative to the text prefix ("model." on hub checkpoints,
    "model.language_model." in transformers 5). Layouts: PyTorch Linear weights are
    [out, in]; ours are [in, out] with the heads split into their own axis.
    """
    hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads,
                                         config.num_key_value_heads, config.head_dim)

    def identity(x):
        return np.asarray(x)

    def transpose(x):
        return np.asarray(x).T

    def heads_in(n):  # weight [n * D, E] <-> kernel [E, n, D]
        return (lambda w: np.asarray(w).T.reshape(hidden, n, head_dim),
                lambda k: np.asarray(k).reshape(hidden, n * head_dim).T)

    def heads_bias(n):  # bias [n * D] <-> [n, D]
        return (lambda b: np.asarray(b).reshape(n, head_dim), lambda b: np.asarray(b).reshape(n * head_dim))

    out_to_ours = lambda w: np.asarray(w).T.reshape(heads, head_dim, hidden)  # [E, N * D] -> [N, D, E]
    out_to_hf = lambda k: np.asarray(k).reshape(heads * head_dim, hidden).T

    def layer(hf, path, conv):
        return TensorSpec(f"layers.{{i}}.{hf}", ("layers", *path), conv[0], conv[1], stacked=True)

    specs = [TensorSpec("embed_tokens.weight", ("embed_tokens", "embedding"), identity, identity)]
    for name, n in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
        specs.append(layer(f"self_attn.{name}.weight", ("self_attn", name, "kernel"), heads_in(n)))
        specs.append(layer(f"self_attn.{name}.bias", ("self_attn", name, "bias"), heads_bias(n)))
    specs.append(layer("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (out_to_ours, out_to_hf)))
    for name in ("gate_proj", "up_proj", "down_proj"):
        specs.append(layer(f"mlp.{name}.weight", ("mlp", name, "kernel"), (transpose, transpose)))
    for name in ("input_layernorm", "post_attention_layernorm"):
        specs.append(layer(f"{name}.weight", (name, "scale"), (identity, identity)))
    specs.append(TensorSpec("norm.weight", ("norm", "scale"), identity, identity))
    return specs


def load_text_params(model: TextModel, tensors: Mapping[str, Any]) -> None:
    """Fills ``model`` in place from transformers-named tensors (text-relative names)."""
    load_from_specs(model, text_tensor_specs(model.config), tensors, model.config.num_hidden_layers,
                    what="text checkpoint")


def text_params_to_hf(model: TextModel) -> dict[str, np.ndarray]:
    """The model's parameters as transformers-named numpy tensors (text-relative names)."""
    return export_to_specs(model, text_tensor_specs(model.config), model.config.num_hidden_layers)
