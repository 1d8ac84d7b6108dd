"""The pieces the training loop is made of, each small and testable on its own:

- `build_processor` / `build_model_config` / `init_params`: the tokenizer (a demo BPE built
  deterministically from the synthetic corpus when training from scratch), the model config
  and parameters (a Hugging Face directory, or a random model);
- `open_sources`: train and held-out sources of ``config.data.sources``;
- `WarmStartTargets`: a source whose answers are the task's formatted completions
  (``<think></think><answer>3</answer>``), for the SFT warm-start;
- `rl_batch` / `sft_batch`: a replay batch -> the train step's batch (sampling, decoding and
  reward scoring happen in `rl_batch`);
- `Evaluator`: greedy decoding on the held-out records, per-task metrics.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recap_jax import rewards as rewards_lib
from recap_jax import sampling
from recap_jax.data import encode as encode_lib
from recap_jax.data.records import BadRecord, Record, format_box
from recap_jax.data.tasks import Task, get_task

__all__ = ["Evaluator", "WarmStartTargets", "build_model_config", "build_processor",
           "decode_completions", "open_sources", "other_image_partners", "prompt_inputs", "rl_batch",
           "score", "sft_batch"]

PATCH_BUCKET = 256
DEMO_CORPUS_RECORDS = 300


# --------------------------------------------------------------------------- model, tokenizer


def _mrope_section(head_dim: int) -> tuple[int, int, int]:
    """Qwen's 1/4 temporal, 3/8 height, 3/8 width split of the head_dim / 2 frequencies."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return temporal, height, half - temporal - height


def build_model_config(config):
    """The Qwen2_5_VLConfig of ``config.model`` (a directory's config.json or a preset)."""
    from recap_jax.models import qwen2_5_vl as qwen
    from recap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig

    model = config.model
    if model.path:
        return Qwen2_5_VLConfig.from_json_file(model.path)
    if model.preset != "tiny":
        return qwen.PRESETS[model.preset]()
    base = qwen.tiny(vocab_size=model.vocab_size, text_layers=model.text_layers,
                     vision_depth=model.vision_depth,
                     fullatt_block_indexes=(model.vision_depth - 1,))
    head_dim = model.hidden_size // model.heads
    text = dataclasses.replace(base.text, hidden_size=model.hidden_size,
                               intermediate_size=model.intermediate_size,
                               num_attention_heads=model.heads, num_key_value_heads=model.kv_heads,
                               head_dim=head_dim, mrope_section=_mrope_section(head_dim),
                               rope_theta=float(model.rope_theta))
    vision = dataclasses.replace(base.vision, hidden_size=model.vision_hidden_size,
                                 intermediate_size=2 * model.vision_hidden_size,
                                 out_hidden_size=model.hidden_size)
    return dataclasses.replace(base, text=text, vision=vision)


def demo_corpus(config) -> list[str]:
    """Texts the demo tokenizer learns its merges from: the chat template's words and the
    prompts and targets of the first records of every synthetic source.

    OCR transcriptions are left out (their target is the bare template): random letter
    strings would teach merges such as "KL" or "CE", so one glyph in the image would be one
    token in some answers and half a token in others; without them every letter stays a
    token of its own, the one-to-one reading a tiny model can learn."""
    from recap_jax.data import synthetic

    texts = ["system", "user", "assistant", "You are a helpful assistant."]
    for name in config.data.sources:
        if config.data.sources[name].kind != "synthetic":
            continue
        task = get_task(name)
        layout = config.data.sources[name].layout
        for record in synthetic.generate(name, "train", DEMO_CORPUS_RECORDS, layout=layout):
            answer = "" if name == "ocr" else record.answer_text
            texts += [task.format_prompt(record.question), task.format_target(answer)]
    return texts


def build_processor(config, workdir: str):
    """The Qwen2_5_VLProcessor: tokenizer.path, else model.path, else the demo BPE (built once
    into WORKDIR/tokenizer and reused on resume)."""
    from recap_jax.models.qwen2_5_vl import processor as proc

    directory = config.tokenizer.path or config.model.path
    if not directory:
        directory = os.path.join(workdir, "tokenizer")
        if not os.path.exists(os.path.join(directory, "tokenizer.json")):
            proc.build_demo_tokenizer(demo_corpus(config), config.model.vocab_size, directory)
    return proc.Qwen2_5_VLProcessor.from_pretrained(directory,
                                                    min_pixels=config.tokenizer.min_pixels,
                                                    max_pixels=config.tokenizer.max_pixels)


