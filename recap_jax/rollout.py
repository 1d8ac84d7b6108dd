"""Replay batch -> train-step batch: an RL source's prompts are sampled G times, decoded and
scored by the source's verifiable rewards (`rl_batch`); an SFT source's reference answers
become the completions of a next-token loss (`sft_batch`). Both return a
`train_step.TrainBatch` and host statistics.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from recap_jax import parallel, sampling
from recap_jax import rewards as rewards_lib
from recap_jax.data import encode as encode_lib
from recap_jax.data.tasks import Task
from recap_jax.dynamic_sampling import ScoredGroups, fill_batch, take_groups
from recap_jax.models.qwen2_5_vl.model import ModelInputs
from recap_jax.stop_strings import finish_completions
from recap_jax.train_step import TrainBatch

__all__ = ["BATCH_AXES", "PATCH_BUCKET", "Placement", "decode_completions", "finish_rows",
           "gather", "prompt_inputs", "rl_batch", "score", "sft_batch", "take_local_groups",
           "take_prompt_rows"]

PATCH_BUCKET = 256
# the row axis of every leaf of a TrainBatch (None: the same on every process)
BATCH_AXES = TrainBatch(
    prompt=ModelInputs(input_ids=0, attention_mask=0, position_ids=1, feature_index=0,
                       pixel_values=None, vision=None, rope_deltas=0),
    completions=0, completion_mask=0, source_id=0, rewards=0, old_logprobs=0, truncated=0)


def gather(tree: Any) -> Any:
    """Host numpy of device arrays, on one process or (global arrays) on several."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


class Placement:
    """Where batches live: one device, or a mesh over one or several processes.

    Every process holds the same global replay batch; `local` keeps this process's rows, and
    `to_device` assembles the global array from each process's rows (parallel.shard_batch).
    Image patches (a flat list without a row axis) are passed whole by every process.
    """

    def __init__(self, mesh):
        self.mesh = mesh
        self.count, self.index = jax.process_count(), jax.process_index()

    def local(self, rows: np.ndarray) -> np.ndarray:
        """This process's contiguous share of ``rows`` along axis 0."""
        n = len(rows) // self.count
        return rows[self.index * n:(self.index + 1) * n]

    def local_prompts(self, inputs: ModelInputs) -> ModelInputs:
        if self.count == 1:
            return inputs
        n = inputs.input_ids.shape[0] // self.count
        take = slice(self.index * n, (self.index + 1) * n)
        return inputs._replace(input_ids=inputs.input_ids[take],
                               attention_mask=inputs.attention_mask[take],
                               position_ids=inputs.position_ids[:, take],
                               feature_index=inputs.feature_index[take],
                               rope_deltas=inputs.rope_deltas[take])

    def to_device(self, tree, axes):
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return parallel.shard_batch(tree, self.mesh, batch_axes=axes)

    def local_batch(self, batch: TrainBatch) -> TrainBatch:
        """This process's rows of a host TrainBatch built from the global replay batch."""
        if self.count == 1:
            return batch
        rows = {name: self.local(getattr(batch, name)) for name in
                ("completions", "completion_mask", "source_id", "rewards", "old_logprobs",
                 "truncated")}
        return batch.replace(prompt=self.local_prompts(batch.prompt), **rows)



def prompt_inputs(model_config, batch: dict, prompt_buckets: Sequence[int]):
    """ModelInputs (host numpy) of a replay batch's prompts, images included."""
    vision = encode_lib.flat_vision_kwargs(batch)
    shim = types.SimpleNamespace(config=model_config)  # prepare_prompts reads model.config only
    return sampling.prepare_prompts(shim, batch["input_ids"], batch["attention_mask"],
                                    pad_token_id=model_config.pad_token_id,
                                    prompt_buckets=prompt_buckets, patch_bucket=PATCH_BUCKET,
                                    **vision)


def decode_completions(tokenizer, tokens: np.ndarray, lengths: np.ndarray,
                       drop_ids: Sequence[int]) -> list[str]:
    """Completion texts: each row's first ``length`` tokens without EOS / padding ids; tag
    tokens (<think>, <answer>) are kept as text."""
    drop = np.asarray(list(drop_ids))
    texts = []
    for row, length in zip(tokens, lengths):
        ids = row[:int(length)]
        texts.append(tokenizer.decode(ids[~np.isin(ids, drop)].tolist(),
                                      skip_special_tokens=False))
    return texts


