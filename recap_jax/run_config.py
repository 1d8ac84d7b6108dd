"""The run config of `python -m recap_jax.train`: every field, its meaning, its validation, and
the table of RL methods (RECAP and the paper's baselines).

A config file (configs/*.py) defines ``get_config()`` returning ``base_config()`` with its
changes; the command line overrides any field (``--config.rl.steps=20``). `validate` runs
before anything is built or compiled and names the field and the allowed values of the first
problem it finds. Fields outside scripts may set: ``seed``, ``sft.steps``, ``rl.steps``,
``rl.method``, ``checkpoint.every_steps``, ``eval.every_steps``.

Methods (``rl.method``; recap-method.md, "Mixing baselines"). Every method draws each batch
from one source (homogeneous batches, as the released code); they differ in which sources,
how often each is drawn, the objective weights lambda and the KL term:

  reasoning_only  the primary (reasoning) source alone, lambda = 1
  uniform         every source in turn (equal shares, round robin), lambda = 1
  propmix         a source per batch with probability proportional to its size, lambda = 1
  coreset         like propmix, replay sources cut to half the primary's volume, lambda = 1
  coreset_released  the released code's coreset: uniform over a smaller OCR shard, lambda = 1
  lwf             uniform + KL to the frozen warm-start policy (beta 0.01, k3)
  modomodo        fixed shares (``data.modomodo_shares``), vision tower frozen, lambda = 1
  recap           every source in turn, lambda from RECAP (``recap.variant``: released | paper,
                  or the baselines dwa | static on the same interface)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from recap_jax.data.replay import MODOMODO_SHARES
from recap_jax.data.synthetic import LAYOUTS, SYNTHETIC_TASKS
from recap_jax.data.tasks import TASKS
from recap_jax.parallel import MeshConfigError, parse_mesh_spec
from recap_jax.reward_pool import resolve_reward

__all__ = ["METHODS", "Method", "ConfigError", "base_config", "validate", "source_names"]


class ConfigError(ValueError):
    """An invalid config value; the message names the field (``rl.temperature``, ...)."""


@dataclasses.dataclass(frozen=True)
class Method:
    """What an ``rl.method`` changes: sources used, replay strategy, weights, KL, frozen parts."""

    strategy: str
    replay: bool = True
    recap: bool = False
    beta: float = 0.0
    freeze_vision: bool = False


METHODS = {
    "reasoning_only": Method("round_robin", replay=False),
    "uniform": Method("round_robin"),
    "propmix": Method("propmix"),
    "coreset": Method("coreset"),
    # the released coreset: every source in turn over a smaller OCR shard (build it with
    # scripts/build_ocr_replay.py --max-rows-per-config 5000)
    "coreset_released": Method("round_robin"),
    "lwf": Method("round_robin", beta=0.01),
    "modomodo": Method("modomodo", freeze_vision=True),
    "recap": Method("round_robin", recap=True),
}
SOURCE_KINDS = ("synthetic", "thinklite", "refcoco", "ocr_llava", "lisa", "geoqav", "sat",
                "scienceqa")
PRESETS = ("tiny", "3b", "7b")


def source_config(kind: str = "synthetic", *, train: str = "", eval: str = "",  # noqa: A002
                  image_root: str = "", size: int = 2000, eval_size: int = 64,
                  max_records: int = 0, layout: str = "free", rewards: str = "",
                  max_new_tokens: int = 0,
                  stop_strings: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """One entry of ``data.sources`` (the key is the task name, e.g. "reasoning").

    kind: "synthetic" (generated offline, ``size`` train / ``eval_size`` eval records) or a
      dataset adapter of recap_jax.data.sources (thinklite, refcoco, ocr_llava, lisa, ...).
    train, eval: comma-separated files (jsonl / json / parquet) of the train and held-out
      splits; eval "" = no evaluation of this source.
    image_root: the directory image paths are relative to (and confined to).
    max_records: read at most this many train records (0 = all).
    layout: synthetic only, "free" | "grid" (recap_jax.data.synthetic: "grid" aligns shapes
      and characters to the model's 28 px merged-patch cells).
    rewards: RL sources: comma-separated reward functions replacing the task's own (one RECAP
      objective each), registered names (recap_jax.rewards.REWARDS) or import paths
      "package.module:function" of fn(completion, reference, **context) -> float; checked
      at start. "" = the task's rewards.
    max_new_tokens: RL sources: this source's completion limit (0 = rl.max_new_tokens, the
      sampler's static length, which bounds it); longer completions are cut and marked
      truncated, and the loss's L_max (overlong penalty, Dr. GRPO divisor) is this limit.
    stop_strings: RL sources: a completion ends with the token that completes the first of
      these strings (kept in its text); e.g. ("</answer>",). () = none.
    """
    return ml_collections.ConfigDict(dict(kind=kind, train=train, eval=eval, image_root=image_root,
                                          size=size, eval_size=eval_size,
                                          max_records=max_records, layout=layout,
                                          rewards=rewards, max_new_tokens=max_new_tokens,
                                          stop_strings=tuple(stop_strings)))


def parse_shares(text: str, count: int) -> tuple[float, ...] | None:
    """"a,b,c" -> per-source shares, or None unless ``count`` numbers >= 0, not all 0."""
    try:
        shares = tuple(float(x) for x in text.split(","))
    except ValueError:
        return None
    if len(shares) != count or min(shares) < 0 or sum(shares) <= 0:
        return None
    return shares


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default; configs/*.py start from this."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds the model init, the data order and the sampler

    c.model = dict(
        path="",  # a Hugging Face Qwen2.5-VL directory; "" = a random model of `preset`
        require_path=False,  # True: the config fine-tunes a pretrained model; path must be set
        preset="tiny",  # tiny | 3b | 7b (only when path = "")
        # tiny only: sizes of the from-scratch demo model (vocab = the demo tokenizer's)
        vocab_size=512, hidden_size=64, intermediate_size=128, text_layers=2, heads=4,
        kv_heads=2, vision_depth=2, vision_hidden_size=32,
        # tiny only: base of the decoder's M-RoPE. Its height and width sections get the
        # lowest frequencies theta^(-2j/head_dim); see configs/demo.py for why a tiny model
        # that must read image positions wants a small theta.
        rope_theta=10000.0,
        param_dtype="float32", compute_dtype="float32",  # see recap_jax.precision
        remat="none",  # none | full | save_dots
        # attention kernels (recap_jax.models.qwen2_5_vl.attention): auto (cuDNN on GPU, Pallas
        # on TPU, xla elsewhere) | xla | cudnn | pallas (segment ids, no mask: TPU flash
        # attention, or Triton's on GPU)
        attention="auto",
        # train step: completion positions per chunk of the output projection (0 = all at
        # once); chunks are recomputed in the backward pass instead of keeping [rows, C, V]
        # logits, the largest buffers of long completions with Qwen's 152k vocabulary
        logits_chunk=0,
        # the vision tower frozen, its backward pass not run (the gradient stops at the
        # merger's input; the merger still trains); modomodo freezes it regardless
        freeze_vision=False,
        # LoRA (recap_jax.lora): rank 0 = off (full fine-tuning). rank r > 0: the base weights
        # are frozen and W' = W + (alpha / r) A B trains in the targeted kernels; only A, B
        # (float32) and their optimizer state are trained and checkpointed. targets: comma-
        # separated attention (decoder q, k, v, o), mlp (decoder gate, up, down), vision (the
        # vision blocks' qkv, proj, mlp). dropout: p in [0, 1) on the adapter branch's input
        # in training (x W + (alpha/r) (dropout(x) A) B, masks from the state's key; off in
        # sampling, eval and export; 0 keeps the merged W + (alpha/r) A B in the loss).
        # merge_on_export: final/ (and warmstart/) hold W + (alpha/r) A B as a Hugging Face
        # directory; False: final/ holds only the adapters (adapters.safetensors + lora.json
        # naming the base directory)
        lora=dict(rank=0, alpha=16.0, targets="attention,mlp", dropout=0.0,
                  merge_on_export=True),
    )
    c.tokenizer = dict(
        path="",  # "" = model.path, or (from scratch) a demo BPE built into WORKDIR/tokenizer
        min_pixels=3136, max_pixels=12845056,
    )
    c.mesh = dict(
        spec="",  # "" = one device; e.g. "fsdp=-1", "data=2,fsdp=4"
        # multi-host: jax.distributed.initialize before the mesh is built. The coordinator
        # fields left empty ("", 0, -1) are read from the cluster's environment (TPU pods,
        # SLURM, Open MPI); set all three to start processes by hand (e.g. on loopback).
        distributed=False, coordinator_address="", num_processes=0, process_id=-1,
    )

    c.data = dict(
        sources=ml_collections.ConfigDict(),  # task name -> source_config(...)
        primary="",  # the reasoning source, source id 0 (default: the first name in sorted order)
        modomodo_shares="",  # comma-separated shares per source for modomodo ("" = the paper's)
        # bare: the task registry's prompts; released: the authors' code's exact prompts,
        # rewards and SFT targets (each source runs as its `<name>_released` task; see
        # docs/fidelity.md)
        prompt_style="bare",
        prompt_buckets=(128, 256, 512, 1024, 2048, 4096),
        answer_buckets=(16, 32, 64, 128, 256, 512, 1024),
        patch_buckets=(64, 256, 1024, 4096, 16384),
        num_parallel_calls=2, prefetch=2,
    )
    c.sft = dict(
        steps=0,  # warm-start steps of next-token prediction on every source's targets (0 = none)
        batch_size=32, learning_rate=1e-3, warmup_fraction=0.05, max_grad_norm=1.0,
        weight_decay=0.0,
        # comma-separated shares of the warm-start mixture per source, in data.sources order
        # ("" = every source equally likely). "0,0,1" trains on the third source only (a
        # curriculum stage: experiments/forgetting_in_miniature warm-starts OCR first).
        source_shares="",
    )
    c.rl = dict(
        steps=100, method="recap",
        prompts_per_step=8,  # B prompts per step (one source per step)
        group_size=4,  # G completions per prompt
        max_new_tokens=32, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=1e-6, warmup_fraction=0.1, max_grad_norm=1.0, weight_decay=0.0,
        weighting="reward",  # reward (released code) | loss (paper)
        advantage_normalization="group", loss_aggregation="token-mean",
        epsilon_low=0.2, epsilon_high=0.2, dual_clip_c=0.0,  # 0 = no dual clip
        beta=-1.0,  # KL coefficient; -1 = the method's (0, lwf 0.01)
        # GRPO variants (recap_jax.grpo.GRPOConfig; all off by default): token | sequence (GSPO's
        # sequence-level ratio), DAPO's soft overlong penalty over the last overlong_buffer
        # tokens before max_new_tokens (0 = off), truncated importance sampling of the
        # sampler / trainer mismatch capped at tis_cap (0 = off; needs recompute_old_logprobs)
        importance_ratio="token", overlong_buffer=0, overlong_penalty=1.0, tis_cap=0.0,
        # entropy bonus: the loss gets -entropy_coef x the RL tokens' mean entropy (aggregated
        # like the policy loss), with its gradient (0 = off, no extra backward work)
        entropy_coef=0.0,
        # DAPO's dynamic sampling (0 = off): groups whose rewards are all equal are dropped and
        # the step's prompts resampled (fresh completions) up to this many more rounds until
        # the batch of prompts_per_step groups is full of groups whose rewards vary (zero-
        # variance groups fill what is left); shapes stay static. Several processes choose
        # together, over the global batch's rewards.
        dynamic_sampling_extra_draws=0,
        # rewards scored in this many worker processes with a per-call timeout (a reward that
        # hangs or crashes scores 0 and is counted); 0 = in this process, no timeout
        reward_workers=0, reward_timeout_s=10.0,
        kl_estimator="k3", mask_truncated_completions=False,
        num_iterations=1,
        # optimizer updates per rollout batch and epoch, each on B / num_minibatches rows
        # (whole groups); every mini-batch runs the vision tower over all the step's images
        num_minibatches=1,
        # recompute the old log-probs with the pre-update params instead of the sampler's
        recompute_old_logprobs=False,
        # trainer log-probs at the sampling temperature, log_softmax(logits / T), as TRL and
        # the released code (the sampler reports the same); False: at temperature 1
        scale_logprobs=False,
        # also log lambda_gradient_cosine: the cosine between the update's gradient and the
        # one lambda = 1 would give (one more backward pass per update); advantage_change is
        # always logged
        log_lambda_effect=False,
        # batches (one source each) whose gradients are averaged into one optimizer update:
        # 2 is the released hybrid run's gradient accumulation (two consecutive single-source
        # micro-batches per update); every batch still gets its own RECAP signal and lambda
        sources_per_update=1,
        # True: rl.steps is replaced by one pass until the smallest source is exhausted
        # (replay.epoch_steps; the released RLVR-only run: 328 steps)
        epoch_bounded=False,
        max_bad_steps=5,  # stop (after saving) when this many steps in a row are not finite
    )
    # variant: released | paper (recap-method.md) | dwa (Liu et al. 2019) | static (lambda = 1)
    # paper_sigma (paper variant): "window" (Eq. 1, sigma about the current window's mean) |
    # "2w" (Algorithm 2's pseudocode, about the 2W mean)
    # alpha: a number in [0, 1] or "anneal" (1 - step / rl.steps); typed `object` so that
    # --config.recap.alpha=anneal parses (a float field would reject it) as --config.recap.alpha=0.25 does
    c.recap = dict(variant="released", window=10, temperature=5.0,
                   alpha=ml_collections.FieldReference(0.5, field_type=object), paper_sigma="window")
    # ignore_memory_plan: start on accelerators even when the memory plan printed at the start
    # (recap_jax.tools.memory.preflight) says the run does not fit
    c.run = dict(ignore_memory_plan=False)
    c.checkpoint = dict(every_steps=50, keep=2)  # RL steps between checkpoints; kept N at a time
    c.eval = dict(
        every_steps=0,  # RL steps between evaluations (0 = before and after RL only)
        num_examples=64, batch_size=16, max_new_tokens=32,
        # also the reference answers' NLL with the record's own image and with another's
        # (answer_nll, answer_nll_other_image, image_reliance: evaluator.Evaluator)
        image_reliance=True,
        # public benchmarks at every evaluation (the forgetting curve as it happens):
        # comma-separated LABEL=PATH[;split=..][;config=..][;image_root=..][;circular=..] specs read by
        # recap_jax.bench (docs/benchmarks_eval.md); "" = none
        benchmarks="", benchmarks_prompt="thinking",  # thinking | plain (the paper's prompts)
        benchmarks_batch_size=8, benchmarks_max_new_tokens=1024,
        benchmarks_limit=0,  # rows per suite (0 = all)
    )
    # wandb: Weights & Biases beside JSONL and TensorBoard (offline mode needs no network)
    c.log = dict(every_steps=10, tensorboard=True, wandb=False, wandb_project="recap_jax",
                 wandb_run_name="", wandb_mode="offline", wandb_entity="")
    return c


def source_names(config) -> list[str]:
    """Source order (source ids, objective order): ``data.primary`` first, then the others by
    name (ConfigDict keys have no insertion order)."""
    names = sorted(config.data.sources.keys())
    primary = config.data.primary if config.data.primary in names else None
    return ([primary] if primary else []) + [n for n in names if n != primary]


# --------------------------------------------------------------------------- validation


def apply_overrides(config, overrides: dict[str, Any]):
    """Sets each dotted field of ``overrides`` in ``config`` (as --config.<field>=<value> does);
    a field the config does not have is a KeyError naming it. Returns ``config``."""
    for field, value in overrides.items():
        node = config
        *parents, last = field.split(".")
        try:
            for part in parents:
                node = node[part]
            node[last]  # noqa: B018 - the field must exist already
        except (KeyError, AttributeError):
            raise KeyError(f"override {field}: the config has no such field") from None
        node[last] = value
    return config


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config.{field}={value!r} is invalid; allowed: {allowed}")


def _int(config, field: str, low: int) -> None:
    value = _get(config, field)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        _fail(field, value, f"an int >= {low}")


def _number(config, field: str, low: float, high: float = math.inf, *,
            low_open: bool = False) -> None:
    value = _get(config, field)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        _fail(field, value, f"a number in {bracket}{low}, {high}]")


def _choice(config, field: str, allowed: Sequence[str]) -> None:
    if _get(config, field) not in allowed:
        _fail(field, _get(config, field), " | ".join(allowed))


def _get(config, field: str) -> Any:
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def _paths(value: str) -> list[str]:
    return [p.strip() for p in str(value).split(",") if p.strip()]


def validate(config, *, check_paths: bool = True) -> None:
    """Raises ConfigError for the first invalid field (before anything is built)."""
    for section in ("model", "tokenizer", "mesh", "data", "sft", "rl", "recap", "run",
                    "checkpoint", "eval", "log"):
        if section not in config:
            _fail(section, None, "a section (start configs from run_config.base_config())")
    _int(config, "seed", 0)
    _validate_model(config, check_paths)
    _validate_data(config, check_paths)
    for field in ("sft.steps",):
        _int(config, field, 0)
    _int(config, "sft.batch_size", 1)
    _int(config, "rl.steps", 0)
    _choice(config, "rl.method", tuple(METHODS))
    _int(config, "rl.prompts_per_step", 1)
    _int(config, "rl.group_size", 1)
    _int(config, "rl.max_new_tokens", 1)
    _number(config, "rl.temperature", 0.0, math.inf, low_open=True)
    _number(config, "rl.top_p", 0.0, 1.0, low_open=True)
    _int(config, "rl.top_k", 0)
    for stage in ("sft", "rl"):
        _number(config, f"{stage}.learning_rate", 0.0, math.inf, low_open=True)
        _number(config, f"{stage}.warmup_fraction", 0.0, 0.999)
        _number(config, f"{stage}.max_grad_norm", 0.0, math.inf, low_open=True)
        _number(config, f"{stage}.weight_decay", 0.0)
    if config.rl.beta != -1:
        _number(config, "rl.beta", 0.0)
    _int(config, "rl.max_bad_steps", 1)
    _int(config, "rl.sources_per_update", 1)
    _int(config, "rl.reward_workers", 0)
    _int(config, "rl.dynamic_sampling_extra_draws", 0)
    _number(config, "rl.reward_timeout_s", 0.0, math.inf, low_open=True)
    # rl.epsilon_*, dual_clip_c, num_iterations, num_minibatches, the loss options and
    # recap.* are checked by the types they build (GRPOConfig, RecapConfig) in plan.build_plan
    _int(config, "checkpoint.every_steps", 0)
    _int(config, "checkpoint.keep", 1)
    _int(config, "eval.every_steps", 0)
    _int(config, "eval.num_examples", 0)
    _int(config, "eval.batch_size", 1)
    _int(config, "eval.max_new_tokens", 1)
    _choice(config, "eval.benchmarks_prompt", ("thinking", "plain"))
    _int(config, "eval.benchmarks_batch_size", 1)
    _int(config, "eval.benchmarks_max_new_tokens", 1)
    _int(config, "eval.benchmarks_limit", 0)
    _int(config, "log.every_steps", 1)
    _validate_mesh(config)


def _validate_model(config, check_paths: bool) -> None:
    model = config.model
    if model.require_path and not model.path:
        _fail("model.path", model.path, "a local Hugging Face Qwen2.5-VL directory (this config "
                                        "post-trains a pretrained model: pass "
                                        "--config.model.path=/path/to/Qwen2.5-VL)")
    if model.path:
        if check_paths and not os.path.isfile(os.path.join(model.path, "config.json")):
            _fail("model.path", model.path, "a Hugging Face Qwen2.5-VL directory holding "
                                            "config.json and *.safetensors")
    else:
        _choice(config, "model.preset", PRESETS)
        if model.preset != "tiny" and not config.tokenizer.path:
            _fail("tokenizer.path", config.tokenizer.path,
                  f"a tokenizer directory (model.preset={model.preset!r} from scratch "
                  "needs the real Qwen tokenizer)")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "text_layers", "heads",
                  "kv_heads", "vision_depth", "vision_hidden_size"):
        _int(config, f"model.{field}", 1)
    _number(config, "model.rope_theta", 1.0)
    if model.vocab_size < 300:
        _fail("model.vocab_size", model.vocab_size, "an int >= 300 (256 bytes + special tokens)")
    if model.heads % model.kv_heads:
        _fail("model.kv_heads", model.kv_heads, f"a divisor of model.heads={model.heads}")
    # model.param_dtype, compute_dtype, remat: checked by PrecisionConfig (plan.build_plan)
    _int(config, "model.logits_chunk", 0)
    if config.tokenizer.path and check_paths and not os.path.isdir(config.tokenizer.path):
        _fail("tokenizer.path", config.tokenizer.path, "an existing tokenizer directory")
    _int(config, "tokenizer.min_pixels", 1)
    _int(config, "tokenizer.max_pixels", config.tokenizer.min_pixels)


def _validate_data(config, check_paths: bool) -> None:
    names = source_names(config)
    if not names:
        _fail("data.sources", {}, "at least one source (task name -> source_config(...))")
    for name in names:
        if name not in TASKS:
            _fail(f"data.sources.{name}", name, f"a registered task: {' | '.join(sorted(TASKS))}")
        source = config.data.sources[name]
        field = f"data.sources.{name}"
        _choice(config, f"{field}.kind", SOURCE_KINDS)
        if source.kind == "synthetic":
            if name not in SYNTHETIC_TASKS:
                _fail(field, name, f"a synthetic task ({' | '.join(SYNTHETIC_TASKS)}) for kind "
                                   "'synthetic'")
            _int(config, f"{field}.size", 1)
            _int(config, f"{field}.eval_size", 0)
            _choice(config, f"{field}.layout", LAYOUTS)
        else:
            if not _paths(source.train):
                _fail(f"{field}.train", source.train, "comma-separated data files")
            if check_paths:
                for key in ("train", "eval"):
                    for path in _paths(source[key]):
                        if not os.path.exists(path):
                            _fail(f"{field}.{key}", path, "existing files")
                if source.image_root and not os.path.isdir(source.image_root):
                    _fail(f"{field}.image_root", source.image_root, "an existing directory")
        _int(config, f"{field}.max_records", 0)
        _validate_source_rollout(config, name)
    if config.data.primary and config.data.primary not in names:
        _fail("data.primary", config.data.primary, " | ".join(names))
    if config.rl.steps > 0 and TASKS[names[0]].kind != "rl":
        # every method trains the primary with GRPO; an SFT primary leaves RL no reward
        field = "data.primary" if config.data.primary else "data.sources"
        _fail(field, names[0], "an RL task (verifiable rewards) as the primary source when "
                               f"rl.steps > 0; RL tasks: "
                               f"{' | '.join(sorted(n for n, t in TASKS.items() if t.kind == 'rl'))}")
    for field, text in (("data.modomodo_shares", config.data.modomodo_shares),
                        ("sft.source_shares", config.sft.source_shares)):
        if text and parse_shares(text, len(names)) is None:
            _fail(field, text, f"{len(names)} comma-separated numbers >= 0 (one per source), "
                               f"not all 0")
    if config.rl.method == "modomodo" and not config.data.modomodo_shares:
        missing = [n for n in names if n not in MODOMODO_SHARES]
        if missing:
            _fail("data.modomodo_shares", "", f"explicit shares: the paper's cover only "
                                              f"{sorted(MODOMODO_SHARES)}, not {missing}")
    for field in ("prompt_buckets", "answer_buckets", "patch_buckets"):
        values = tuple(config.data[field])
        if not values or any(not isinstance(v, int) or v < 1 for v in values):
            _fail(f"data.{field}", values, "a non-empty tuple of ints >= 1")
    _int(config, "data.num_parallel_calls", 1)
    _int(config, "data.prefetch", 1)


def _validate_source_rollout(config, name: str) -> None:
    """A source's rewards (each resolvable now), completion limit and stop strings."""
    source, field = config.data.sources[name], f"data.sources.{name}"
    rl = TASKS[name].kind == "rl"
    for key, unset in (("rewards", ""), ("max_new_tokens", 0), ("stop_strings", ())):
        if key in source and not rl and source[key] != unset:
            _fail(f"{field}.{key}", source[key], f"{unset!r}: task {name!r} is an SFT task")
    if "max_new_tokens" in source:
        _int(config, f"{field}.max_new_tokens", 0)
        if source.max_new_tokens > config.rl.max_new_tokens:
            _fail(f"{field}.max_new_tokens", source.max_new_tokens,
                  f"0 or an int <= rl.max_new_tokens={config.rl.max_new_tokens} (the sampler's "
                  "static length)")
    stop = source.get("stop_strings", ())
    if isinstance(stop, str) or not isinstance(stop, (tuple, list)) \
            or not all(isinstance(s, str) and s for s in stop):
        _fail(f"{field}.stop_strings", stop, "a tuple of non-empty strings, e.g. ('</answer>',)")
    names = source_rewards(source)
    if len(set(names)) != len(names) or any("/" in n for n in names):
        _fail(f"{field}.rewards", source.get("rewards", ""),
              "comma-separated distinct reward names without '/'")
    for reward in names:
        try:
            resolve_reward(reward)
        except ValueError as error:
            raise ConfigError(f"config.{field}.rewards={source.rewards!r}: {error}") from None


def source_rewards(source) -> tuple[str, ...]:
    """The reward names a source config sets (() = the task's own)."""
    return tuple(n.strip() for n in str(source.get("rewards", "")).split(",") if n.strip())


def _validate_mesh(config) -> None:
    if not config.mesh.spec:
        return
    try:
        mesh = parse_mesh_spec(config.mesh.spec)
        if config.mesh.distributed:  # the devices are known after jax.distributed starts
            return
        sizes = mesh.axis_sizes(jax.device_count())
    except MeshConfigError as error:
        raise ConfigError(f"config.mesh.spec={config.mesh.spec!r}: {error}") from None
    batch_shards = sizes["data"] * sizes["fsdp"]
    rows = config.rl.prompts_per_step
    for field, value in (("rl.prompts_per_step", rows), ("sft.batch_size", config.sft.batch_size),
                         ("eval.batch_size", config.eval.batch_size)):
        if value % batch_shards:
            _fail(field, value, f"a multiple of the mesh's batch shards (data x fsdp = "
                                f"{batch_shards} for mesh {config.mesh.spec!r})")
