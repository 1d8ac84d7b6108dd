"""Log-probs at the sampling temperature (TRL's and the released code's convention): the
trainer's `completion_logprobs(..., temperature=T)` equals transformers' log_softmax(logits / T),
and a sampler run with ``scale_logprobs=True`` reports the same numbers, so the ratio starts at
1 (``logprob_abs_diff`` ~ 0) under either convention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from recap_jax import sampling
from recap_jax.models import qwen2_5_vl as qwen
from tests.models.test_model import build_batch, randomise_, tiny_config

ATOL = 1e-4
PROMPT = [[2, (1, 4, 6), 3], [5], [(1, 8, 8), 1, 2]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cfg = tiny_config(tie=False)
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())).eval()
    randomise_(hf, seed=5)
    path = tmp_path_factory.mktemp("ckpt_temperature")
    hf.save_pretrained(path)
    return cfg, hf, qwen.from_pretrained(path)


def transformers_logprobs(hf, ids, mask, pixels, grid, token_type, completions, completion_mask, temperature):
    """log_softmax(logits / T) of each completion token, one prompt per row (G = 1)."""
    full_ids = np.concatenate([ids, completions], 1)
    full_mask = np.concatenate([mask, completion_mask], 1)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(full_ids), attention_mask=torch.tensor(full_mask),
                    pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
                    mm_token_type_ids=torch.tensor(np.concatenate([token_type, 0 * completions], 1))).logits
    scaled = logits[:, ids.shape[1] - 1:-1].float() / temperature
    logp = torch.log_softmax(scaled, -1).gather(-1, torch.tensor(completions[..., None]).long())[..., 0]
    return logp.numpy() * completion_mask


@pytest.mark.parametrize("temperature, logits_chunk", [(0.9, 0), (0.9, 3), (1.0, 0), (1.7, 2)])
def test_trainer_logprobs_equal_transformers_logits_over_temperature(models, temperature, logits_chunk):
    cfg, hf, ours = models
    rng = np.random.default_rng(11)
    ids, mask, pixels, grid, token_type = build_batch(cfg, PROMPT, rng)
    steps = 5
    completions = rng.integers(0, cfg.text.vocab_size - 8, (len(ids), steps)).astype(np.int32)
    completion_mask = (np.arange(steps)[None] < np.array([[5], [2], [4]])).astype(np.int32)
    completions = np.where(completion_mask > 0, completions, cfg.pad_token_id)
    expected = transformers_logprobs(hf, ids, mask, pixels, grid, token_type, completions, completion_mask,
                                     temperature)
    inputs = jax.tree.map(jnp.asarray, sampling.prepare_prompts(ours, ids, mask, pixels, grid,
                                                                pad_token_id=cfg.pad_token_id))
    got = sampling.completion_logprobs(ours, inputs, jnp.asarray(completions), jnp.asarray(completion_mask),
                                       logits_chunk=logits_chunk, temperature=temperature)
    assert np.abs(np.asarray(got) - expected).max() <= ATOL
    if temperature != 1.0:  # the test can fail: unscaled log-probs differ
        unscaled = transformers_logprobs(hf, ids, mask, pixels, grid, token_type, completions,
                                         completion_mask, 1.0)
        assert np.abs(unscaled - expected).max() > 100 * ATOL


@pytest.mark.parametrize("scale", [True, False])
def test_sampler_and_trainer_agree_under_each_convention(models, scale):
    from flax import nnx

    cfg, _, ours = models
    ids, mask, pixels, grid, _ = build_batch(cfg, PROMPT, np.random.default_rng(12))
    samples, temperature = 2, 0.9
    params = sampling.SamplingParams(10, temperature, 0.95, 0, (cfg.eos_token_id,), cfg.pad_token_id,
                                     samples, scale_logprobs=scale)
    assert sampling.logprob_temperature(params) == (temperature if scale else 1.0)
    inputs = jax.tree.map(jnp.asarray, sampling.prepare_prompts(ours, ids, mask, pixels, grid,
                                                                pad_token_id=cfg.pad_token_id))
    graphdef, state = nnx.split(ours)
    out = sampling.generate_prepared(graphdef, state, inputs, params, jax.random.key(3))
    completion_mask = (np.arange(10)[None] < np.asarray(out.lengths)[:, None]).astype(np.int32)
    logprob_fn = sampling.make_logprob_fn(graphdef, samples, temperature=sampling.logprob_temperature(params))
    trainer, _ = logprob_fn(state, {"prompt": inputs, "completions": out.tokens,
                                    "completion_mask": jnp.asarray(completion_mask)})
    logprob_abs_diff = np.abs(np.asarray(trainer) - np.asarray(out.logprobs)).max()
    assert logprob_abs_diff <= ATOL
    # the other convention does not agree: the choice matters
    other = sampling.make_logprob_fn(graphdef, samples, temperature=temperature if not scale else 1.0)
    mismatch, _ = other(state, {"prompt": inputs, "completions": out.tokens,
                                "completion_mask": jnp.asarray(completion_mask)})
    assert np.abs(np.asarray(mismatch) - np.asarray(out.logprobs)).max() > 100 * ATOL


def test_greedy_logprobs_are_unscaled():
    params = sampling.SamplingParams(4, 0.0, scale_logprobs=True)
    assert sampling.logprob_temperature(params) == 1.0


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "0.9"])
def test_bad_logprob_temperature_is_refused(bad):
    with pytest.raises(ValueError, match="temperature"):
        sampling.make_logprob_fn(None, 1, temperature=bad)
