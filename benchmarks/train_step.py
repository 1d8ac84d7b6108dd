"""Policy-gradient step throughput: our jitted GRPO step against a PyTorch forward+backward+AdamW
of transformers' model on the same batch and weights.

    python -m benchmarks.train_step [--prompts 4] [--samples 4] [--completion 64] [--repeats 3]

Each prompt holds one 224x224 image and 32 text tokens; G completions per prompt. The PyTorch
side runs the same work a TRL-style trainer does per update: forward over prompt+completion for
every sample (the vision tower once per sample, as TRL repeats the images), the output projection
only at the completion's positions (`logits_to_keep`, as TRL), log-softmax gather of the
completion tokens, the clipped-surrogate loss, backward, AdamW. Prints tokens/s (prompt +
completion tokens of all rows) and the ratio, from one run (best of `--repeats` rounds,
`common.timed_rounds`).
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from benchmarks.common import (
    bench_config,
    image_prompts,
    machine_line,
    print_table,
    save_random_transformers_checkpoint,
    timed_rounds,
)
from recap_jax import grpo, sampling
from recap_jax.models import qwen2_5_vl as qwen
from recap_jax.train_state import TrainState, make_optimizer
from recap_jax.train_step import make_train_step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = bench_config()
    rng = np.random.default_rng(1)
    B, G, C = args.prompts, args.samples, args.completion
    ids, mask, pixels, grid = image_prompts(cfg, B, 32)
    completions = rng.integers(0, 8000, (B * G, C))
    rewards = rng.random((B * G, 1)).astype(np.float32)
    tokens = B * G * (ids.shape[1] + C)

    with tempfile.TemporaryDirectory() as tmp:
        save_random_transformers_checkpoint(cfg, tmp)
        hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp, attn_implementation="sdpa").train()
        ours = qwen.from_pretrained(tmp)

    # ---------------------------------------------------------------- PyTorch reference
    full_ids = torch.tensor(np.concatenate([np.repeat(ids, G, 0), completions], 1))
    full_mask = torch.ones_like(full_ids)
    token_type = torch.tensor((full_ids.numpy() == cfg.image_token_id).astype(np.int64))
    rep_pixels = torch.tensor(np.concatenate([pixels.reshape(B, -1, pixels.shape[1])[b] for b in range(B)
                                              for _ in range(G)]))
    rep_grid = torch.tensor(np.repeat(grid, G, 0))
    adv = torch.tensor(rewards[:, 0] - rewards[:, 0].mean())
    optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-6)
    P = ids.shape[1]

    def run_torch():
        # as TRL: logits only at the C + 1 last positions (logits_to_keep), the last one dropped
        logits = hf(input_ids=full_ids, attention_mask=full_mask, pixel_values=rep_pixels, image_grid_thw=rep_grid,
                    mm_token_type_ids=token_type, logits_to_keep=C + 1).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, full_ids[:, P:, None])[..., 0]
        ratio = torch.exp(logp - logp.detach())
        loss = -torch.minimum(ratio * adv[:, None], torch.clamp(ratio, 0.8, 1.2) * adv[:, None]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    # ---------------------------------------------------------------- ours
    config = grpo.GRPOConfig(group_size=G, reward_objective_index=((0,),), sft_objective_index=(-1,))
    graphdef, params = nnx.split(ours)
    optimizer_jax = make_optimizer(1e-6, 100)
    step = make_train_step(config, sampling.make_logprob_fn(graphdef, G), optimizer_jax)
    inputs = jax.tree.map(jnp.asarray, qwen.prepare_inputs(cfg, ids, mask, pixels, grid))
    batch = {"prompt": inputs, "completions": jnp.asarray(completions, jnp.int32),
             "completion_mask": jnp.ones((B * G, C), jnp.int32), "source_id": jnp.zeros((B * G,), jnp.int32),
             "rewards": jnp.asarray(rewards), "old_logprobs": jnp.zeros((B * G, C), jnp.float32)}
    weights = jnp.ones((1,), jnp.float32)
    holder = {"state": TrainState.create(params, optimizer_jax, jax.random.key(0))}

    def run_ours():
        holder["state"], metrics = step(holder["state"], batch, weights)
        jax.block_until_ready(metrics)

    results = timed_rounds({"transformers fwd+bwd+AdamW (sdpa)": run_torch, "recap_jax GRPO step (jit)": run_ours},
                           args.repeats)
    print(machine_line())
    print(f"{B} prompts x G={G} x ({P} prompt + {C} completion) tokens, float32")
    print_table(results, "recap_jax GRPO step (jit)", tokens, "tokens", "seconds / step")


if __name__ == "__main__":
    main()
