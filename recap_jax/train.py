"""Training end to end: an optional SFT warm-start, then RLVR with replay and RECAP (or a
baseline), with periodic evaluation, metrics and resumable checkpoints.

    python -m recap_jax.train --config configs/demo.py --workdir /tmp/recap_demo
    python -m recap_jax.train --config configs/demo.py --workdir DIR --config.rl.method=uniform

`train` in the order it runs:
  1. plan: the config validated and turned into typed objects once (recap_jax.plan);
  2. mesh (``mesh.spec``; ``mesh.distributed`` starts jax.distributed first), tokenizer,
     model (a Hugging Face directory, a preset of the real architecture or the tiny model);
  3. resume: the newest complete checkpoint in WORKDIR/checkpoints, if any;
  4. each stage of the plan through one loop (`run_stage`): SFT (every source's targets as
     next-token prediction; writes WORKDIR/warmstart), then RL (per step one homogeneous
     batch from the replay mixture; an RL source's prompts are sampled G times and scored,
     an SFT source's references give an NTP loss; one jitted step weights the batch with
     lambda from RECAP, computed inside the step from the history including this batch, or
     1 for the baselines);
  5. evaluation (greedy, held-out records) before RL, every ``eval.every_steps`` and at the
     end; the final policy exported to WORKDIR/final.

Multi-process runs: every process reads the same replay stream (same seed) and keeps its own
share of the rows (`rollout.Placement`): it samples, decodes and scores only those; the train step
sees the global batch, so group advantages and RECAP's signals are global.

Outputs in WORKDIR: config.json, metrics.jsonl (+ metrics.superseded.jsonl after a resume),
tensorboard/, checkpoints/<step>/ (orbax; step = SFT step, or sft.steps + RL step),
warmstart/ and final/ (Hugging Face directories), eval/<stage>_step_<n>.json, tokenizer/
(demo only). With LoRA (model.lora.rank > 0) the checkpoints hold the adapters and their
optimizer state, not the frozen base; warmstart/ and final/ the merged policy, or final/ the
adapters only (model.lora.merge_on_export=False: adapters.safetensors + lora.json).

Metric keys (one JSONL line per step; see recap_jax.metrics_log): loss, grad_norm,
update_norm (global L2 norm of the change of the stored parameters: 0 when a bf16 update is
rounded away), param_norm, ratio_max, ratio_p99 (importance ratio pi / pi_old over RL
tokens), skipped, source, tokens_per_s, step_time_s, process_rows (the rows this process
fed), advantage_change (||A(lambda) - A(1)|| / ||A(1)||: what lambda changed in the
advantages), lambda_gradient_cosine (rl.log_lambda_effect: cosine of the update's gradient
with the one lambda = 1 would give), completion_length_mean, truncated_fraction, entropy,
clip_fraction_{low,high}, kl (lwf), logprob_abs_diff; per objective o: reward/<o> (batch
mean raw reward, RL objectives in the batch), ntp_loss/<o> (SFT objectives in the batch),
weight/<o> (the lambda that weighted this step), recap/c/<o>, recap/i/<o> (RECAP's c and i
after this step's signal; recap only); reward_timeouts/<r>, reward_errors/<r> (rewards that
failed, when any); dynamic_sampling/{draws,resampled,dropped,filled_zero_variance,surplus}
(RL batches, with rl.dynamic_sampling_extra_draws > 0: recap_jax.dynamic_sampling).
Eval lines: eval/<task>/<metric>, eval/<task>/completion_length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recap_jax import benchmarks_eval, freeze, lora, lora_run, parallel, policy, recap, rollout, run_config, sampling
from recap_jax import plan as plan_lib
from recap_jax.checkpointing import CheckpointMismatch, RunCheckpoints
from recap_jax.data import sft_targets
from recap_jax.data.records import SkipCounter
from recap_jax.data.replay import make_replay
from recap_jax.data.run_sources import WarmStartTargets, open_sources
from recap_jax.data.tasks import get_task
from recap_jax.evaluator import Evaluator
from recap_jax.metrics_log import MetricsLog
from recap_jax.models.qwen2_5_vl import attention
from recap_jax.preemption import Preempted, PreemptionHandler
from recap_jax.reward_pool import RewardPool
from recap_jax.tools import memory
from recap_jax.train_state import TrainState
from recap_jax.train_step import make_train_step
from recap_jax.workdir_lock import WorkdirBusy, WorkdirLock

__all__ = ["CheckpointsUnreadable", "Preempted", "TrainingStopped", "load_checkpoint_params", "main",
           "run_stage", "train"]

_log = logging.getLogger("recap_jax.train")

class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps in a row); a checkpoint holding
    the last good state was saved first."""


