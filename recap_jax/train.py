"""Training end to end: an optional SFT warm-start, then RLVR with replay and RECAP (or a
baseline), with periodic evaluation, metrics and resumable checkpoints.

    python -m recap_jax.train --config configs/demo.py --workdir /tmp/recap_demo
    python -m recap_jax.train --config configs/demo.py --workdir DIR --config.rl.method=uniform

Sections of `train` (one linear function, in the order they run):
  1. config: validated before anything is built (recap_jax.run_config);
  2. model: tokenizer + model from a Hugging Face directory or from scratch, on a mesh when
     ``mesh.spec`` is set;
  3. resume: the newest complete checkpoint in WORKDIR/checkpoints, if any (a damaged one is
     reported and the previous one used);
  4. SFT warm-start (``sft.steps``): next-token prediction on every source's formatted
     completions; ends by writing WORKDIR/warmstart (a Hugging Face directory);
  5. RL (``rl.steps``): per step one homogeneous batch from the replay mixture; an RL source's
     prompts are sampled G times and scored, an SFT source's references give an NTP loss; the
     jitted GRPO step takes the objective weights lambda (RECAP, or 1 for the baselines);
     RECAP's state is updated from the step's per-objective signals;
  6. evaluation (greedy, held-out records) before RL, every ``eval.every_steps`` and at the end.

Outputs in WORKDIR: config.json, metrics.jsonl (+ metrics.superseded.jsonl after a resume),
tensorboard/, checkpoints/<step>/ (orbax; step = SFT step, or sft.steps + RL step),
warmstart/, eval/<stage>_step_<n>.json, tokenizer/ (demo only).

Metric keys (one JSONL line per step; see recap_jax.metrics_log): loss, grad_norm, skipped,
source, tokens_per_s, step_time_s, completion_length_mean, truncated_fraction, entropy,
clip_fraction_{low,high}, kl (lwf), logprob_abs_diff; per objective o: reward/<o> (batch mean
raw reward, RL objectives in the batch), ntp_loss/<o> (SFT objectives in the batch), weight/<o>
(lambda used), recap/c/<o>, recap/i/<o> (RECAP state after the step; recap only).
Eval lines: eval/<task>/<metric>, eval/<task>/completion_length.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recap_jax import grpo, recap, rollout, run_config, sampling
from recap_jax.checkpointing import CheckpointMismatch, RunCheckpoints
from recap_jax.data.records import SkipCounter
from recap_jax.data.tasks import get_task
from recap_jax.metrics_log import MetricsLog
from recap_jax.train_state import TrainState, make_optimizer
from recap_jax.train_step import make_train_step

__all__ = ["CheckpointsUnreadable", "TrainingStopped", "train", "main"]

_log = logging.getLogger("recap_jax.train")
RL_RNG_OFFSET = 1_000_003  # RL step keys fold in (offset + step), disjoint from SFT's


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps in a row); a checkpoint holding
    the last good state was saved first."""


class CheckpointsUnreadable(RuntimeError):
    """The workdir has checkpoints but none can be read; the run refuses to start over them."""


# --------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
    """What both stages share (built once per process)."""

    config: Any
    workdir: str
    processor: Any
    model_config: Any
    graphdef: Any
    initial_params: Any
    mesh: Any
    names: list[str]
    train_sources: list
    evaluator: rollout.Evaluator
    checkpoints: RunCheckpoints
    log: MetricsLog
    skips: SkipCounter
    on_step: Any = None  # callable(stage, step, line) after each logged step, or None

    def record(self, stage: str, step: int, line: dict) -> None:
        self.log.write(stage, step, line)
        if self.on_step is not None:
            self.on_step(stage, step, line)


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def _build_model(config, model_config, mesh):
    """(graphdef, params) from model.path or a seeded random init."""
    from recap_jax.models import qwen2_5_vl as qwen
    from recap_jax import parallel

    model_cfg = config.model
    kwargs = dict(dtype=_dtype(model_cfg.compute_dtype), param_dtype=_dtype(model_cfg.param_dtype),
                  remat=model_cfg.remat)
    if model_cfg.path:
        model = qwen.from_pretrained(model_cfg.path, mesh=mesh, **kwargs)
    elif mesh is not None:
        model = parallel.init_sharded_model(model_config, mesh, seed=config.seed, **kwargs)
    else:
        model = qwen.init_model(model_config, seed=config.seed, **kwargs)
    return nnx.split(model)


