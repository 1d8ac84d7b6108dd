"""One prepared accelerator benchmark: train-step MFU, prefill and decode speed (with the
decode's fraction of the HBM roofline), the same model in transformers + PyTorch as the ratio
reference, peak memory of each, and a check of the compiled programs for silent bf16 -> f32
matmul upcasts.

    python -m benchmarks.accelerator --out $OUT/accelerator.json          # GPU: 3B shape (+ 7B decoder)
    python -m benchmarks.accelerator --tiny --out /tmp/accelerator.json   # CPU: tiny shape, seconds

The model is random with Qwen2.5-VL-3B's real dimensions (`config.qwen2_5_vl_3b`), parameters
and compute in bf16. Sections, each timed after a warm-up call that compiles (compilation is
never in a timing), each in its own try/except (an error is recorded in the table and the
run goes on), skipped once ``--budget-s`` is spent:

* ``jax_train``: `train_step.make_train_step` with `sampling.make_logprob_fn` (GRPO, the
  prompt run once for its G completions). MFU = model FLOPs / (step time x peak), the model
  FLOPs from `benchmarks.mfu.train_flops` (shared prompt counted once, 3 x forward).
* ``jax_prefill``: the model's forward over the prompts (vision tower + decoder), tokens/s.
* ``jax_decode``: `sampling.generate_prepared` for N new tokens (no EOS); a decode step's time
  is (generate time - prefill time) / N; the HBM roofline of a step is (decoder + lm_head
  weight bytes + KV bytes of the prompt prefix and of the half-filled completion cache) /
  peak bandwidth, and the table gives the fraction of it reached.
* ``torch_train`` / ``torch_generate``: transformers' Qwen2_5_VLForConditionalGeneration
  (sdpa, bf16, the same dimensions, its own random weights) on the same device: a TRL-style
  forward + backward + AdamW on the same batch (prompt repeated per completion, logits at the
  completion positions), and ``generate`` with ``num_return_sequences=G``.
* ``vision_paths``: the vision tower alone over 16 images (448 px: 16,384 patches; tiny:
  4 images), forward under each attention implementation (``xla``; ``cudnn``, whose
  full-attention blocks take an N x N mask; ``pallas``, which takes segment ids: the Triton
  kernel on a GPU), its time and its program's peak bytes.
* ``decode_floor``: the decode step's matmuls alone (`decode_matmul_floor`): the fraction of
  the roofline XLA's matmuls reach at the decode's row count, the bound for ``jax_decode``.
* ``jax_decode_split``: ``jax_decode`` with the decoder weights copied out of their layer
  stack once before the loop (`sampling.SPLIT_DECODER_WEIGHTS`, the CPU default) instead of
  sliced per step: whether slicing inside the loop costs a GPU a copy of every weight per step.
* ``jax_train_save_dots``: the train step with remat "save_dots" (matmul outputs kept for
  the backward pass, not recomputed): more memory, fewer FLOPs per step than "full".
* ``jax_train_7b``: the train step with Qwen2.5-VL-7B's decoder (and vision tower), G = 4,
  where the device has the memory (not in --tiny mode).
* ``jax_train_pallas``: the 3B train step under ``--attention pallas`` (the Triton kernel on
  a GPU, segment ids, no mask), to set against ``jax_train``'s cuDNN.

Each section runs in its own interpreter (``--section``), so that its device memory is
returned when it ends (JAX's allocator keeps what it took; PyTorch then gets the whole device)
and a crash loses that section only. PyTorch trains with gradient checkpointing (as TRL /
EasyR1 train, and as our step's remat "full"); the reference is `benchmarks.accelerator_torch`,
the bf16 check `benchmarks.hlo_check`.

Peak figures by device name (`PEAKS`); a CPU has none ("n/a", MFU not computed) unless
--peak-tflops / --peak-gbs are given. The JSON written to --out holds every row.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory for PyTorch in the same run

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import accelerator_torch  # noqa: E402
from benchmarks.hlo_check import hlo_report  # noqa: E402
from benchmarks.mfu import train_flops  # noqa: E402
from recap_jax import grpo, sampling  # noqa: E402
from recap_jax.models.qwen2_5_vl import attention  # noqa: E402
from recap_jax.models.qwen2_5_vl import config as config_lib  # noqa: E402
from recap_jax.models.qwen2_5_vl import model as model_lib  # noqa: E402
from recap_jax.models.qwen2_5_vl import text as text_lib  # noqa: E402
from recap_jax.tools import memory  # noqa: E402
from recap_jax.train_state import TrainState, make_optimizer  # noqa: E402
from recap_jax.train_step import make_train_step  # noqa: E402

# device name substring -> (dense bf16 FLOP/s, HBM bytes/s), vendors' datasheets
PEAKS = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),
}


def log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------- peaks
def device_peaks(device, peak_tflops: float | None = None, peak_gbs: float | None = None) -> dict[str, Any]:
    """{"flops": FLOP/s or None, "bandwidth": bytes/s or None, "name": device kind, "source": ...}."""
    name = getattr(device, "device_kind", str(device))
    flops = bandwidth = None
    source = "n/a"
    for key, (f, b) in PEAKS.items():
        if key.lower() in name.lower():
            flops, bandwidth, source = f, b, f"datasheet ({key})"
            break
    if peak_tflops:
        flops, source = peak_tflops * 1e12, "given"
    if peak_gbs:
        bandwidth = peak_gbs * 1e9
    return {"name": name, "platform": device.platform, "flops": flops, "bandwidth": bandwidth, "source": source}


# ----------------------------------------------------------------------------- workloads
@dataclasses.dataclass(frozen=True)
class Shapes:
    """The benchmark's sizes: a train step's `memory.Workload` and the generation's."""

    train: memory.Workload
    gen_prompts: int
    gen_samples: int
    gen_prompt_len: int
    gen_image_size: int
    gen_new_tokens: int
    repeats: int