def score(task: Task, texts: Sequence[str], references: Sequence[str],
          image_sizes: np.ndarray, input_sizes: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """[N, len(names)] reward values of ``names`` (reward functions) for each completion."""
    out = np.zeros((len(texts), len(names)), np.float32)
    for row, (text, reference) in enumerate(zip(texts, references)):
        context = {}
        if task.answer_kind == "box":
            context = dict(image_size=tuple(image_sizes[row]), input_size=tuple(input_sizes[row]))
        for column, name in enumerate(names):
            out[row, column] = rewards_lib.REWARDS[name](text, reference, **context)
    return out


def finish_rows(tokens: np.ndarray, lengths: np.ndarray, truncated: np.ndarray,
                logprobs: np.ndarray, decode, *, pad_id: int, stop: Sequence[str] = (),
                max_new_tokens: int | None = None) -> dict[str, np.ndarray]:
    """The sampler's completions (host numpy, [N, T]) cut by a source's limit
    ``max_new_tokens`` and its ``stop`` strings (stop_strings.finish_completions): per-row
    arrays completions (``pad_id`` past the end), completion_mask, old_logprobs (0 past the
    end), truncated, lengths, and text (the completions to score). ``decode(ids) -> str``."""
    steps = tokens.shape[1]
    limit = max_new_tokens if max_new_tokens and max_new_tokens < steps else None
    done = finish_completions(tokens, lengths, truncated, decode, stop=tuple(stop),
                              max_new_tokens=limit)
    kept = done.mask > 0
    return {"completions": np.where(kept, tokens, pad_id).astype(np.int32),
            "completion_mask": done.mask, "old_logprobs": np.where(kept, logprobs, 0.0).astype(np.float32),
            "truncated": done.truncated, "lengths": done.lengths,
            "text": np.asarray(done.texts, dtype=object)}


def take_prompt_rows(batch: dict, rows: np.ndarray) -> dict:
    """The replay batch's prompts ``rows`` (repeats allowed): every array with one entry per
    prompt first is indexed, the rest kept."""
    size = len(batch["input_ids"])
    return {k: np.asarray(v)[rows] if np.ndim(v) and np.shape(v)[0] == size else v
            for k, v in batch.items()}


def take_local_groups(scored: ScoredGroups, placement: Placement, group_size: int) -> ScoredGroups:
    """This process's contiguous share of the groups of a global ``scored`` (rows and rewards
    follow their groups)."""
    n = scored.num_groups(group_size) // placement.count
    return take_groups(scored, np.arange(placement.index * n, (placement.index + 1) * n), group_size)


def rl_batch(*, graphdef, params, batch: dict, task: Task, source_id: int, model_config,
             processor, sampling_params: sampling.SamplingParams, rng: jax.Array,
             num_reward_columns: int, prompt_buckets: Sequence[int],
             placement: Placement | None = None, scorer=None,
             reward_names: Sequence[str] | None = None, max_new_tokens: int = 0,
             stop_strings: Sequence[str] = (), dynamic_sampling_extra_draws: int = 0
             ) -> tuple[TrainBatch, dict]:
    """Samples G completions per prompt and scores them; returns (host train-step batch of
    this process's rows, host stats). ``batch`` is the global replay batch: every process
    samples the global batch together (its prompts sharded by rows) and decodes and scores
    only its own rows. ``scorer``: a function with `score`'s signature (default `score`, e.g.
    a reward_pool.RewardPool's); ``reward_names``: the source's rewards (default the task's).

    ``max_new_tokens`` (0: the sampler's) and ``stop_strings`` cut each completion after
    sampling (`finish_rows`). ``dynamic_sampling_extra_draws`` > 0: DAPO's dynamic sampling
    within that budget; round r > 0 resamples the same prompts with ``fold_in(rng, r)``, and
    `dynamic_sampling.fill_batch` keeps groups whose rewards vary first, then zero-variance
    ones, so the batch keeps B prompts x G rows; its counts are in ``stats["dynamic_sampling"]``.
    On several processes the choice is made over the global batch: each process scores its own
    rows, the rewards are all-gathered, every process makes the same choice and keeps its share
    of the chosen groups (which may have been sampled for another process's rows)."""
    placement = Placement(None) if placement is None else placement
    scorer = score if scorer is None else scorer
    names = tuple(task.rewards if reward_names is None else reward_names)
    # dynamic sampling on several processes chooses among the global batch's groups
    global_rows = bool(dynamic_sampling_extra_draws) and placement.count > 1
    inputs = prompt_inputs(model_config, batch, prompt_buckets)
    mine = placement.local_prompts(inputs)
    device_inputs = placement.to_device(mine, BATCH_AXES.prompt)
    group = sampling_params.num_samples
    drop = np.asarray([model_config.eos_token_id, model_config.pad_token_id])

    def decode(ids):
        ids = np.asarray(ids, np.int64)
        return processor.tokenizer.decode(ids[~np.isin(ids, drop)].tolist(),
                                          skip_special_tokens=False)

    repeat = lambda x: placement.local(np.repeat(np.asarray(x), group, axis=0))  # noqa: E731
    sampled_tokens = []

    def draw(round_index: int = 0) -> ScoredGroups:
        key = rng if round_index == 0 else jax.random.fold_in(rng, round_index)
        out = gather(sampling.generate_prepared(graphdef, params, device_inputs,
                                                sampling_params, key))
        out = jax.tree.map(np.asarray, out)
        if not global_rows:
            out = jax.tree.map(placement.local, out)
        # (global rows: every process cuts every row by its stop strings, a host decode per row,
        # so that all hold the same rows to choose from; each still scores only its own)
        sampled_tokens.append(int(placement.local(out.lengths).sum() if global_rows
                                  else out.lengths.sum()))
        rows = finish_rows(out.tokens, out.lengths, out.truncated, out.logprobs, decode,
                           pad_id=model_config.pad_token_id, stop=stop_strings,
                           max_new_tokens=max_new_tokens)
        texts = placement.local(rows["text"]) if global_rows else rows["text"]
        rewards = np.zeros((len(texts), num_reward_columns), np.float32)
        rewards[:, :len(names)] = scorer(task, list(texts), repeat(batch["answer"]),
                                         repeat(batch["image_size"]),
                                         repeat(batch["input_size"]), names)
        if global_rows:  # every process sees every row's rewards, in global row order
            rewards = np.asarray(multihost_utils.process_allgather(rewards, tiled=True))
        prompts = np.arange(len(rows["text"]) // group)
        return ScoredGroups(rewards, rows=rows, groups={"prompt": prompts})

    stats = {}
    if dynamic_sampling_extra_draws:
        rounds = iter(range(dynamic_sampling_extra_draws + 1))
        scored, counts = fill_batch(lambda: draw(next(rounds)), len(batch["input_ids"]), group,
                                    dynamic_sampling_extra_draws, columns=range(len(names)))
        stats["dynamic_sampling"] = counts.as_metrics()
        prompts = scored.groups["prompt"]
        if not np.array_equal(prompts, np.arange(len(prompts))):
            mine = placement.local_prompts(
                prompt_inputs(model_config, take_prompt_rows(batch, prompts), prompt_buckets))
        if global_rows:
            scored = take_local_groups(scored, placement, group)
    else:
        scored = draw()
    rows = scored.rows
    step_batch = TrainBatch(prompt=mine, completions=rows["completions"],
                            completion_mask=rows["completion_mask"],
                            source_id=np.full((len(rows["text"]),), source_id, np.int32),
                            rewards=np.asarray(scored.rewards, np.float32),
                            old_logprobs=rows["old_logprobs"], truncated=rows["truncated"])
    stats.update(sampled_tokens=sum(sampled_tokens), texts=list(rows["text"]))
    return step_batch, stats


def sft_batch(*, batch: dict, source_id: int, model_config, num_reward_columns: int,
              prompt_buckets: Sequence[int]) -> tuple[TrainBatch, dict]:
    """Reference answers as the completions of an SFT (NTP) step; (train-step batch, stats)."""
    inputs = prompt_inputs(model_config, batch, prompt_buckets)
    answers, mask = batch["answer_ids"], batch["answer_mask"]
    rows = answers.shape[0]
    source_ids = np.asarray(batch.get("source_id", np.full((rows,), source_id)), np.int32)
    step_batch = TrainBatch(prompt=inputs, completions=answers.astype(np.int32),
                            completion_mask=mask.astype(np.int32), source_id=source_ids,
                            rewards=np.zeros((rows, num_reward_columns), np.float32),
                            old_logprobs=np.zeros(answers.shape, np.float32),
                            truncated=np.zeros((rows,), bool))
    return step_batch, {"trained_tokens": int(mask.sum() + batch["attention_mask"].sum())}
