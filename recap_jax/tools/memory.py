"""Memory plan of a GRPO train step on a device mesh, compiled on abstract inputs.

    # a run config: the plan of that run (before downloading: model.preset or the file name's size)
    python -m recap_jax.tools.memory --config configs/hybrid_7b.py --mesh fsdp=8 --simulate-devices 8
    python -m recap_jax.tools.memory --config configs/hybrid_7b.py --config.model.path=/models/Qwen2.5-VL-7B \\
        --config.model.logits_chunk=256 --mesh fsdp=8 --simulate-devices 8
    # a preset (or config.json) with the workload as flags
    python -m recap_jax.tools.memory --config 7b --mesh fsdp=8 --batch 8 --group-size 8 \\
        --prompt-len 1024 --completion-len 1024 --images 1 --image-size 448 --remat full \\
        --device-memory-gib 80 --simulate-devices 8

With a run config (configs/*.py, ``--config.<field>=<value>`` overrides as in train) every stage
of the run is planned with its own train step (`plan_run_memory`: the stage's loss config,
optimizer with the float32 master copy and accumulation, RECAP inside the step, the reference
policy of a KL term, logits chunk, dtypes, remat) on the batch it feeds: B = prompts per step,
G, prompts padded to the largest prompt bucket, completions of rl.max_new_tokens, one image per
prompt (``--images N`` for sources with multi-image records) of the largest square under
tokenizer.max_pixels that fits the prompt and patch buckets (`stage_workload`). The preset flags
describe a one-stage GRPO run (`preset_run_config`) planned the same way. Any bad argument ends
the program with one line on stderr (exit status 2), never a traceback.

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
import logging
import math
import os
import re
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from recap_jax import lora as lora_lib
from recap_jax import parallel, sampling
from recap_jax import precision as precision_lib
from recap_jax.freeze import param_path
from recap_jax.models.qwen2_5_vl import config as config_lib
from recap_jax.models.qwen2_5_vl import model as model_lib
from recap_jax.tools.workload import (  # noqa: F401 - names of this module's API
    POLICY_BATCH_AXES,
    POLICY_BATCH_AXES_TRUNCATED,
    Workload,
    _itemsize,
    batch_shapes,
    bytes_per_device,
    example_batch,
    kv_cache_bytes_per_device,
    with_batch_shardings,
)

GIB = 2 ** 30

_log = logging.getLogger(__name__)


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
    reference: int = 0  # the frozen reference policy's params (a KL term: lwf)
    adapters: int = 0  # LoRA: the adapters' share of ``params`` (the rest is the frozen base)
    lora_merged: int = 0  # LoRA: the targeted kernels merged (W + s A B) for the sampler

    @property
    def step_peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def generation_peak(self) -> int:
        """The train state stays on the device while the sampler runs: params + optimizer (+ the
        reference policy) (+ LoRA's merged copy of the targeted kernels) + KV cache."""
        return self.params + self.opt_state + self.reference + self.lora_merged + self.kv_cache


def abstract_train_state(model_config, mesh, precision: precision_lib.PrecisionConfig, optimizer, rules=None, *,
                         recap_state: Any = None, strict: bool = True, lora: lora_lib.LoraConfig | None = None):
    """(graphdef, train state of ShapeDtypeStructs carrying their shardings); ``strict=False``
    replicates what the mesh does not divide, as `parallel.create_sharded` in train does.
    ``lora``: params are {"base": the model's, "adapters": A, B} (``optimizer`` is then the
    adapters-only one of the run plan)."""
    from recap_jax.train_state import TrainState

    kwargs = precision.model_kwargs()
    graphdef, params = nnx.split(nnx.eval_shape(
        lambda: model_lib.Qwen2_5_VLForConditionalGeneration(model_config, rngs=nnx.Rngs(0), **kwargs)))
    if lora is not None:
        params = {"base": params,
                  "adapters": jax.eval_shape(lambda: lora_lib.init_adapters(params, lora, jax.random.key(0)))}
    state = jax.eval_shape(lambda p: TrainState.create(p, optimizer, jax.random.key(0), recap_state), params)
    shardings = parallel.tree_shardings(state, mesh, rules, strict=strict)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    return graphdef, state


def plan_memory(model_config: config_lib.Qwen2_5_VLConfig, mesh, workload: Workload,
                precision: precision_lib.PrecisionConfig = precision_lib.PrecisionConfig(), *, rules=None,
                learning_rate: float = 1e-6, logits_chunk: int = 0) -> MemoryPlan:
    """Compiles the GRPO train step for abstract inputs and reads its memory use per device
    (``logits_chunk``: `sampling.completion_logprobs`'s)."""
    from recap_jax.grpo import GRPOConfig
    from recap_jax.train_state import make_optimizer

    workload.check(model_config)
    optimizer = precision.wrap_optimizer(make_optimizer(learning_rate, total_updates=1000))
    weights = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    return compile_step_plan(model_config, mesh, workload, precision, GRPOConfig(group_size=workload.group_size),
                             optimizer, rules=rules, logits_chunk=logits_chunk, weights=weights)


def compile_step_plan(model_config: config_lib.Qwen2_5_VLConfig, mesh, workload: Workload,
                      precision: precision_lib.PrecisionConfig, grpo_config, optimizer, *, rules=None,
                      logits_chunk: int = 0, recap=None, recap_state: Any = None, reference: bool = False,
                      measure_lambda_effect: bool = False, weights: Any = None,
                      strict: bool = True, lora: lora_lib.LoraConfig | None = None) -> MemoryPlan:
    """The memory plan of `train_step.make_train_step` with exactly these settings (the loss
    config, optimizer, RECAP config and state, reference policy, logits chunk, LoRA adapters on
    a frozen base), compiled for abstract inputs of ``workload``'s sizes on ``mesh``. With
    ``lora.dropout`` > 0 the step compiled is the x W + s (dropout(x) A) B one (masks and
    masked inputs in its temporaries, no merged kernel copy), as the run compiles it."""
    from recap_jax.train_step import make_train_step

    workload.check(model_config)
    graphdef, state = abstract_train_state(model_config, mesh, precision, optimizer, rules,
                                           recap_state=recap_state, strict=strict, lora=lora)
    truncated = grpo_config.mask_truncated_completions
    batch = with_batch_shardings(
        batch_shapes(model_config, workload, reward_columns=grpo_config.num_reward_columns, truncated=truncated),
        mesh, rules, POLICY_BATCH_AXES_TRUNCATED if truncated else POLICY_BATCH_AXES)
    parallel.check_divisible(batch, "batch")  # before compiling: --batch / --group-size vs the mesh
    reference_params = state.params if reference else None
    logprob_fn = sampling.make_logprob_fn(graphdef, workload.group_size, logits_chunk)
    if lora is not None:
        logprob_fn = lora_lib.wrap_logprob_fn(logprob_fn, lora, precision.model_kwargs()["dtype"])
    step = make_train_step(grpo_config, logprob_fn, optimizer, recap=recap,
                           measure_lambda_effect=measure_lambda_effect,
                           frozen_key="base" if lora is not None else None,
                           logprob_rng=lora is not None and lora.dropout > 0)
    start = time.perf_counter()
    with parallel.use_mesh(mesh, rules):
        compiled = step.lower(state, batch, weights, reference_params).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    kv = kv_cache_bytes_per_device(model_config, workload, mesh, precision.model_kwargs()["dtype"], rules)
    return MemoryPlan(params=bytes_per_device(state.params), opt_state=bytes_per_device(state.opt_state),
                      batch=bytes_per_device(batch), temporaries=int(stats.temp_size_in_bytes),
                      arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
                      aliased=int(stats.alias_size_in_bytes), code=int(stats.generated_code_size_in_bytes),
                      kv_cache=kv, compile_seconds=seconds,
                      reference=bytes_per_device(reference_params) if reference else 0,
                      **(_lora_bytes(state.params, lora) if lora is not None else {}))


def _lora_bytes(params: dict, lora: lora_lib.LoraConfig) -> dict[str, int]:
    """Per device: the adapters, and the targeted base kernels (sharded as the base, in its
    dtype): the size of the merged copy the sampler reads (`lora_run.policy_params`)."""
    targets = lora_lib.target_kernels(params["base"], lora)
    targeted = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params["base"])
                if re.sub(r"/value$", "", param_path(path)) in targets]
    return {"adapters": bytes_per_device(params["adapters"]), "lora_merged": bytes_per_device(targeted)}