def shapes(tiny: bool) -> Shapes:
    if tiny:
        return Shapes(memory.Workload(2, 2, 48, 16, 1, 56), 2, 2, 48, 56, 8, 2)
    return Shapes(memory.Workload(2, 8, 1024, 512, 1, 448), 8, 8, 512, 448, 128, 3)


def model_config(tiny: bool, preset: str = "3b") -> config_lib.Qwen2_5_VLConfig:
    return config_lib.tiny(vocab_size=512) if tiny else config_lib.PRESETS[preset]()


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one untimed warm-up call (which compiles)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def jax_peak_bytes(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def compiled_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries - aliased bytes of one executable (its own peak)."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def param_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def decode_step_bytes(config: config_lib.Qwen2_5_VLConfig, rows: int, prompts: int, prompt_len: int,
                      new_tokens: int, itemsize: int = 2) -> int:
    """Fewest bytes one decode step reads: the decoder's weights and the output projection (the
    token embedding is gathered, a row per sequence) and the KV cache of the prompt prefix
    (once per prompt) and of the completions, half filled on average over the run."""
    t = config.text
    per_layer = (t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
                 + t.num_attention_heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
                 + 2 * t.hidden_size + (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim)
    weights = t.num_hidden_layers * per_layer + t.hidden_size * t.vocab_size + t.hidden_size
    kv_per_token = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim
    kv = kv_per_token * (prompts * prompt_len + rows * new_tokens / 2)
    return int((weights + kv) * itemsize)


# ----------------------------------------------------------------------------- JAX sections
def build_model(config, dtype=jnp.bfloat16, remat: str = "none"):
    model = model_lib.init_model(config, seed=0, dtype=dtype, param_dtype=dtype, remat=remat)
    return nnx.split(model)


# The train step keeps only each block's input for the backward pass (as the paper configs'
# model.remat="full", and as the PyTorch reference with gradient checkpointing): without it the
# 3B step's activations (16 rows x 1,536 tokens x 36 layers) take ~80 GiB.
TRAIN_REMAT = "full"


def jax_train(config, workload: memory.Workload, repeats: int, peaks: dict, with_hlo: bool,
              remat: str = TRAIN_REMAT) -> dict[str, Any]:
    graphdef, params = build_model(config, remat=remat)
    batch = jax.tree.map(jnp.asarray, memory.example_batch(config, workload))
    grpo_config = grpo.GRPOConfig(group_size=workload.group_size, reward_objective_index=((0,),),
                                  sft_objective_index=(-1,))
    optimizer = make_optimizer(1e-6, 100)
    step = make_train_step(grpo_config, sampling.make_logprob_fn(graphdef, workload.group_size), optimizer)
    weights = jnp.ones((1,), jnp.float32)
    holder = {"state": TrainState.create(params, optimizer, jax.random.key(0))}
    del params
    lowered = step.lower(holder["state"], batch, weights)
    compile_start = time.perf_counter()
    compiled = lowered.compile()
    row: dict[str, Any] = {"compile_s": time.perf_counter() - compile_start,
                           "peak_bytes_program": compiled_bytes(compiled)}
    if with_hlo:
        row["hlo"] = hlo_report(lowered, compiled)

    def run():
        holder["state"], metrics = compiled(holder["state"], batch, weights)
        holder.setdefault("first", metrics)  # the warm-up call's: the same across implementations
        return metrics

    seconds = median_time(run, repeats)
    row["first_step"] = {k: float(holder["first"][k]) for k in ("loss", "grad_norm")}
    flops = train_flops(config, workload)
    tokens = workload.batch * (workload.prompt_len + workload.group_size * workload.completion_len)
    row.update(step_s=seconds, model_flops=flops["total"], model_flops_vision=flops["vision"],
               model_flops_text=flops["text"], tokens_per_step=tokens, tokens_per_s=tokens / seconds,
               peak_flops=peaks["flops"],
               mfu=None if not peaks["flops"] else flops["total"] / (seconds * peaks["flops"]),
               param_bytes=param_bytes(holder["state"].params), attention=_used(), remat=remat)
    return row


VISION_IMPLEMENTATIONS = ("xla", "cudnn", "pallas")


def vision_paths(config, images: int, image_size: int, repeats: int) -> dict[str, Any]:
    """The vision tower's forward over ``images`` square images under each attention
    implementation: seconds, the program's peak bytes and what ran (each in its own guard)."""
    from recap_jax.models.qwen2_5_vl.vision import vision_inputs

    side = image_size // config.vision.patch_size
    grid = np.asarray([[1, side, side]] * images)
    patches = int(grid.prod(-1).sum())
    inputs = jax.tree.map(jnp.asarray, vision_inputs(grid, config.vision))
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(patches, config.vision.patch_dim)), jnp.bfloat16)
    graphdef, state = build_model(config)
    forward = lambda s, p, i: nnx.merge(graphdef, s).visual(p, i)  # noqa: E731
    rows: dict[str, Any] = {"images": images, "image_size": image_size, "patches": patches}

    def one(impl):
        attention.set_implementation(impl)
        before = attention.USED.copy()
        compiled = jax.jit(forward).lower(state, pixels, inputs).compile()
        used = _used(since=before)
        seconds = median_time(lambda: compiled(state, pixels, inputs), repeats)
        return {"forward_s": seconds, "peak_bytes_program": compiled_bytes(compiled), "attention": used}

    for impl in VISION_IMPLEMENTATIONS:
        rows[impl] = guarded(f"vision_paths:{impl}", lambda impl=impl: one(impl))
    return rows