def _setup(config, workdir: str) -> Setup:
    from recap_jax import parallel

    mesh = parallel.make_mesh(parallel.parse_mesh_spec(config.mesh.spec)) if config.mesh.spec \
        else None
    processor = rollout.build_processor(config, workdir)
    model_config = rollout.build_model_config(config)
    rollout.check_tokenizer_matches(processor, model_config)
    graphdef, params = _build_model(config, model_config, mesh)
    skips = SkipCounter(_log)
    names = run_config.source_names(config)
    train_sources = rollout.open_sources(config, "train", skips)
    if [source.name for source in train_sources] != names:  # source ids index both
        raise AssertionError(f"sources {[s.name for s in train_sources]} != names {names}")
    eval_sources = rollout.open_sources(config, "eval", skips)
    data = config.data
    evaluator = rollout.Evaluator(eval_sources, processor, model_config,
                                  num_examples=config.eval.num_examples,
                                  batch_size=config.eval.batch_size,
                                  max_new_tokens=config.eval.max_new_tokens,
                                  prompt_buckets=data.prompt_buckets,
                                  answer_buckets=data.answer_buckets,
                                  image_reliance=config.eval.image_reliance)
    checkpoints = RunCheckpoints(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
    log = MetricsLog(workdir, tensorboard=config.log.tensorboard)
    return Setup(config, workdir, processor, model_config, graphdef, params, mesh, names,
                 train_sources, evaluator, checkpoints, log, skips)


def _replay(setup: Setup, sources, *, batch_size: int, strategy: str, homogeneous: bool,
            state: dict | None, weights=None, primary=()):
    from recap_jax.data.replay import ReplayConfig, make_replay

    data = setup.config.data
    replay_config = ReplayConfig(batch_size=batch_size, strategy=strategy, homogeneous=homogeneous,
                                 weights=weights, primary=tuple(primary), seed=setup.config.seed,
                                 prompt_buckets=tuple(data.prompt_buckets),
                                 answer_buckets=tuple(data.answer_buckets),
                                 patch_buckets=tuple(data.patch_buckets),
                                 num_parallel_calls=data.num_parallel_calls, prefetch=data.prefetch)
    return make_replay(sources, setup.processor, setup.model_config, replay_config, state=state,
                       skips=setup.skips)


def _place(setup: Setup, tree):
    """Host batch -> device (replicated over the mesh; the model's constraints shard it)."""
    if setup.mesh is None:
        return rollout.to_device(tree)
    sharding = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    return rollout.to_device(tree, sharding)


# --------------------------------------------------------------------------- logging helpers


def _host(metrics: dict) -> dict:
    return {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}


def _objective_values(names, metrics: dict, weights, recap_state) -> dict[str, float]:
    """Per-objective entries of a metrics line (see the module docstring)."""
    out = {}
    present = metrics["objective_present"].astype(bool)
    is_sft = [name.endswith("/ntp") for name in names]
    for k, name in enumerate(names):
        if present[k] and is_sft[k]:
            out[f"ntp_loss/{name}"] = float(metrics["objective_ntp_loss"][k])
        elif present[k]:
            out[f"reward/{name}"] = float(metrics["objective_reward_mean"][k])
        out[f"weight/{name}"] = float(np.asarray(weights)[k])
        if recap_state is not None:
            out[f"recap/c/{name}"] = float(recap_state.c[k])
            out[f"recap/i/{name}"] = float(recap_state.i[k])
    return out


SCALARS = ("loss", "grad_norm", "skipped", "entropy", "kl", "logprob_abs_diff",
           "clip_fraction_low", "clip_fraction_high", "completion_length_mean",
           "truncated_fraction")


def _progress(stage: str, step: int, total: int, line: dict, eta_s: float) -> str:
    rewards = " ".join(f"{k.split('/', 1)[1]}={v:.3f}" for k, v in line.items()
                       if k.startswith(("reward/", "ntp_loss/")))
    weights = " ".join(f"{v:.2f}" for k, v in line.items() if k.startswith("weight/"))
    return (f"[{stage}] step {step}/{total} {line.get('source', '')} | {rewards} | lambda "
            f"[{weights}] | loss {line.get('loss', float('nan')):.4f} | "
            f"{line.get('tokens_per_s', 0):.0f} tok/s | ETA {eta_s / 60:.1f} min")


class _Clock:
    """Step-time average for the ETA (ignores the first, compiling, steps)."""

    def __init__(self):
        self.times: list[float] = []

    def add(self, seconds: float) -> None:
        self.times.append(seconds)

    def eta(self, remaining: int) -> float:
        recent = self.times[-20:][1:] or self.times
        return remaining * float(np.mean(recent)) if recent else 0.0


def _evaluate(setup: Setup, params, rl_step: int, stage: str = "rl") -> dict:
    """Runs the evaluator, logs an eval line and writes eval/<stage>_step_<n>.json."""
    start = time.perf_counter()
    results = setup.evaluator(setup.graphdef, params)
    values = {f"eval/{task}/{metric}": value for task, table in results.items()
              for metric, value in table.items() if metric != "num_examples"}
    setup.log.write("eval", rl_step, dict(values, eval_time_s=time.perf_counter() - start))
    os.makedirs(os.path.join(setup.workdir, "eval"), exist_ok=True)
    with open(os.path.join(setup.workdir, "eval", f"{stage}_step_{rl_step}.json"), "w") as handle:
        json.dump({"stage": stage, "step": rl_step, "tasks": results}, handle, indent=1)
    print(format_eval_table(results, f"eval at {stage} step {rl_step}"), flush=True)
    return results


def format_eval_table(results: dict, title: str) -> str:
    lines = [title, f"{'task':<14} {'metric':<22} {'value':>8}  n"]
    for task, table in results.items():
        for metric, value in table.items():
            if metric != "num_examples":
                lines.append(f"{task:<14} {metric:<22} {value:8.4f}  {table['num_examples']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- stages


def _stage_state(setup: Setup, params, optimizer, seed_offset: int, recap_state=None):
    create = lambda p: TrainState.create(p, optimizer, jax.random.key(  # noqa: E731
        setup.config.seed + seed_offset), recap_state)
    if setup.mesh is None:
        return create(params)
    from recap_jax import parallel

    with parallel.use_mesh(setup.mesh):
        return parallel.create_sharded(create, params, mesh=setup.mesh, strict=False)


def _sft_objectives(setup: Setup) -> recap.ObjectiveSet:
    return recap.ObjectiveSet([(name, "sft", ()) for name in setup.names])


def _sft_state(setup: Setup, params):
    sft = setup.config.sft
    optimizer = make_optimizer(sft.learning_rate, sft.steps, warmup_fraction=sft.warmup_fraction,
                               max_grad_norm=sft.max_grad_norm, weight_decay=sft.weight_decay)
    return optimizer, _stage_state(setup, params, optimizer, 0)


def _save(setup: Setup, global_step: int, state, stage: str, stage_step: int, replay,
          bad_steps: int) -> None:
    setup.checkpoints.save(global_step, state, {
        "stage": stage, "stage_step": stage_step, "replay": replay.state() if replay else None,
        "bad_steps": bad_steps, "skipped_records": setup.skips.counts()})


def _check_bad_steps(setup: Setup, bad_steps: int, save) -> None:
    limit = setup.config.rl.max_bad_steps
    if bad_steps >= limit:
        save()
        raise TrainingStopped(
            f"{bad_steps} steps in a row had a non-finite loss or gradient (limit "
            f"rl.max_bad_steps={limit}); their updates were skipped, the last good state is "
            f"saved in {setup.checkpoints.directory}. Check the rewards and the learning rate.")


def _logprob_fn(setup: Setup, group_size: int):
    return sampling.make_logprob_fn(setup.graphdef, group_size, setup.config.model.logits_chunk)


def run_sft(setup: Setup, params, resumed) -> Any:
    """The warm-start: returns the trained params (and writes WORKDIR/warmstart)."""
    config = setup.config
    total = config.sft.steps
    objectives = _sft_objectives(setup)
    count = objectives.num_objectives  # every source is an SFT objective; no reward columns
    grpo_config = grpo.GRPOConfig(group_size=1, reward_objective_index=((-1,),) * count,
                                  sft_objective_index=tuple(range(count)))
    optimizer, state = _sft_state(setup, params)
    start, replay_state, bad_steps = 0, None, 0
    if resumed is not None and resumed.meta["stage"] == "sft":
        state, start = resumed.state, resumed.meta["stage_step"]
        replay_state, bad_steps = resumed.meta["replay"], resumed.meta["bad_steps"]
    if start < total:
        step_fn = make_train_step(grpo_config, _logprob_fn(setup, 1),
                                  optimizer)
        sources = [rollout.WarmStartTargets(s, setup.processor) for s in setup.train_sources]
        shares = config.sft.source_shares
        replay = _replay(setup, sources, batch_size=config.sft.batch_size,
                         strategy="modomodo" if shares else "uniform",  # modomodo: fixed shares
                         weights=run_config.parse_shares(shares, len(sources)) if shares else None,
                         homogeneous=False, state=replay_state)
        weights = jnp.ones((objectives.num_objectives,), jnp.float32)
        clock = _Clock()
        for step in range(start + 1, total + 1):
            began = time.perf_counter()
            batch, stats = rollout.sft_batch(
                batch=next(replay), source_id=0, model_config=setup.model_config,
                num_reward_columns=grpo_config.num_reward_columns,
                prompt_buckets=config.data.prompt_buckets)
            state, metrics = step_fn(state, _place(setup, batch), weights)
            metrics = _host(metrics)
            clock.add(time.perf_counter() - began)
            bad_steps = bad_steps + 1 if metrics["skipped"] > 0 else 0
            line = {k: float(metrics[k]) for k in ("loss", "grad_norm", "skipped")}
            line.update(_objective_values(objectives.names, metrics, weights, None))
            line.update(tokens_per_s=stats["trained_tokens"] / clock.times[-1],
                        step_time_s=clock.times[-1])
            setup.record("sft", step, line)
            if step % config.log.every_steps == 0 or step == total:
                print(_progress("sft", step, total, line, clock.eta(total - step)), flush=True)
            save = lambda: _save(setup, step, state, "sft", step, replay, bad_steps)  # noqa: E731,B023
            _check_bad_steps(setup, bad_steps, save)
            if step == total or (config.checkpoint.every_steps
                                 and step % config.checkpoint.every_steps == 0):
                save()
        replay.close()
    _write_warmstart(setup, state.params)
    return state.params


def _write_warmstart(setup: Setup, params) -> None:
    """WORKDIR/warmstart: the warm-started policy as a Hugging Face directory (+ tokenizer)."""
    from recap_jax.models import qwen2_5_vl as qwen

    path = os.path.join(setup.workdir, "warmstart")
    qwen.save_pretrained(nnx.merge(setup.graphdef, params), path)
    setup.processor.tokenizer.save_pretrained(path)


def _rl_optimizer(setup: Setup, method: run_config.Method):
    rl = setup.config.rl
    updates = rl.steps * rl.num_iterations * rl.num_minibatches
    optimizer = make_optimizer(rl.learning_rate, max(updates, 1),
                               warmup_fraction=rl.warmup_fraction,
                               max_grad_norm=rl.max_grad_norm, weight_decay=rl.weight_decay)
    if not method.freeze_vision:
        return optimizer

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if "visual" in jax.tree_util.keystr(path) else "trained",
            params)

    return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)


