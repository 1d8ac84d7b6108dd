"""The whole Qwen2.5-VL against transformers' PyTorch model, through real checkpoint files.

Each case saves a tiny random transformers model with save_pretrained (safetensors), loads it
with our from_pretrained, and compares float32 logits at every real position.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from recap_jax.models import qwen2_5_vl as qwen
from recap_jax.models.qwen2_5_vl import config as C
from recap_jax.models.qwen2_5_vl.checkpoint import CheckpointError

LOGIT_ATOL = 2e-4  # float32, max abs over real positions (issue 2)
BF16_RTOL = 0.05  # bf16 compute: max abs error relative to the float32 logits' max abs


def tiny_config(tie: bool) -> C.Qwen2_5_VLConfig:
    # window 56 px = 2x2 merged units: a 12x20-patch image has 3x5 windows; blocks 1 and 3 are full.
    return C.tiny(vocab_size=256, tie_word_embeddings=tie, text_layers=2, vision_depth=4,
                  fullatt_block_indexes=(1, 3), window_size=56)


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Every weight random (norm scales around 1), so a wrong mapping cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name or "ln_q" in name else 0.08 * noise)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoint(request, tmp_path_factory):
    cfg = tiny_config(tie=request.param)
    hf_config = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config).eval()
    randomise_(hf, seed=1)
    if request.param:
        hf.tie_weights()
    path = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(path, safe_serialization=True)
    return cfg, hf, path


@pytest.fixture(scope="module")
def ours(checkpoint):
    cfg, _, path = checkpoint
    return qwen.from_pretrained(path, dtype=jnp.float32)


def image_tokens(cfg, grid):
    n = int(np.prod(grid)) // cfg.vision.merge_unit
    return [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]


def build_batch(cfg, prompts, rng):
    """prompts: list of lists of items, each item an int (that many text tokens) or a grid (t, h, w).

    Returns left-padded input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids.
    """
    rows, grids = [], []
    for items in prompts:
        row = []
        for item in items:
            if isinstance(item, int):
                row += rng.integers(0, cfg.text.vocab_size - 8, item).tolist()
            else:
                row += image_tokens(cfg, item)
                grids.append(item)
        rows.append(row)
    length = max(map(len, rows))
    ids = np.full((len(rows), length), cfg.pad_token_id, np.int64)
    mask = np.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = row
        mask[b, length - len(row):] = 1
    patches = sum(int(np.prod(g)) for g in grids)
    pixels = rng.normal(size=(patches, cfg.vision.patch_dim)).astype(np.float32) if grids else None
    grid = np.array(grids, np.int64) if grids else None
    token_type = (ids == cfg.image_token_id).astype(np.int64)
    return ids, mask, pixels, grid, token_type


def torch_logits(hf, ids, mask, pixels, grid, token_type):
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if pixels is not None:
        kwargs.update(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
                      mm_token_type_ids=torch.tensor(token_type))
    with torch.no_grad():
        return hf(**kwargs).logits.float().numpy()


CASES = {
    "text_only": [[12], [12]],
    "one_image": [[3, (1, 4, 6), 5]],
    "two_images_of_different_sizes": [[2, (1, 4, 6), 3, (1, 12, 20), 4]],
    "left_padded_batch_with_different_image_counts": [[9], [2, (1, 8, 8), 3], [(1, 4, 4), 2, (1, 6, 10), 1]],
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(checkpoint, ours, case):
    cfg, hf, _ = checkpoint
    ids, mask, pixels, grid, token_type = build_batch(cfg, CASES[case], np.random.default_rng(0))
    expected = torch_logits(hf, ids, mask, pixels, grid, token_type)
    got = np.asarray(ours(ids, mask, pixel_values=pixels, image_grid_thw=grid))
    real = mask.astype(bool)
    err = np.abs(got[real] - expected[real]).max()
    assert err <= LOGIT_ATOL, f"{case}: max abs logit difference {err:.2e}"


def test_bf16_forward_close_to_float32(checkpoint, ours):
    cfg, _, path = checkpoint
    ids, mask, pixels, grid, _ = build_batch(cfg, CASES["two_images_of_different_sizes"], np.random.default_rng(1))
    ref = np.asarray(ours(ids, mask, pixel_values=pixels, image_grid_thw=grid))
    bf16 = qwen.from_pretrained(path, dtype=jnp.bfloat16)
    got = np.asarray(bf16(ids, mask, pixel_values=pixels, image_grid_thw=grid))
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel <= BF16_RTOL, f"bf16 relative error {rel:.3f}"
    leaves = jax.tree.leaves(bf16.language_model.layers)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)


def test_save_pretrained_loads_in_transformers_with_same_logits(checkpoint, ours, tmp_path):
    cfg, _, _ = checkpoint
    qwen.save_pretrained(ours, tmp_path, max_shard_bytes=200_000)  # forces an indexed, sharded save
    assert (tmp_path / "model.safetensors.index.json").exists()
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, mask, pixels, grid, token_type = build_batch(cfg, CASES["one_image"], np.random.default_rng(2))
    expected = np.asarray(ours(ids, mask, pixel_values=pixels, image_grid_thw=grid))
    got = torch_logits(reloaded, ids, mask, pixels, grid, token_type)
    assert np.abs(got - expected).max() <= LOGIT_ATOL
    # and our own loader reads our (hub-spelled) save back bit for bit
    again = qwen.from_pretrained(tmp_path)
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, again)), jax.tree.leaves(jax.tree.map(np.asarray, ours))):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- bad checkpoints
@pytest.fixture
def saved_copy(checkpoint, ours, tmp_path):
    qwen.save_pretrained(ours, tmp_path, max_shard_bytes=200_000)
    return tmp_path


def test_truncated_safetensors_is_named(saved_copy):
    shard = sorted(saved_copy.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        qwen.from_pretrained(saved_copy)


def test_missing_shard_is_named(saved_copy):
    shard = sorted(saved_copy.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing.*{shard.name}"):
        qwen.from_pretrained(saved_copy)


def test_wrong_shape_and_missing_tensors_listed_together(saved_copy):
    from safetensors.numpy import load_file, save_file
    index = json.loads((saved_copy / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    tensors = {f: load_file(saved_copy / f) for f in files}
    wrong, gone = "model.norm.weight", "visual.merger.ln_q.weight"
    for f, t in tensors.items():
        if wrong in t:
            t[wrong] = np.zeros(t[wrong].shape[0] + 1, t[wrong].dtype)
        t.pop(gone, None)
        t["extra.weight"] = np.zeros(2, np.float32)
        save_file(t, saved_copy / f)
        index["weight_map"]["extra.weight"] = f
    index["weight_map"].pop(gone)
    (saved_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        qwen.from_pretrained(saved_copy)
    message = str(err.value)
    assert gone in message and wrong in message and "extra.weight" in message


def test_pickled_weights_are_refused(tmp_path, checkpoint):
    cfg, _, _ = checkpoint
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickled"):
        qwen.from_pretrained(tmp_path)


def test_image_token_count_must_match_grid(checkpoint, ours):
    cfg, _, _ = checkpoint
    ids, mask, pixels, grid, _ = build_batch(cfg, CASES["one_image"], np.random.default_rng(3))
    ids = ids.copy()
    ids[0, np.where(ids[0] == cfg.image_token_id)[0][0]] = 5  # one placeholder too few
    with pytest.raises(qwen.InputError, match="image"):
        ours(ids, mask, pixel_values=pixels, image_grid_thw=grid)


def test_video_and_image_logits_match_transformers(checkpoint, ours):
    """A video (2 temporal patches, with second_per_grid_ts) and an image in one prompt."""
    cfg, hf, _ = checkpoint
    rng = np.random.default_rng(7)
    image_grid, video_grid = np.array([[1, 4, 6]]), np.array([[2, 4, 4]])
    n_video = int(video_grid.prod()) // cfg.vision.merge_unit
    video = [cfg.vision_start_token_id] + [cfg.video_token_id] * n_video + [cfg.vision_end_token_id]
    row = rng.integers(0, 200, 3).tolist() + image_tokens(cfg, image_grid[0]) + [9, 8] + video + [7, 6, 5]
    ids = np.array([row])
    mask = np.ones_like(ids)
    image_pixels = rng.normal(size=(24, cfg.vision.patch_dim)).astype(np.float32)
    video_pixels = rng.normal(size=(32, cfg.vision.patch_dim)).astype(np.float32)
    seconds = np.array([1.5], np.float32)
    token_type = np.where(ids == cfg.image_token_id, 1, np.where(ids == cfg.video_token_id, 2, 0))
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      pixel_values=torch.tensor(image_pixels), image_grid_thw=torch.tensor(image_grid),
                      pixel_values_videos=torch.tensor(video_pixels), video_grid_thw=torch.tensor(video_grid),
                      second_per_grid_ts=torch.tensor(seconds), mm_token_type_ids=torch.tensor(token_type)
                      ).logits.numpy()
    got = np.asarray(ours(ids, mask, pixel_values=image_pixels, image_grid_thw=image_grid,
                          pixel_values_videos=video_pixels, video_grid_thw=video_grid, second_per_grid_ts=seconds))
    assert np.abs(got - expected).max() <= LOGIT_ATOL


def test_prefill_then_cached_decode_equals_full_forward_with_images(checkpoint, ours):
    """Prefill an image prompt, feed the next tokens one at a time through the KV cache, and
    compare each step's logits with the uncached forward over the whole sequence."""
    from recap_jax import sampling
    from recap_jax.models.qwen2_5_vl import text as text_lib

    cfg, _, _ = checkpoint
    rng = np.random.default_rng(8)
    ids, mask, pixels, grid, _ = build_batch(cfg, CASES["left_padded_batch_with_different_image_counts"], rng)
    steps = 5
    continuation = rng.integers(0, 200, (ids.shape[0], steps))
    inputs = jax.tree.map(jnp.asarray, qwen.prepare_inputs(cfg, ids, mask, pixels, grid))
    # uncached reference over prompt + continuation (continuation positions follow the sampler's rule)
    start = np.asarray(sampling.first_completion_position(inputs))
    positions = np.concatenate([np.asarray(inputs.position_ids),
                                np.broadcast_to((start + np.arange(steps))[None], (3, len(ids), steps))], axis=2)
    full_inputs = inputs._replace(
        input_ids=jnp.concatenate([inputs.input_ids, jnp.asarray(continuation, jnp.int32)], 1),
        attention_mask=jnp.concatenate([inputs.attention_mask, jnp.ones((len(ids), steps), jnp.int32)], 1),
        position_ids=jnp.asarray(positions, jnp.int32),
        feature_index=jnp.concatenate([inputs.feature_index, -jnp.ones((len(ids), steps), jnp.int32)], 1))
    reference, _ = ours.forward(full_inputs)
    reference = np.asarray(reference)

    cache = text_lib.init_cache(cfg.text, len(ids), ids.shape[1] + steps)
    logits, cache = ours.forward(inputs, cache)
    real = mask.astype(bool)
    assert np.abs(np.asarray(logits)[real] - reference[:, :ids.shape[1]][real]).max() <= 1e-5
    for j in range(steps):
        token = jnp.asarray(continuation[:, j:j + 1], jnp.int32)
        pos = jnp.broadcast_to(jnp.asarray(start + j, jnp.int32)[None], (3, len(ids), 1))
        hidden, cache = ours.language_model(ours.language_model.embed(token), pos, jnp.ones_like(token), cache)
        step_logits = np.asarray(ours.logits(hidden))[:, 0]
        assert np.abs(step_logits - reference[:, ids.shape[1] + j]).max() <= 1e-5, j


