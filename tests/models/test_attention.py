"""Every attention implementation against the reference (float64 numpy, and the XLA path):
left-padded causal attention, a shared prompt prefix + G completions, images of different
sizes as segments, decoding over a partly filled cache; then the whole model under each.

"cudnn" cannot run on a CPU; `attention.EMULATE_CUDNN` sends the very arguments cuDNN would
get (layout, GQA heads, masks) through jax.nn's XLA implementation, which checks everything
but cuDNN itself. "pallas" runs the TPU flash-attention kernel in interpret mode, and
"pallas-gpu" the GPU (Triton) kernel in interpret mode (`attention.PALLAS_KERNEL_OFF_ACCELERATOR`).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from recap_jax import sampling
from recap_jax.models.qwen2_5_vl import attention
from recap_jax.models.qwen2_5_vl import config as config_lib
from recap_jax.models.qwen2_5_vl import model as model_lib
from recap_jax.models.qwen2_5_vl.vision import window_attention

IMPLS = ("xla", "cudnn", "pallas", "pallas-gpu")
# cuDNN takes bf16 only: its path is checked in bf16 (tolerance of bf16 inputs), the others in f32
DTYPES = {"xla": jnp.float32, "cudnn": jnp.bfloat16, "pallas": jnp.float32, "pallas-gpu": jnp.float32}
ATOL = {"xla": 1e-5, "cudnn": 3e-2, "pallas": 1e-5, "pallas-gpu": 1e-5}
# what `attention.USED` records for each
LABEL = {"xla": "xla", "cudnn": "cudnn", "pallas": "pallas-tpu", "pallas-gpu": "pallas-gpu"}


@contextlib.contextmanager
def implementation(impl: str):
    """Runs the block under ``impl`` (one of IMPLS); yields the name `attention` takes."""
    kernel = attention.PALLAS_KERNEL_OFF_ACCELERATOR
    previous, kernel["kernel"] = kernel["kernel"], "gpu" if impl == "pallas-gpu" else "tpu"
    jax.clear_caches()  # the kernel is chosen at trace time
    name = "pallas" if impl.startswith("pallas") else impl
    try:
        with attention.use_implementation(name):
            yield name
    finally:
        kernel["kernel"] = previous
        jax.clear_caches()


@pytest.fixture(autouse=True)
def emulate_cudnn(monkeypatch):
    monkeypatch.setitem(attention.EMULATE_CUDNN, "on", True)
    yield
    attention.set_implementation("auto")


def _qkv(rng, batch, q_len, kv_len, heads=4, kv_heads=2, head_dim=16, dtype=jnp.float32):
    q = rng.normal(size=(batch, q_len, heads, head_dim))
    k = rng.normal(size=(batch, kv_len, kv_heads, head_dim))
    v = rng.normal(size=(batch, kv_len, kv_heads, head_dim))
    # round through the dtype so that the numpy reference sees the very inputs
    return tuple(np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v))


def _run(fn, impl, *arrays, **kwargs):
    dtype = DTYPES[impl]
    cast = [jnp.asarray(a, dtype) if np.asarray(a).dtype.kind == "f" else jnp.asarray(a) for a in arrays]
    before = attention.USED.copy()
    with implementation(impl) as name:
        out = jax.jit(lambda *a: fn(*a, implementation=name, **kwargs))(*cast)
    used = attention.USED - before
    assert used and all(i == LABEL[impl] for (_, i) in used), \
        f"{impl} fell back: {dict(used)}, {dict(attention.FALLBACKS)}"
    return np.asarray(out.astype(jnp.float32))


def _left_padding(rng, batch, length):
    pads = rng.integers(0, length, batch)
    return np.arange(length)[None, :] >= pads[:, None]


# ---------------------------------------------------------------------------- selection
def test_auto_resolves_by_backend_and_bad_names_are_errors():
    assert attention.resolve("auto", backend="cpu") == "xla"
    assert attention.resolve("auto", backend="gpu") == "cudnn"
    assert attention.resolve("auto", backend="tpu") == "pallas"
    assert attention.resolve("pallas", backend="gpu") == "pallas"
    with pytest.raises(ValueError, match="flash"):
        attention.set_implementation("flash")
    with attention.use_implementation("pallas"):
        assert attention.resolve() == "pallas"
    assert attention.get_implementation() == "auto"


def test_cudnn_falls_back_to_xla_for_float32_and_says_why(monkeypatch):
    monkeypatch.setitem(attention.EMULATE_CUDNN, "on", False)
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 1, 4, 4)
    valid = jnp.ones((1, 4), bool)
    with pytest.warns(UserWarning, match="cudnn unavailable"):
        attention.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), valid, implementation="cudnn")
    assert any(impl == "cudnn" and "float32" in why for (_, impl, why) in attention.FALLBACKS)


# ---------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=6)
@given(seed=st.integers(0, 2 ** 16), batch=st.integers(1, 3))
def test_causal_attention_with_left_padding_equals_reference(impl, seed, batch):
    rng = np.random.default_rng(seed)
    length = 16
    q, k, v = _qkv(rng, batch, length, length, dtype=DTYPES[impl])
    valid = _left_padding(rng, batch, length)
    expected = attention.numpy_attention(q, k, v, np.asarray(attention.causal_mask(jnp.asarray(valid))))
    got = _run(attention.causal_attention, impl, q, k, v, valid)
    np.testing.assert_allclose(got[valid], expected[valid], atol=ATOL[impl])


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=4)
@given(seed=st.integers(0, 2 ** 16), groups=st.sampled_from([1, 2]), share=st.sampled_from([1, 3]))
def test_shared_prefix_and_group_completions_equal_reference(impl, seed, groups, share):
    """Bp left-padded prompts, each continued by G right-padded completions."""
    rng = np.random.default_rng(seed)
    batch, prefix_len, length = groups * share, 16, 8
    q, k, v = _qkv(rng, batch, length, length, dtype=DTYPES[impl])
    _, prefix_k, prefix_v = _qkv(rng, groups, 1, prefix_len, dtype=DTYPES[impl])
    prefix_valid = _left_padding(rng, groups, prefix_len)
    valid = np.arange(length)[None, :] < rng.integers(1, length + 1, batch)[:, None]
    rows_prefix_valid = np.repeat(prefix_valid, share, 0)
    mask = np.concatenate([np.broadcast_to(rows_prefix_valid[:, None, None, :], (batch, 1, length, prefix_len)),
                           np.asarray(attention.causal_mask(jnp.asarray(valid)))], axis=-1)
    keys = np.concatenate([np.repeat(prefix_k, share, 0), k], 1)
    values = np.concatenate([np.repeat(prefix_v, share, 0), v], 1)
    expected = attention.numpy_attention(q, keys, values, mask)
    got = _run(attention.prefix_attention, impl, q, k, v, valid, prefix_k, prefix_v, prefix_valid)
    np.testing.assert_allclose(got[valid], expected[valid], atol=ATOL[impl])


def _image_segments(sizes, total):
    ids = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)] + [np.full(total - sum(sizes), -1)])
    return ids.astype(np.int32)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=4)
@given(seed=st.integers(0, 2 ** 16), sizes=st.lists(st.sampled_from([4, 8, 16, 20]), min_size=1, max_size=3))
def test_images_of_different_sizes_as_segments_equal_reference(impl, seed, sizes):
    rng = np.random.default_rng(seed)
    total = 64
    q, k, v = _qkv(rng, 1, total, total, heads=2, kv_heads=2, dtype=DTYPES[impl])
    ids = _image_segments(sizes, total)[None]
    expected = attention.numpy_attention(q, k, v, ids[:, None, :, None] == ids[:, None, None, :])
    got = _run(attention.segment_attention, impl, q, k, v, ids)  # self-attention: the keys' ids are the queries'
    np.testing.assert_allclose(got, expected, atol=ATOL[impl])


@pytest.mark.parametrize("impl", IMPLS)
def test_vision_window_blocks_equal_reference(impl):
    """`window_attention` (banded key blocks, segment ids per block) under each implementation
    against float64 attention over all patches masked by window. The GPU Pallas kernel takes
    one id array, so the banded blocks (queries and keys of different lengths) go to cuDNN."""
    rng = np.random.default_rng(3)
    block, windows = 8, [8, 4, 8, 6, 8]
    ids = _image_segments(windows, 40)
    q, k, v = (x[0] for x in _qkv(rng, 1, 40, 40, heads=2, kv_heads=2, dtype=DTYPES[impl]))
    same_window = ids[None, None, :, None] == ids[None, None, None]
    expected = attention.numpy_attention(q[None], k[None], v[None], same_window)[0]
    before = attention.USED.copy()
    with implementation(impl):
        got = jax.jit(lambda q, k, v: window_attention(q, k, v, jnp.asarray(ids), block))(
            *(jnp.asarray(x, DTYPES[impl]) for x in (q, k, v)))
    assert set(i for _, i in attention.USED - before) == {"cudnn" if impl == "pallas-gpu" else LABEL[impl]}
    real = ids >= 0
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32))[real], expected[real], atol=ATOL[impl])


@pytest.mark.parametrize("with_prefix", [False, True])
@settings(max_examples=8)
@given(seed=st.integers(0, 2 ** 16), index=st.integers(0, 47))
def test_chunked_decode_equals_reference_and_reads_only_filled_chunks(with_prefix, seed, index):
    """The decode step at slot ``index`` of a 48-slot cache (chunks of 16): equal to the XLA
    reference; NaN written into the chunks after the query's does not reach the output."""
    rng = np.random.default_rng(seed)
    batch, groups, length = 4, 2, 48
    assert attention.decode_chunk(length) == 16
    q, k, v = _qkv(rng, batch, 1, length)
    keys_t, values = k.transpose(0, 2, 3, 1).copy(), v.transpose(0, 2, 1, 3).copy()
    cache_valid = rng.random((batch, length)) < 0.8
    cache_valid[:, index] = True
    prefix = None
    if with_prefix:
        _, pk, pv = _qkv(rng, groups, 1, 8)
        prefix = (jnp.asarray(pk.transpose(0, 2, 3, 1)), jnp.asarray(pv.transpose(0, 2, 1, 3)),
                  jnp.asarray(_left_padding(rng, groups, 8)))
    args = (jnp.asarray(q), jnp.asarray(keys_t), jnp.asarray(values), jnp.asarray(cache_valid), jnp.int32(index))
    expected = np.asarray(attention.decode_attention(*args, prefix, implementation="xla"))
    poisoned_from = (index // 16 + 1) * 16
    keys_t[..., poisoned_from:] = np.nan
    values[:, :, poisoned_from:] = np.nan
    args = (args[0], jnp.asarray(keys_t), jnp.asarray(values), *args[3:])
    got = np.asarray(jax.jit(lambda *a: attention.decode_attention(*a, implementation="pallas"))(*args, prefix))
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ---------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def tiny_model():
    config = config_lib.tiny(vocab_size=128)
    return model_lib.init_model(config, seed=0)


def _prompts(config, rng, batch=2, length=16):
    ids = rng.integers(0, 100, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :5] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("impl", ["cudnn", "pallas", "pallas-gpu"])
def test_policy_logprobs_and_gradients_equal_reference(tiny_model, impl):
    """The trainer's log-probs of G completions after a shared, left-padded prompt
    (`TextModel.with_shared_prefix`) and their gradients, under each path vs xla."""
    config = tiny_model.config
    rng = np.random.default_rng(0)
    ids, mask = _prompts(config, rng)
    group, steps = 2, 8
    inputs = jax.tree.map(jnp.asarray, model_lib.prepare_inputs(config, ids, mask))
    completions = jnp.asarray(rng.integers(0, 100, (2 * group, steps)), jnp.int32)
    completion_mask = jnp.asarray(np.arange(steps)[None] < np.array([[8], [5], [8], [3]]), jnp.int32)
    dtype = DTYPES[impl]
    model = model_lib.init_model(config, seed=0, dtype=dtype)
    graphdef, params = nnx.split(model)
    logprob_fn = sampling.make_logprob_fn(graphdef, group)
    batch = {"prompt": inputs, "completions": completions, "completion_mask": completion_mask}

    def loss(p):
        logp, _ = logprob_fn(p, batch)
        return jnp.sum(logp), logp

    results = {}
    for name in ("xla", impl):
        with implementation(name):
            (_, logp), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results[name] = (np.asarray(logp), jax.tree.map(np.asarray, grads))
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    real = np.asarray(completion_mask).astype(bool)
    np.testing.assert_allclose(results[impl][0][real], results["xla"][0][real], atol=tol * 10, rtol=tol)
    for got, want in zip(jax.tree.leaves(results[impl][1]), jax.tree.leaves(results["xla"][1])):
        scale = np.abs(want.astype(np.float32)).max() + 1e-6
        assert np.abs(got.astype(np.float32) - want.astype(np.float32)).max() <= tol * 5 * scale


@pytest.mark.parametrize("impl", ["pallas", "pallas-gpu"])
def test_generation_with_fused_prefill_and_chunked_decode_equals_reference(tiny_model, impl):
    """Greedy sampling: the prefill through each Pallas kernel and decoding through the
    chunked cache reader give the reference's tokens and log-probs."""
    config = tiny_model.config
    rng = np.random.default_rng(1)
    ids, mask = _prompts(config, rng)
    graphdef, state = nnx.split(tiny_model)
    params = sampling.SamplingParams(max_new_tokens=40, temperature=0.0, num_samples=2)
    inputs = sampling.prepare_prompts(tiny_model, ids, mask, prompt_buckets=(16,))
    outputs = {}
    for name in ("xla", impl):
        with implementation(name):
            outputs[name] = sampling.generate_prepared(graphdef, state, inputs, params, jax.random.key(0))
    np.testing.assert_array_equal(outputs[impl].tokens, outputs["xla"].tokens)
    np.testing.assert_allclose(outputs[impl].logprobs, outputs["xla"].logprobs, atol=1e-4)


def test_vision_tower_with_images_of_different_sizes_equals_reference(tiny_model):
    config = tiny_model.config
    rng = np.random.default_rng(2)
    grid = np.array([[1, 8, 8], [1, 4, 8], [1, 4, 4]])
    pixels = jnp.asarray(rng.normal(size=(int(grid.prod(-1).sum()), config.vision.patch_dim)), jnp.float32)
    from recap_jax.models.qwen2_5_vl.vision import vision_inputs

    inputs = jax.tree.map(jnp.asarray, vision_inputs(grid, config.vision, num_patches=128))
    pixels = jnp.concatenate([pixels, jnp.zeros((128 - pixels.shape[0], pixels.shape[1]))])
    outs = {}
    for name in IMPLS:
        dtype = DTYPES[name]
        model = model_lib.init_model(config, seed=0, dtype=dtype)
        with implementation(name):
            outs[name] = np.asarray(jax.jit(lambda p, i, m=model: m.visual(p, i))(pixels, inputs).astype(jnp.float32))
    real = int(grid.prod(-1).sum()) // config.vision.merge_unit
    np.testing.assert_allclose(outs["pallas"][:real], outs["xla"][:real], atol=1e-4)
    np.testing.assert_allclose(outs["pallas-gpu"][:real], outs["xla"][:real], atol=1e-4)
    np.testing.assert_allclose(outs["cudnn"][:real], outs["xla"][:real], atol=0.1, rtol=0.05)