class CheckpointsUnreadable(RuntimeError):
    """The workdir has checkpoints but none can be read; the run refuses to start over them."""


# --------------------------------------------------------------------------- host


class _SilentLog:
    """The metrics log of processes other than 0 (process 0 writes the run's files)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.superseded_path = os.path.join(workdir, "metrics.superseded.jsonl")

    def write(self, *args, **kwargs) -> None:
        pass

    def rewind(self, *args, **kwargs) -> int:
        return 0

    def close(self) -> None:
        pass


def _host_scalars(metrics: dict) -> dict:
    """Replicated metrics -> numpy (a multi-process array: its local copy)."""
    return {k: np.asarray(v.addressable_data(0) if isinstance(v, jax.Array) else v)
            for k, v in metrics.items()}


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """What every stage shares (built once per process)."""

    plan: plan_lib.RunPlan
    workdir: str
    processor: Any
    model_config: Any
    graphdef: Any
    initial_params: Any
    placement: rollout.Placement
    train_sources: list
    evaluator: Evaluator
    bench_suites: list
    checkpoints: RunCheckpoints
    log: MetricsLog
    skips: SkipCounter
    on_step: Any = None  # callable(stage, step, line) after each logged step, or None
    preemption: Any = None  # a preemption.PreemptionHandler polled once per step, or None

    @property
    def mesh(self):
        return self.placement.mesh

    def record(self, stage: str, step: int, line: dict) -> None:
        self.log.write(stage, step, line)
        if self.on_step is not None:
            self.on_step(stage, step, line)


def build_run(plan: plan_lib.RunPlan, workdir: str) -> Run:
    """Mesh, tokenizer, model, sources, evaluator, checkpoints and metrics of a plan."""
    mesh = parallel.make_mesh(plan.mesh) if plan.mesh is not None else None
    attention.set_implementation(plan.model.attention)  # read when each step is traced
    if jax.process_index() == 0 and (plan.model.attention != "auto" or jax.default_backend() != "cpu"):
        print(f"attention: {plan.model.attention} -> {attention.resolve()} on {jax.default_backend()}", flush=True)
    processor = policy.build_processor(plan, workdir)
    model_config = policy.build_model_config(plan.model)
    policy.check_tokenizer_matches(processor, model_config)
    # on accelerators: the per-device memory plan printed, and a run that cannot fit refused
    memory.preflight(plan, mesh, ignore=plan.ignore_memory_plan, model_config=model_config)
    graphdef, params = policy.build_params(plan, model_config, mesh)
    skips = SkipCounter(_log)
    train_sources = open_sources(plan.sources, "train", skips)
    plan = plan.bounded_by_data(train_sources)
    evaluator = Evaluator(open_sources(plan.sources, "eval", skips), processor, model_config,
                          num_examples=plan.eval_num_examples, batch_size=plan.eval_batch_size,
                          max_new_tokens=plan.eval_max_new_tokens,
                          prompt_buckets=plan.data.prompt_buckets,
                          answer_buckets=plan.data.answer_buckets,
                          image_reliance=plan.eval_image_reliance)
    bench = plan.benchmarks
    bench_suites = benchmarks_eval.open_suites(bench.specs, limit=bench.limit or None) \
        if bench.specs else []
    checkpoints = RunCheckpoints(os.path.join(workdir, "checkpoints"), keep=plan.checkpoint_keep)
    log = MetricsLog(workdir, tensorboard=plan.tensorboard, wandb=plan.wandb) \
        if jax.process_index() == 0 else _SilentLog(workdir)
    return Run(plan, workdir, processor, model_config, graphdef, params, rollout.Placement(mesh),
               train_sources, evaluator, bench_suites, checkpoints, log, skips)


# --------------------------------------------------------------------------- logging


def _objective_values(objectives: recap.ObjectiveSet, metrics: dict) -> dict[str, float]:
    """Per-objective entries of a metrics line (see the module docstring)."""
    out = {}
    present = metrics["objective_present"].astype(bool)
    for k, (name, direction) in enumerate(zip(objectives.names, objectives.directions)):
        if present[k]:
            key = "ntp_loss" if direction == "loss" else "reward"
            value = metrics["objective_ntp_loss" if direction == "loss"
                            else "objective_reward_mean"][k]
            out[f"{key}/{name}"] = float(value)
        out[f"weight/{name}"] = float(metrics["objective_weight"][k])
        if "recap_c" in metrics:
            out[f"recap/c/{name}"] = float(metrics["recap_c"][k])
            out[f"recap/i/{name}"] = float(metrics["recap_i"][k])
    return out


SCALARS = ("overlong_penalty_mean", "loss", "grad_norm", "update_norm", "param_norm", "skipped", "entropy", "kl",
           "logprob_abs_diff", "ratio_max", "ratio_p99", "clip_fraction_low",
           "clip_fraction_high", "completion_length_mean", "truncated_fraction",
           "advantage_change", "lambda_gradient_cosine")
SFT_SCALARS = ("overlong_penalty_mean", "loss", "grad_norm", "update_norm", "param_norm", "skipped")


def _progress(stage: str, step: int, total: int, line: dict, eta_s: float) -> str:
    rewards = " ".join(f"{k.split('/', 1)[1]}={v:.3f}" for k, v in line.items()
                       if k.startswith(("reward/", "ntp_loss/")))
    weights = " ".join(f"{v:.2f}" for k, v in line.items() if k.startswith("weight/"))
    return (f"[{stage}] step {step}/{total} {line.get('source', '')} | {rewards} | lambda "
            f"[{weights}] | loss {line.get('loss', float('nan')):.4f} | update "
            f"{line.get('update_norm', float('nan')):.2e} | "
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


def _evaluate(run: Run, params, rl_step: int, stage: str = "rl") -> dict:
    """Runs the evaluator, logs an eval line and writes eval/<stage>_step_<n>.json."""
    start = time.perf_counter()
    results = run.evaluator(run.graphdef, params)
    values = {f"eval/{task}/{metric}": value for task, table in results.items()
              for metric, value in table.items() if metric != "num_examples"}
    if run.bench_suites:  # the public benchmarks (the paper's measure of forgetting)
        bench = run.plan.benchmarks
        scores = benchmarks_eval.evaluate_suites(
            run.graphdef, params, run.processor, run.model_config, run.bench_suites,
            prompt=bench.prompt, batch_size=bench.batch_size,
            max_new_tokens=bench.max_new_tokens, mesh=run.mesh)
        print(benchmarks_eval.write_results(
            scores, os.path.join(run.workdir, "eval", f"bench_{stage}_step_{rl_step}"),
            {"stage": stage, "step": rl_step}), flush=True)
        values.update({f"bench/{label}": result["score"] for label, result in scores.items()})
    run.log.write("eval", rl_step, dict(values, eval_time_s=time.perf_counter() - start))
    if jax.process_index() != 0:
        return results
    os.makedirs(os.path.join(run.workdir, "eval"), exist_ok=True)
    with open(os.path.join(run.workdir, "eval", f"{stage}_step_{rl_step}.json"), "w") as handle:
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


def stage_state(run: Run, stage: plan_lib.StagePlan, params) -> TrainState:
    """A fresh train state of ``stage`` from ``params`` (sharded like them on a mesh). With
    LoRA, ``params`` is the frozen base and the state's params are {"base", "adapters"}."""
    recap_state = recap.init(stage.recap, stage.objectives.num_objectives) if stage.recap \
        else None
    rng = jax.random.key(run.plan.seed + (stage.name == "rl"))
    config = run.plan.model.lora
    if config is not None:
        adapted = lora_run.init_params(params, config, run.plan.seed + stage.rng_offset, run.mesh)
        return lora_run.create_state(adapted, stage.optimizer, rng, recap_state, run.mesh)

    def create(p):
        return TrainState.create(p, stage.optimizer, rng, recap_state)

    if run.mesh is None:
        return create(params)
    with parallel.use_mesh(run.mesh):
        return parallel.create_sharded(create, params, mesh=run.mesh, strict=False)