def _rl_plan(setup: Setup):
    """(method, source names used, their sources, ObjectiveSet, GRPOConfig, RecapConfig)."""
    config = setup.config
    method = run_config.METHODS[config.rl.method]
    primary = config.data.primary or setup.names[0]
    names = setup.names if method.replay else [primary]
    sources = [setup.train_sources[setup.names.index(n)] for n in names]
    objectives = recap.ObjectiveSet([(n, get_task(n).kind, get_task(n).rewards) for n in names])
    rl = config.rl
    beta = method.beta if rl.beta == -1 else rl.beta
    grpo_config = grpo.GRPOConfig.for_objectives(
        objectives, group_size=rl.group_size, advantage_normalization=rl.advantage_normalization,
        epsilon_low=rl.epsilon_low, epsilon_high=rl.epsilon_high,
        dual_clip_c=rl.dual_clip_c or None, loss_aggregation=rl.loss_aggregation,
        max_completion_length=rl.max_new_tokens, beta=beta, kl_estimator=rl.kl_estimator,
        weighting=rl.weighting, mask_truncated_completions=rl.mask_truncated_completions,
        num_iterations=rl.num_iterations, num_minibatches=rl.num_minibatches)
    recap_config = None
    if method.recap:
        recap_config = objectives.recap_config(
            variant=config.recap.variant, window=config.recap.window,
            temperature=config.recap.temperature, alpha=config.recap.alpha,
            max_steps=max(rl.steps, 1))
    return method, primary, names, sources, objectives, grpo_config, recap_config