def check_tokenizer_matches(processor, model_config) -> None:
    """ValueError if the tokenizer's special ids are not the model's."""
    from recap_jax.models.qwen2_5_vl import processor as proc

    ids = proc.special_token_ids(processor.tokenizer)
    wrong = {k: (v, getattr(model_config, k)) for k, v in ids.items()
             if getattr(model_config, k) != v}
    if wrong:
        raise ValueError("the tokenizer's special token ids differ from the model config's "
                         "(tokenizer, model): " + ", ".join(f"{k}={v}" for k, v in wrong.items()))


# --------------------------------------------------------------------------- data


def open_sources(config, split: str, skips=None) -> list:
    """The sources of ``config.data.sources`` for split "train" or "eval", in source-id order
    (run_config.source_names); an eval entry is None for a source without held-out data."""
    from recap_jax.data import sources as sources_lib
    from recap_jax.data.synthetic import SyntheticSource

    from recap_jax.run_config import source_names

    opened = []
    for name in source_names(config):
        spec = config.data.sources[name]
        if spec.kind == "synthetic":
            size = spec.size if split == "train" else spec.eval_size
            opened.append(SyntheticSource(name, split, size, layout=spec.layout) if size else None)
            continue
        paths = [p.strip() for p in spec[split].split(",") if p.strip()]
        if not paths:
            opened.append(None)
            continue
        opened.append(sources_lib.open_source(
            name, paths, image_root=spec.image_root or None, skips=skips,
            max_records=(spec.max_records or None) if split == "train" else None,
            adapter=spec.kind))
    return opened


def model_input_size(processor, height: int, width: int) -> tuple[int, int]:
    """(h', w'): the size ``processor`` resizes an image of ``height`` x ``width`` to."""
    from recap_jax.models.qwen2_5_vl.processor import smart_resize

    kwargs = processor.image_kwargs
    return smart_resize(height, width, kwargs["patch_size"] * kwargs["merge_size"],
                        kwargs["min_pixels"], kwargs["max_pixels"])


def box_in_input_frame(box, image_size: tuple[int, int], input_size: tuple[int, int]) -> tuple:
    """A box ``(x1, y1, x2, y2)`` of the original image in the frame of the resized image the
    model sees, rounded to whole pixels: the frame the iou reward reads predictions in."""
    (height, width), (input_height, input_width) = image_size, input_size
    sx, sy = input_width / width, input_height / height
    x1, y1, x2, y2 = (float(v) for v in box)
    return (round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy))


class WarmStartTargets:
    """A source whose records' answers are the task's warm-start completion text.

    Box answers are first moved into the resized image's frame (``processor`` given): the
    model sees the resized image, and the iou reward rescales its predictions from that frame.
    """

    def __init__(self, source, processor=None):
        self.source, self.name = source, source.name
        self._task = get_task(source.name)
        self._processor = processor

    def __len__(self) -> int:
        return len(self.source)

    @property
    def blocks(self) -> np.ndarray:
        return self.source.blocks

    def where(self, i: int):
        return self.source.where(i)

    def load(self, i: int) -> Record:
        return self.target(self.source.load(i))

    def target(self, record: Record) -> Record:
        """``record`` with its answer replaced by the warm-start completion text."""
        answer = record.answer
        if not isinstance(answer, str) and self._processor is not None:
            input_size = model_input_size(self._processor, *record.image_size)
            answer = box_in_input_frame(answer, record.image_size, input_size)
        answer_text = answer if isinstance(answer, str) else format_box(answer)
        return dataclasses.replace(record, answer=self._task.format_target(answer_text))


# --------------------------------------------------------------------------- batches


def prompt_inputs(model_config, batch: dict, prompt_buckets: Sequence[int]):
    """ModelInputs (host numpy) of a replay batch's prompts, images included."""
    pixels, grid = encode_lib.flat_vision_inputs(batch)
    shim = types.SimpleNamespace(config=model_config)  # prepare_prompts reads model.config only
    return sampling.prepare_prompts(shim, batch["input_ids"], batch["attention_mask"], pixels, grid,
                                    pad_token_id=model_config.pad_token_id,
                                    prompt_buckets=prompt_buckets, patch_bucket=PATCH_BUCKET)


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