def format_plan(plan: MemoryPlan, device_memory_gib: float, title: str = "") -> str:
    """The printed report: one line per category and a fits / does not fit verdict."""
    def gib(n: int) -> str:
        return f"{n / GIB:9.3f} GiB" if n >= GIB // 10 else f"{n / 2 ** 20:9.3f} MiB"

    limit = device_memory_gib * GIB
    lines = [title] if title else []
    lora = [f"  of which LoRA adapters     {gib(plan.adapters)}   (trained; the base is frozen: no "
            "gradient or optimizer state)"] if plan.adapters else []
    lines += [f"  parameters                 {gib(plan.params)}", *lora,
              f"  optimizer state            {gib(plan.opt_state)}"]
    if plan.adapters:
        lines.append(f"  LoRA merged kernels        {gib(plan.lora_merged)}   (W + s A B, what the sampler reads)")
    if plan.reference:
        lines.append(f"  reference policy           {gib(plan.reference)}   (frozen params of the KL term)")
    lines += [
        f"  batch                      {gib(plan.batch)}",
        f"  activations / temporaries  {gib(plan.temporaries)}   (XLA temp buffers of the compiled step)",
        f"  train step peak            {gib(plan.step_peak)}   (arguments + outputs - donated + temporaries)",
        f"  generation KV cache        {gib(plan.kv_cache)}",
        f"  generation peak            {gib(plan.generation_peak)}   (parameters + optimizer state"
        f"{' + reference' if plan.reference else ''}{' + merged kernels' if plan.adapters else ''} + KV cache)",
        f"  (compiled in {plan.compile_seconds:.1f} s)",
    ]
    worst = max(plan.step_peak, plan.generation_peak)
    verdict = "fits" if worst <= limit else "does not fit"
    lines.append(f"{verdict} in {device_memory_gib:g} GiB per device "
                 f"(largest: {worst / GIB:.2f} GiB, {100 * worst / limit:.0f}% of the device)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a run's plan
def image_side(max_pixels: int, unit: int) -> int:
    """The side of the largest square image the processor keeps whole under ``max_pixels``:
    a multiple of ``unit`` (patch_size x merge_size) px, at least one unit."""
    return max(unit, int(math.isqrt(max_pixels) // unit) * unit)


def stage_workload(run_plan, stage, model_config: config_lib.Qwen2_5_VLConfig, images: int = 1) -> Workload:
    """The largest batch a stage of ``run_plan`` feeds its train step: B prompts (RL:
    prompts_per_step, SFT: batch_size), G rows each, prompts padded to the largest prompt bucket,
    completions of rl.max_new_tokens (SFT: the largest answer bucket), ``images`` per prompt (1:
    the paper's sources hold one; more for multi-image records, docs/multimodal_records.md), each
    the largest square under tokenizer.max_pixels, shrunk while the prompt's patches exceed the
    largest patch bucket (the replay skips such records) or its tokens would not fit the prompt."""
    prompt_len = max(run_plan.data.prompt_buckets)
    completion_len = stage.max_new_tokens if stage.is_rl else max(run_plan.data.answer_buckets)
    unit = model_config.vision.patch_size * model_config.vision.spatial_merge_size
    side = image_side(run_plan.tokenizer.max_pixels, unit)
    workload = Workload(stage.replay.batch_size, stage.grpo.group_size, prompt_len, completion_len, images, side)
    max_patches = max(run_plan.data.patch_buckets)
    while side > unit and (images * (workload.tokens_per_image(model_config) + 2) + 1 > prompt_len
                           or images * workload.patches_per_image(model_config) > max_patches):
        side -= unit
        workload = dataclasses.replace(workload, image_size=side)
    return workload


def plan_stage_memory(run_plan, stage, mesh, model_config: config_lib.Qwen2_5_VLConfig, workload: Workload,
                      rules=None) -> MemoryPlan:
    """The memory plan of ``stage``'s own train step (its loss config, optimizer with the master
    copy and accumulation, RECAP inside the step, reference policy, lambda-effect pass) on ``mesh``."""
    from recap_jax import recap as recap_lib

    recap_state = (recap_lib.init(stage.recap, stage.objectives.num_objectives) if stage.recap is not None
                   else None)
    return compile_step_plan(model_config, mesh, workload, run_plan.model.precision, stage.grpo, stage.optimizer,
                             rules=rules, logits_chunk=run_plan.model.logits_chunk, recap=stage.recap,
                             recap_state=recap_state, reference=stage.reference,
                             measure_lambda_effect=stage.log_lambda_effect, strict=False,
                             lora=run_plan.model.lora)


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """One stage's workload and the memory plan of its compiled step."""

    stage: str
    workload: Workload
    plan: MemoryPlan

    def describe(self) -> str:
        w = self.workload
        return (f"[{self.stage}] B={w.batch} prompts x G={w.group_size}, prompt {w.prompt_len} + completion "
                f"{w.completion_len} tokens, {w.images} image(s) of {w.image_size}x{w.image_size} px per prompt")


@dataclasses.dataclass(frozen=True)
class RunMemoryReport:
    """The memory plan of every stage of a run, per device; printable with `table`."""

    title: str
    stages: tuple[StageMemory, ...]
    notes: tuple[str, ...] = ()

    @property
    def largest(self) -> MemoryPlan:
        """The plan of the stage with the largest peak."""
        return max((s.plan for s in self.stages), key=lambda p: max(p.step_peak, p.generation_peak))

    @property
    def peak_bytes(self) -> int:
        """The largest of every stage's train-step and generation peaks, per device."""
        return max(max(s.plan.step_peak, s.plan.generation_peak) for s in self.stages)

    def fits(self, device_memory_gib: float) -> bool:
        return self.peak_bytes <= device_memory_gib * GIB

    def verdict(self, device_memory_gib: float) -> str:
        """The "fits / does not fit in N GiB" line."""
        worst = self.peak_bytes
        limit = device_memory_gib * GIB
        return (f"{'fits' if worst <= limit else 'does not fit'} in {device_memory_gib:g} GiB per device "
                f"(largest: {worst / GIB:.2f} GiB, {100 * worst / limit:.0f}% of the device)")

    def table(self, device_memory_gib: float) -> str:
        lines = [self.title] + [f"note: {n}" for n in self.notes]
        for stage in self.stages:
            lines += [stage.describe(), format_plan(stage.plan, device_memory_gib).rsplit("\n", 1)[0]]
        return "\n".join(lines + [self.verdict(device_memory_gib)])

    def __str__(self) -> str:
        return self.table(80.0)


def plan_run_memory(run_plan, mesh, *, model_config: config_lib.Qwen2_5_VLConfig | None = None,
                    workloads: dict[str, Workload] | None = None, rules=None,
                    notes: Sequence[str] = (), images: int = 1) -> RunMemoryReport:
    """The per-device memory plan of every stage of ``run_plan`` (a `recap_jax.plan.RunPlan`) on
    ``mesh``, each from its real train step compiled for abstract inputs (nothing is allocated).

    model_config: the model's dimensions (default: `policy.build_model_config(run_plan.model)`:
      model.path's config.json, the preset, or the tiny model's sizes).
    workloads: per stage name, sizes replacing `stage_workload`'s.
    images: images per prompt in `stage_workload` (sources with multi-image records).
    """
    from recap_jax import policy

    model_config = model_config or policy.build_model_config(run_plan.model)
    stages = []
    for stage in run_plan.stages:
        workload = (workloads or {}).get(stage.name) or stage_workload(run_plan, stage, model_config, images)
        stages.append(StageMemory(stage.name, workload,
                                  plan_stage_memory(run_plan, stage, mesh, model_config, workload, rules)))
    if not stages:
        raise ValueError("the run has no stage to plan (sft.steps and rl.steps are both 0)")
    m = run_plan.model
    text = model_config.text
    title = (f"mesh {dict(mesh.shape)} on {mesh.devices.size} {mesh.devices.flat[0].platform} devices; model "
             f"{text.num_hidden_layers} layers x {text.hidden_size} (vocab {text.vocab_size}); params "
             f"{m.param_dtype}, compute {m.compute_dtype}, remat {m.remat}, logits chunk {m.logits_chunk or 'none'}. "
             "Bytes per device:")
    return RunMemoryReport(title, tuple(stages), tuple(notes))


class MemoryPlanError(RuntimeError):
    """The run's memory plan does not fit the device (raised by `preflight`)."""


def device_memory_gib(device=None) -> float | None:
    """The memory one accelerator lets JAX use (``memory_stats()["bytes_limit"]``) in GiB; None on
    a CPU or where the backend does not say."""
    device = device or jax.local_devices()[0]
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    return limit / GIB if limit else None


def preflight(run_plan, mesh, *, ignore: bool = False, model_config=None, device_gib: float | None = None,
              field: str = "run.ignore_memory_plan", echo=print) -> RunMemoryReport | None:
    """The memory plan a run prints at its start on accelerators: compiled for ``mesh`` (None: one
    device, as a run without mesh.spec), printed
    with ``echo`` (process 0 only), and MemoryPlanError when it does not fit ``device_gib``
    (default: the device's own limit) unless ``ignore``. None on a CPU (nothing to plan against)."""
    device_gib = device_gib if device_gib is not None else device_memory_gib()
    if device_gib is None:
        return None
    mesh = mesh if mesh is not None else mesh_of(run_plan)  # a run without a mesh: one device
    report = plan_run_memory(run_plan, mesh, model_config=model_config)
    if jax.process_index() == 0:
        echo(report.table(device_gib))
    if not report.fits(device_gib):
        message = (f"the run's memory plan does not fit: {report.verdict(device_gib)}. Lower rl.prompts_per_step "
                   "or rl.max_new_tokens, set model.logits_chunk or model.remat, or use a larger mesh; "
                   f"--config.{field}=True starts anyway")
        if not ignore:
            raise MemoryPlanError(message)
        _log.warning("%s (ignored)", message)
    return report


# ----------------------------------------------------------------------------- command line
class UsageError(Exception):
    """A bad argument: printed as one line, never a traceback."""


def _model_config(name: str) -> config_lib.Qwen2_5_VLConfig:
    if name in config_lib.PRESETS:
        return config_lib.PRESETS[name]()
    if os.path.exists(name):
        return config_lib.Qwen2_5_VLConfig.from_json_file(name)
    raise UsageError(f"--config: {name!r} is neither a preset ({', '.join(config_lib.PRESETS)}), a config.json file "
                     "or checkpoint directory, nor a configs/*.py run config")


def is_run_config(name: str) -> bool:
    """Whether ``--config`` names an ml_collections run config (configs/x.py, or x.py:arg)."""
    return name.split(":", 1)[0].endswith(".py")


def load_run_config(path: str, overrides: Sequence[str] = ()):
    """The ConfigDict of ``path`` (a configs/*.py file, as train's --config) with ``--config.x=y``
    overrides applied by ml_collections' own flag parser (typed like the field they replace)."""
    from absl import flags
    from ml_collections import config_flags

    if not os.path.isfile(path.split(":", 1)[0]):
        raise UsageError(f"--config {path}: no such file")
    argv = ["memory", f"--config={path}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "a configs/*.py run config", flag_values=values,
                                    lock_config=False, sys_argv=argv)  # overrides are read from sys_argv
    try:
        values(argv)
        return values.config
    except flags.Error as error:
        raise UsageError(f"--config {path}: {str(error).splitlines()[0]}") from None
    except (AttributeError, KeyError) as error:
        raise UsageError(f"--config {path}: an override names a field the config does not have ({error}); "
                         f"overrides: {' '.join(overrides)}") from None
    except (OSError, SyntaxError, ImportError, ValueError, TypeError) as error:
        raise UsageError(f"--config {path}: cannot load it ({type(error).__name__}: {error})") from None


_PRESET_IN_NAME = re.compile(r"(?:^|[_\-/])(3b|7b)(?:[_\-.]|$)", re.IGNORECASE)


def planning_config(config, source: str, mesh_spec: str | None) -> tuple[Any, list[str]]:
    """``config`` made plannable before anything is downloaded, and notes saying what changed:
    ``mesh_spec`` (if given) replaces mesh.spec; a multi-host mesh is planned on this process's
    (simulated) devices; a run that needs model.path but has none is planned with model.preset's
    dimensions (3b / 7b; when the preset is left at "tiny", the size in the config's file name); data
    files are not needed."""
    notes = []
    config = config.copy_and_resolve_references()
    if mesh_spec:
        config.mesh.spec = mesh_spec
    if config.mesh.distributed:
        config.mesh.distributed = False
        notes.append("mesh.distributed: planned on this process's devices (the mesh spec is the same)")
    model = config.model
    if not model.path and model.require_path:
        preset = model.preset
        if preset == "tiny":
            found = _PRESET_IN_NAME.search(os.path.basename(source.split(":", 1)[0]))
            if found is None:
                raise UsageError(f"--config {source}: model.path is empty; pass --config.model.path=DIR (its "
                                 "config.json is read) or --config.model.preset=3b|7b to plan before downloading")
            preset = found.group(1).lower()
            notes.append(f"model.path is empty: planned with the {preset} preset's dimensions (from the file name "
                         f"{os.path.basename(source)}; set --config.model.preset or --config.model.path to choose)")
        else:
            notes.append(f"model.path is empty: planned with model.preset={preset}'s dimensions")
        model.update(preset=preset, require_path=False)
    if not model.path and model.preset != "tiny" and not config.tokenizer.path:
        config.tokenizer.path = "(not read when planning)"
    empty = [name for name, source in config.data.sources.items()
             if source.kind != "synthetic" and not source.train.strip()]
    for name in empty:
        config.data.sources[name].train = "(not read when planning)"
    if empty:
        notes.append(f"data.sources.{{{','.join(sorted(empty))}}}.train are empty: the data is not read when "
                     "planning (the workload comes from the buckets, max_new_tokens and max_pixels)")
    return config, notes


# field of the run config -> the flag it comes from (preset mode's errors name what the user typed)
_FLAG_OF_FIELD = {"config.rl.prompts_per_step": "--batch", "config.sft.batch_size": "--batch",
                  "config.eval.batch_size": "--batch", "config.rl.group_size": "--group-size",
                  "config.rl.max_new_tokens": "--completion-len", "config.data.prompt_buckets": "--prompt-len",
                  "config.model.logits_chunk": "--logits-chunk", "config.mesh.spec": "--mesh"}


def preset_run_config(args: argparse.Namespace):
    """The run config the preset flags describe: one RL stage (reasoning_only GRPO on one
    verifiable-reward source) with B = --batch prompts x G = --group-size, prompts of
    --prompt-len tokens, completions of --completion-len, the model from --config."""
    from recap_jax.run_config import base_config, source_config

    c = base_config()
    if args.config in ("3b", "7b"):
        c.model.preset = args.config
        c.tokenizer.path = "(not read when planning)"
    elif args.config != "tiny":
        _model_config(args.config)  # a clear error for a path that is not a config.json
        c.model.path = args.config
    c.model.update(param_dtype=args.param_dtype, compute_dtype=args.compute_dtype, remat=args.remat,
                   logits_chunk=args.logits_chunk)
    c.mesh.spec = args.mesh
    c.data.sources = {"reasoning": source_config("synthetic")}
    c.data.primary = "reasoning"
    c.data.prompt_buckets = (args.prompt_len,)
    c.sft.update(steps=0, batch_size=args.batch)
    c.eval.batch_size = args.batch
    c.rl.update(steps=1000, method="reasoning_only", prompts_per_step=args.batch, group_size=args.group_size,
                max_new_tokens=args.completion_len)
    return c


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit status 2), without the usage block."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(flags, the ``--config.x=y`` overrides of a run config)."""
    w = Workload()
    p = _Parser(prog="python -m recap_jax.tools.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="7b", help="a configs/*.py run config (with --config.x=y overrides), or a "
                   "preset (3b, 7b, tiny) or config.json / checkpoint directory with the workload flags below")
    p.add_argument("--mesh", default=None, help="axis sizes, e.g. 'fsdp=8' or 'data=2,fsdp=2,tensor=2' (default: "
                   "the run config's mesh.spec, or fsdp=-1)")
    p.add_argument("--batch", type=int, default=w.batch, help="prompts per train step (B)")
    p.add_argument("--group-size", type=int, default=w.group_size, help="completions per prompt (G)")
    p.add_argument("--prompt-len", type=int, default=w.prompt_len, help="padded prompt tokens, images included")
    p.add_argument("--completion-len", type=int, default=w.completion_len, help="padded completion tokens (T)")
    p.add_argument("--images", type=int, default=w.images,
                   help="images per prompt (with --config too: sources with multi-image records)")
    p.add_argument("--image-size", type=int, default=w.image_size, help="image side in pixels (multiple of 28)")
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--remat", default="full", choices=["none", "full", "save_dots"])
    p.add_argument("--logits-chunk", type=int, default=0,
                   help="completion positions per chunk of the output projection (0 = all at once)")
    p.add_argument("--device-memory-gib", type=float, default=80.0, help="memory of one device (H100: 80)")
    p.add_argument("--simulate-devices", type=int, default=None,
                   help="use this many simulated CPU devices (must come before JAX starts its backend)")
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest and not is_run_config(args.config):
        p.error(f"{rest[0]}: --config.<field> overrides need a configs/*.py run config as --config")
    workload_flags = [f"--{n.replace('_', '-')}" for n in ("batch", "group_size", "prompt_len", "completion_len",
                                                          "image_size", "param_dtype", "compute_dtype",
                                                          "remat", "logits_chunk")
                      if getattr(args, n) != p.get_default(n)]
    if is_run_config(args.config) and workload_flags:
        p.error(f"{', '.join(workload_flags)}: with a run config the workload comes from the config; override its "
                "fields instead (--config.rl.prompts_per_step=..., --config.model.remat=...)")
    return args, rest


def _renamed(message: str, preset_mode: bool) -> str:
    if preset_mode:
        for field, flag in _FLAG_OF_FIELD.items():
            message = message.replace(f"{field}=", f"{flag} ").replace(field, flag)
    return message


def mesh_of(run_plan):
    """The plan's mesh, or one device when the run has none."""
    if run_plan.mesh is None:
        return parallel.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    return parallel.make_mesh(run_plan.mesh)


def build_report(args: argparse.Namespace, overrides: Sequence[str]) -> RunMemoryReport:
    """The memory report the command line asks for (see `main`)."""
    from recap_jax import plan as plan_lib
    from recap_jax.run_config import ConfigError

    preset_mode = not is_run_config(args.config)
    notes: list[str] = []
    workloads = model_config = None
    try:
        if preset_mode:
            model_config = _model_config(args.config)
            config = preset_run_config(_with_mesh(args))
            workloads = {"rl": Workload(args.batch, args.group_size, args.prompt_len, args.completion_len,
                                        args.images, args.image_size)}
        else:
            config, notes = planning_config(load_run_config(args.config, overrides), args.config, args.mesh)
        run_plan = plan_lib.build_plan(config, check_paths=False)
        mesh = mesh_of(run_plan)
        if model_config is None:
            from recap_jax import policy

            model_config = policy.build_model_config(run_plan.model)
        return plan_run_memory(run_plan, mesh, model_config=model_config, workloads=workloads, notes=notes,
                               images=args.images)
    except config_lib.ConfigError as error:  # the model's config.json
        where = "--config" if preset_mode else "--config.model.path"
        raise UsageError(f"{where}: {error}") from None
    except (ConfigError, parallel.MeshConfigError) as error:
        hint = (" (on CPU, simulate devices with --simulate-devices N)"
                if "devices" in str(error) and not args.simulate_devices else "")
        raise UsageError(_renamed(str(error), preset_mode) + hint) from None
    except (parallel.ShardingError, ValueError) as error:
        if "batch" in str(error).split(":")[0]:
            raise UsageError(f"{error} (B prompts and B x G completions must split evenly over data x fsdp)") \
                from None
        raise UsageError(_renamed(str(error), preset_mode)) from None


def _with_mesh(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**dict(vars(args), mesh=args.mesh or "fsdp=-1"))


def main(argv: Sequence[str] | None = None) -> MemoryPlan:
    """Prints the memory table and the "fits / does not fit" line; returns the largest stage's
    plan. Any bad argument ends the program with a one-line message (exit status 2)."""
    args, overrides = parse_args(argv)
    if args.simulate_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.simulate_devices)
    try:
        report = build_report(args, overrides)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(report.table(args.device_memory_gib))
    return report.largest


if __name__ == "__main__":
    main(sys.argv[1:])
