"""The text decoder against transformers' Qwen2_5_VLTextModel (tiny, fully random weights).

Reference: transformers 5.x ``Qwen2_5_VLTextModel`` in float32 with eager attention. It takes
3-row position_ids [3, B, S] as the t/h/w M-RoPE rows directly (a 4-row tensor would carry a
text row first, used only for packed masks), so both models get the same 3 rows.
Tolerance: float32 max abs difference <= 2e-5 on the final hidden states.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding, Qwen2_5_VLTextModel

from recap_jax.models.qwen2_5_vl import text as T
from recap_jax.models.qwen2_5_vl.config import TextConfig
from recap_jax.models.qwen2_5_vl.layers import variable_at

F32_ATOL = 2e-5
BATCH, SEQ = 3, 14
LEFT_PADS = (0, 3, 5)  # leading padding tokens per row in the padded cases

CONFIG = TextConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                    rope_theta=10000.0, mrope_section=(2, 3, 3), max_position_embeddings=4096)


def _hf_config(config: TextConfig) -> Qwen2_5_VLTextConfig:
    return Qwen2_5_VLTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings, attn_implementation="eager",
        bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta,
                         "mrope_section": list(config.mrope_section)})


def _random_hf_model(config: TextConfig, seed: int = 0) -> Qwen2_5_VLTextModel:
    """Every weight random (norm scales around 1, biases and matrices around 0) so errors show."""
    torch.manual_seed(seed)
    model = Qwen2_5_VLTextModel(_hf_config(config)).eval()
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.15)
    return model


def _plausible_positions(rng: np.random.Generator, left_pads) -> np.ndarray:
    """[3, B, S] M-RoPE rows for "text, image grid, text" with left padding (pad positions = 1).

    Inside the image t is constant and h/w walk the grid, so the three rows differ.
    """
    positions = np.ones((3, len(left_pads), SEQ), np.int64)
    for b, pad in enumerate(left_pads):
        prefix = int(rng.integers(1, 3))
        grid_h, grid_w = [(2, 2), (2, 3), (3, 2)][int(rng.integers(0, 3))]
        rows = [np.arange(prefix)] * 3
        hh, ww = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
        rows = [np.concatenate([r, prefix + g]) for r, g in
                zip(rows, (np.zeros(grid_h * grid_w, int), hh.ravel(), ww.ravel()))]
        start = prefix + max(grid_h, grid_w)
        rest = SEQ - pad - len(rows[0])
        rows = [np.concatenate([r, start + np.arange(rest)]) for r in rows]
        positions[:, b, pad:] = np.stack(rows)
    return positions


def _hf_forward(model, embeds, positions, mask):
    with torch.no_grad():
        out = model(inputs_embeds=torch.from_numpy(embeds), position_ids=torch.from_numpy(positions),
                    attention_mask=None if mask is None else torch.from_numpy(mask))
    return out.last_hidden_state.numpy()


def _our_model(hf_model, config=CONFIG, **kwargs) -> T.TextModel:
    model = T.TextModel(config, rngs=nnx.Rngs(0), **kwargs)
    T.load_text_params(model, {k: v.numpy() for k, v in hf_model.state_dict().items()})
    return model


def _jitted(model: T.TextModel):
    """model's __call__ as one jitted pure function of (state, inputs...), plus a trace counter."""
    graphdef, state = nnx.split(model)
    traces = []

    def forward(state, embeds, positions, mask, cache):
        traces.append(embeds.shape)
        return nnx.merge(graphdef, state)(embeds, positions, mask, cache)

    fn = jax.jit(forward)
    return (lambda *args: fn(state, *args)), traces


@pytest.fixture(scope="module")
def text_case():
    rng = np.random.default_rng(0)
    hf = _random_hf_model(CONFIG)
    embeds = rng.normal(size=(BATCH, SEQ, CONFIG.hidden_size)).astype(np.float32)
    mask = np.ones((BATCH, SEQ), np.int64)
    for b, pad in enumerate(LEFT_PADS):
        mask[b, :pad] = 0
    positions = _plausible_positions(rng, LEFT_PADS)
    model = _our_model(hf)
    forward, traces = _jitted(model)
    return dict(hf=hf, model=model, forward=forward, traces=traces, embeds=embeds, mask=mask,
                positions=positions, hf_padded=_hf_forward(hf, embeds, positions, mask))


