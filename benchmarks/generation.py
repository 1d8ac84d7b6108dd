"""Generation throughput: our jitted KV-cache sampler against transformers' generate, same weights.

    python -m benchmarks.generation [--prompts 4] [--samples 4] [--new 64] [--repeats 3] [--breakdown]

Each of `--prompts` prompts holds one 224x224 image and 32 text tokens; each is sampled
`--samples` times (G) for `--new` tokens (no EOS, so every row generates the same count).
transformers gets the same work as `num_return_sequences=G`. Prints generated tokens/s of
each and the ratio, from one run (best of `--repeats` rounds, `common.timed_rounds`).
`--breakdown` also times one new token on both sides and prints the split into prefill
(vision tower, prompt, first token) and time per decode step.
"""

from __future__ import annotations

import argparse
import functools
import tempfile

import jax
import numpy as np
import torch
import transformers

from benchmarks.common import (
    bench_config,
    image_prompts,
    machine_line,
    print_table,
    save_random_transformers_checkpoint,
    timed_rounds,
)
from recap_jax import sampling
from recap_jax.models import qwen2_5_vl as qwen


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true", help="also split each side into prefill and decode")
    args = parser.parse_args()

    cfg = bench_config()
    ids, mask, pixels, grid = image_prompts(cfg, args.prompts, 32)
    generated = args.prompts * args.samples * args.new

    with tempfile.TemporaryDirectory() as tmp:
        save_random_transformers_checkpoint(cfg, tmp)
        hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp, attn_implementation="sdpa").eval()
        hf.generation_config.eos_token_id = None
        ours = qwen.from_pretrained(tmp)

    def run_torch(new=args.new):
        with torch.no_grad():
            hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
                        mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64)),
                        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new,
                        num_return_sequences=args.samples, pad_token_id=cfg.pad_token_id)

    def run_ours(new=args.new):
        out = sampling.generate(ours, ids, mask, pixels, grid, max_new_tokens=new, temperature=1.0,
                                eos_token_id=[], num_samples=args.samples, rng=jax.random.key(0))
        jax.block_until_ready(out)

    runners = {"transformers generate (sdpa)": run_torch, "recap_jax sampling.generate": run_ours}
    results = timed_rounds(runners, args.repeats)
    print(machine_line())
    print(f"{args.prompts} prompts x G={args.samples} samples x {args.new} new tokens, float32")
    print_table(results, "recap_jax sampling.generate", generated, "generated tokens", "seconds")
    if args.breakdown and args.new > 1:
        print("\n| implementation | prefill + first token (s) | per decode step (ms) |")
        print("|---|---|---|")
        first_token = timed_rounds({name: functools.partial(run, 1) for name, run in runners.items()}, args.repeats)
        for name, first in first_token.items():
            print(f"| {name} | {first:.4f} | {(results[name] - first) / (args.new - 1) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
