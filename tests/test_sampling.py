"""The KV-cache sampler: exact greedy parity with transformers' generate, log-probs equal to the
trainer's, and temperature / top-k / top-p drawing from the right distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from recap_jax import sampling
from recap_jax.models import qwen2_5_vl as qwen
from tests.models.test_model import build_batch, randomise_, tiny_config

LOGPROB_ATOL = 1e-4  # float32: sampler vs trainer log-prob of the same token


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cfg = tiny_config(tie=False)
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())).eval()
    randomise_(hf, seed=3)
    path = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(path)
    return cfg, hf, qwen.from_pretrained(path)


PROMPTS = {
    "text": [[7], [7]],
    "image_left_padded": [[2, (1, 4, 6), 3], [5], [(1, 8, 8), 1, (1, 4, 4), 2]],
}


@pytest.mark.parametrize("split", ["auto", "never"])  # on CPU "auto" copies the layers out once
@pytest.mark.parametrize("case", list(PROMPTS))
def test_greedy_equals_transformers_generate(models, case, split, monkeypatch):
    """Both ways the decode loop reads the decoder weights (`sampling.SPLIT_DECODER_WEIGHTS`)."""
    monkeypatch.setitem(sampling.SPLIT_DECODER_WEIGHTS, "mode", split)
    cfg, hf, ours = models
    ids, mask, pixels, grid, token_type = build_batch(cfg, PROMPTS[case], np.random.default_rng(4))
    new = 10
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if pixels is not None:
        kwargs.update(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
                      mm_token_type_ids=torch.tensor(token_type))
    with torch.no_grad():
        hf.generation_config.eos_token_id = None  # no stopping: compare all `new` tokens
        ref = hf.generate(**kwargs, do_sample=False, max_new_tokens=new,
                          pad_token_id=cfg.pad_token_id).numpy()[:, ids.shape[1]:]
    out = sampling.generate(ours, ids, mask, pixels, grid, max_new_tokens=new, temperature=0.0, eos_token_id=[],
                            rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert np.all(np.asarray(out.lengths) == new) and np.all(np.asarray(out.truncated))


def test_eos_stops_each_sequence(models):
    cfg, _, ours = models
    ids, mask, pixels, grid, _ = build_batch(cfg, PROMPTS["image_left_padded"], np.random.default_rng(5))
    free = sampling.generate(ours, ids, mask, pixels, grid, max_new_tokens=8, temperature=0.0, eos_token_id=[],
                             rng=jax.random.key(0))
    eos = int(np.asarray(free.tokens)[0, 2])  # make row 0's third token the EOS
    out = sampling.generate(ours, ids, mask, pixels, grid, max_new_tokens=8, temperature=0.0, eos_token_id=eos,
                            rng=jax.random.key(0))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row in range(len(tokens)):
        hits = np.where(np.asarray(free.tokens)[row] == eos)[0]
        expected_len = hits[0] + 1 if len(hits) else 8
        assert lengths[row] == expected_len
        np.testing.assert_array_equal(tokens[row, :expected_len], np.asarray(free.tokens)[row, :expected_len])
        assert np.all(tokens[row, expected_len:] == cfg.pad_token_id)
        assert np.all(np.asarray(out.logprobs)[row, expected_len:] == 0)
        assert bool(np.asarray(out.truncated)[row]) == (not len(hits))


def test_sampler_logprobs_equal_trainer_logprobs(models):
    cfg, _, ours = models
    ids, mask, pixels, grid, _ = build_batch(cfg, PROMPTS["image_left_padded"], np.random.default_rng(6))
    samples = 3
    out = sampling.generate(ours, ids, mask, pixels, grid, max_new_tokens=12, temperature=1.3, top_p=0.9,
                            top_k=50, eos_token_id=cfg.eos_token_id, num_samples=samples, rng=jax.random.key(1))
    inputs = sampling.prepare_prompts(ours, ids, mask, pixels, grid, pad_token_id=cfg.pad_token_id)
    steps = np.arange(out.tokens.shape[1])[None]
    completion_mask = (steps < np.asarray(out.lengths)[:, None]).astype(np.int32)
    trainer = sampling.completion_logprobs(ours, jax.tree.map(jnp.asarray, inputs), out.tokens,
                                           jnp.asarray(completion_mask), num_samples=samples)
    err = np.abs(np.asarray(trainer) - np.asarray(out.logprobs)).max()
    assert err <= LOGPROB_ATOL, err
    # the G samples of one prompt differ (sampling is per row), and each row is scored
    assert len({tuple(r) for r in np.asarray(out.tokens)[:samples]}) > 1


def _repeated_prompt_reference(hf, cfg, ids, mask, pixels, grid, token_type, completions, completion_mask,
                               samples, weights, entropy_weights=None):
    """transformers on the B * G full sequences [prompt b, completion b*G+g] (every prompt and
    image repeated G times, as a trainer without prefix sharing runs them): the completion
    tokens' log-probs and entropies, and d sum(weights * log-probs) / d every weight (plus
    sum(entropy_weights * entropies) when given)."""
    rep = lambda x: np.repeat(x, samples, axis=0)  # noqa: E731
    full_ids = np.concatenate([rep(ids), completions], 1)
    full_mask = np.concatenate([rep(mask), completion_mask], 1)
    per_prompt = np.split(pixels, np.cumsum([int(np.prod(g)) for g in grid])[:-1])
    images_of_row = np.split(np.arange(len(grid)), np.cumsum([int(r.sum()) for r in
                                                              (ids == cfg.vision_start_token_id)])[:-1])
    rep_pixels = np.concatenate([per_prompt[i] for row in images_of_row for _ in range(samples) for i in row])
    rep_grid = np.concatenate([grid[row] for row in images_of_row for _ in range(samples)])
    hf.zero_grad()
    logits = hf(input_ids=torch.tensor(full_ids), attention_mask=torch.tensor(full_mask),
                pixel_values=torch.tensor(rep_pixels), image_grid_thw=torch.tensor(rep_grid),
                mm_token_type_ids=torch.tensor(np.concatenate([rep(token_type), 0 * completions], 1))).logits
    prompt_len = ids.shape[1]
    log_softmax = torch.log_softmax(logits[:, prompt_len - 1:-1].float(), -1)
    logp = log_softmax.gather(-1, torch.tensor(completions[..., None]))[..., 0] * torch.tensor(completion_mask)
    entropy = -(log_softmax.exp() * log_softmax).sum(-1) * torch.tensor(completion_mask)
    objective = (logp * torch.tensor(weights)).sum()
    if entropy_weights is not None:
        objective = objective + (entropy * torch.tensor(entropy_weights)).sum()
    objective.backward()
    hub_name = lambda n: n.replace("model.language_model.", "model.").replace("model.visual.", "visual.")  # noqa: E731
    grads = {hub_name(name): p.grad.numpy() for name, p in hf.named_parameters() if p.grad is not None}
    return logp.detach().numpy(), entropy.detach().numpy(), grads


@pytest.mark.parametrize("logits_chunk,entropy_gradient", [(0, False), (3, False), (3, True)],
                         ids=["whole", "chunks_of_3", "chunks_of_3_entropy_gradient"])
def test_trainer_shares_the_prompt_and_matches_transformers_on_repeated_prompts(models, logits_chunk,
                                                                                entropy_gradient):
    """The trainer runs each prompt once for its G completions (`with_shared_prefix`);
    transformers runs every prompt and image G times. Log-probs and every weight's gradient,
    vision tower included, must agree: left-padded image prompts, completions of different
    lengths (padding after the end), the output projection at once or in chunks of 3 of the
    7 positions (a padded last chunk). With ``entropy_gradient`` (an entropy bonus) the
    objective also holds sum(w' * entropy) and its gradient must match too."""
    from flax import nnx

    from recap_jax.models.qwen2_5_vl.checkpoint import _hf_tensors

    cfg, hf, ours = models
    rng = np.random.default_rng(8)
    ids, mask, pixels, grid, token_type = build_batch(cfg, PROMPTS["image_left_padded"], rng)
    samples, steps = 2, 7
    rows = len(ids) * samples
    completions = rng.integers(0, cfg.text.vocab_size - 8, (rows, steps)).astype(np.int32)
    lengths = np.array([7, 3, 5, 1, 7, 6])
    completion_mask = (np.arange(steps)[None] < lengths[:, None]).astype(np.int32)
    completions = np.where(completion_mask > 0, completions, cfg.pad_token_id)
    weights = rng.normal(size=(rows, steps)).astype(np.float32)
    entropy_weights = rng.normal(size=(rows, steps)).astype(np.float32) if entropy_gradient else None
    expected_logp, expected_entropy, expected_grads = _repeated_prompt_reference(
        hf, cfg, ids, mask, pixels, grid, token_type, completions, completion_mask, samples, weights,
        entropy_weights)

    inputs = jax.tree.map(jnp.asarray, sampling.prepare_prompts(ours, ids, mask, pixels, grid,
                                                                pad_token_id=cfg.pad_token_id))
    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)

    def objective(params):
        logp, entropy = sampling.completion_logprobs(
            nnx.merge(graphdef, params, rest), inputs, jnp.asarray(completions), jnp.asarray(completion_mask),
            num_samples=samples, with_entropy=True, logits_chunk=logits_chunk,
            entropy_gradient=entropy_gradient)
        bonus = (entropy * entropy_weights).sum() if entropy_gradient else 0.0
        return (logp * weights).sum() + bonus, (logp, entropy)

    (_, (logp, entropy)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    assert np.abs(np.asarray(logp) - expected_logp).max() <= LOGPROB_ATOL
    assert np.abs(np.asarray(entropy) - expected_entropy).max() <= LOGPROB_ATOL
    got = dict(_hf_tensors(nnx.merge(graphdef, grads, rest)))
    assert sum("visual" in name for name in got) > 20 and set(got) == set(expected_grads)
    for name, value in got.items():
        ref = expected_grads[name]
        err = np.abs(value - ref).max() / max(np.abs(ref).max(), 1e-6)
        assert err < 2e-3, f"{name}: max abs gradient difference {err:.1e} of the largest entry"


# ----------------------------------------------------------------------------- distributions
LOGITS = np.array([2.0, 1.5, 0.3, 0.0, -1.0, -3.0], np.float32)


def reference_distribution(temperature, top_k, top_p):
    """Written independently of the sampler: plain numpy, sort-and-cut."""
    z = LOGITS / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    if top_k:
        keep[order[:top_k]] = True
    else:
        keep[:] = True
    if top_p < 1:
        nucleus = np.zeros_like(keep)
        mass = 0.0
        for i in order:
            nucleus[i] = True
            mass += p[i]
            if mass >= top_p:
                break
        keep &= nucleus
    q = np.where(keep, p, 0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0), (1.0, 3, 1.0),
                                                     (1.0, 0, 0.8), (1.5, 4, 0.9)])
