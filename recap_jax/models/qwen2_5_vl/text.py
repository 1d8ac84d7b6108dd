"""The Qwen2 text decoder of Qwen2.5-VL: GQA with q/k/v biases, M-RoPE, RMSNorm, SwiGLU, KV cache.

Numerically it follows transformers' ``Qwen2_5_VLTextModel`` (eager attention): the same
multimodal rotary recomposition, the same float32 RMSNorm statistics and float32 softmax.
Parameter names mirror transformers' (``layers.self_attn.q_proj.kernel`` ...), with the
decoder layers stacked on a leading ``layers`` axis and the attention heads kept as their
own axis (q_proj kernel ``[embed, heads, head_dim]``) so that tensor parallelism can shard
heads. The output projection (lm_head) is not here: ``model.py`` owns it.

KV cache: one static-shape buffer per layer, ``[B, max_len, kv_heads, head_dim]``, stacked
over layers. A call with a cache writes its S new tokens at slots ``[index, index + S)``, so
one compiled function serves prefill (S = prompt length) and decode (S = 1). Slot order is
time order; rotary positions come from ``position_ids`` and are independent of slots.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recap_jax import parallel
from recap_jax.models.qwen2_5_vl.config import TextConfig
from recap_jax.models.qwen2_5_vl.layers import (LAYERS_AXIS, REMAT_POLICIES, RMSNorm, SwiGLU, TensorSpec,
                                                 apply_rotary, dot_product_attention, export_to_specs, load_from_specs,
                                                 make_param, scan_layers)

# Logical axis names of the KV cache buffers (k and v), for sharding rules in parallel.py.
KV_CACHE_AXES = (LAYERS_AXIS, "batch", "cache_length", "kv_heads", "head_dim")
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
    positions = jnp.moveaxis(position_ids[mrope_section_rows(config)], 0, -1).astype(jnp.float32)  # [B, S, head_dim / 2]
    angles = positions * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


# ---------------------------------------------------------------------------- KV cache
class KVCache(NamedTuple):
    """Per-layer keys/values of the tokens seen so far (a pytree; static shapes).

    k, v: [num_layers, B, max_len, kv_heads, head_dim] in the compute dtype (keys after RoPE).
    valid: [B, max_len] bool; True where a real (non-padding) token has been written.
    index: int32 scalar; the next free slot (the number of slots written so far).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(config: TextConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
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
        y = jnp.einsum("bse,end->bsnd", x.astype(dtype), self.kernel[...].astype(dtype))
        return y + self.bias[...].astype(dtype)


class OutputProjection(nnx.Module):
    """[..., heads, head_dim] -> [..., embed]: kernel [heads, head_dim, embed], no bias."""

    def __init__(self, num_heads: int, head_dim: int, dim: int, *, rngs: nnx.Rngs, param_dtype: Any,
                 stack: int | None):
        self.kernel = make_param(rngs.params(), (num_heads, head_dim, dim), ("heads", "head_dim", "embed"),
                                 dtype=param_dtype, stack=stack)

    def __call__(self, x: jax.Array, dtype: Any) -> jax.Array:
        return jnp.einsum("bsnd,nde->bse", x.astype(dtype), self.kernel[...].astype(dtype))


class Attention(nnx.Module):
    """Grouped-query self-attention with M-RoPE on q and k, optionally through a KV cache."""

    def __init__(self, config: TextConfig, *, rngs: nnx.Rngs, param_dtype: Any, stack: int | None):
        c = config
        kw = dict(rngs=rngs, param_dtype=param_dtype, stack=stack)
        self.q_proj = HeadsProjection(c.hidden_size, c.num_attention_heads, c.head_dim, heads_axis="heads", **kw)
        self.k_proj = HeadsProjection(c.hidden_size, c.num_key_value_heads, c.head_dim, heads_axis="kv_heads", **kw)
        self.v_proj = HeadsProjection(c.hidden_size, c.num_key_value_heads, c.head_dim, heads_axis="kv_heads", **kw)
        self.o_proj = OutputProjection(c.num_attention_heads, c.head_dim, c.hidden_size, **kw)

    def __call__(self, x, cos, sin, mask, layer_cache, cache_index, dtype):
        """x [B, S, E]; cos/sin [B, S, 1, D]; mask broadcastable to [B, 1, S, keys].

        layer_cache: None, or (k, v) of this layer, [B, max_len, Hkv, D]; the new keys and
        values are written at slot cache_index and the queries attend to the whole buffer.
        Returns (output [B, S, E], updated (k, v) or None).
        """
        q = apply_rotary(self.q_proj(x, dtype), cos, sin)
        k = apply_rotary(self.k_proj(x, dtype), cos, sin)
        v = self.v_proj(x, dtype)
        if layer_cache is not None:
            cached_k, cached_v = layer_cache
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), start)
            v = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), start)
            layer_cache = (k, v)
        out = dot_product_attention(q, k.astype(dtype), v.astype(dtype), mask)
        return self.o_proj(out, dtype), layer_cache


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

    def __call__(self, h, cos, sin, mask, layer_cache, cache_index, dtype):
        attn, layer_cache = self.self_attn(self.input_layernorm(h), cos, sin, mask, layer_cache, cache_index, dtype)
        h = h + attn
        h = h + self.mlp(self.post_attention_layernorm(h), dtype)
        return h, layer_cache


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

    def __call__(self, inputs_embeds: jax.Array, position_ids: jax.Array, attention_mask: jax.Array | None = None,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Runs the decoder.

        inputs_embeds: [B, S, hidden]; position_ids: [3, B, S] (t, h, w rows of M-RoPE);
        attention_mask: [B, S], 1 = real token, 0 = padding (None = all real).
        Without a cache: causal attention restricted to real keys. With a cache: the S tokens
        are written at slots [cache.index, cache.index + S) and each query attends to the
        valid slots up to its own. Returns (hidden_states [B, S, hidden] after the final
        norm, the updated cache or None).
        """
        batch, seq_len = _check_inputs(inputs_embeds, position_ids, attention_mask, self.config)
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq_len), bool)
        attention_mask = jnp.asarray(attention_mask).astype(bool)
        cos, sin = mrope_cos_sin(position_ids, self.config)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        h = parallel.constrain(inputs_embeds.astype(self.dtype), HIDDEN_AXES)
        dtype = self.dtype

        if cache is None:
            causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))
            mask = causal[None, None] & attention_mask[:, None, None, :]

            def body(layer, h, _):
                h, _ = layer(parallel.constrain(h, HIDDEN_AXES), cos, sin, mask, None, None, dtype)
                return h, None

            h, _ = scan_layers(self.layers, body, h, remat=self.remat)
            return self.norm(h), None

        _check_cache(cache, batch, seq_len, self.config)
        index = cache.index
        valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, index))
        slots = jnp.arange(cache.max_len)
        query_slots = index + jnp.arange(seq_len)
        mask = valid[:, None, None, :] & (slots[None, :] <= query_slots[:, None])[None, None]

        def cached_body(layer, h, layer_cache):
            return layer(parallel.constrain(h, HIDDEN_AXES), cos, sin, mask, layer_cache, index, dtype)

        h, (new_k, new_v) = scan_layers(self.layers, cached_body, h, (cache.k, cache.v), remat=self.remat)
        new_cache = KVCache(k=new_k, v=new_v, valid=valid, index=(index + seq_len).astype(jnp.int32))
        return self.norm(h), new_cache


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


def _check_cache(cache: KVCache, batch: int, seq_len: int, config: TextConfig) -> None:
    expected = (config.num_hidden_layers, batch, cache.max_len, config.num_key_value_heads, config.head_dim)
    if cache.k.shape != expected or cache.v.shape != expected:
        raise ValueError(f"cache: k/v shapes {cache.k.shape}/{cache.v.shape} do not match {expected}")
    if seq_len > cache.max_len:
        raise ValueError(f"cache: {seq_len} new tokens do not fit in max_len={cache.max_len}")
    try:  # checkable only outside jit; inside jit the caller keeps index + S <= max_len
        index = int(cache.index)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return
    if index + seq_len > cache.max_len:
        raise ValueError(f"cache: writing {seq_len} tokens at slot {index} overflows max_len={cache.max_len}")


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
