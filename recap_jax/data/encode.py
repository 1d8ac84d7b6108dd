"""Record → model arrays (one example), and collation of examples into bucket-padded batches.

One example (numpy, unpadded; see `RecordEncoder.encode`):
  input_ids int32 [n]        chat-formatted prompt: system, user (image + task prompt),
                             generation prompt; ``<|image_pad|>`` expanded to the merged
                             patch count
  position_ids int32 [3, n]  M-RoPE positions (rope.get_rope_index)
  rope_delta int32 []        max position + 1 - n (generated text continues at index + delta)
  pixel_values float32 [N, D], image_grid_thw int32 [3]   (processor.preprocess_image)
  answer_ids int32 [a]       reference answer tokens + <|im_end|> (NTP targets of SFT sources)
  image_size, input_size int32 [2]   original (h, w) and model-input (h', w') image sizes

A batch (`collate`): the same fields padded to buckets, prompts LEFT-aligned (generation
convention), answers right-aligned; see `collate` for the exact layout.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np

from recap_jax.data.records import BadRecord, Record
from recap_jax.data.tasks import Task

__all__ = ["ARRAY_FIELDS", "RecordEncoder", "bucket", "collate", "flat_vision_inputs"]

# Fields of one encoded example and their (dtype, rank).
ARRAY_FIELDS = {
    "input_ids": (np.int32, 1), "position_ids": (np.int32, 2), "rope_delta": (np.int32, 0),
    "pixel_values": (np.float32, 2), "image_grid_thw": (np.int32, 1), "answer_ids": (np.int32, 1),
    "image_size": (np.int32, 1), "input_size": (np.int32, 1),
}


def bucket(length: int, buckets: Sequence[int], what: str) -> int:
    """The smallest bucket >= length (ValueError naming ``what`` if none)."""
    for size in sorted(buckets):
        if length <= size:
            return int(size)
    raise ValueError(f"{what} of {length} exceeds the largest bucket {max(buckets)}")


class RecordEncoder:
    """Turns a Record into model arrays with a Qwen2_5_VLProcessor and a model config.

    Thread-safe (tf.data calls it from several threads): chat templating and tokenisation are
    serialised, image preprocessing (processor.preprocess_image) runs in parallel. The result
    equals Qwen2_5_VLProcessor([prompt], [[image]]) followed by rope.get_rope_index.
    """

    def __init__(self, processor, model_config, *, max_prompt_tokens: int,
                 max_answer_tokens: int):
        from recap_jax.models.qwen2_5_vl import processor as processor_lib

        self.processor = processor
        self.model_config = model_config
        self.max_prompt_tokens, self.max_answer_tokens = max_prompt_tokens, max_answer_tokens
        ids = processor_lib.special_token_ids(processor.tokenizer)
        self.eos_id, self.pad_id = ids["eos_token_id"], ids["pad_token_id"]
        self.patch_dim = model_config.vision.patch_dim
        self._image_pad = processor_lib.IMAGE_PAD
        self._lock = threading.Lock()

    def prompt_text(self, task: Task, record: Record) -> str:
        """The chat-formatted prompt with one image placeholder and the task's prompt text."""
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": task.format_prompt(record.question)}]}]
        with self._lock:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def encode(self, task: Task, record: Record) -> dict[str, np.ndarray]:
        """One example's arrays (see the module docstring); BadRecord if it cannot be used."""
        from recap_jax.models.qwen2_5_vl import rope

        from recap_jax.models.qwen2_5_vl import processor as processor_lib

        text = self.prompt_text(task, record)
        try:  # outside the lock: PIL resizing releases the GIL, so threads overlap here
            pixels, grid = processor_lib.preprocess_image(record.image,
                                                          **self.processor.image_kwargs)
        except (ValueError, TypeError) as error:  # e.g. extreme aspect ratio
            raise BadRecord(f"image: cannot preprocess ({error})", "image") from None
        # What Qwen2_5_VLProcessor.__call__ does for one image: one <|image_pad|> per merged
        # patch, then tokenise.
        image_tokens = int(np.prod(grid)) // self.processor.merge_size ** 2
        expanded = text.replace(self._image_pad, self._image_pad * image_tokens)
        with self._lock:
            input_ids = np.asarray(self.processor.tokenizer(expanded)["input_ids"], np.int64)
            answer = self.processor.tokenizer(record.answer_text, add_special_tokens=False)
        if int(np.sum(input_ids == self.processor.image_token_id)) != image_tokens:
            raise ValueError(f"the tokenizer split {self._image_pad}; it must be one added token")
        if len(input_ids) > self.max_prompt_tokens:
            raise BadRecord(f"text: prompt has {len(input_ids)} tokens "
                            f"(max {self.max_prompt_tokens})", "text")
        answer_ids = np.asarray([*answer["input_ids"], self.eos_id], dtype=np.int32)
        if len(answer_ids) > self.max_answer_tokens:
            raise BadRecord(f"text: answer has {len(answer_ids)} tokens "
                            f"(max {self.max_answer_tokens})", "text")
        positions, deltas = rope.get_rope_index(input_ids[None], grid[None], None, None, None,
                                                self.model_config)
        patch = self.model_config.vision.patch_size
        return {
            "input_ids": input_ids.astype(np.int32),
            "position_ids": positions[:, 0].astype(np.int32),
            "rope_delta": np.int32(deltas[0, 0]),
            "pixel_values": pixels.astype(np.float32, copy=False),
            "image_grid_thw": grid.astype(np.int32),
            "answer_ids": answer_ids,
            "image_size": np.asarray(record.image_size, np.int32),
            "input_size": np.asarray([grid[1] * patch, grid[2] * patch], np.int32),
        }


