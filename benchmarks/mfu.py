"""Model FLOPs utilisation of the policy-gradient forward + backward of Qwen2.5-VL.

    python -m benchmarks.mfu --config 3b --batch 2 --group-size 4 --prompt-len 1024 \\
        --completion-len 512 --images 1 --image-size 448 --peak-tflops 989   # H100 bf16 dense
    python -m benchmarks.mfu --config tiny   # CPU smoke run; peak = a measured matmul

Model FLOPs (counted analytically, vision and text separately; training = 3 x forward):
  vision, per image of n patches: patch embedding 2 n C T P^2 d; per block 2 n (3 d^2 + d^2
    + 3 d f) for qkv / proj / SwiGLU plus attention 4 d sum_w |w|^2 over the attention
    windows w (one window = the whole frame in the full-attention blocks); merger
    2 (n/4) (16 d^2 + 4 d E).
  text, per prompt of S tokens and its G completions of T tokens (the prompt runs once,
    `TextModel.with_shared_prefix`): per layer and token 2 (E H D + 2 E K D + H D E + 3 E F)
    over the S + G T tokens, plus attention 4 H D per score entry, S^2 for the prompt and
    T (S + T) per completion (PaLM's convention: whole score matrices), and the output
    projection 2 E V at the G T completion positions whose log-probs are taken.
The measured step is ``jax.value_and_grad`` of a GRPO-shaped loss, -mean(A * log pi) over the
completion tokens, with `sampling.make_logprob_fn` (the train step's policy), jitted. The
reference in the same run is the matmul FLOPs of the traced program (every dot_general,
scan bodies times their length): equal to the model count for text-only batches without
remat; above it when the vision tower runs (window blocks score bands of three window-sized
blocks, full-attention blocks all patches of the batch, masked; and a block's cond counts its
costlier branch, the full one) or remat recomputes. Without --peak-tflops, the peak is a large matmul's
measured FLOP/s on this machine.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recap_jax import parallel, sampling
from recap_jax import precision as precision_lib
from recap_jax.models.qwen2_5_vl import config as C
from recap_jax.models.qwen2_5_vl.sharded import init_sharded_model
from recap_jax.models.qwen2_5_vl.vision import window_units
from recap_jax.tools import memory


# ----------------------------------------------------------------------------- model FLOPs
def window_sizes(grid_h: int, grid_w: int, vision: C.VisionConfig) -> list[int]:
    """Patches in each attention window of one frame (edge windows are smaller)."""
    m = vision.spatial_merge_size
    units = window_units(vision)
    lh, lw = grid_h // m, grid_w // m
    rows = [min(units, lh - i) for i in range(0, lh, units)]
    cols = [min(units, lw - j) for j in range(0, lw, units)]
    return [r * c * m * m for r in rows for c in cols]


def vision_forward_flops(vision: C.VisionConfig, grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    n, d, f = t * h * w, vision.hidden_size, vision.intermediate_size
    flops = 2 * n * vision.patch_dim * d
    dense = 2 * n * (3 * d * d + d * d + 3 * d * f)
    windowed = t * sum(s * s for s in window_sizes(h, w, vision))
    full = t * (h * w) ** 2
    for block in range(vision.depth):
        flops += dense + 4 * d * (full if block in vision.fullatt_block_indexes else windowed)
    merged, units = d * vision.merge_unit, n // vision.merge_unit
    return flops + 2 * units * (merged * merged + merged * vision.out_hidden_size)


def text_forward_flops(text: C.TextConfig, prompts: int, group_size: int, prompt_len: int, completion_len: int) -> int:
    """The decoder on B prompts, each run once for its G completions (`with_shared_prefix`),
    plus the output projection at the B * G * T completion positions."""
    e, h, k, dh, f = (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim,
                      text.intermediate_size)
    per_token = 2 * (e * h * dh + 2 * e * k * dh + h * dh * e + 3 * e * f)
    tokens = prompts * (prompt_len + group_size * completion_len)
    # score rows x keys: the prompt's S x S, and each completion's T x (S + T)
    score_entries = prompts * (prompt_len ** 2 + group_size * completion_len * (prompt_len + completion_len))
    layers = text.num_hidden_layers * (tokens * per_token + 4 * h * dh * score_entries)
    return layers + prompts * group_size * completion_len * 2 * e * text.vocab_size


def train_flops(config: C.Qwen2_5_VLConfig, workload: memory.Workload) -> dict[str, int]:
    """Model FLOPs of one forward + backward (3 x forward) of the policy log-probs."""
    images = workload.batch * workload.images
    vision = 3 * images * vision_forward_flops(config.vision, workload.grid(config)) if images else 0
    text = 3 * text_forward_flops(config.text, workload.batch, workload.group_size, workload.prompt_len,
                                  workload.completion_len)
    return {"vision": vision, "text": text, "total": vision + text}


# ----------------------------------------------------------------------------- program FLOPs
def _sub_jaxprs(params: dict):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def jaxpr_matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general the program runs (scan bodies x their length;
    a cond counts its most expensive branch). XLA's cost analysis counts a loop body once,
    so with scanned layers it cannot serve as the reference."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
            free = [n for i, n in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
            total += 2 * math.prod(lhs) * math.prod(free)
            continue
        inner = [jaxpr_matmul_flops(j) for j in _sub_jaxprs(eqn.params)]
        if eqn.primitive.name == "cond":
            total += max(inner, default=0)
        else:
            total += sum(inner) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    return total


# ----------------------------------------------------------------------------- measuring
def pg_loss_fn(graphdef, group_size: int):
    logprob_fn = sampling.make_logprob_fn(graphdef, group_size)

    def loss(params, batch):
        logprobs, _ = logprob_fn(params, batch)
        mask = batch["completion_mask"].astype(jnp.float32)
        advantages = batch["rewards"][:, :1] - batch["rewards"].mean()
        return -jnp.sum(advantages * logprobs * mask) / jnp.maximum(mask.sum(), 1.0)

    return loss


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_flops_per_second(dtype, size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of one large square matmul on one device (the peak of a CPU run)."""
    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x: x @ x)
    return 2 * size ** 3 / median_seconds(lambda: f(a), repeats)