def _max_abs_on(mask, a, b) -> float:
    real = np.asarray(mask, bool)
    return float(np.max(np.abs(np.asarray(a, np.float32)[real] - np.asarray(b, np.float32)[real])))


# ------------------------------------------------------------------------------------ rotary
def test_mrope_cos_sin_matches_reference_rotary_embedding():
    rng = np.random.default_rng(1)
    positions = rng.integers(0, 3000, size=(3, 2, 9))
    reference = Qwen2_5_VLRotaryEmbedding(_hf_config(CONFIG))
    ref_cos, ref_sin = reference(torch.zeros(1, dtype=torch.float32), torch.from_numpy(positions))
    cos, sin = T.mrope_cos_sin(jnp.asarray(positions, jnp.int32), CONFIG)
    assert cos.shape == sin.shape == (2, 9, CONFIG.head_dim) and cos.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), ref_sin.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(T.rope_inverse_frequencies(CONFIG), reference.inv_freq.numpy())


def test_mrope_sections_take_their_own_rows():
    # Independent numpy recomposition: frequency j < 2 from t, 2 <= j < 5 from h, 5 <= j < 8 from w.
    positions = np.stack([np.full((1, 4), 7), np.full((1, 4), 11), np.arange(4)[None]])
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    rows = [0, 0, 1, 1, 1, 2, 2, 2]
    angles = np.stack([positions[r, 0] * f for r, f in zip(rows, inv_freq)], axis=-1)
    cos, _ = T.mrope_cos_sin(jnp.asarray(positions), CONFIG)
    np.testing.assert_allclose(np.asarray(cos)[0], np.cos(np.concatenate([angles, angles], -1)), atol=1e-6)


# ------------------------------------------------------------------------------------ forward
def test_forward_matches_transformers_float32(text_case):
    c = text_case
    positions = _plausible_positions(np.random.default_rng(2), (0,) * BATCH)
    expected = _hf_forward(c["hf"], c["embeds"], positions, None)
    hidden, cache = c["forward"](c["embeds"], positions, None, None)
    assert cache is None and hidden.shape == (BATCH, SEQ, CONFIG.hidden_size) and hidden.dtype == jnp.float32
    assert np.abs(expected).max() > 0.5  # the comparison is not between near-zero tensors
    assert float(np.max(np.abs(np.asarray(hidden) - expected))) <= F32_ATOL


def test_left_padded_batch_matches_transformers_on_real_tokens(text_case):
    c = text_case
    hidden, _ = c["forward"](c["embeds"], c["positions"], c["mask"], None)
    assert _max_abs_on(c["mask"], hidden, c["hf_padded"]) <= F32_ATOL


def test_bfloat16_compute_close_to_float32_reference(text_case):
    c = text_case
    model = _our_model(c["hf"], dtype=jnp.bfloat16)
    forward, _ = _jitted(model)
    hidden, _ = forward(c["embeds"], c["positions"], c["mask"], None)
    assert hidden.dtype == jnp.bfloat16
    real = c["mask"].astype(bool)
    diff = np.asarray(hidden, np.float32)[real] - c["hf_padded"][real]
    relative = np.linalg.norm(diff) / np.linalg.norm(c["hf_padded"][real])
    # measured 1.5e-2; transformers' own all-bf16 model is 1.7e-2 from its float32 output
    assert relative <= 3e-2, relative


def test_embed_is_a_table_lookup_in_compute_dtype(text_case):
    model = _our_model(text_case["hf"], dtype=jnp.bfloat16)
    ids = np.array([[0, 5, 199]])
    table = text_case["hf"].embed_tokens.weight.detach().numpy()
    out = model.embed(jnp.asarray(ids))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), table[ids].astype(jnp.bfloat16).astype(np.float32))


def test_remat_keeps_outputs_and_gradients(text_case):
    c = text_case
    cotangent = jnp.asarray(np.random.default_rng(3).normal(size=(BATCH, SEQ, CONFIG.hidden_size)), jnp.float32)

    def loss_and_grads(model):
        graphdef, params = nnx.split(model)

        def loss(params):
            hidden, _ = nnx.merge(graphdef, params)(c["embeds"], c["positions"], c["mask"])
            return jnp.sum(hidden * cotangent)

        return jax.jit(jax.value_and_grad(loss))(params)

    value, grads = loss_and_grads(c["model"])
    for remat in ("full", "save_dots"):
        remat_value, remat_grads = loss_and_grads(_our_model(c["hf"], remat=remat))
        np.testing.assert_allclose(remat_value, value, rtol=1e-5)
        for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
            g, h = np.asarray(g), np.asarray(h)
            # float32 reassociation noise only: relative to the leaf's scale
            assert np.max(np.abs(h - g)) <= 2e-5 * np.max(np.abs(g)), remat