class _StageSteps:
    """The stage's jitted steps (one per group size: RL sources G rows per prompt, SFT 1)
    and how a replay batch becomes a train-step batch."""

    def __init__(self, run: Run, stage: plan_lib.StagePlan):
        self.run, self.stage = run, stage
        self.sampling = (stage.sampling_params(run.model_config.eos_token_id,
                                               run.model_config.pad_token_id)
                         if stage.is_rl else None)
        self._steps: dict[Any, Any] = {}  # one per GRPOConfig (group size, source's L_max)
        self.rewards = RewardPool(stage.reward_workers, stage.reward_timeout_s,
                                  names=sorted({r for s in stage.objectives.sources
                                                for r in s.rewards}))
        self.rollout_counts: dict[str, int] = {}  # dynamic sampling's, of the last batch

    def step_fn(self, grpo_config):
        if grpo_config not in self._steps:
            temperature = sampling.logprob_temperature(self.sampling) if self.sampling else 1.0
            logprob_fn = sampling.make_logprob_fn(self.run.graphdef, grpo_config.group_size,
                                                  self.run.plan.model.logits_chunk,
                                                  temperature=temperature,
                                                  entropy_gradient=grpo_config.entropy_coef > 0)
            if self.stage.freeze_vision:  # no backward pass through the vision tower
                logprob_fn = freeze.freeze_vision(logprob_fn)
            lora_config = self.run.plan.model.lora
            if lora_config is not None:  # params {"base", "adapters"}: merged inside the loss,
                # or x W + s (dropout(x) A) B with dropout > 0 (a key per update: logprob_rng)
                logprob_fn = lora.wrap_logprob_fn(logprob_fn, lora_config,
                                                  policy.DTYPES[self.run.plan.model.compute_dtype])
            self._steps[grpo_config] = make_train_step(
                grpo_config, logprob_fn, self.stage.optimizer, recap=self.stage.recap,
                measure_lambda_effect=self.stage.log_lambda_effect,
                frozen_key="base" if lora_config is not None else None,
                logprob_rng=lora_config is not None and lora_config.dropout > 0)
        return self._steps[grpo_config]

    def batch(self, replay_batch: dict, step: int, params):
        """(device TrainBatch, its GRPOConfig, tokens processed, source, this process's rows)
        of one replay batch."""
        run, stage, place = self.run, self.stage, self.run.placement
        source_id = int(replay_batch["source_id"][0]) if stage.is_rl else 0
        name = stage.sources[source_id]
        grpo_config = stage.source_grpo(name) if stage.is_rl else stage.grpo
        buckets = run.plan.data.prompt_buckets
        task = get_task(name)
        if stage.is_rl and task.kind == "rl":
            rng = jax.random.fold_in(jax.random.key(run.plan.seed), stage.rng_offset + step)
            batch, stats = rollout.rl_batch(
                graphdef=run.graphdef, params=policy_params(run, params), batch=replay_batch,
                task=task,
                source_id=source_id, model_config=run.model_config, processor=run.processor,
                sampling_params=self.sampling, rng=rng,
                num_reward_columns=grpo_config.num_reward_columns, prompt_buckets=buckets,
                placement=place, scorer=self.rewards.score,
                reward_names=stage.objectives.sources[source_id].rewards,
                max_new_tokens=stage.completion_limit(name), stop_strings=stage.stop_strings(name),
                dynamic_sampling_extra_draws=stage.dynamic_sampling_extra_draws)
            tokens = stats["sampled_tokens"]
            self.rollout_counts = stats.get("dynamic_sampling", {})
        else:
            if task.sft_loss == "conversation":  # the released OCR replay: the whole turn
                replay_batch = sft_targets.conversation_batch(
                    replay_batch, image_token_id=run.model_config.image_token_id,
                    pad_id=run.model_config.pad_token_id,
                    completion_buckets=run.plan.data.answer_buckets,
                    tail_ids=sft_targets.released_tail_ids(run.processor.tokenizer))
            batch, stats = rollout.sft_batch(
                batch=replay_batch, source_id=source_id, model_config=run.model_config,
                num_reward_columns=grpo_config.num_reward_columns, prompt_buckets=buckets)
            batch = place.local_batch(batch)
            tokens = stats["trained_tokens"]
        rows = len(batch.source_id)
        return place.to_device(batch, rollout.BATCH_AXES), grpo_config, tokens, name, rows


