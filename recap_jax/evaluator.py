"""Greedy evaluation on the held-out records of every task, and the answer-NLL metrics that
say whether the model still looks at its images (`Evaluator`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recap_jax import sampling
from recap_jax.data import encode as encode_lib
from recap_jax.data.records import BadRecord
from recap_jax.data.run_sources import WarmStartTargets
from recap_jax.data.tasks import Task, get_task
from recap_jax.rollout import decode_completions, gather, prompt_inputs, score

__all__ = ["Evaluator", "other_image_partners", "to_device"]


class Evaluator:
    """Each task's held-out records: greedy decoding scored by the task's eval metrics, and
    the reference answer's next-token loss with the record's own image and with another's.

    Records are encoded once; batches are padded to ``batch_size`` by repeating the last
    record (one compiled shape per task), the padding rows are not scored.

    Image reliance (``image_reliance=True``): per task, ``answer_nll`` is the mean NLL per
    token (nats) of the warm-start target (``WarmStartTargets``) given prompt and image, and
    ``answer_nll_other_image`` the same with the image of another held-out record of the same
    image size (so the prompt is unchanged). Their difference ``image_reliance`` is what the
    image is worth to the model: ~0 for a model that ignores images, the quantity that falls
    when RL makes a model forget how to look. Rows without a same-size partner in their batch
    (and targets over the answer budget) are left out of all three, counted in
    ``image_reliance_rows``.
    """

    def __init__(self, sources: Sequence[Any], processor, model_config, *, num_examples: int,
                 batch_size: int, max_new_tokens: int, prompt_buckets: Sequence[int],
                 answer_buckets: Sequence[int], image_reliance: bool = True):
        self.processor, self.model_config = processor, model_config
        self.batch_size, self.prompt_buckets = batch_size, tuple(prompt_buckets)
        self.answer_length = max(answer_buckets)
        self.params = sampling.SamplingParams(
            max_new_tokens, temperature=0.0, eos_token_id=model_config.eos_token_id,
            pad_token_id=model_config.pad_token_id, num_samples=1).validate()
        encoder = encode_lib.RecordEncoder(processor, model_config,
                                           max_prompt_tokens=max(prompt_buckets),
                                           max_answer_tokens=self.answer_length)
        self.image_reliance = image_reliance
        self._logprob = None  # (graphdef, jitted log-prob fn), built at the first call
        self.tasks: dict[str, tuple[Task, list]] = {}
        for source in sources:
            if source is None:
                continue
            task = get_task(source.name)
            targets = WarmStartTargets(source, processor)
            count = min(num_examples, len(source))
            examples = []
            for i in range(count):
                record = source.load(i)
                arrays = encoder.encode(task, record)
                if image_reliance:
                    arrays["target_ids"] = _target_ids(encoder, targets.target(record).answer_text)
                examples.append((arrays, record.answer_text))
            if examples:
                self.tasks[source.name] = (task, examples)

    def _batch(self, examples) -> dict:
        arrays = [a for a, _ in examples]
        arrays += [arrays[-1]] * (self.batch_size - len(arrays))
        length = max(len(a["input_ids"]) for a in arrays)
        ids = np.full((len(arrays), length), self.model_config.pad_token_id, np.int32)
        mask = np.zeros_like(ids)
        for row, a in enumerate(arrays):
            ids[row, length - len(a["input_ids"]):] = a["input_ids"]
            mask[row, length - len(a["input_ids"]):] = 1
        patches = [len(a["pixel_values"]) for a in arrays]
        pixels = np.zeros((len(arrays), max(patches), arrays[0]["pixel_values"].shape[1]),
                          np.float32)
        for row, a in enumerate(arrays):
            pixels[row, :patches[row]] = a["pixel_values"]
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
                "num_patches": np.asarray(patches),
                "image_grid_thw": np.stack([a["image_grid_thw"] for a in arrays]),
                "image_size": np.stack([a["image_size"] for a in arrays]),
                "input_size": np.stack([a["input_size"] for a in arrays]),
                **encode_lib.stack_vision_fields(arrays)}

    def __call__(self, graphdef, params, *, greedy: bool = True) -> dict[str, dict[str, float]]:
        """{task: {metric: mean, "completion_length": mean tokens, "num_examples": n}} and,
        with image reliance on, the three NLL metrics of the class docstring.
        ``greedy=False``: only the latter (no decoding)."""
        results = {}
        for name, (task, examples) in self.tasks.items():
            values, lengths, nll_sums = [], [], np.zeros(4)
            for start in range(0, len(examples), self.batch_size):
                chunk = examples[start:start + self.batch_size]
                batch = self._batch(chunk)
                inputs = prompt_inputs(self.model_config, batch, self.prompt_buckets)
                if self.image_reliance:
                    nll_sums += self._nll_sums(graphdef, params, chunk, batch, inputs)
                if not greedy:
                    continue
                out = gather(sampling.generate_prepared(
                    graphdef, params, inputs, self.params, jax.random.key(0)))
                texts = decode_completions(
                    self.processor.tokenizer, out.tokens, out.lengths,
                    (self.model_config.eos_token_id, self.model_config.pad_token_id))[:len(chunk)]
                values.append(score(task, texts, [a for _, a in chunk], batch["image_size"],
                                    batch["input_size"], task.eval_metrics))
                lengths.append(out.lengths[:len(chunk)])
            results[name] = {}
            if greedy:
                table = np.concatenate(values).mean(axis=0)
                results[name] = {metric: float(v) for metric, v in zip(task.eval_metrics, table)}
                results[name]["completion_length"] = float(np.concatenate(lengths).mean())
            if self.image_reliance:
                results[name].update(_reliance_metrics(*nll_sums))
            results[name]["num_examples"] = len(examples)
        return results

    def _nll_sums(self, graphdef, params, chunk, batch, inputs) -> np.ndarray:
        """[NLL summed with the own images, with the partners' images, target tokens, rows]
        over ``chunk``'s rows that have a target and a partner (``other_image_partners``)."""
        if self._logprob is None or self._logprob[0] is not graphdef:
            self._logprob = (graphdef, jax.jit(sampling.make_logprob_fn(graphdef, 1)))
        logprob = self._logprob[1]
        targets = np.full((len(batch["input_ids"]), self.answer_length),
                          self.model_config.pad_token_id, np.int32)
        mask = np.zeros_like(targets)
        for row, (arrays, _) in enumerate(chunk):
            if arrays["target_ids"] is not None:
                targets[row, :len(arrays["target_ids"])] = arrays["target_ids"]
                mask[row, :len(arrays["target_ids"])] = 1
        partner = other_image_partners(_vision_keys(batch)[:len(chunk)])
        mask[:len(chunk)][partner < 0] = 0
        mask[len(chunk):] = 0  # padding rows
        swapped = np.concatenate([np.where(partner < 0, np.arange(len(chunk)), partner),
                                  np.arange(len(chunk), len(targets))])
        other = prompt_inputs(self.model_config, _with_images_of(batch, swapped),
                              self.prompt_buckets)
        sums = []
        for prompt in (inputs, other):
            step_batch = {"prompt": prompt, "completions": targets, "completion_mask": mask}
            lp, _ = gather(logprob(params, to_device(step_batch)))
            sums.append(-float((np.asarray(lp) * mask).sum()))
        return np.asarray([*sums, mask.sum(), (mask.sum(axis=1) > 0).sum()], np.float64)


def _target_ids(encoder, text: str):
    try:
        return encoder.answer_ids(text)
    except BadRecord:
        return None  # over the answer budget: out of the NLL metrics, still decoded


def _vision_keys(batch: dict) -> np.ndarray:
    """[B, k]: per row, every image and video grid (rows with equal keys can swap images)."""
    if "image_grids" not in batch:
        return np.asarray(batch["image_grid_thw"])
    rows = len(batch["image_grids"])
    return np.concatenate([batch["image_grids"].reshape(rows, -1),
                           batch["video_grid_thw"].reshape(rows, -1)], axis=1)


def other_image_partners(grids: np.ndarray) -> np.ndarray:
    """For each row, another row whose image has the same ``image_grid_thw`` (the next such
    row, cyclically), or -1 if it has none. ``grids`` [B, 3], or [B, k] keys of several
    grids per row (all zero: a row without images or video, never partnered)."""
    partner = np.full((len(grids),), -1, np.int64)
    keys = [tuple(np.asarray(g).ravel().tolist()) for g in np.asarray(grids)]
    for key in set(keys) - {(0,) * len(keys[0]) if keys else ()}:
        rows = [r for r, k in enumerate(keys) if k == key]
        if len(rows) > 1:
            partner[rows] = np.roll(rows, -1)
    return partner


def _with_images_of(batch: dict, rows: np.ndarray) -> dict:
    """``batch`` with row r's image replaced by row ``rows[r]``'s (same grid, same prompt)."""
    swapped = dict(batch)
    for key in ("pixel_values", "num_patches", "image_grid_thw", "image_grids", "num_images",
                "video_grid_thw", "num_videos", "second_per_grid_ts"):
        if key in batch:
            swapped[key] = batch[key][rows]
    return swapped


def _reliance_metrics(nll_own: float, nll_other: float, tokens: float,
                      rows: float) -> dict[str, float]:
    own, other = (nll_own / tokens, nll_other / tokens) if tokens else (math.nan, math.nan)
    return {"answer_nll": own, "answer_nll_other_image": other, "image_reliance": other - own,
            "image_reliance_rows": float(rows)}


def to_device(tree: Any, sharding=None) -> Any:
    """Host arrays -> device arrays (replicated on ``sharding``'s mesh when given)."""
    if sharding is None:
        return jax.tree.map(jnp.asarray, tree)
    return jax.device_put(tree, sharding)
