"""Memory plan of a GRPO train step on a device mesh, compiled on abstract inputs.

    python -m recap_jax.tools.memory --config 7b --mesh fsdp=8 --batch 8 --group-size 8 \\
        --prompt-len 1024 --completion-len 1024 --images 1 --image-size 448 --remat full \\
        --device-memory-gib 80 --simulate-devices 8

Nothing is allocated: the model and train state exist only as ``jax.eval_shape`` results
(ShapeDtypeStructs carrying their shardings), and the real jitted train step
(`recap_jax.train_step.make_train_step` with `sampling.make_logprob_fn` and AdamW) is
lowered and compiled for them. Per device it prints the bytes of the parameters, the
optimizer state and the batch (from the shardings), XLA's temporaries (activations kept for
the backward pass, gradients, workspace: ``compiled.memory_analysis()``), the KV cache of
generating B x G completions, and whether the train step and generation fit in the device
memory. Compiled on CPU (``--simulate-devices``), temporaries follow the CPU compiler's
buffer assignment: a planning figure, not a GPU/TPU measurement.

The batch is the one `sampling.make_logprob_fn` reads; `POLICY_BATCH_AXES` gives each leaf's
row axis for `parallel.shard_batch`; `example_batch` / `batch_shapes` build one of given sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recap_jax import parallel, sampling
from recap_jax import precision as precision_lib
from recap_jax.models.qwen2_5_vl import config as config_lib
from recap_jax.models.qwen2_5_vl import model as model_lib
from recap_jax.models.qwen2_5_vl import text as text_lib
from recap_jax.models.qwen2_5_vl import vision as vision_lib

GIB = 2 ** 30


# ----------------------------------------------------------------------------- the batch
# Row axis of every batch leaf (None: replicated; the vision patches of all prompts are
# concatenated, so every process must feed all of them).
POLICY_BATCH_AXES = {
    "prompt": model_lib.ModelInputs(input_ids=0, attention_mask=0, position_ids=1, feature_index=0,
                                    pixel_values=None, vision=None, rope_deltas=0),
    "completions": 0, "completion_mask": 0, "source_id": 0, "rewards": 0, "old_logprobs": 0,
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """Sizes of one train step: B prompts x G completions, lengths in tokens, square images."""

    batch: int = 8
    group_size: int = 8
    prompt_len: int = 1024
    completion_len: int = 1024
    images: int = 1
    image_size: int = 448

    def check(self, config: config_lib.Qwen2_5_VLConfig) -> None:
        for name in ("batch", "group_size", "prompt_len", "completion_len", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.images < 0:
            raise ValueError(f"--images: must be >= 0, got {self.images}")
        unit = config.vision.patch_size * config.vision.spatial_merge_size
        if self.images and self.image_size % unit:
            raise ValueError(f"--image-size: {self.image_size} px must be a multiple of patch_size x "
                             f"spatial_merge_size = {unit}")
        needed = self.images * (self.tokens_per_image(config) + 2) + 1
        if self.prompt_len < needed:
            raise ValueError(f"--prompt-len: {self.prompt_len} tokens cannot hold {self.images} image(s) of "
                             f"{self.tokens_per_image(config)} tokens (+2 delimiters each) and one text token")

    def grid(self, config) -> tuple[int, int, int]:
        side = self.image_size // config.vision.patch_size
        return (1, side, side)

    def patches_per_image(self, config) -> int:
        return math.prod(self.grid(config))

    def tokens_per_image(self, config) -> int:
        return self.patches_per_image(config) // config.vision.merge_unit


def example_batch(config: config_lib.Qwen2_5_VLConfig, workload: Workload, seed: int = 0) -> dict[str, Any]:
    """A concrete random batch (numpy) of the workload's sizes, built with model.prepare_inputs."""
    workload.check(config)
    rng = np.random.default_rng(seed)
    b, g, t = workload.batch, workload.group_size, workload.completion_len
    text_vocab = min(config.image_token_id, config.vision_start_token_id, config.text.vocab_size) - 8
    image = [config.vision_start_token_id] + [config.image_token_id] * workload.tokens_per_image(config) + \
        [config.vision_end_token_id]
    rows = []
    for _ in range(b):
        head = image * workload.images
        rows.append(head + rng.integers(0, text_vocab, workload.prompt_len - len(head)).tolist())
    ids = np.asarray(rows, np.int32)
    pixels = grid = None
    if workload.images:
        grid = np.asarray([workload.grid(config)] * (b * workload.images), np.int64)
        pixels = rng.normal(size=(b * workload.images * workload.patches_per_image(config),
                                  config.vision.patch_dim)).astype(np.float32)
    inputs = model_lib.prepare_inputs(config, ids, np.ones_like(ids), pixels, grid)
    mask = np.ones((b * g, t), np.int32)
    mask[:, t - t // 4:] = rng.random((b * g, 1)) < 0.5  # some completions end early
    return {
        "prompt": inputs,
        "completions": rng.integers(0, text_vocab, (b * g, t)).astype(np.int32),
        "completion_mask": mask,
        "source_id": np.zeros(b * g, np.int32),
        "rewards": rng.random((b * g, 1)).astype(np.float32),
        "old_logprobs": (-rng.random((b * g, t)) * 3).astype(np.float32),
    }


def batch_shapes(config: config_lib.Qwen2_5_VLConfig, workload: Workload) -> dict[str, Any]:
    """ShapeDtypeStructs of `example_batch` (without building it: large workloads fit)."""
    workload.check(config)
    b, s, rows, t = workload.batch, workload.prompt_len, workload.batch * workload.group_size, workload.completion_len
    i32, f32 = jnp.int32, jnp.float32
    sds = jax.ShapeDtypeStruct
    pixels = vision = None
    if workload.images:
        n = b * workload.images * workload.patches_per_image(config)
        units = n // config.vision.merge_unit
        pixels = sds((n, config.vision.patch_dim), f32)
        vision = vision_lib.VisionInputs(sds((units,), i32), sds((units,), i32), sds((n, 2), i32), sds((n,), i32),
                                         sds((n,), i32))
    inputs = model_lib.ModelInputs(sds((b, s), i32), sds((b, s), i32), sds((3, b, s), i32), sds((b, s), i32),
                                   pixels, vision, sds((b, 1), i32))
    return {"prompt": inputs, "completions": sds((rows, t), i32), "completion_mask": sds((rows, t), i32),
            "source_id": sds((rows,), i32), "rewards": sds((rows, 1), f32), "old_logprobs": sds((rows, t), f32)}


def with_batch_shardings(shapes: Any, mesh, rules=None, batch_axes: Any = POLICY_BATCH_AXES) -> Any:
    """ShapeDtypeStructs placed as `parallel.shard_batch` would place the real batch."""

    def place(axis, subtree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(
            mesh, parallel.batch_spec(len(x.shape), axis, mesh, rules))), subtree)

    return jax.tree.map(place, batch_axes, shapes, is_leaf=lambda x: x is None)