def _replay_weights(config, names):
    if config.rl.method != "modomodo":
        return None
    if config.data.modomodo_shares:
        return run_config.parse_shares(config.data.modomodo_shares, len(names))
    from recap_jax.data.replay import MODOMODO_SHARES

    return tuple(MODOMODO_SHARES[n] for n in names)


def run_rl(setup: Setup, params, resumed) -> Any:
    """RLVR with replay and RECAP or a baseline, from ``params`` (the warm-start)."""
    config, rl = setup.config, setup.config.rl
    if rl.steps == 0:  # a warm-start only: evaluate it, build no RL machinery
        _evaluate(setup, params, 0)
        return params
    method, primary, names, sources, objectives, grpo_config, recap_config = _rl_plan(setup)
    optimizer = _rl_optimizer(setup, method)
    recap_state = recap.init(recap_config, objectives.num_objectives) if recap_config else None
    # the step donates the state: the frozen reference needs buffers of its own
    reference_params = jax.tree.map(jnp.copy, params) if grpo_config.beta > 0 else None
    state = _stage_state(setup, params, optimizer, 1, recap_state)
    start, replay_state, bad_steps = 0, None, 0
    if resumed is not None and resumed.meta["stage"] == "rl":
        state, start = resumed.state, resumed.meta["stage_step"]
        replay_state, bad_steps = resumed.meta["replay"], resumed.meta["bad_steps"]
    if start == 0:
        _evaluate(setup, state.params, 0)
    if start >= rl.steps:
        return state.params

    rl_step_fn = make_train_step(grpo_config, _logprob_fn(setup, rl.group_size), optimizer)
    sft_config = dataclasses.replace(grpo_config, group_size=1)
    sft_step_fn = make_train_step(sft_config, _logprob_fn(setup, 1),
                                  optimizer)
    reference_fn = jax.jit(lambda p, b: _logprob_fn(setup, rl.group_size)(p, b)[0]) \
        if reference_params is not None else None
    update_recap = jax.jit(lambda s, m: recap.update(recap_config, s, m["objective_signal"],
                                                     m["objective_present"])[0]) \
        if recap_config else None
    sampling_params = sampling.SamplingParams(
        rl.max_new_tokens, rl.temperature, rl.top_p, rl.top_k, setup.model_config.eos_token_id,
        setup.model_config.pad_token_id, rl.group_size).validate()
    replay = _replay(setup, sources, batch_size=rl.prompts_per_step, strategy=method.strategy,
                     homogeneous=True, state=replay_state, primary=(primary,),
                     weights=_replay_weights(config, names))
    offset = config.sft.steps
    clock = _Clock()
    for step in range(start + 1, rl.steps + 1):
        began = time.perf_counter()
        batch = next(replay)
        source_id = int(batch["source_id"][0])
        task = get_task(names[source_id])
        weights = jnp.copy(state.recap_state.weights) if recap_config else \
            jnp.ones((objectives.num_objectives,), jnp.float32)  # (a copy: the state is donated)
        if task.kind == "rl":
            rng = jax.random.fold_in(jax.random.key(config.seed), RL_RNG_OFFSET + step)
            step_batch, stats = rollout.rl_batch(
                graphdef=setup.graphdef, params=state.params, batch=batch, task=task,
                source_id=source_id, model_config=setup.model_config, processor=setup.processor,
                sampling_params=sampling_params, rng=rng,
                num_reward_columns=grpo_config.num_reward_columns,
                prompt_buckets=config.data.prompt_buckets)
            step_batch = _place(setup, step_batch)
            if reference_fn is not None:
                step_batch["ref_logprobs"] = reference_fn(reference_params, step_batch)
            tokens = stats["sampled_tokens"]
            state, metrics = rl_step_fn(state, step_batch, weights)
        else:
            step_batch, stats = rollout.sft_batch(
                batch=batch, source_id=source_id, model_config=setup.model_config,
                num_reward_columns=grpo_config.num_reward_columns,
                prompt_buckets=config.data.prompt_buckets)
            step_batch = _place(setup, step_batch)
            if reference_fn is not None:
                step_batch["ref_logprobs"] = jnp.zeros_like(step_batch["old_logprobs"])
            tokens = stats["trained_tokens"]
            state, metrics = sft_step_fn(state, step_batch, weights)
        if update_recap is not None:
            state = state.replace(recap_state=update_recap(state.recap_state, metrics))
        metrics = _host(metrics)
        clock.add(time.perf_counter() - began)
        bad_steps = bad_steps + 1 if metrics["skipped"] > 0 else 0
        line = {k: float(metrics[k]) for k in SCALARS if k in metrics
                and (task.kind == "rl" or k in ("loss", "grad_norm", "skipped"))}
        line.update(source=names[source_id], tokens_per_s=tokens / clock.times[-1],
                    step_time_s=clock.times[-1])
        line.update(_objective_values(objectives.names, metrics, np.asarray(weights),
                                      jax.device_get(state.recap_state) if recap_config else None))
        setup.record("rl", step, line)
        if step % config.log.every_steps == 0 or step == rl.steps:
            print(_progress("rl", step, rl.steps, line, clock.eta(rl.steps - step)), flush=True)
        save = lambda: _save(setup, offset + step, state, "rl", step, replay, bad_steps)  # noqa: E731,B023
        _check_bad_steps(setup, bad_steps, save)
        if step == rl.steps or (config.eval.every_steps and step % config.eval.every_steps == 0):
            _evaluate(setup, state.params, step)
        if step == rl.steps or (config.checkpoint.every_steps
                                and step % config.checkpoint.every_steps == 0):
            save()
    replay.close()
    return state.params