def _used(since=None) -> dict[str, int]:
    """"use:implementation" -> traces, of what ran (since the ``since`` copy of attention.USED)."""
    used = attention.USED if since is None else attention.USED - since
    return {f"{use}:{impl}": n for (use, impl), n in used.items()}


def gen_inputs(config, shp: Shapes):
    workload = memory.Workload(shp.gen_prompts, shp.gen_samples, shp.gen_prompt_len, 1, 1, shp.gen_image_size)
    return memory.example_batch(config, workload)["prompt"]


def jax_generation(config, shp: Shapes, peaks: dict, with_hlo: bool) -> tuple[dict, dict]:
    """(prefill row, decode row) of the sampler on the generation workload."""
    graphdef, state = build_model(config)
    inputs = jax.tree.map(jnp.asarray, gen_inputs(config, shp))
    forward = jax.jit(lambda s, i: nnx.merge(graphdef, s).forward(i)[0])
    prefill_s = median_time(lambda: forward(state, inputs), shp.repeats)
    prompt_tokens = shp.gen_prompts * shp.gen_prompt_len
    prefill = {"prefill_s": prefill_s, "prompt_tokens": prompt_tokens, "tokens_per_s": prompt_tokens / prefill_s,
               "what": "forward over the prompts (vision tower + decoder), as a prefill"}

    params = sampling.SamplingParams(max_new_tokens=shp.gen_new_tokens, temperature=1.0, eos_token_id=(),
                                     num_samples=shp.gen_samples).validate()
    generate = sampling._generate_jit  # the jitted sampler behind generate_prepared
    lowered = generate.lower(graphdef, state, inputs, params, jax.random.key(0), sampling._split_weights_once())
    compiled = lowered.compile()
    decode: dict[str, Any] = {"peak_bytes_program": compiled_bytes(compiled)}
    if with_hlo:
        decode["hlo"] = hlo_report(lowered, compiled)
    total_s = median_time(lambda: sampling.generate_prepared(graphdef, state, inputs, params, jax.random.key(0)),
                          shp.repeats)
    rows = shp.gen_prompts * shp.gen_samples
    step_s = max(total_s - prefill_s, 1e-9) / shp.gen_new_tokens
    step_bytes = decode_step_bytes(config, rows, shp.gen_prompts, shp.gen_prompt_len, shp.gen_new_tokens)
    decode.update(generate_s=total_s, new_tokens=shp.gen_new_tokens, rows=rows, step_s=step_s,
                  tokens_per_s=rows / step_s, bytes_per_step=step_bytes, peak_bandwidth=peaks["bandwidth"],
                  roofline_fraction=None if not peaks["bandwidth"] else step_bytes / step_s / peaks["bandwidth"],
                  attention=_used())
    return prefill, decode