def test_draws_follow_the_filtered_distribution(temperature, top_k, top_p):
    params = sampling.SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p).validate()
    n = 40_000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, len(LOGITS)))
    tokens, logprobs = jax.jit(lambda k: sampling.draw_tokens(k, logits, params))(jax.random.key(7))
    freq = np.bincount(np.asarray(tokens), minlength=len(LOGITS)) / n
    expected = reference_distribution(temperature, top_k, top_p)
    # 4.5 standard errors per token: fails only on a real difference
    tolerance = 4.5 * np.sqrt(expected * (1 - expected) / n) + 1e-9
    assert np.all(np.abs(freq - expected) <= tolerance), (freq, expected)
    # returned log-probs are the temperature-free log-softmax of the raw logits
    raw = LOGITS - LOGITS.max() - np.log(np.exp(LOGITS - LOGITS.max()).sum())
    np.testing.assert_allclose(np.asarray(logprobs), raw[np.asarray(tokens)], atol=1e-5)


def test_inverse_cdf_draws_over_many_blocks_follow_the_distribution():
    """`sample_categorical` inverts the CDF block by block: 7 blocks of 16 with a partial last
    one, the largest mass in its last token, and tokens of probability 0 that are never drawn."""
    rng = np.random.default_rng(11)
    vocab, n = 100, 40_000
    logits = rng.normal(scale=1.5, size=vocab).astype(np.float32)
    logits[rng.random(vocab) < 0.4] = -np.inf
    logits[vocab - 1] = 3.0
    p = np.exp(logits - logits.max())
    p /= p.sum()
    draw = jax.jit(lambda key: sampling.sample_categorical(key, jnp.broadcast_to(jnp.asarray(logits), (n, vocab)),
                                                           block=16))
    tokens = np.asarray(draw(jax.random.key(3)))
    assert tokens.min() >= 0 and tokens.max() < vocab
    freq = np.bincount(tokens, minlength=vocab) / n
    assert np.all(freq[p == 0] == 0)
    tolerance = 4.5 * np.sqrt(p * (1 - p) / n) + 1e-9  # fails only on a real difference
    assert np.all(np.abs(freq - p) <= tolerance), np.abs(freq - p).max()