def model_config(name: str) -> C.Qwen2_5_VLConfig:
    if name == "bench":
        from benchmarks.common import bench_config

        return bench_config()
    return C.PRESETS[name]()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=["tiny", "bench", "3b", "7b"])
    p.add_argument("--mesh", default="fsdp=-1")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=32)
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none", choices=["none", "full", "save_dots"])
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense FLOP/s of ONE device in TFLOP/s (H100 SXM bf16: 989); default: measured matmul")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    config = model_config(args.config)
    workload = memory.Workload(args.batch, args.group_size, args.prompt_len, args.completion_len, args.images,
                               args.image_size)
    precision = precision_lib.PrecisionConfig(args.param_dtype, args.compute_dtype, args.remat)
    mesh = parallel.make_mesh(parallel.parse_mesh_spec(args.mesh))
    devices = mesh.devices.size
    model = init_sharded_model(config, mesh, **precision.model_kwargs())
    graphdef, params = nnx.split(model)
    batch = parallel.shard_batch(memory.example_batch(config, workload), mesh, batch_axes=memory.POLICY_BATCH_AXES)
    step = jax.jit(jax.value_and_grad(pg_loss_fn(graphdef, workload.group_size)))
    with parallel.use_mesh(mesh):
        compiled = step.lower(params, batch).compile()
        seconds = median_seconds(lambda: compiled(params, batch), args.repeats)
    program_flops = jaxpr_matmul_flops(jax.make_jaxpr(step)(params, batch).jaxpr)
    flops = train_flops(config, workload)
    if args.peak_tflops:
        peak, peak_label = args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s per device (given)"
    else:
        peak = matmul_flops_per_second(precision.model_kwargs()["dtype"])
        peak_label = f"{peak / 1e12:.4f} TFLOP/s per device (measured 2048^3 matmul, {args.compute_dtype})"
    achieved = flops["total"] / seconds
    mfu = achieved / (peak * devices)

    print(f"{args.config}: {devices} x {jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}; B={workload.batch} "
          f"x G={workload.group_size}, prompt {workload.prompt_len} + completion {workload.completion_len} tokens, "
          f"{workload.images} image(s) of {workload.image_size}px; params {args.param_dtype}, compute "
          f"{args.compute_dtype}, remat {args.remat}")
    print("| quantity | value |")
    print("|---|---|")
    print(f"| model FLOPs / step: vision | {flops['vision']:.4g} |")
    print(f"| model FLOPs / step: text (incl. output projection) | {flops['text']:.4g} |")
    print(f"| model FLOPs / step: total | {flops['total']:.4g} |")
    print(f"| matmul FLOPs the program runs (reference) | {program_flops:.4g} "
          f"(model / program = {flops['total'] / program_flops:.3f}) |")
    print(f"| step time (median of {args.repeats}) | {seconds:.4f} s |")
    print(f"| achieved model FLOP/s | {achieved / 1e12:.4f} TFLOP/s |")
    print(f"| peak | {peak_label} |")
    print(f"| **MFU** | **{100 * mfu:.1f}%** |")
    return {"flops": flops, "program_flops": program_flops, "seconds": seconds, "mfu": mfu}


if __name__ == "__main__":
    main()