def test_gradients_match_transformers(checkpoint, ours):
    """d(next-token log-likelihood)/d(every weight), vision tower and merger included, against
    torch autograd on the same weights: a left-padded batch with 0, 1 and 2 images per row.
    Our gradients are exported through the checkpoint writer's own name and layout mapping."""
    from flax import nnx

    from recap_jax.models.qwen2_5_vl.checkpoint import _hf_tensors

    cfg, hf, _ = checkpoint
    ids, mask, pixels, grid, token_type = build_batch(
        cfg, CASES["left_padded_batch_with_different_image_counts"], np.random.default_rng(2))
    scored = (mask[:, :-1] * mask[:, 1:]).astype(np.float32)  # predictions of real next tokens

    hf.zero_grad()
    logits = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
                mm_token_type_ids=torch.tensor(token_type)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(ids[:, 1:, None]))[..., 0]
    (logp * torch.tensor(scored)).sum().backward()
    hub_name = lambda n: n.replace("model.language_model.", "model.").replace("model.visual.", "visual.")  # noqa: E731
    expected = {hub_name(name): p.grad.numpy() for name, p in hf.named_parameters() if p.grad is not None}

    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)

    def log_likelihood(params):
        model = nnx.merge(graphdef, params, rest)
        out = jax.nn.log_softmax(model(ids, mask, pixel_values=pixels, image_grid_thw=grid)[:, :-1], -1)
        return (jnp.take_along_axis(out, ids[:, 1:, None], -1)[..., 0] * scored).sum()

    grads = jax.grad(log_likelihood)(params)
    got = dict(_hf_tensors(nnx.merge(graphdef, grads, rest)))
    visual = [name for name in got if "visual" in name]
    assert len(visual) > 20 and set(got) <= set(expected) | {"lm_head.weight"}
    for name, value in got.items():
        if name not in expected:
            continue  # lm_head.weight of a tied model: the embedding's gradient holds both uses
        ref = expected[name]
        scale = max(np.abs(ref).max(), 1e-6)
        err = np.abs(value - ref).max() / scale
        assert err < 2e-3, f"{name}: max abs gradient difference {err:.1e} of the largest entry"
