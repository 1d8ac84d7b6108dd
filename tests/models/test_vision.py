"""Parity of recap_jax's vision tower with transformers' Qwen2_5_VisionTransformerPretrainedModel.

The reference is a tiny transformers model whose every parameter (norm scales and biases
included) is drawn from N(0, 0.2^2), so that a wrong layout, order or mask shows up.
Tolerances: float32 max abs diff <= 2e-5 (measured ~2e-6 with outputs of magnitude ~3);
bfloat16 compute: relative L2 error <= 2e-2 against the float32 reference (measured 0.7%;
transformers itself in bfloat16 is 0.7% off its float32 output).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

from recap_jax.models.qwen2_5_vl.config import VisionConfig
from recap_jax.models.qwen2_5_vl.vision import (
    PAD_SEGMENT,
    VisionTransformer,
    load_vision_weights,
    vision_inputs,
    vision_tensor_specs,
    vision_weights_to_hf,
)

F32_TOL = 2e-5
BF16_REL_TOL = 2e-2

# window_size 56 = 2 merged units per window side: a 12x20 patch grid (6x10 merged) has 15 windows.
TINY = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
            window_size=56, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
            fullatt_block_indexes=[1, 3])


@pytest.fixture(scope="module")
def vision_config() -> VisionConfig:
    return VisionConfig(**TINY)


@pytest.fixture(scope="module")
def vision_hf_model():
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**TINY)).eval()
    with torch.no_grad():
        for param in model.parameters():
            torch.nn.init.normal_(param, std=0.2)
    return model


@pytest.fixture(scope="module")
def vision_hf_tensors(vision_hf_model) -> dict[str, np.ndarray]:
    return {name: t.detach().numpy().copy() for name, t in vision_hf_model.state_dict().items()}


def _build(config, tensors, **kwargs) -> VisionTransformer:
    model = VisionTransformer(config, rngs=nnx.Rngs(0), **kwargs)
    load_vision_weights(model, tensors)
    return model


class JittedForward:
    """model(pixels, inputs) under jax.jit with the parameters as an argument; counts traces."""

    def __init__(self, model: VisionTransformer):
        self.graphdef, self.state = nnx.split(model)
        self.traces = 0

        def forward(state, pixels, inputs):
            self.traces += 1
            return nnx.merge(self.graphdef, state)(pixels, inputs)

        self._jitted = jax.jit(forward)

    def __call__(self, pixels, inputs) -> np.ndarray:
        return np.asarray(self._jitted(self.state, pixels, inputs))


@pytest.fixture(scope="module")
def vision_forward(vision_config, vision_hf_tensors) -> JittedForward:
    return JittedForward(_build(vision_config, vision_hf_tensors))


def _pixels(grid, patch_dim: int, seed: int = 0) -> np.ndarray:
    num = int(np.prod(np.asarray(grid), axis=1).sum())
    return np.random.default_rng(seed).normal(size=(num, patch_dim)).astype(np.float32)


def _reference(hf_model, pixels: np.ndarray, grid) -> np.ndarray:
    with torch.no_grad():
        out = hf_model(torch.from_numpy(pixels), torch.tensor(grid, dtype=torch.long))
    return out.pooler_output.numpy()


def _padded(pixels: np.ndarray, num_patches: int) -> np.ndarray:
    return np.concatenate([pixels, np.zeros((num_patches - len(pixels), pixels.shape[1]), pixels.dtype)])


# ---------------------------------------------------------------------------- parity
@pytest.mark.parametrize("grid", [
    [[1, 12, 20]],                           # one image, 15 windows
    [[1, 4, 6], [1, 12, 20], [1, 8, 8]],     # several images of different sizes
    [[2, 8, 12]],                            # a video: 2 temporal patches
    [[3, 6, 10], [1, 4, 4]],                 # a video and an image together
], ids=["one_image", "three_images", "video_t2", "video_t3_and_image"])
def test_matches_transformers_float32(vision_forward, vision_hf_model, vision_config, grid):
    pixels = _pixels(grid, vision_config.patch_dim)
    expected = _reference(vision_hf_model, pixels, grid)
    got = vision_forward(pixels, vision_inputs(np.array(grid), vision_config))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=F32_TOL)


def test_padding_to_a_bucket_leaves_real_rows_unchanged(vision_forward, vision_hf_model, vision_config):
    grid = [[1, 4, 6], [1, 8, 8]]  # 88 real patches, 22 merged tokens
    pixels = _pixels(grid, vision_config.patch_dim, seed=1)
    expected = _reference(vision_hf_model, pixels, grid)
    got = vision_forward(_padded(pixels, 160), vision_inputs(np.array(grid), vision_config, num_patches=160))
    assert got.shape == (40, vision_config.out_hidden_size)
    np.testing.assert_allclose(got[:22], expected, rtol=0, atol=F32_TOL)
    assert np.isfinite(got[22:]).all()


def test_one_compile_serves_every_image_set_of_a_bucket(vision_config, vision_hf_tensors, vision_hf_model):
    forward = JittedForward(_build(vision_config, vision_hf_tensors))
    for seed, grid in enumerate([[[1, 12, 20]], [[1, 4, 6], [2, 4, 4], [1, 8, 8]]]):
        pixels = _pixels(grid, vision_config.patch_dim, seed=seed)
        got = forward(_padded(pixels, 256), vision_inputs(np.array(grid), vision_config, num_patches=256))
        np.testing.assert_allclose(got[:len(pixels) // 4], _reference(vision_hf_model, pixels, grid),
                                   rtol=0, atol=F32_TOL)
    assert forward.traces == 1


def test_bfloat16_compute_is_close_to_float32(vision_config, vision_hf_tensors, vision_hf_model):
    grid = [[1, 12, 20], [2, 4, 6]]
    pixels = _pixels(grid, vision_config.patch_dim, seed=2)
    expected = _reference(vision_hf_model, pixels, grid)
    model = _build(vision_config, vision_hf_tensors, dtype=jnp.bfloat16)
    got = JittedForward(model)(pixels, vision_inputs(np.array(grid), vision_config))
    assert got.dtype == jnp.bfloat16
    got = got.astype(np.float32)
    relative = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert relative <= BF16_REL_TOL, relative


def test_full_rematerialisation_gives_the_same_gradients(vision_config, vision_hf_tensors):
    grid = [[1, 4, 8]]
    pixels = _pixels(grid, vision_config.patch_dim, seed=3)
    inputs = vision_inputs(np.array(grid), vision_config)

    def grads(remat):
        graphdef, state = nnx.split(_build(vision_config, vision_hf_tensors, remat=remat))
        loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(pixels, inputs) ** 2)
        return jax.jit(jax.grad(loss))(state)

    plain, remat = grads("none"), grads("full")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), plain, remat)


# ---------------------------------------------------------------------------- host metadata
def _boundaries(segment_ids: np.ndarray) -> list[int]:
    """cu_seqlens of a sequence of contiguous segments."""
    change = np.flatnonzero(np.diff(segment_ids)) + 1
    return [0, *change.tolist(), len(segment_ids)]


grids = st.lists(st.tuples(st.integers(1, 3), st.integers(1, 13).map(lambda h: 2 * h),
                           st.integers(1, 13).map(lambda w: 2 * w)), min_size=1, max_size=3)


@settings(max_examples=40, deadline=None)
@given(grid=grids, extra_units=st.integers(0, 5))
def test_vision_inputs_equal_the_reference_functions(vision_config, grid, extra_units):
    cfg, mu = vision_config, vision_config.merge_unit
    hf_config = Qwen2_5_VLVisionConfig(**TINY)
    grid_t = torch.tensor(grid, dtype=torch.long)
    ref_window_index, ref_cu_window = get_vision_window_index(
        grid_t, spatial_merge_size=cfg.spatial_merge_size, window_size=cfg.window_size, patch_size=cfg.patch_size)
    ref_cu_full, _ = get_vision_attention_seqlens(grid_t, hf_config)
    ref_positions = get_vision_position_ids(grid_t, cfg.spatial_merge_size).numpy()
    ref_window_index = ref_window_index.numpy()
    real = int(np.prod(np.asarray(grid), axis=1).sum())
    units = real // mu

    got = vision_inputs(np.array(grid), cfg, num_patches=real + extra_units * mu)

    np.testing.assert_array_equal(got.window_index[:units], ref_window_index)
    np.testing.assert_array_equal(got.window_index[units:], np.arange(units, units + extra_units))
    np.testing.assert_array_equal(got.reverse_index, np.argsort(got.window_index))
    np.testing.assert_array_equal(got.reverse_index[:units], np.argsort(ref_window_index))
    permuted = ref_positions.reshape(units, mu, 2)[ref_window_index].reshape(real, 2)
    np.testing.assert_array_equal(got.position_ids[:real], permuted)
    np.testing.assert_array_equal(got.position_ids[real:], 0)
    for segments, ref_cu in ((got.window_segment_ids, ref_cu_window), (got.full_segment_ids, ref_cu_full)):
        real_segments = segments[:real]
        assert _boundaries(real_segments) == ref_cu.tolist()
        assert len(np.unique(real_segments)) == len(ref_cu) - 1  # every segment is one contiguous run
        assert (real_segments != PAD_SEGMENT).all()
        np.testing.assert_array_equal(segments[real:], PAD_SEGMENT)
    for field in got:
        assert field.dtype == np.int32


@pytest.mark.parametrize("grid, num_patches, message", [
    ([[1, 3, 4]], None, "multiples of spatial_merge_size"),
    ([[0, 4, 4]], None, "positive"),
    ([1, 4, 4], None, "shape"),
    ([[1, 4, 4]], 8, "at least the 16 patches"),
    ([[1, 4, 4]], 18, "multiple of merge_unit"),
])
def test_vision_inputs_rejects_bad_grids(vision_config, grid, num_patches, message):
    with pytest.raises(ValueError, match=message):
        vision_inputs(np.array(grid), vision_config, num_patches=num_patches)


def test_forward_rejects_pixels_that_do_not_match_the_inputs(vision_forward, vision_config):
    inputs = vision_inputs(np.array([[1, 4, 4]]), vision_config)
    with pytest.raises(ValueError, match="pixel_values"):
        vision_forward(np.zeros((20, vision_config.patch_dim), np.float32), inputs)


# ---------------------------------------------------------------------------- checkpoint mapping
def _expand(specs, depth):
    return [(spec, spec.hf_name.format(i=i)) for spec in specs for i in (range(depth) if spec.stacked else [None])]


def test_tensor_specs_cover_every_reference_tensor(vision_config, vision_hf_tensors):
    names = [name for _, name in _expand(vision_tensor_specs(vision_config), vision_config.depth)]
    assert len(names) == len(set(names))
    assert set(names) == set(vision_hf_tensors)


def test_tensor_specs_round_trip_exactly(vision_config, vision_hf_tensors):
    rng = np.random.default_rng(0)
    for spec, name in _expand(vision_tensor_specs(vision_config), vision_config.depth):
        x = rng.normal(size=vision_hf_tensors[name].shape).astype(np.float32)
        back = spec.to_hf(spec.to_ours(x))
        assert back.shape == x.shape, name
        np.testing.assert_array_equal(back, x, err_msg=name)


def test_exported_weights_equal_the_loaded_ones(vision_config, vision_hf_tensors):
    prefix = "model.visual."
    model = VisionTransformer(vision_config, rngs=nnx.Rngs(0))
    load_vision_weights(model, {prefix + k: v for k, v in vision_hf_tensors.items()}, prefix=prefix)
    exported = vision_weights_to_hf(model, prefix=prefix)
    assert set(exported) == {prefix + k for k in vision_hf_tensors}
    for name, value in vision_hf_tensors.items():
        np.testing.assert_array_equal(exported[prefix + name], value, err_msg=name)


def test_loading_names_missing_and_unknown_tensors(vision_config, vision_hf_tensors):
    model = VisionTransformer(vision_config, rngs=nnx.Rngs(0))
    missing = {k: v for k, v in vision_hf_tensors.items() if k != "blocks.2.attn.qkv.bias"}
    with pytest.raises(KeyError, match="blocks.2.attn.qkv.bias"):
        load_vision_weights(model, missing)
    with pytest.raises(ValueError, match="blocks.9.norm1.weight"):
        load_vision_weights(model, {**vision_hf_tensors, "blocks.9.norm1.weight": np.ones(32, np.float32)})


def test_parameters_carry_logical_axes_for_sharding(vision_config):
    model = VisionTransformer(vision_config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    for path, param in nnx.to_flat_state(params):
        assert len(param.logical_axes) == param.ndim, path
    assert model.blocks.attn.qkv.kernel.logical_axes == ("layers", "vision_embed", None, "vision_heads",
                                                          "vision_head_dim")
    assert model.blocks.attn.proj.kernel.logical_axes == ("layers", "vision_heads", "vision_head_dim",
                                                          "vision_embed")
    assert model.patch_embed.proj.kernel.logical_axes == ("vision_patch", "vision_embed")
    assert model.merger.mlp_2.kernel.logical_axes == ("vision_merge_hidden", "embed")


@settings(max_examples=30, deadline=None)
@given(block=st.integers(2, 9), data=st.data())
def test_window_attention_equals_masked_full_attention(block, data):
    """The banded window path against all N x N masked scores (`segment_attention`), on
    contiguous segments of 1..block patches, N not a multiple of the block, and a tail of
    bucket padding (PAD_SEGMENT) of any length."""
    from recap_jax.models.qwen2_5_vl.vision import segment_attention, window_attention

    lengths = data.draw(st.lists(st.integers(1, block), min_size=1, max_size=12))
    padding = data.draw(st.integers(0, 2 * block))
    segment_ids = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)] + [np.full(padding, PAD_SEGMENT)])
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    q, k, v = (jnp.asarray(rng.normal(size=(len(segment_ids), 2, 4)), jnp.float32) for _ in range(3))
    ids = jnp.asarray(segment_ids, jnp.int32)
    got = np.asarray(window_attention(q, k, v, ids, block))
    real = segment_ids != PAD_SEGMENT
    np.testing.assert_allclose(got[real], np.asarray(segment_attention(q, k, v, ids))[real], atol=1e-5)
    assert np.isfinite(got).all()