def test_a_bad_weight_split_mode_is_an_error(monkeypatch):
    monkeypatch.setitem(sampling.SPLIT_DECODER_WEIGHTS, "mode", "sometimes")
    with pytest.raises(ValueError, match="sometimes"):
        sampling._split_weights_once()


def test_invalid_sampling_parameters_name_the_field():
    for kwargs, field in [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                          (dict(top_k=-2), "top_k"), (dict(max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(ValueError, match=field):
            sampling.SamplingParams(**{"max_new_tokens": 4, **kwargs}).validate()


def test_sharded_generation_equals_single_device(models):
    """The sampler on a model sharded fsdp=4 x tensor=2 (8 simulated devices) draws the same
    greedy tokens and log-probs as on one device."""
    from recap_jax import parallel

    cfg, _, ours = models
    ids, mask, pixels, grid, _ = build_batch(cfg, [[2, (1, 4, 6), 3], [5], [(1, 8, 8), 1], [4, (1, 4, 4)]],
                                             np.random.default_rng(9))
    kwargs = dict(max_new_tokens=6, temperature=0.0, eos_token_id=[], num_samples=2, rng=jax.random.key(0))
    single = sampling.generate(ours, ids, mask, pixels, grid, **kwargs)
    mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=4, tensor=2))
    sharded_model = parallel.shard_model(ours, mesh)
    kernel = sharded_model.language_model.layers.self_attn.q_proj.kernel[...]
    assert kernel.sharding.shard_shape(kernel.shape) != kernel.shape  # really split
    with parallel.use_mesh(mesh):
        sharded = sampling.generate(sharded_model, ids, mask, pixels, grid, **kwargs)
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(single.logprobs), atol=1e-4)