def policy_params(run: Run, params) -> Any:
    """A train state's params as the policy's model state (LoRA: the base with the adapters
    merged); what the sampler, the evaluator and the export read."""
    return lora_run.policy_params(params, run.plan.model.lora)


def _checkpointed(run: Run, state: TrainState) -> TrainState:
    """What a checkpoint holds of ``state``: all of it, or with LoRA all but the frozen base."""
    return state if run.plan.model.lora is None else lora_run.checkpoint_view(state)


def _save(run: Run, global_step: int, state, stage: str, stage_step: int, replay,
          bad_steps: int) -> None:
    run.checkpoints.save(global_step, _checkpointed(run, state), {
        "stage": stage, "stage_step": stage_step, "replay": replay.state() if replay else None,
        "bad_steps": bad_steps, "skipped_records": run.skips.counts()})


def _replay_sources(run: Run, stage: plan_lib.StagePlan) -> list:
    """The stage's sources for the replay: an SFT target (warm-start, or an SFT source in RL)
    is the task's formatted completion (e.g. the released OCR replay's <answer>...</answer>);
    RL sources keep their raw references, which the rewards read."""
    names = list(run.plan.source_names)
    sources = [run.train_sources[names.index(n)] for n in stage.sources]
    return [WarmStartTargets(s, run.processor) if not stage.is_rl or get_task(n).kind == "sft"
            else s for n, s in zip(stage.sources, sources)]


