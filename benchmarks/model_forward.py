"""Forward throughput of our jitted Qwen2.5-VL against transformers (eager and sdpa), same weights.

    python benchmarks/model_forward.py [--batch 4] [--text 256] [--image 224] [--repeats 5]

A small random model (4 text layers, hidden 512; vision depth 4, hidden 256) with one image
and `--text` text tokens per sequence. Prints tokens/s of each and the ratio, from one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from recap_jax.models import qwen2_5_vl as qwen
from recap_jax.models.qwen2_5_vl import config as C
from recap_jax.models.qwen2_5_vl.model import _jitted_forward, prepare_inputs
from flax import nnx


def bench_config(dtype_name: str) -> C.Qwen2_5_VLConfig:
    base = C.tiny(vocab_size=8192)
    text = dataclasses.replace(base.text, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=64, mrope_section=(8, 12, 12))
    vision = dataclasses.replace(base.vision, depth=4, hidden_size=256, intermediate_size=640, num_heads=4,
                                 out_hidden_size=512, window_size=112, fullatt_block_indexes=(3,))
    return dataclasses.replace(base, text=text, vision=vision)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=256)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    cfg = bench_config(args.dtype)
    torch.manual_seed(0)
    hf_config = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())
    torch_dtype = getattr(torch, args.dtype)
    grid = np.array([[1, args.image // 14, args.image // 14]] * args.batch)
    n_img = int(np.prod(grid[0])) // 4
    rng = np.random.default_rng(0)
    row = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
    ids = np.stack([row + rng.integers(0, 8000, args.text).tolist() for _ in range(args.batch)])
    mask = np.ones_like(ids)
    pixels = rng.normal(size=(int(grid.prod(-1).sum()), cfg.vision.patch_dim)).astype(np.float32)
    tokens = ids.size

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config).eval()
        hf.save_pretrained(tmp)
        for impl in ("eager", "sdpa"):
            model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
                tmp, attn_implementation=impl, dtype=torch_dtype).eval()
            kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pixels, dtype=torch_dtype), image_grid_thw=torch.tensor(grid),
                          mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64)))

            def run_torch():
                with torch.no_grad():
                    model(**kwargs)
            results[f"transformers ({impl})"] = timed(run_torch, args.repeats)
        ours = qwen.from_pretrained(tmp, dtype=getattr(jnp, args.dtype))
    graphdef, state = nnx.split(ours)
    inputs = jax.tree.map(jnp.asarray, prepare_inputs(cfg, ids, mask, pixels, grid))

    def run_ours():
        _jitted_forward(graphdef, state, inputs).block_until_ready()
    results["recap_jax (jit)"] = timed(run_ours, args.repeats)

    ours_time = results["recap_jax (jit)"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
          f"on {jax.devices()[0].platform}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"batch {args.batch} x ({n_img + 2} image + {args.text} text) tokens, {args.dtype}")
    print(f"| implementation | seconds / forward | tokens/s | recap_jax speed-up |")
    print(f"|---|---|---|---|")
    for name, t in results.items():
        print(f"| {name} | {t:.4f} | {tokens / t:,.0f} | {t / ours_time:.2f}x |")


if __name__ == "__main__":
    main()