# --------------------------------------------------------------------------- entry points


def _resume_target(setup: Setup, meta: dict):
    """A fresh train state of the checkpoint's stage (the structure a restore fills)."""
    if meta["stage"] == "sft":
        return _sft_state(setup, setup.initial_params)[1]
    method, _, _, _, objectives, _, recap_config = _rl_plan(setup)
    recap_state = recap.init(recap_config, objectives.num_objectives) if recap_config else None
    return _stage_state(setup, setup.initial_params, _rl_optimizer(setup, method), 1, recap_state)


def _resume(setup: Setup):
    """The newest complete checkpoint, restored into the state of its stage; None if none."""
    like = functools.partial(_resume_target, setup)
    resumed = setup.checkpoints.restore_latest(like)
    if resumed is None and setup.checkpoints.set_aside:
        raise CheckpointsUnreadable(
            f"every checkpoint in {setup.checkpoints.directory} is damaged (see the warnings "
            f"above); they were moved to {setup.checkpoints.set_aside}, nothing was deleted "
            "or overwritten. Run again to start over, or restore them by hand.")
    if resumed is not None:
        meta = resumed.meta
        moved = setup.log.rewind(meta["stage"], meta["stage_step"])
        print(f"resuming from {setup.checkpoints.path(resumed.step)} ({meta['stage']} step "
              f"{meta['stage_step']}); {moved} later metric lines moved to "
              f"{os.path.basename(setup.log.superseded_path)}", flush=True)
    elif os.path.exists(setup.log.path):
        setup.log.rewind("sft", 0)  # a run killed before its first checkpoint starts over
    return resumed