def _lengths(mask: np.ndarray) -> np.ndarray:
    return mask.sum(axis=-1).astype(np.int32)


def collate(padded: Mapping[str, np.ndarray], *, pad_id: int, prompt_buckets: Sequence[int],
            answer_buckets: Sequence[int], patch_buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """A right-padded batch (tf.data padded_batch output) → the replay batch layout.

    Input fields: those of ARRAY_FIELDS with a leading batch axis, right-padded with zeros,
    plus prompt_length, answer_length, num_patches int32 [B] and the metadata fields.

    Output (B rows, L / A / P = smallest bucket holding the batch's longest prompt / answer /
    patch list):
      input_ids int32 [B, L]       left-padded with pad_id; attention_mask int32 [B, L]
      position_ids int32 [B, 3, L] M-RoPE positions (0 on padding); transpose to [3, B, L]
                                   for the model
      rope_deltas int32 [B]
      pixel_values float32 [B, P, D] (zeros past num_patches), num_patches int32 [B],
      image_grid_thw int32 [B, 3]
      answer_ids int32 [B, A]      right-padded with pad_id; answer_mask int32 [B, A]
      image_size, input_size int32 [B, 2]; and every other field unchanged.
    """
    batch = {key: np.asarray(value) for key, value in padded.items()}
    prompt_length, answer_length = batch.pop("prompt_length"), batch.pop("answer_length")
    size = len(prompt_length)
    length = bucket(int(prompt_length.max()), prompt_buckets, "prompt length")
    answer_size = bucket(int(answer_length.max()), answer_buckets, "answer length")
    patches = bucket(int(batch["num_patches"].max()), patch_buckets, "patch count")

    input_ids = np.full((size, length), pad_id, np.int32)
    attention_mask = np.zeros((size, length), np.int32)
    position_ids = np.zeros((size, 3, length), np.int32)
    answer_ids = np.full((size, answer_size), pad_id, np.int32)
    answer_mask = np.zeros((size, answer_size), np.int32)
    for row in range(size):
        n, a = int(prompt_length[row]), int(answer_length[row])
        input_ids[row, length - n:] = batch["input_ids"][row, :n]
        attention_mask[row, length - n:] = 1
        position_ids[row, :, length - n:] = batch["position_ids"][row, :, :n]
        answer_ids[row, :a] = batch["answer_ids"][row, :a]
        answer_mask[row, :a] = 1
    pixel_values = np.zeros((size, patches, batch["pixel_values"].shape[-1]), np.float32)
    pixel_values[:, :batch["pixel_values"].shape[1]] = batch["pixel_values"]
    batch.update(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 rope_deltas=batch.pop("rope_delta").astype(np.int32), pixel_values=pixel_values,
                 answer_ids=answer_ids, answer_mask=answer_mask)
    return batch


def flat_vision_inputs(batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values [sum num_patches, D], image_grid_thw int64 [B, 3]): the concatenated form
    transformers / recap_jax.sampling.generate take, rows in batch order."""
    pixels = [batch["pixel_values"][row, :count] for row, count in enumerate(batch["num_patches"])]
    return np.concatenate(pixels, axis=0), np.asarray(batch["image_grid_thw"], np.int64)