def decode_matmul_floor(config, rows: int, steps: int, peaks: dict, repeats: int) -> dict[str, Any]:
    """What the decode step's matmuls alone reach: every decoder layer's projections (q, k, v,
    o, gate, up, down; separate bf16 arrays, none sliced from a stack) and the output
    projection on [rows, hidden] activations, ``steps`` steps in one jitted loop, no attention,
    cache, norms or sampling. Its fraction of the HBM roofline bounds what the model's decode
    step can reach with XLA's matmuls; the gap to ``jax_decode`` is the rest of the step."""
    t = config.text
    d, f = t.hidden_size, t.intermediate_size
    q_dim, kv_dim = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    keys = iter(jax.random.split(jax.random.key(0), 7 * t.num_hidden_layers + 2))
    weight = jax.jit(lambda key, shape: jax.random.normal(key, shape, jnp.bfloat16) * 0.02, static_argnums=1)
    projections = dict(q=(d, q_dim), k=(d, kv_dim), v=(d, kv_dim), o=(q_dim, d), gate=(d, f), up=(d, f), down=(f, d))
    layers = [{name: weight(next(keys), shape) for name, shape in projections.items()}
              for _ in range(t.num_hidden_layers)]
    lm_head = weight(next(keys), (d, t.vocab_size))

    def norm(x):
        return x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + 1e-6).astype(x.dtype)

    def step(_, x):
        for w in layers:
            kv = (x @ w["k"]).sum(-1, keepdims=True) + (x @ w["v"]).sum(-1, keepdims=True)
            x = norm(x + (x @ w["q"]) @ w["o"] + 1e-3 * kv)
            x = norm(x + (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"])
        return norm(x + 1e-3 * (x @ lm_head)[:, :d])

    run = jax.jit(lambda x: jax.lax.fori_loop(0, steps, step, x))
    x = jax.random.normal(next(keys), (rows, d), jnp.bfloat16)
    step_s = median_time(lambda: run(x), repeats) / steps
    weight_bytes = param_bytes((layers, lm_head))
    return {"rows": rows, "step_s": step_s, "bytes_per_step": weight_bytes, "peak_bandwidth": peaks["bandwidth"],
            "roofline_fraction": None if not peaks["bandwidth"] else weight_bytes / step_s / peaks["bandwidth"]}


def decode_step_hlo(config) -> dict[str, Any]:
    """The HLO report of ONE decode step (the text model over a cache with a shared prefix)."""
    graphdef, state = build_model(config)
    text = nnx.merge(graphdef, state).language_model
    rows, groups, prompt_len, steps = 4, 2, 16, 8
    prefix = text_lib.init_cache(config.text, groups, prompt_len, jnp.bfloat16)
    prefix = prefix._replace(valid=jnp.ones_like(prefix.valid), index=jnp.int32(prompt_len))
    cache = text_lib.init_cache(config.text, rows, steps, jnp.bfloat16)

    def step(state, cache, tokens):
        model = nnx.merge(graphdef, state)
        positions = jnp.zeros((3, rows, 1), jnp.int32)
        hidden, cache = model.language_model(model.language_model.embed(tokens), positions,
                                             jnp.ones((rows, 1), jnp.int32), cache, prefix=prefix)
        return model.logits(hidden[:, 0]), cache

    del text
    return hlo_report(jax.jit(step).lower(state, cache, jnp.zeros((rows, 1), jnp.int32)))


# ----------------------------------------------------------------------------- PyTorch sections
def torch_sections(config, shp: Shapes, device: str, results: dict, budget: "Budget") -> None:
    """transformers' train step and generate on the same workloads (rows into ``results``)."""
    model = accelerator_torch.torch_model(config, device)
    if budget.allows("torch_train"):
        results["torch_train"] = guarded("torch_train", lambda: accelerator_torch.train_row(
            model, config, shp.train, device, shp.repeats))
    accelerator_torch.reset_peak_memory(device)
    if budget.allows("torch_generate"):
        results["torch_generate"] = guarded("torch_generate", lambda: accelerator_torch.generate_row(
            model, config, gen_inputs(config, shp), device, shp.gen_image_size, shp.gen_samples,
            shp.gen_new_tokens, shp.repeats))


# ----------------------------------------------------------------------------- running
class Budget:
    """The run's time budget: a section starts only while time is left (skips are recorded)."""

    def __init__(self, seconds: float):
        self.seconds, self.start, self.skipped = seconds, time.perf_counter(), []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, name: str) -> bool:
        if self.elapsed() < self.seconds:
            return True
        self.skipped.append(name)
        log(f"[{self.elapsed():6.1f}s] skip {name}: budget of {self.seconds:.0f} s spent")
        return False


def guarded(name: str, fn: Callable[[], dict]) -> dict:
    """``fn()``'s row, or {"error": ...} (with the traceback's tail) when it raises."""
    start = time.perf_counter()
    log(f"[section] {name} ...")
    try:
        row = fn()
    except Exception as error:  # noqa: BLE001 - every failure is recorded and the run goes on
        row = {"error": f"{type(error).__name__}: {error}"[:2000], "traceback": traceback.format_exc()[-3000:]}
    row["section_s"] = time.perf_counter() - start
    log(f"[section] {name}: {'ERROR ' + row['error'][:300] if 'error' in row else 'ok'} ({row['section_s']:.1f} s)")
    return row


def _fmt(x, unit="", scale=1.0, digits=3):
    if x is None:
        return "n/a"
    return f"{x / scale:.{digits}g}{unit}"


def table(results: dict) -> str:
    """The markdown table of a results dict (what main prints)."""
    r = results
    g = lambda name, key: r.get(name, {}).get(key)  # noqa: E731
    ratio = lambda a, b: None if not a or not b else a / b  # noqa: E731
    lines = ["| quantity | recap_jax | transformers + PyTorch | PyTorch / JAX time |", "|---|---|---|---|"]
    lines.append(f"| train step (s) | {_fmt(g('jax_train', 'step_s'))} | {_fmt(g('torch_train', 'step_s'))} | "
                 f"{_fmt(ratio(g('torch_train', 'step_s'), g('jax_train', 'step_s')))} |")
    mfu = g("jax_train", "mfu")
    lines.append(f"| train-step MFU | {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | | |")
    lines.append(f"| prefill tokens/s | {_fmt(g('jax_prefill', 'tokens_per_s'))} | "
                 f"{_fmt(g('torch_generate', 'prefill_tokens_per_s'))} | "
                 f"{_fmt(ratio(g('torch_generate', 'prefill_s'), g('jax_prefill', 'prefill_s')))} |")
    lines.append(f"| decode step (ms) | {_fmt(g('jax_decode', 'step_s'), scale=1e-3)} | "
                 f"{_fmt(g('torch_generate', 'step_s'), scale=1e-3)} | "
                 f"{_fmt(ratio(g('torch_generate', 'step_s'), g('jax_decode', 'step_s')))} |")
    lines.append(f"| decode tokens/s | {_fmt(g('jax_decode', 'tokens_per_s'))} | "
                 f"{_fmt(g('torch_generate', 'tokens_per_s'))} | |")
    frac = g("jax_decode", "roofline_fraction")
    lines.append(f"| decode, fraction of HBM roofline | {'n/a' if frac is None else f'{100 * frac:.1f}%'} | | |")
    lines.append(f"| peak memory, train (GB) | {_fmt(g('jax_train', 'peak_bytes_program'), scale=1e9)} | "
                 f"{_fmt(g('torch_train', 'peak_bytes'), scale=1e9)} | |")
    lines.append(f"| peak memory, generate (GB) | {_fmt(g('jax_decode', 'peak_bytes_program'), scale=1e9)} | "
                 f"{_fmt(g('torch_generate', 'peak_bytes'), scale=1e9)} | |")
    if "decode_floor" in r:
        frac = g("decode_floor", "roofline_fraction")
        lines.append(f"| decode matmuls alone, no attention (ms) / roofline | "
                     f"{_fmt(g('decode_floor', 'step_s'), scale=1e-3)} / "
                     f"{'n/a' if frac is None else f'{100 * frac:.1f}%'} | | |")
    if "jax_decode_split" in r:
        frac = g("jax_decode_split", "roofline_fraction")
        lines.append(f"| decode step, weights split once (ms) / roofline | "
                     f"{_fmt(g('jax_decode_split', 'step_s'), scale=1e-3)} / "
                     f"{'n/a' if frac is None else f'{100 * frac:.1f}%'} | | |")
    variants = (("jax_train_save_dots", "train step, remat save_dots"), ("jax_train_pallas", "train step, Pallas"),
                ("jax_train_7b", "7B train step (G = 4)"))
    for name, label in variants:
        if name in r:
            m = g(name, "mfu")
            lines.append(f"| {label} (s) / MFU / peak GB | {_fmt(g(name, 'step_s'))} / "
                         f"{'n/a' if m is None else f'{100 * m:.1f}%'} / "
                         f"{_fmt(g(name, 'peak_bytes_program'), scale=1e9)} | | |")
    vision = r.get("vision_paths", {})
    for impl in VISION_IMPLEMENTATIONS:
        if impl in vision:
            row = vision[impl]
            lines.append(f"| vision tower, {vision.get('images')} images, {impl} (ms / peak GB) | "
                         f"{_fmt(row.get('forward_s'), scale=1e-3)} / "
                         f"{_fmt(row.get('peak_bytes_program'), scale=1e9)} | | |")
    upcasts = {name: {k: len(v) for k, v in row.get("hlo", {}).items() if k.endswith("upcasts")}
               for name, row in r.items() if isinstance(row, dict) and "hlo" in row}
    lines.append(f"| bf16 -> f32 matmul upcasts (traced / compiled) | {upcasts} | | |")
    errors = [name for name, row in r.items() if isinstance(row, dict) and "error" in row]
    errors += [f"vision_paths:{impl}" for impl in VISION_IMPLEMENTATIONS if "error" in vision.get(impl, {})]
    if errors or r.get("skipped"):
        lines.append(f"| errors / skipped | {errors} / {r.get('skipped')} | | |")
    return "\n".join(lines)


# in order of importance: the budget skips the last ones first
SECTIONS = ("jax_train", "jax_generation", "decode_step", "torch", "decode_floor", "jax_decode_split",
            "vision_paths", "jax_train_save_dots", "jax_train_pallas", "jax_train_7b")


def run_section(name: str, tiny: bool, peaks: dict, budget: Budget) -> dict[str, Any]:
    """The rows of one section, in this process (``--section``)."""
    config, shp = model_config(tiny), shapes(tiny)
    if name == "jax_train":
        return {"jax_train": guarded(name, lambda: jax_train(config, shp.train, shp.repeats, peaks, True))}
    if name == "jax_generation":
        holder = {}

        def prefill_row():
            holder["prefill"], holder["decode"] = jax_generation(config, shp, peaks, True)
            return holder["prefill"]

        prefill = guarded("jax_prefill + jax_decode", prefill_row)
        return {"jax_prefill": prefill, "jax_decode": holder.get("decode", {"error": "see jax_prefill"})}
    if name == "decode_step":
        return {"decode_step": guarded(name, lambda: {"hlo": decode_step_hlo(config)})}
    if name == "torch":
        rows: dict[str, Any] = {}
        device = "cuda" if peaks["platform"] == "gpu" else "cpu"
        row = guarded("torch", lambda: torch_sections(config, shp, device, rows, budget) or {})
        if "error" in row:
            rows["torch"] = row
        return rows
    if name == "decode_floor":
        rows = shp.gen_prompts * shp.gen_samples
        return {name: guarded(name, lambda: decode_matmul_floor(config, rows, shp.gen_new_tokens, peaks,
                                                                shp.repeats))}
    if name == "jax_decode_split":
        sampling.SPLIT_DECODER_WEIGHTS["mode"] = "always"
        return {name: guarded(name, lambda: jax_generation(config, shp, peaks, False)[1])}
    if name == "vision_paths":
        return {"vision_paths": vision_paths(config, 4 if tiny else 16, shp.gen_image_size, shp.repeats)}
    if name == "jax_train_save_dots":
        return {name: guarded(name, lambda: jax_train(config, shp.train, shp.repeats, peaks, False, "save_dots"))}
    if name == "jax_train_pallas":
        # off accelerators: the GPU kernel in interpret mode (the TPU kernel's interpreter cannot run under remat)
        attention.PALLAS_KERNEL_OFF_ACCELERATOR["kernel"] = "gpu"
        attention.set_implementation("pallas")
        return {name: guarded(name, lambda: jax_train(config, shp.train, shp.repeats, peaks, False))}
    if name == "jax_train_7b":  # G = 4: the 7B step's activations without remat fit one H200
        workload = dataclasses.replace(shp.train, group_size=4)
        return {"jax_train_7b": guarded(name, lambda: jax_train(model_config(False, "7b"), workload, shp.repeats,
                                                                 peaks, False))}
    raise ValueError(f"unknown section {name!r}; one of {SECTIONS}")


def _section_in_subprocess(name: str, args, remaining_s: float) -> dict[str, Any]:
    """Runs one section in a fresh interpreter (device memory is returned when it exits, so JAX
    and PyTorch each get the whole device; a crash costs that section only) and returns its rows."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"{name}.json")
        command = [sys.executable, "-m", "benchmarks.accelerator", "--section", name, "--out", out,
                   "--attention", args.attention, "--budget-s", str(max(remaining_s, 1.0))]
        command += ["--tiny"] if args.tiny else []
        command += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        command += ["--peak-gbs", str(args.peak_gbs)] if args.peak_gbs else []
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        try:
            result = subprocess.run(command, cwd=root, timeout=remaining_s + 60, stdout=sys.stdout,
                                    stderr=subprocess.PIPE, text=True)
            stderr = result.stderr
        except subprocess.TimeoutExpired as error:
            return {name: {"error": f"timed out after {remaining_s + 60:.0f} s", "stderr": str(error.stderr)[-2000:]}}
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f)["sections"]
        return {name: {"error": f"exit code {result.returncode}", "stderr": stderr[-3000:]}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="path of the JSON table")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (automatic without an accelerator)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the sections that would start later")
    parser.add_argument("--attention", default="auto", choices=attention.IMPLEMENTATIONS)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--peak-gbs", type=float, default=None)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-7b", action="store_true")
    parser.add_argument("--section", default=None, choices=SECTIONS, help="run one section here (internal)")
    args = parser.parse_args(argv)

    budget = Budget(args.budget_s)
    device = jax.devices()[0]
    tiny = args.tiny or device.platform == "cpu"
    args.tiny = tiny
    attention.set_implementation(args.attention)
    peaks = device_peaks(device, args.peak_tflops, args.peak_gbs)
    if args.section:
        rows = run_section(args.section, tiny, peaks, budget)
        fallbacks = {" / ".join(k): n for k, n in attention.FALLBACKS.items()}
        rows[args.section + "_meta"] = {"attention_fallbacks": fallbacks, "skipped": budget.skipped,
                                        "jax_peak_bytes_process": jax_peak_bytes(device)}
        with open(args.out, "w") as f:
            json.dump({"sections": rows}, f, indent=1, default=str)
        return rows

    shp = shapes(tiny)
    results: dict[str, Any] = {
        "device": peaks, "jax": jax.__version__, "tiny": tiny, "attention": args.attention,
        "attention_resolved": attention.resolve(), "config": "tiny" if tiny else "3b",
        "train_workload": dataclasses.asdict(shp.train),
        "generation_workload": {k: v for k, v in dataclasses.asdict(shp).items() if k.startswith("gen_")},
    }
    log(f"accelerator benchmark: {peaks['name']} ({peaks['platform']}), jax {jax.__version__}, "
        f"attention {args.attention} -> {attention.resolve()}, {'tiny' if tiny else '3B'} shapes, "
        f"budget {args.budget_s:.0f} s")

    def write():
        results["skipped"] = budget.skipped
        results["elapsed_s"] = budget.elapsed()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)

    sections = [name for name in SECTIONS
                if not (name == "torch" and args.no_torch) and not (name == "jax_train_7b" and (tiny or args.no_7b))
                and not (name == "decode_step" and not tiny)]  # on a GPU, jax_decode's report covers decoding
    for name in sections:
        if not budget.allows(name):
            continue
        log(f"[{budget.elapsed():6.1f}s] {name} (subprocess)")
        results.update(_section_in_subprocess(name, args, args.budget_s - budget.elapsed()))
        write()
    write()
    log("\n" + table(results))
    log(f"\nwritten: {args.out} ({budget.elapsed():.0f} s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