def run_stage(run: Run, stage: plan_lib.StagePlan, params, resumed) -> Any:
    """One stage from ``params`` (or its checkpoint in ``resumed``) to its last step; returns
    the final train-state params (LoRA: {"base", "adapters"}; `policy_params` merges).
    Resume, clock, bad-step counting, metrics lines, progress, evaluation
    and checkpoint cadence are the same for SFT and RL."""
    plan = run.plan
    offset = plan.stage("sft").steps if stage.is_rl and plan.stage("sft") else 0
    state = stage_state(run, stage, params)
    # the initial policy (LoRA: the base and the zero-effect adapters); state is donated
    reference = jax.tree.map(jnp.copy, state.params) if stage.reference else None
    start, replay_state, bad_steps = 0, None, 0
    if resumed is not None and resumed.meta["stage"] == stage.name:
        state, start = resumed.state, resumed.meta["stage_step"]
        if run.plan.model.lora is not None:  # the checkpoint holds the adapters only
            state = lora_run.with_base(state, params)
        replay_state, bad_steps = resumed.meta["replay"], resumed.meta["bad_steps"]
    if stage.is_rl and start == 0:
        _evaluate(run, policy_params(run, state.params), 0)
    if start >= stage.steps:
        return state.params
    steps = _StageSteps(run, stage)
    replay = make_replay(_replay_sources(run, stage), run.processor, run.model_config,
                         stage.replay, state=replay_state, skips=run.skips)
    clock = _Clock()
    scalars = SCALARS if stage.is_rl else SFT_SCALARS
    try:
        for step in range(start + 1, stage.steps + 1):
            began = time.perf_counter()
            batch, grpo_config, tokens, source, rows = steps.batch(next(replay), step,
                                                                   state.params)
            state, metrics = steps.step_fn(grpo_config)(state, batch, None, reference)
            metrics = _host_scalars(metrics)
            clock.add(time.perf_counter() - began)
            bad_steps = bad_steps + 1 if metrics["skipped"] > 0 else 0
            rl_batch = grpo_config.group_size == stage.grpo.group_size and stage.is_rl
            line = {k: float(metrics[k]) for k in scalars if k in metrics
                    and (rl_batch or k in SFT_SCALARS)}
            if stage.is_rl:
                line["source"] = source
            line.update(tokens_per_s=tokens / clock.times[-1], step_time_s=clock.times[-1],
                        process_rows=rows)
            line.update(_objective_values(stage.objectives, metrics))
            line.update(steps.rewards.take_counts())  # rewards that timed out or failed
            line.update(steps.rollout_counts)  # dynamic sampling: dropped / resampled groups
            steps.rollout_counts = {}
            run.record(stage.name, step, line)
            if step % plan.log_every == 0 or step == stage.steps:
                print(_progress(stage.name, step, stage.steps, line,
                                clock.eta(stage.steps - step)), flush=True)
            def save(step=step, state=state, bad_steps=bad_steps):
                _save(run, offset + step, state, stage.name, step, replay, bad_steps)

            if bad_steps >= stage.max_bad_steps:
                save()
                raise TrainingStopped(
                    f"{bad_steps} steps in a row had a non-finite loss or gradient (limit "
                    f"rl.max_bad_steps={stage.max_bad_steps}); their updates were skipped, the "
                    f"last good state is saved in {run.checkpoints.directory}. Check the "
                    "rewards and the learning rate.")
            if stage.is_rl and (step == stage.steps
                                or (stage.eval_every and step % stage.eval_every == 0)):
                _evaluate(run, policy_params(run, state.params), step)
            # polled at every step on every process (collective on several)
            preempted = run.preemption is not None and run.preemption.should_stop(offset + step)
            if preempted or step == stage.steps or (plan.checkpoint_every
                                                    and step % plan.checkpoint_every == 0):
                save()
            if preempted:  # this step finished and is saved: the restart resumes from here
                raise Preempted(offset + step, run.preemption.signal_name)
    finally:
        replay.close()
        steps.rewards.close()
    return state.params


