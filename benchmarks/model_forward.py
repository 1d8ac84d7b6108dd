"""Forward throughput of our jitted Qwen2.5-VL against transformers (eager and sdpa), same weights.

    python -m benchmarks.model_forward [--batch 4] [--text 256] [--image 224] [--repeats 5]

The random benchmark model of benchmarks/common.py (4 text layers, hidden 512; vision depth 4,
hidden 256) with one image and `--text` text tokens per sequence. Prints tokens/s of each and
the ratio, from one run.
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

from benchmarks.common import bench_config, image_prompts, machine_line, print_table, \
    save_random_transformers_checkpoint, timed_rounds
from recap_jax.models import qwen2_5_vl as qwen
from recap_jax.models.qwen2_5_vl.model import _jitted_forward, prepare_inputs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=256)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    cfg = bench_config()
    ids, mask, pixels, grid = image_prompts(cfg, args.batch, args.text, args.image)
    torch_dtype = getattr(torch, args.dtype)
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_random_transformers_checkpoint(cfg, tmp)
        for impl in ("eager", "sdpa"):
            model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
                tmp, attn_implementation=impl, dtype=torch_dtype).eval()
            kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pixels, dtype=torch_dtype), image_grid_thw=torch.tensor(grid),
                          mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64)))

            def run_torch(model=model, kwargs=kwargs):
                with torch.no_grad():
                    model(**kwargs)
            runners[f"transformers ({impl})"] = run_torch
        ours = qwen.from_pretrained(tmp, dtype=getattr(jnp, args.dtype))
    graphdef, state = nnx.split(ours)
    inputs = jax.tree.map(jnp.asarray, prepare_inputs(cfg, ids, mask, pixels, grid))

    def run_ours():
        _jitted_forward(graphdef, state, inputs).block_until_ready()
    runners["recap_jax (jit)"] = run_ours
    results = timed_rounds(runners, args.repeats)

    print(machine_line())
    print(f"batch {args.batch} x {ids.shape[1]} tokens (one {args.image}x{args.image} image + {args.text} text), "
          f"{args.dtype}")
    print_table(results, "recap_jax (jit)", ids.size, "tokens", "seconds / forward")


if __name__ == "__main__":
    main()