def _write_config(config, workdir: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config.to_dict(), handle, indent=1, default=str)


def train(config, workdir: str, *, on_step=None) -> Any:
    """Runs (or resumes) the whole job; returns the final params.

    on_step: optional callable(stage, step, line) run after each step's metrics line is
    written (monitoring, tests).
    """
    run_config.validate(config)
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)
    setup = _setup(config, workdir)
    setup.on_step = on_step
    try:
        resumed = _resume(setup)
        params = setup.initial_params
        in_rl = resumed is not None and resumed.meta["stage"] == "rl"
        if config.sft.steps > 0 and not in_rl:
            params = run_sft(setup, params, resumed)
        elif in_rl and config.sft.steps > 0:
            params = _warmstart_params(setup)
        params = run_rl(setup, params, resumed)
        if setup.skips.count():
            print(f"records skipped: {setup.skips.counts()}", flush=True)
        return params
    finally:
        setup.log.close()
        setup.checkpoints.close()


def _warmstart_params(setup: Setup):
    """The warm-start params (the LwF reference and RL's starting point) from WORKDIR/warmstart."""
    from recap_jax.models import qwen2_5_vl as qwen

    model_cfg = setup.config.model
    model = qwen.from_pretrained(os.path.join(setup.workdir, "warmstart"), mesh=setup.mesh,
                                 dtype=_dtype(model_cfg.compute_dtype),
                                 param_dtype=_dtype(model_cfg.param_dtype), remat=model_cfg.remat)
    return nnx.split(model)[1]


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
    flags.DEFINE_string("workdir", None, "output directory (resumes when it has checkpoints)")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(_):
        from absl import logging as absl_logging

        absl_logging.set_verbosity("warning")  # orbax logs every file operation at INFO
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            train(flags.FLAGS.config, flags.FLAGS.workdir)
        except (run_config.ConfigError, TrainingStopped, CheckpointsUnreadable,
                CheckpointMismatch) as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1
        return 0

    app.run(_main, argv=argv)
    return 0


if __name__ == "__main__":
    main()