def test_greedy_with_a_video_equals_transformers_generate(models):
    """Video and image patches share one padded vision bucket; decoding continues M-RoPE
    positions after the video's temporal positions exactly as transformers does."""
    cfg, hf, ours = models
    rng = np.random.default_rng(10)
    video = [cfg.vision_start_token_id] + [cfg.video_token_id] * 8 + [cfg.vision_end_token_id]
    image = [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id]
    ids = np.array([[5, 6] + image + [7] + video + [8, 9]])
    mask = np.ones_like(ids)
    image_pixels = rng.normal(size=(16, cfg.vision.patch_dim)).astype(np.float32)
    video_pixels = rng.normal(size=(32, cfg.vision.patch_dim)).astype(np.float32)
    image_grid, video_grid, seconds = np.array([[1, 4, 4]]), np.array([[2, 4, 4]]), np.array([2.0], np.float32)
    token_type = np.where(ids == cfg.image_token_id, 1, np.where(ids == cfg.video_token_id, 2, 0))
    with torch.no_grad():
        hf.generation_config.eos_token_id = None
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(image_pixels), image_grid_thw=torch.tensor(image_grid),
                          pixel_values_videos=torch.tensor(video_pixels), video_grid_thw=torch.tensor(video_grid),
                          second_per_grid_ts=torch.tensor(seconds), mm_token_type_ids=torch.tensor(token_type),
                          do_sample=False, max_new_tokens=6, pad_token_id=cfg.pad_token_id).numpy()[:, ids.shape[1]:]
    out = sampling.generate(ours, ids, mask, image_pixels, image_grid, max_new_tokens=6, temperature=0.0,
                            eos_token_id=[], rng=jax.random.key(0), patch_bucket=64,
                            pixel_values_videos=video_pixels, video_grid_thw=video_grid, second_per_grid_ts=seconds)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_token_logprobs_and_their_gradient_equal_numpy_log_softmax():
    """The custom-VJP gather (no [.., V] log-softmax buffer in the backward) against numpy:
    value log_softmax(x)[t] and gradient g * (onehot(t) - softmax(x)), with logits of very
    different scales (a row of -1e4 .. 1e4) and a masked (g = 0) position."""
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=3.0, size=(3, 4, 37)).astype(np.float32)
    logits[1, 2] = np.linspace(-1e4, 1e4, 37)
    tokens = rng.integers(0, 37, size=(3, 4)).astype(np.int32)
    upstream = rng.normal(size=(3, 4)).astype(np.float32)
    upstream[0, 0] = 0.0
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected_value = np.take_along_axis(log_softmax, tokens[..., None], -1)[..., 0]
    onehot = np.eye(37)[tokens]
    expected_grad = upstream[..., None] * (onehot - np.exp(log_softmax))

    value, vjp = jax.vjp(lambda x: sampling.token_logprobs(x, jnp.asarray(tokens)), jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(value), expected_value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(upstream))[0]), expected_grad, atol=1e-5)
    entropy = -(np.exp(log_softmax) * log_softmax).sum(-1)
    np.testing.assert_allclose(np.asarray(sampling.token_entropy(jnp.asarray(logits))), entropy, atol=1e-4)