# ----------------------------------------------------------------------------- sizes
def _itemsize(dtype) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8  # threefry: two uint32 words
    return np.dtype(dtype).itemsize


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of the (abstract or concrete) sharded arrays of ``tree``.

    Uses the largest shard (shards are even when the mesh divides the dimensions).
    """
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * _itemsize(x.dtype)
    return total


def kv_cache_bytes_per_device(config: config_lib.Qwen2_5_VLConfig, workload: Workload, mesh, dtype,
                              rules=None) -> int:
    """k and v as `sampling.generate` holds them: the prompt's cache once per prompt (shared by
    its G samples as a prefix) and each of the B*G samples' completion slots."""

    def cache_bytes(rows: int, length: int) -> int:
        shape = text_lib.kv_cache_shape(config.text, rows, length)
        spec = parallel.logical_to_spec(text_lib.KV_CACHE_AXES, shape, mesh, rules, strict=False)
        shard = jax.sharding.NamedSharding(mesh, spec).shard_shape(shape)
        return 2 * math.prod(shard) * np.dtype(dtype).itemsize

    return (cache_bytes(workload.batch, workload.prompt_len)
            + cache_bytes(workload.batch * workload.group_size, workload.completion_len))


# ----------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device. step_peak = arguments + outputs - aliased (donated) + temporaries.

    The temporaries include the float32 gradients and the optimizer update's intermediates
    (about 3 x the float32 parameter bytes with AdamW), not only activations.
    """

    params: int
    opt_state: int
    batch: int
    temporaries: int
    arguments: int
    outputs: int
    aliased: int
    code: int
    kv_cache: int
    compile_seconds: float

    @property
    def step_peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def generation_peak(self) -> int:
        """The train state stays on the device while the sampler runs: params + optimizer + KV cache."""
        return self.params + self.opt_state + self.kv_cache


def abstract_train_state(model_config, mesh, precision: precision_lib.PrecisionConfig, optimizer, rules=None):
    """(graphdef, train state of ShapeDtypeStructs carrying their shardings)."""
    from recap_jax.train_state import TrainState

    kwargs = precision.model_kwargs()
    graphdef, params = nnx.split(nnx.eval_shape(
        lambda: model_lib.Qwen2_5_VLForConditionalGeneration(model_config, rngs=nnx.Rngs(0), **kwargs)))
    state = jax.eval_shape(lambda p: TrainState.create(p, optimizer, jax.random.key(0)), params)
    shardings = parallel.tree_shardings(state, mesh, rules)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    return graphdef, state


def plan_memory(model_config: config_lib.Qwen2_5_VLConfig, mesh, workload: Workload,
                precision: precision_lib.PrecisionConfig = precision_lib.PrecisionConfig(), *, rules=None,
                learning_rate: float = 1e-6, logits_chunk: int = 0) -> MemoryPlan:
    """Compiles the GRPO train step for abstract inputs and reads its memory use per device
    (``logits_chunk``: `sampling.completion_logprobs`'s)."""
    from recap_jax.grpo import GRPOConfig
    from recap_jax.train_state import make_optimizer
    from recap_jax.train_step import make_train_step

    workload.check(model_config)
    optimizer = precision.wrap_optimizer(make_optimizer(learning_rate, total_updates=1000))
    graphdef, state = abstract_train_state(model_config, mesh, precision, optimizer, rules)
    batch = with_batch_shardings(batch_shapes(model_config, workload), mesh, rules)
    parallel.check_divisible(batch, "batch")  # before compiling: --batch / --group-size vs the mesh
    weights = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    step = make_train_step(GRPOConfig(group_size=workload.group_size),
                           sampling.make_logprob_fn(graphdef, workload.group_size, logits_chunk), optimizer)
    start = time.perf_counter()
    with parallel.use_mesh(mesh, rules):
        compiled = step.lower(state, batch, weights).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    kv = kv_cache_bytes_per_device(model_config, workload, mesh, precision.model_kwargs()["dtype"], rules)
    return MemoryPlan(params=bytes_per_device(state.params), opt_state=bytes_per_device(state.opt_state),
                      batch=bytes_per_device(batch), temporaries=int(stats.temp_size_in_bytes),
                      arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
                      aliased=int(stats.alias_size_in_bytes), code=int(stats.generated_code_size_in_bytes),
                      kv_cache=kv, compile_seconds=seconds)


def format_plan(plan: MemoryPlan, device_memory_gib: float, title: str = "") -> str:
    """The printed report: one line per category and a fits / does not fit verdict."""
    def gib(n: int) -> str:
        return f"{n / GIB:9.3f} GiB" if n >= GIB // 10 else f"{n / 2 ** 20:9.3f} MiB"

    limit = device_memory_gib * GIB
    lines = [title] if title else []
    lines += [
        f"  parameters                 {gib(plan.params)}",
        f"  optimizer state            {gib(plan.opt_state)}",
        f"  batch                      {gib(plan.batch)}",
        f"  activations / temporaries  {gib(plan.temporaries)}   (XLA temp buffers of the compiled step)",
        f"  train step peak            {gib(plan.step_peak)}   (arguments + outputs - donated + temporaries)",
        f"  generation KV cache        {gib(plan.kv_cache)}",
        f"  generation peak            {gib(plan.generation_peak)}   (parameters + optimizer state + KV cache)",
        f"  (compiled in {plan.compile_seconds:.1f} s)",
    ]
    worst = max(plan.step_peak, plan.generation_peak)
    verdict = "fits" if worst <= limit else "does not fit"
    lines.append(f"{verdict} in {device_memory_gib:g} GiB per device "
                 f"(largest: {worst / GIB:.2f} GiB, {100 * worst / limit:.0f}% of the device)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def _model_config(name: str) -> config_lib.Qwen2_5_VLConfig:
    if name in config_lib.PRESETS:
        return config_lib.PRESETS[name]()
    if os.path.exists(name):
        return config_lib.Qwen2_5_VLConfig.from_json_file(name)
    raise SystemExit(f"--config: {name!r} is neither a preset ({', '.join(config_lib.PRESETS)}) nor a config.json "
                     "file or checkpoint directory")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    w = Workload()
    p = argparse.ArgumentParser(prog="python -m recap_jax.tools.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="7b", help="preset (3b, 7b, tiny) or a config.json / checkpoint directory")
    p.add_argument("--mesh", default="fsdp=-1", help="axis sizes, e.g. 'fsdp=8' or 'data=2,fsdp=2,tensor=2'")
    p.add_argument("--batch", type=int, default=w.batch, help="prompts per train step (B)")
    p.add_argument("--group-size", type=int, default=w.group_size, help="completions per prompt (G)")
    p.add_argument("--prompt-len", type=int, default=w.prompt_len, help="padded prompt tokens, images included")
    p.add_argument("--completion-len", type=int, default=w.completion_len, help="padded completion tokens (T)")
    p.add_argument("--images", type=int, default=w.images, help="images per prompt")
    p.add_argument("--image-size", type=int, default=w.image_size, help="image side in pixels (multiple of 28)")
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--remat", default="full", choices=["none", "full", "save_dots"])
    p.add_argument("--logits-chunk", type=int, default=0,
                   help="completion positions per chunk of the output projection (0 = all at once)")
    p.add_argument("--device-memory-gib", type=float, default=80.0, help="memory of one device (H100: 80)")
    p.add_argument("--simulate-devices", type=int, default=None,
                   help="use this many simulated CPU devices (must come before JAX starts its backend)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> MemoryPlan:
    args = parse_args(argv)
    if args.simulate_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.simulate_devices)
    model_config = _model_config(args.config)
    mesh_config = parallel.parse_mesh_spec(args.mesh)
    try:
        mesh = parallel.make_mesh(mesh_config)
    except parallel.MeshConfigError as e:
        raise SystemExit(f"{e}\n(on CPU, simulate devices with --simulate-devices N)") from None
    workload = Workload(args.batch, args.group_size, args.prompt_len, args.completion_len, args.images,
                        args.image_size)
    precision = precision_lib.PrecisionConfig(args.param_dtype, args.compute_dtype, args.remat)
    try:
        plan = plan_memory(model_config, mesh, workload, precision, logits_chunk=args.logits_chunk)
    except (parallel.ShardingError, ValueError) as e:
        raise SystemExit(f"{e}\n(--batch prompts and --batch x --group-size completions must split evenly over "
                         "data x fsdp)" if "batch" in str(e).split(":")[0] else str(e)) from None
    title = (f"{args.config}: mesh {dict(mesh.shape)} on {len(mesh.devices.flat)} {jax.devices()[0].platform} "
             f"devices; B={workload.batch} x G={workload.group_size}, prompt {workload.prompt_len} + completion "
             f"{workload.completion_len} tokens, {workload.images} image(s) of {workload.image_size}px; params "
             f"{args.param_dtype}, compute {args.compute_dtype}, remat {args.remat}, logits chunk "
             f"{args.logits_chunk or 'none'}. Bytes per device:")
    print(format_plan(plan, args.device_memory_gib, title))
    return plan


if __name__ == "__main__":
    main(sys.argv[1:])