# --------------------------------------------------------------------------- resume


def _resume_target(run: Run, meta: dict) -> TrainState:
    """A fresh train state of the checkpoint's stage (the structure a restore fills)."""
    return _checkpointed(run, stage_state(run, run.plan.stage(meta["stage"]), run.initial_params))


def _resume(run: Run):
    """The newest complete checkpoint, restored into the state of its stage; None if none."""
    resumed = run.checkpoints.restore_latest(lambda meta: _resume_target(run, meta))
    if resumed is None and run.checkpoints.set_aside:
        raise CheckpointsUnreadable(
            f"every checkpoint in {run.checkpoints.directory} is damaged (see the warnings "
            f"above); they were moved to {run.checkpoints.set_aside}, nothing was deleted "
            "or overwritten. Run again to start over, or restore them by hand.")
    if resumed is not None:
        meta = resumed.meta
        moved = run.log.rewind(meta["stage"], meta["stage_step"])
        print(f"resuming from {run.checkpoints.path(resumed.step)} ({meta['stage']} step "
              f"{meta['stage_step']}); {moved} later metric lines moved to "
              f"{os.path.basename(run.log.superseded_path)}", flush=True)
    elif os.path.exists(run.log.path):
        run.log.rewind("sft", 0)  # a run killed before its first checkpoint starts over
    return resumed


def load_checkpoint_params(run: Run, step: int):
    """The policy params of checkpoint ``step`` (the optimizer state is not built or read).
    With LoRA the checkpoint's adapters are merged into the base they trained on: the
    warm-start (WORKDIR/warmstart) for an RL checkpoint after an SFT stage, else the run's
    initial params."""
    meta = run.checkpoints.read_meta(step)
    config = run.plan.model.lora
    if config is None:
        return run.checkpoints.restore_params(step, run.initial_params, meta)
    base = run.initial_params
    if meta["stage"] == "rl" and run.plan.stage("sft") is not None:
        base = policy.load_params(run.plan, os.path.join(run.workdir, "warmstart"), run.mesh)
    like = {"adapters": lora_run.init_params(base, config, 0, run.mesh)["adapters"]}
    adapters = run.checkpoints.restore_params(step, like, meta)["adapters"]
    return lora_run.policy_params({"base": base, "adapters": adapters}, config)


def load_final_params(run: Run):
    """The policy params of WORKDIR/final: a Hugging Face directory, or (LoRA with
    merge_on_export=False) the adapters of lora.json merged into the base directory it names
    (a random base of the run's seed when that is "")."""
    final = os.path.join(run.workdir, "final")
    config = run.plan.model.lora
    if config is None or not os.path.exists(os.path.join(final, lora_run.LORA_FILE)):
        return policy.load_params(run.plan, final, run.mesh)
    with open(os.path.join(final, lora_run.LORA_FILE), encoding="utf-8") as handle:
        base_directory = json.load(handle)["base"]
    base = (policy.load_params(run.plan, base_directory, run.mesh) if base_directory
            else run.initial_params)
    like = lora_run.init_params(base, config, 0, run.mesh)["adapters"]
    adapters = lora_run.load_adapters(final, like)
    return lora_run.policy_params({"base": base, "adapters": adapters}, config)


