"""The RL engine on the real (tiny) Qwen2.5-VL: sampler -> reward -> jitted GRPO step.

A learning test: the reward is "the completion contains token X"; a tiny random VLM's mean
reward must rise clearly within a bounded number of steps (asserted on the reward, not time).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recap_jax import grpo, sampling
from recap_jax.models import qwen2_5_vl as qwen
from recap_jax.train_state import TrainState, make_optimizer
from recap_jax.train_step import make_train_step

TARGET_TOKEN = 17


def prompts(cfg, rng, batch):
    """Left-padded prompts, each with one small image, and their pixels."""
    rows, grids = [], []
    for b in range(batch):
        text = rng.integers(0, 50, 3 + b).tolist()  # below the special tokens
        rows.append(text + [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id])
        grids.append([1, 4, 4])
    length = max(map(len, rows))
    ids = np.full((batch, length), cfg.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, length - len(row):], mask[b, length - len(row):] = row, 1
    pixels = rng.normal(size=(16 * batch, cfg.vision.patch_dim)).astype(np.float32)
    return ids, mask, pixels, np.array(grids)


def test_reward_for_containing_a_token_rises():
    cfg = qwen.tiny(vocab_size=64, vision_depth=1, fullatt_block_indexes=(0,))
    model = qwen.init_model(cfg, seed=0)
    group, batch, new_tokens, steps = 8, 4, 6, 25
    config = grpo.GRPOConfig(group_size=group, reward_objective_index=((0,),), sft_objective_index=(-1,))
    graphdef, params = nnx.split(model)
    step_fn = make_train_step(config, sampling.make_logprob_fn(graphdef, group),
                              make_optimizer(3e-3, steps, warmup_fraction=0.0))
    state = TrainState.create(params, make_optimizer(3e-3, steps, warmup_fraction=0.0), jax.random.key(0))
    rng = np.random.default_rng(0)
    ids, mask, pixels, grid = prompts(cfg, rng, batch)
    inputs = jax.tree.map(jnp.asarray, sampling.prepare_prompts(model, ids, mask, pixels, grid,
                                                                pad_token_id=cfg.pad_token_id, patch_bucket=64))
    weights = jnp.ones((1,), jnp.float32)
    rewards_seen = []
    for step in range(steps):
        model = nnx.merge(graphdef, state.params)
        out = sampling.generate(model, ids, mask, pixels, grid, max_new_tokens=new_tokens, temperature=1.0,
                                eos_token_id=[], num_samples=group, rng=jax.random.key(100 + step), patch_bucket=64)
        tokens = np.asarray(out.tokens)
        reward = (tokens == TARGET_TOKEN).any(axis=1).astype(np.float32)
        rewards_seen.append(reward.mean())
        completion_mask = np.ones_like(tokens, np.int32)
        rl_batch = {"prompt": inputs, "completions": jnp.asarray(tokens), "completion_mask": jnp.asarray(completion_mask),
                    "source_id": jnp.zeros((batch * group,), jnp.int32), "rewards": jnp.asarray(reward[:, None]),
                    "old_logprobs": out.logprobs}
        state, metrics = step_fn(state, rl_batch, weights)
        # sampler and trainer agree on the log-probs of the same tokens (importance ratio 1)
        assert float(metrics["logprob_abs_diff"]) < 1e-4
    start, end = np.mean(rewards_seen[:3]), np.mean(rewards_seen[-3:])
    print("mean reward per step:", np.round(rewards_seen, 2))
    assert start < 0.3, rewards_seen
    assert end > 0.7, rewards_seen
