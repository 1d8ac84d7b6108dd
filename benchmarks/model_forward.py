"""Forward throughput of our jitted Qwen2.5-VL against transformers (eager and sdpa), same weights.

    python -m benchmarks.model_forward [--batch 4] [--text 256] [--image 224] [--repeats 5]
    python -m benchmarks.model_forward --attention-paths [--images 16] [--prefill 2048] [--repeats 5]

The random benchmark model of benchmarks/common.py (4 text layers, hidden 512; vision depth 4,
hidden 256) with one image and `--text` text tokens per sequence. Prints tokens/s of each and
the ratio, from one run.

``--attention-paths`` instead times the attention implementations (`attention.py`) that run
on this machine, on the vision tower alone with ``--images`` images of ``--image`` px, and on
a text-only prefill of ``--prefill`` tokens (the decoder, batch 1): ``xla`` (the reference)
and ``cudnn-args`` (the cuDNN path's call of jax.nn.dot_product_attention, here through its
XLA implementation, since a CPU has no cuDNN); ``--pallas`` adds the Pallas kernel in
interpret mode (a correctness tool, orders of magnitude slow, not a speed figure).
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
from recap_jax.models import qwen2_5_vl as qwen
from recap_jax.models.qwen2_5_vl import attention
from recap_jax.models.qwen2_5_vl.model import _jitted_forward, init_model, prepare_inputs
from recap_jax.models.qwen2_5_vl.vision import vision_inputs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=256)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attention-paths", action="store_true", help="time the attention implementations instead")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--pallas", action="store_true", help="with --attention-paths: also Pallas (interpret)")
    args = parser.parse_args()
    if args.attention_paths:
        return attention_paths(args)

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


def _paths(pallas: bool) -> dict[str, str]:
    """Label -> attention implementation to time; "cudnn" off GPU runs its arguments through XLA."""
    paths = {"xla (reference)": "xla", "cudnn-args (jax.nn, XLA impl.)": "cudnn"}
    if pallas:
        paths["pallas (interpret)"] = "pallas"
    return paths


def _time_paths(paths: dict[str, str], make_run, repeats: int) -> dict[str, float]:
    """Best seconds of ``make_run()``'s jitted call under each implementation (traced anew per path)."""
    results = {}
    attention.EMULATE_CUDNN["on"] = True
    for label, impl in paths.items():
        attention.set_implementation(impl)
        run = make_run()
        results[label] = timed_rounds({label: run}, repeats)[label]
    attention.set_implementation("auto")
    return results


def attention_paths(args) -> None:
    """The vision tower on ``args.images`` images and a ``args.prefill``-token prefill, per path."""
    cfg = bench_config()
    dtype = getattr(jnp, args.dtype)
    model = init_model(cfg, dtype=dtype)
    side = args.image // cfg.vision.patch_size
    grid = np.array([[1, side, side]] * args.images)
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(int(grid.prod(-1).sum()), cfg.vision.patch_dim)),
                         jnp.float32)
    inputs = jax.tree.map(jnp.asarray, vision_inputs(grid, cfg.vision))

    def vision_run():
        forward = jax.jit(lambda p, i: model.visual(p, i))
        return lambda: forward(pixels, inputs).block_until_ready()

    ids = np.random.default_rng(1).integers(0, 8000, (1, args.prefill))
    text_inputs = jax.tree.map(jnp.asarray, prepare_inputs(cfg, ids, np.ones_like(ids)))
    graphdef, state = nnx.split(model)

    def prefill_run():
        forward = jax.jit(lambda s, i: nnx.merge(graphdef, s).hidden_states(i)[0])
        return lambda: forward(state, text_inputs).block_until_ready()

    paths = _paths(args.pallas)
    vision = _time_paths(paths, vision_run, args.repeats)
    prefill = _time_paths(paths, prefill_run, args.repeats)
    print(machine_line())
    print(f"bench model, {args.dtype}; vision: {args.images} images of {args.image} px "
          f"({int(grid.prod(-1).sum())} patches); prefill: 1 x {args.prefill} text tokens, decoder only")
    print("| attention path | vision tower (ms) | prefill (ms) | prefill tokens/s |")
    print("|---|---|---|---|")
    for label in paths:
        print(f"| {label} | {vision[label] * 1e3:.1f} | {prefill[label] * 1e3:.1f} | "
              f"{args.prefill / prefill[label]:,.0f} |")


if __name__ == "__main__":
    main()