# ------------------------------------------------------------------------------------ KV cache
def _cached_pass(forward, embeds, positions, mask, chunks, max_len):
    """Runs the sequence through the cache in consecutive chunks of the given lengths."""
    cache = T.init_cache(CONFIG, BATCH, max_len)
    outputs, start = [], 0
    for length in chunks:
        part = slice(start, start + length)
        hidden, cache = forward(embeds[:, part], positions[:, :, part], mask[:, part], cache)
        outputs.append(np.asarray(hidden))
        start += length
    return np.concatenate(outputs, axis=1), cache


def test_prefill_then_decode_matches_transformers_with_left_padding(text_case):
    c = text_case
    prefill = 8  # the shortest row has 3 real prompt tokens
    chunks = [prefill] + [1] * (SEQ - prefill)
    hidden, cache = _cached_pass(c["forward"], c["embeds"], c["positions"], c["mask"], chunks, max_len=SEQ + 2)
    assert _max_abs_on(c["mask"], hidden, c["hf_padded"]) <= F32_ATOL
    assert int(cache.index) == SEQ
    np.testing.assert_array_equal(np.asarray(cache.valid)[:, :SEQ], c["mask"].astype(bool))
    assert not np.asarray(cache.valid)[:, SEQ:].any()


def test_two_chunk_prefill_then_decode_matches_transformers(text_case):
    c = text_case
    hidden, _ = _cached_pass(c["forward"], c["embeds"], c["positions"], c["mask"], [6, 5, 1, 1, 1], max_len=SEQ)
    assert _max_abs_on(c["mask"], hidden, c["hf_padded"]) <= F32_ATOL


def test_decoding_after_a_shared_prefix_matches_transformers(text_case):
    """G = 2 continuations of each left-padded prompt, decoded against the prompt's cache kept
    once (``prefix``, as the sampler does for its G samples), equal transformers run on each
    full sequence: prompt repeated, then that row's own continuation."""
    c = text_case
    prompt, samples = 8, 2
    rows, length = BATCH * samples, SEQ - prompt
    own = np.random.default_rng(7).normal(size=(rows, length, CONFIG.hidden_size)).astype(np.float32)
    own[::samples] = c["embeds"][:, prompt:]
    positions = np.repeat(c["positions"], samples, axis=1)
    full = np.concatenate([np.repeat(c["embeds"][:, :prompt], samples, axis=0), own], axis=1)
    reference = _hf_forward(c["hf"], full, positions, np.repeat(c["mask"], samples, axis=0))[:, prompt:]

    graphdef, state = nnx.split(c["model"])
    prefill = jax.jit(lambda state, embeds, positions, mask: nnx.merge(graphdef, state)(
        embeds, positions, mask, T.init_cache(CONFIG, BATCH, prompt))[1])
    decode = jax.jit(lambda state, embeds, positions, cache, prefix: nnx.merge(graphdef, state)(
        embeds, positions, None, cache, prefix=prefix))
    prefix = prefill(state, c["embeds"][:, :prompt], c["positions"][:, :, :prompt], c["mask"][:, :prompt])
    cache, outputs = T.init_cache(CONFIG, rows, length), []
    for start, size in ((0, 2), (2, 1), (3, 1), (4, 2)):
        hidden, cache = decode(state, own[:, start:start + size],
                               positions[:, :, prompt + start:prompt + start + size], cache, prefix)
        outputs.append(np.asarray(hidden))
    assert float(np.max(np.abs(np.concatenate(outputs, axis=1) - reference))) <= F32_ATOL


def test_cached_keys_equal_transformers_cache(text_case):
    c = text_case
    _, cache = _cached_pass(c["forward"], c["embeds"], c["positions"], c["mask"], [SEQ], max_len=SEQ)
    with torch.no_grad():
        out = c["hf"](inputs_embeds=torch.from_numpy(c["embeds"]), position_ids=torch.from_numpy(c["positions"]),
                      attention_mask=torch.from_numpy(c["mask"]), use_cache=True)
    real = c["mask"].astype(bool)
    assert len(cache.k) == len(cache.v) == len(out.past_key_values.layers)
    for i, layer in enumerate(out.past_key_values.layers):
        # ours: keys [B, Hkv, D, S], values [B, Hkv, S, D]; theirs: both [B, Hkv, S, D]
        for ours, theirs in ((np.swapaxes(cache.k[i], 2, 3), layer.keys), (cache.v[i], layer.values)):
            assert ours.shape == theirs.shape
            slots_first = (0, 2, 1, 3)  # -> [B, S, Hkv, D], to select the real slots
            assert _max_abs_on(real, ours.transpose(slots_first), theirs.numpy().transpose(slots_first)) <= F32_ATOL