def rl_batch(*, graphdef, params, batch: dict, task: Task, source_id: int, model_config,
             processor, sampling_params: sampling.SamplingParams, rng: jax.Array,
             num_reward_columns: int, prompt_buckets: Sequence[int]) -> tuple[dict, dict]:
    """Samples G completions per prompt, scores them; returns (train-step batch, host stats)."""
    inputs = prompt_inputs(model_config, batch, prompt_buckets)
    out = jax.device_get(sampling.generate_prepared(graphdef, params, inputs, sampling_params, rng))
    group = sampling_params.num_samples
    texts = decode_completions(processor.tokenizer, out.tokens, out.lengths,
                               (model_config.eos_token_id, model_config.pad_token_id))
    repeat = lambda x: np.repeat(np.asarray(x), group, axis=0)  # noqa: E731
    rewards = np.zeros((len(texts), num_reward_columns), np.float32)
    rewards[:, :len(task.rewards)] = score(task, texts, repeat(batch["answer"]),
                                           repeat(batch["image_size"]),
                                           repeat(batch["input_size"]), task.rewards)
    steps = out.tokens.shape[1]
    mask = (np.arange(steps)[None, :] < out.lengths[:, None]).astype(np.int32)
    step_batch = {"prompt": inputs, "completions": out.tokens, "completion_mask": mask,
                  "source_id": np.full((len(texts),), source_id, np.int32),
                  "rewards": rewards, "old_logprobs": out.logprobs,
                  "truncated": np.asarray(out.truncated)}
    stats = {"sampled_tokens": int(out.lengths.sum()), "texts": texts}
    return step_batch, stats


def sft_batch(*, batch: dict, source_id: int, model_config, num_reward_columns: int,
              prompt_buckets: Sequence[int]) -> tuple[dict, dict]:
    """Reference answers as the completions of an SFT (NTP) step; (train-step batch, stats)."""
    inputs = prompt_inputs(model_config, batch, prompt_buckets)
    answers, mask = batch["answer_ids"], batch["answer_mask"]
    rows = answers.shape[0]
    source_ids = np.asarray(batch.get("source_id", np.full((rows,), source_id)), np.int32)
    step_batch = {"prompt": inputs, "completions": answers.astype(np.int32),
                  "completion_mask": mask.astype(np.int32), "source_id": source_ids,
                  "rewards": np.zeros((rows, num_reward_columns), np.float32),
                  "old_logprobs": np.zeros(answers.shape, np.float32),
                  "truncated": np.zeros((rows,), bool)}
    return step_batch, {"trained_tokens": int(mask.sum() + batch["attention_mask"].sum())}


# --------------------------------------------------------------------------- evaluation


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
                "input_size": np.stack([a["input_size"] for a in arrays])}

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
                out = jax.device_get(sampling.generate_prepared(
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
        partner = other_image_partners(batch["image_grid_thw"][:len(chunk)])
        mask[:len(chunk)][partner < 0] = 0
        mask[len(chunk):] = 0  # padding rows
        swapped = np.concatenate([np.where(partner < 0, np.arange(len(chunk)), partner),
                                  np.arange(len(chunk), len(targets))])
        other = prompt_inputs(self.model_config, _with_images_of(batch, swapped),
                              self.prompt_buckets)
        sums = []
        for prompt in (inputs, other):
            step_batch = {"prompt": prompt, "completions": targets, "completion_mask": mask}
            lp, _ = jax.device_get(logprob(params, to_device(step_batch)))
            sums.append(-float((np.asarray(lp) * mask).sum()))
        return np.asarray([*sums, mask.sum(), (mask.sum(axis=1) > 0).sum()], np.float64)


def _target_ids(encoder, text: str):
    try:
        return encoder.answer_ids(text)
    except BadRecord:
        return None  # over the answer budget: out of the NLL metrics, still decoded


def other_image_partners(grids: np.ndarray) -> np.ndarray:
    """For each row, another row whose image has the same ``image_grid_thw`` (the next such
    row, cyclically), or -1 if it has none."""
    partner = np.full((len(grids),), -1, np.int64)
    keys = [tuple(g) for g in np.asarray(grids)]
    for key in set(keys):
        rows = [r for r, k in enumerate(keys) if k == key]
        if len(rows) > 1:
            partner[rows] = np.roll(rows, -1)
    return partner


def _with_images_of(batch: dict, rows: np.ndarray) -> dict:
    """``batch`` with row r's image replaced by row ``rows[r]``'s (same grid, same prompt)."""
    swapped = dict(batch)
    for key in ("pixel_values", "num_patches", "image_grid_thw"):
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
