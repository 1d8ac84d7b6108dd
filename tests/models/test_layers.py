"""The shared building blocks against plain numpy: the 2-D `matmul` and masked grouped-query
attention with a mask per head (the transformers parity tests only use head-shared masks)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from recap_jax.models.qwen2_5_vl.layers import dot_product_attention, matmul


@pytest.mark.parametrize("x_shape, kernel_shape, contract", [
    ((3, 5, 8), (8, 6), 1),            # [B, S, E] x [E, out]
    ((3, 5, 8), (8, 2, 4), 1),         # q/k/v: [B, S, E] x [E, heads, head_dim]
    ((3, 5, 2, 4), (2, 4, 8), 2),      # o_proj: [B, S, heads, head_dim] x [heads, head_dim, E]
    ((7, 8), (8, 3, 2, 4), 1),         # vision qkv: [N, d] x [d, 3, heads, head_dim]
])
def test_matmul_equals_the_tensor_contraction(x_shape, kernel_shape, contract):
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape).astype(np.float32)
    kernel = rng.normal(size=kernel_shape).astype(np.float32)
    expected = np.tensordot(x, kernel, axes=(list(range(x.ndim - contract, x.ndim)), list(range(contract))))
    got = np.asarray(matmul(jnp.asarray(x), jnp.asarray(kernel), contract=contract))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_matmul_names_mismatched_axes():
    with pytest.raises(ValueError, match=r"does not end in kernel's contracted axes \(4,\)"):
        matmul(jnp.zeros((2, 3)), jnp.zeros((4, 5)))


def _numpy_attention(q, k, v, mask):
    """Reference softmax attention, heads expanded: q [B, Sq, Hq, D]; k, v [B, Sk, Hkv, D]."""
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.broadcast_to(mask, scores.shape), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.mark.parametrize("per_head", [False, True])
def test_grouped_query_attention_with_head_shared_and_per_head_masks(per_head):
    rng = np.random.default_rng(1)
    batch, q_len, kv_len, num_heads, num_kv_heads, head_dim = 2, 5, 7, 6, 2, 4
    q = rng.normal(size=(batch, q_len, num_heads, head_dim)).astype(np.float32)
    k = rng.normal(size=(batch, kv_len, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.normal(size=(batch, kv_len, num_kv_heads, head_dim)).astype(np.float32)
    mask = rng.random((batch, num_heads if per_head else 1, q_len, kv_len)) < 0.6
    mask[..., 0] = True  # every query attends to something
    expected = _numpy_attention(q, k, v, mask)
    got = np.asarray(dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