def test_decode_step_compiles_once(text_case):
    c = text_case
    forward, traces = _jitted(c["model"])
    _cached_pass(forward, c["embeds"], c["positions"], c["mask"], [6] + [1] * 8, max_len=SEQ + 2)
    assert traces == [(BATCH, 6, CONFIG.hidden_size), (BATCH, 1, CONFIG.hidden_size)]


def test_cache_overflow_and_bad_shapes_are_clear_errors(text_case):
    c = text_case
    model = c["model"]
    cache = T.init_cache(CONFIG, BATCH, 4)._replace(index=jnp.int32(2))
    with pytest.raises(ValueError, match="overflows max_len=4"):
        model(c["embeds"][:, :3], c["positions"][:, :, :3], c["mask"][:, :3], cache)
    with pytest.raises(ValueError, match="position_ids"):
        model(c["embeds"], c["positions"][:2], c["mask"])
    with pytest.raises(ValueError, match="prefix: 2 shared sequences do not divide the batch of 3"):
        model(c["embeds"][:, :1], c["positions"][:, :, :1], None, T.init_cache(CONFIG, BATCH, 2),
              prefix=T.init_cache(CONFIG, 2, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        model(c["embeds"], c["positions"], c["mask"][:, 1:])


# ------------------------------------------------------------------------------------ checkpoint mapping
def test_specs_cover_exactly_the_transformers_state_dict():
    hf_names = set(_random_hf_model(CONFIG).state_dict())
    ours = {s.hf_name.format(i=i) for s in T.text_tensor_specs(CONFIG)
            for i in (range(CONFIG.num_hidden_layers) if s.stacked else [0])}
    assert ours == hf_names


def test_spec_conversions_are_exact_inverses(text_case):
    model = text_case["model"]
    state = text_case["hf"].state_dict()
    rng = np.random.default_rng(4)
    for spec in T.text_tensor_specs(CONFIG):
        hf_shape = tuple(state[spec.hf_name.format(i=0)].shape)
        our_shape = variable_at(model, spec.path).shape[1 if spec.stacked else 0:]
        hf_value = rng.normal(size=hf_shape).astype(np.float32)
        our_value = rng.normal(size=our_shape).astype(np.float32)
        assert spec.to_ours(hf_value).shape == our_shape, spec.hf_name
        np.testing.assert_array_equal(spec.to_hf(spec.to_ours(hf_value)), hf_value, err_msg=spec.hf_name)
        np.testing.assert_array_equal(spec.to_ours(spec.to_hf(our_value)), our_value, err_msg=spec.hf_name)


def test_q_kernel_layout_splits_heads_like_transformers(text_case):
    # Head n of our q_proj must be rows n*D:(n+1)*D of transformers' weight (the view() in its forward).
    weight = text_case["hf"].layers[1].self_attn.q_proj.weight.detach().numpy()
    kernel = np.asarray(text_case["model"].layers.self_attn.q_proj.kernel[...])[1]
    d = CONFIG.head_dim
    for n in range(CONFIG.num_attention_heads):
        np.testing.assert_array_equal(kernel[:, n, :], weight[n * d:(n + 1) * d].T)


def test_export_after_load_returns_the_checkpoint(text_case):
    state = {k: v.numpy() for k, v in text_case["hf"].state_dict().items()}
    exported = T.text_params_to_hf(text_case["model"])
    assert exported.keys() == state.keys()
    for name, value in state.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_loader_names_missing_and_misshapen_tensors(text_case):
    state = {k: v.numpy() for k, v in text_case["hf"].state_dict().items()}
    model = T.TextModel(CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(KeyError, match=r"layers\.2\.mlp\.up_proj\.weight"):
        T.load_text_params(model, {k: v for k, v in state.items() if k != "layers.2.mlp.up_proj.weight"})
    bad = dict(state, **{"norm.weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="norm.weight"):
        T.load_text_params(model, bad)