def _write_config(config, workdir: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config.to_dict(), handle, indent=1, default=str)


def train(config, workdir: str, *, on_step=None) -> Any:
    """Runs (or resumes) the whole job; returns the final params.

    on_step: optional callable(stage, step, line) run after each step's metrics line is
    written (monitoring, tests).
    """
    plan = plan_lib.build_plan(config)
    if plan.mesh is not None:
        parallel.initialize_distributed(plan.mesh)  # before anything touches the devices
    os.makedirs(workdir, exist_ok=True)
    with WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext(), \
            PreemptionHandler() as preemption:
        return _train(plan, config, workdir, on_step, preemption)


def _train(plan, config, workdir: str, on_step, preemption) -> Any:
    if jax.process_index() == 0:
        _write_config(config, workdir)
    run = build_run(plan, workdir)
    run.on_step, run.preemption = on_step, preemption
    try:
        resumed = _resume(run)
        params, trained = run.initial_params, None
        base_directory = plan.model.path  # the base LoRA adapters apply to
        in_rl = resumed is not None and resumed.meta["stage"] == "rl"
        sft, rl = plan.stage("sft"), plan.stage("rl")
        if sft is not None:
            base_directory = os.path.join(workdir, "warmstart")
            if in_rl:
                params = policy.load_params(plan, base_directory, run.mesh)
            else:  # LoRA: the warm-start is exported merged and is the RL stage's base
                trained = run_stage(run, sft, params, resumed)
                params = policy_params(run, trained)
                policy.export(run.graphdef, params, run.processor, base_directory)
        if rl is not None:
            trained = run_stage(run, rl, params, resumed)
            params = policy_params(run, trained)
        else:
            _evaluate(run, params, 0)  # a warm-start only: evaluate it
        final = os.path.join(workdir, "final")
        if plan.model.lora is not None and not plan.model.lora_merge_on_export \
                and rl is not None:
            lora_run.export_adapters(trained["adapters"], plan.model.lora, final,
                                     base_directory, run.processor)
        else:
            policy.export(run.graphdef, params, run.processor, final)
        if run.skips.count():
            print(f"records skipped: {run.skips.counts()}", flush=True)
        return params
    finally:
        run.log.close()
        run.checkpoints.close()


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
    flags.DEFINE_string("workdir", None, "output directory (resumes when it has checkpoints)")
    flags.DEFINE_bool("rehearse", False, "run the config on a tiny model and fixture data of the "
                                         "same formats for a few steps, then print the checks")
    flags.DEFINE_integer("simulate_devices", 0, "CPU only: this many simulated devices (e.g. 8 "
                                                "for a mesh of 8)")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(_):
        from absl import logging as absl_logging

        absl_logging.set_verbosity("warning")  # orbax logs every file operation at INFO
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        if flags.FLAGS.simulate_devices:
            jax.config.update("jax_num_cpu_devices", flags.FLAGS.simulate_devices)
            # simulated devices share the host's cores: XLA's CPU all-reduce aborts the process
            # when one device thread arrives 40 s after the first (read at backend start)
            xla_flags = os.environ.get("XLA_FLAGS", "")
            if "collective_call_terminate_timeout" not in xla_flags:
                os.environ["XLA_FLAGS"] = (f"{xla_flags} --xla_cpu_collective_call_terminate_timeout_"
                                           "seconds=900").strip()
        try:
            if flags.FLAGS.rehearse:
                from recap_jax.rehearse import format_summary, rehearse

                summary = rehearse(flags.FLAGS.config, flags.FLAGS.workdir)
                print(format_summary(summary), flush=True)
                return 0 if all(ok for ok, _ in summary.values()) else 1
            train(flags.FLAGS.config, flags.FLAGS.workdir)
        except Preempted as stop:
            print(f"preempted: {stop}", flush=True)
            return 0
        except (run_config.ConfigError, TrainingStopped, CheckpointsUnreadable,
                CheckpointMismatch, WorkdirBusy, memory.MemoryPlanError) as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1
        return 0

    app.run(_main, argv=argv)
    return 0


if __name__ == "__main__":
    main()
