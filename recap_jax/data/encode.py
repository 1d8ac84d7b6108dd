"""Record → model arrays (one example), and collation of examples into bucket-padded batches.

One example (numpy, unpadded; see `RecordEncoder.encode`):
  input_ids int32 [n]        chat-formatted prompt: system, user (images, video, task prompt),
                             generation prompt; each ``<|image_pad|>`` / ``<|video_pad|>``
                             expanded to its merged patch count
  position_ids int32 [3, n]  M-RoPE positions (rope.get_rope_index)
  rope_delta int32 []        max position + 1 - n (generated text continues at index + delta)
  pixel_values float32 [N, D]  the patches of all images, then of the video
                             (processor.preprocess_image / preprocess_video); N may be 0
  image_grid_thw int32 [3]   the first image's grid (zeros without an image)
  image_grids int32 [I, 3]   every image's grid (I = 0..n; [[t, h, w]] for one image)
  video_grid_thw int32 [V, 3], second_per_grid_ts float32 [V]   the video's grid and
                             temporal_patch_size / fps (V = 0 or 1)
  answer_ids int32 [a]       reference answer tokens + <|im_end|> (NTP targets of SFT sources)
  image_size, input_size int32 [2]   original (h, w) and model-input (h', w') sizes of the
                             first image (of the video's frames without one; zeros if neither)

A batch (`collate`): the same fields padded to buckets, prompts LEFT-aligned (generation
convention), answers right-aligned; see `collate` for the exact layout.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np

from recap_jax.data.records import BadRecord, Record
from recap_jax.data.tasks import Task

__all__ = ["ARRAY_FIELDS", "PROMPT_OVERFLOWS", "RecordEncoder", "bucket", "collate",
           "flat_vision_inputs", "flat_vision_kwargs", "stack_vision_fields"]

# Fields of one encoded example and their (dtype, rank).
ARRAY_FIELDS = {
    "input_ids": (np.int32, 1), "position_ids": (np.int32, 2), "rope_delta": (np.int32, 0),
    "pixel_values": (np.float32, 2), "image_grid_thw": (np.int32, 1), "answer_ids": (np.int32, 1),
    "image_size": (np.int32, 1), "input_size": (np.int32, 1),
    "image_grids": (np.int32, 2), "video_grid_thw": (np.int32, 2),
    "second_per_grid_ts": (np.float32, 1),
}


def bucket(length: int, buckets: Sequence[int], what: str) -> int:
    """The smallest bucket >= length (ValueError naming ``what`` if none)."""
    for size in sorted(buckets):
        if length <= size:
            return int(size)
    raise ValueError(f"{what} of {length} exceeds the largest bucket {max(buckets)}")


PROMPT_OVERFLOWS = ("skip", "truncate")


class RecordEncoder:
    """Turns a Record into model arrays with a Qwen2_5_VLProcessor and a model config.

    Thread-safe (tf.data calls it from several threads): chat templating and tokenisation are
    serialised, image preprocessing (processor.preprocess_image) runs in parallel. The result
    equals Qwen2_5_VLProcessor([prompt], [record.images], [[video frames]],
    video_fps=[fps]) followed by rope.get_rope_index.

    A prompt longer than ``max_prompt_tokens`` is, by ``prompt_overflow``: "skip", a
    BadRecord; "truncate", cut by dropping tokens of the question from its end until it fits
    (chat template, image tokens and the task's instruction suffix kept whole), reported to
    ``encode``'s ``note`` callback as kind "truncated".
    """

    def __init__(self, processor, model_config, *, max_prompt_tokens: int,
                 max_answer_tokens: int, prompt_overflow: str = "skip"):
        from recap_jax.models.qwen2_5_vl import processor as processor_lib

        if prompt_overflow not in PROMPT_OVERFLOWS:
            raise ValueError(f"prompt_overflow must be one of {PROMPT_OVERFLOWS}, "
                             f"got {prompt_overflow!r}")
        self.processor = processor
        self.model_config = model_config
        self.max_prompt_tokens, self.max_answer_tokens = max_prompt_tokens, max_answer_tokens
        self.prompt_overflow = prompt_overflow
        ids = processor_lib.special_token_ids(processor.tokenizer)
        self.eos_id, self.pad_id = ids["eos_token_id"], ids["pad_token_id"]
        self.patch_dim = model_config.vision.patch_dim
        self._image_pad = processor_lib.IMAGE_PAD
        self._video_kwargs = getattr(processor, "video_kwargs", processor.image_kwargs)
        # Chat/vision control tokens may not appear as text in a record: they would become
        # real control tokens (a second image slot, an early end of turn).
        self._control_tokens = (processor_lib.IMAGE_PAD, processor_lib.VIDEO_PAD,
                                processor_lib.VISION_START, processor_lib.VISION_END,
                                processor_lib.IM_START, processor_lib.IM_END,
                                processor_lib.ENDOFTEXT)
        self._lock = threading.Lock()

    def prompt_text(self, task: Task, record: Record, question: str | None = None) -> str:
        """The chat-formatted prompt: one image placeholder per image, a video placeholder if
        the record has a video, then the task's prompt text (``question`` replaces the
        record's, e.g. a truncated one)."""
        question = record.question if question is None else question
        content = [{"type": "image"} for _ in record.images]
        content += [{"type": "video"}] if record.video is not None else []
        content.append({"type": "text", "text": task.format_prompt(question)})
        messages = [{"role": "user", "content": content}]
        with self._lock:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def _check_text(self, record: Record) -> None:
        """BadRecord for an empty or non-text question/answer, or one holding control tokens."""
        try:
            answer = record.answer_text
        except (TypeError, ValueError) as error:  # a box answer that is not 4 numbers
            raise BadRecord(f"box: malformed answer {record.answer!r:.80} ({error})",
                            "box") from None
        for what, value in (("question", record.question), ("answer", answer)):
            if not isinstance(value, str):
                raise BadRecord(f"text: {what} is a {type(value).__name__}, not text", "text")
            if not value.strip():
                raise BadRecord(f"text: {what} is empty", "text")
            found = [token for token in self._control_tokens if token in value]
            if found:
                raise BadRecord(f"text: {what} contains the control token(s) {found}", "text")

    def _prompt_ids(self, text: str, vision_tokens: tuple[tuple[int, ...], tuple[int, ...]]
                    ) -> np.ndarray:
        """Token ids of a chat prompt with its k-th image / video placeholder expanded to
        ``vision_tokens[0][k]`` / ``vision_tokens[1][k]`` copies (what
        Qwen2_5_VLProcessor.__call__ does)."""
        from recap_jax.models.qwen2_5_vl import processor as processor_lib

        image_tokens, video_tokens = vision_tokens
        expanded = processor_lib.expand_vision_placeholders(text, image_tokens, video_tokens)
        with self._lock:
            input_ids = np.asarray(self.processor.tokenizer(expanded)["input_ids"], np.int64)
        if int(np.sum(input_ids == self.processor.image_token_id)) != sum(image_tokens) or \
                int(np.sum(input_ids == self.model_config.video_token_id)) != sum(video_tokens):
            raise ValueError("the tokenizer split <|image_pad|> or <|video_pad|>; each must be "
                             "one added token")
        return input_ids

    def _question_cuts(self, question: str) -> list[int]:
        """Character offsets where the question's tokens start (cut points for truncation);
        every character offset if the tokenizer gives no offsets."""
        try:
            with self._lock:
                offsets = self.processor.tokenizer(
                    question, add_special_tokens=False,
                    return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, KeyError, TypeError, ValueError):
            return list(range(len(question)))
        return sorted({int(start) for start, _ in offsets if int(start) < len(question)})

    def _truncated_prompt(self, task: Task, record: Record, vision_tokens,
                          length: int) -> tuple[np.ndarray, str]:
        """(prompt ids, question) with the question cut at the last token boundary whose
        prompt fits max_prompt_tokens; BadRecord if even one question token does not fit."""
        question = record.question.strip()
        cuts = self._question_cuts(question)[1:]  # cut at 0 = no question left
        limit = self.max_prompt_tokens

        def ids_at(k: int) -> np.ndarray:
            return self._prompt_ids(self.prompt_text(task, record, question[:cuts[k]]),
                                    vision_tokens)

        # Search for the largest k whose prompt fits. The first probe assumes one prompt
        # token less per dropped question token, the second is its neighbour (usually the
        # answer), then bisection.
        low, high, found = 0, len(cuts) - 1, None
        probe, probes = min(high, max(low, len(cuts) - (length - limit))), 0
        while low <= high:
            ids = ids_at(probe)
            fits = len(ids) <= limit
            if fits:
                found, low = (ids, probe), probe + 1
            else:
                high = probe - 1
            probes += 1
            probe = (low if fits else high) if probes == 1 else (low + high) // 2
        if found is None:
            raise BadRecord(f"text: prompt has {length} tokens (max {limit}) and does not fit "
                            "even with its question cut to one token", "text")
        ids, k = found
        return ids, question[:cuts[k]]

    def answer_ids(self, text: str) -> np.ndarray:
        """int32 tokens of an answer text + <|im_end|>; BadRecord if over max_answer_tokens."""
        with self._lock:
            answer = self.processor.tokenizer(text, add_special_tokens=False)
        ids = np.asarray([*answer["input_ids"], self.eos_id], dtype=np.int32)
        if len(ids) > self.max_answer_tokens:
            raise BadRecord(f"text: answer has {len(ids)} tokens "
                            f"(max {self.max_answer_tokens})", "text")
        return ids

    def encode(self, task: Task, record: Record, note=None) -> dict[str, np.ndarray]:
        """One example's arrays (see the module docstring); BadRecord if it cannot be used.

        ``note(kind, message)``, if given, is called when the record was used but altered
        (kind "truncated": its question was cut to fit max_prompt_tokens).
        """
        from recap_jax.models.qwen2_5_vl import processor as processor_lib
        from recap_jax.models.qwen2_5_vl import rope

        self._check_text(record)
        images, video = self._vision(record)
        merge = self.processor.merge_size
        vision_tokens = (tuple(processor_lib.vision_token_count(g, merge) for _, g in images),
                         tuple(processor_lib.vision_token_count(g, merge) for _, g in video))
        input_ids = self._prompt_ids(self.prompt_text(task, record), vision_tokens)
        if len(input_ids) > self.max_prompt_tokens:
            if self.prompt_overflow == "skip":
                raise BadRecord(f"text: prompt has {len(input_ids)} tokens "
                                f"(max {self.max_prompt_tokens})", "text")
            length = len(input_ids)
            input_ids, question = self._truncated_prompt(task, record, vision_tokens, length)
            if note is not None:
                note("truncated", f"prompt of {length} tokens cut to {len(input_ids)} (max "
                     f"{self.max_prompt_tokens}); question kept up to {question[-40:]!r}")
        answer_ids = self.answer_ids(record.answer_text)
        image_grids = np.asarray([g for _, g in images], np.int64).reshape(-1, 3)
        video_grids = np.asarray([g for _, g in video], np.int64).reshape(-1, 3)
        seconds = np.asarray([self.processor.temporal_patch_size / float(record.video.fps)]
                             if video else [], np.float32)
        positions, deltas = rope.get_rope_index(
            input_ids[None], image_grids if len(images) else None,
            video_grids if video else None, seconds if video else None, None, self.model_config)
        pieces = [p for p, _ in images] + [p for p, _ in video]
        pixels = (np.concatenate(pieces, axis=0) if pieces
                  else np.zeros((0, self.patch_dim), np.float32))
        first = image_grids[0] if len(images) else np.zeros(3, np.int64)
        shown = first if len(images) else (video_grids[0] if video else first)
        patch = self.model_config.vision.patch_size
        return {
            "input_ids": input_ids.astype(np.int32),
            "position_ids": positions[:, 0].astype(np.int32),
            "rope_delta": np.int32(deltas[0, 0]),
            "pixel_values": pixels.astype(np.float32, copy=False),
            "image_grid_thw": first.astype(np.int32),
            "answer_ids": answer_ids,
            "image_size": np.asarray(record.image_size, np.int32),
            "input_size": np.asarray([shown[1] * patch, shown[2] * patch], np.int32),
            "image_grids": image_grids.astype(np.int32),
            "video_grid_thw": video_grids.astype(np.int32),
            "second_per_grid_ts": seconds,
        }

    def _vision(self, record: Record) -> tuple[list, list]:
        """([(pixels, grid)] of the record's images, [(pixels, grid)] of its video or []);
        BadRecord naming the image/video that cannot be preprocessed."""
        from recap_jax.models.qwen2_5_vl import processor as processor_lib

        images = []
        for k, image in enumerate(record.images):
            try:  # outside the lock: PIL resizing releases the GIL, so threads overlap here
                images.append(processor_lib.preprocess_image(image, **self.processor.image_kwargs))
            except (ValueError, TypeError, OSError) as error:  # e.g. extreme aspect ratio,
                # empty image, or a path where an array belongs
                which = "" if len(record.images) == 1 else f" {k}"
                raise BadRecord(f"image{which}: cannot preprocess ({error})", "image") from None
        if record.video is None:
            return images, []
        try:
            video = processor_lib.preprocess_video(list(record.video.frames), **self._video_kwargs)
        except (ValueError, TypeError, OSError) as error:
            raise BadRecord(f"video: cannot preprocess ({error})", "video") from None
        return images, [video]


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
      pixel_values float32 [B, P, D] (zeros past num_patches), num_patches int32 [B]:
                                   each row's images' patches then its video's; P buckets
                                   the largest total (images + video) of the batch
      image_grid_thw int32 [B, 3]  the first image's grid (zeros for a row without image)
      answer_ids int32 [B, A]      right-padded with pad_id; answer_mask int32 [B, A]
      image_size, input_size int32 [B, 2]; and every other field unchanged.
    With the multi-image fields (absent from single-image batches built elsewhere):
      image_grids int32 [B, I, 3], num_images int32 [B]   every image's grid (zero rows past
                                   num_images)
      video_grid_thw int32 [B, V, 3], second_per_grid_ts float32 [B, V], num_videos int32 [B]
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
    # A real grid has t >= 1, so the zero rows of padding are not counted.
    for grids, count in (("image_grids", "num_images"), ("video_grid_thw", "num_videos")):
        if grids in batch:
            batch[count] = (batch[grids][..., 0] > 0).sum(-1).astype(np.int32)
    return batch


def stack_vision_fields(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The multi-image fields of `collate`'s layout from encoded examples (for batches built
    without tf.data): image_grids [B, I, 3], video_grid_thw [B, V, 3], second_per_grid_ts
    [B, V] zero-padded, num_images / num_videos int32 [B]."""
    out = {}
    for key, width in (("image_grids", (3,)), ("video_grid_thw", (3,)), ("second_per_grid_ts", ())):
        rows = [np.asarray(e[key]) for e in examples]
        stacked = np.zeros((len(rows), max([len(r) for r in rows] + [1]), *width), rows[0].dtype)
        for row, value in enumerate(rows):
            stacked[row, :len(value)] = value
        out[key] = stacked
    out["num_images"] = np.asarray([len(e["image_grids"]) for e in examples], np.int32)
    out["num_videos"] = np.asarray([len(e["video_grid_thw"]) for e in examples], np.int32)
    return out


def flat_vision_kwargs(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    """The batch's images and videos in the concatenated form transformers / the model /
    recap_jax.sampling take, rows in batch order: pixel_values [sum image patches, D],
    image_grid_thw int64 [num_images, 3], pixel_values_videos, video_grid_thw int64
    [num_videos, 3], second_per_grid_ts float32 [num_videos]; None where there are none.

    A batch without the multi-image fields (``image_grids``) is read as one image per row."""
    pixels = [batch["pixel_values"][row, :count] for row, count in enumerate(batch["num_patches"])]
    if "image_grids" not in batch:
        return {"pixel_values": np.concatenate(pixels, axis=0),
                "image_grid_thw": np.asarray(batch["image_grid_thw"], np.int64),
                "pixel_values_videos": None, "video_grid_thw": None, "second_per_grid_ts": None}
    image_pixels, image_grids, video_pixels, video_grids, seconds = [], [], [], [], []
    for row, row_pixels in enumerate(pixels):
        grids = np.asarray(batch["image_grids"][row][:batch["num_images"][row]], np.int64)
        videos = np.asarray(batch["video_grid_thw"][row][:batch["num_videos"][row]], np.int64)
        image_patches = int(grids.prod(-1).sum())
        if image_patches + int(videos.prod(-1).sum()) != len(row_pixels):
            raise ValueError(f"row {row}: num_patches {len(row_pixels)} differs from its grids' "
                             f"{image_patches} image + {int(videos.prod(-1).sum())} video patches")
        image_pixels.append(row_pixels[:image_patches])
        video_pixels.append(row_pixels[image_patches:])
        image_grids += list(grids)
        video_grids += list(videos)
        seconds += list(batch["second_per_grid_ts"][row][:len(videos)])
    return {
        "pixel_values": np.concatenate(image_pixels, axis=0) if image_grids else None,
        "image_grid_thw": np.stack(image_grids) if image_grids else None,
        "pixel_values_videos": np.concatenate(video_pixels, axis=0) if video_grids else None,
        "video_grid_thw": np.stack(video_grids) if video_grids else None,
        "second_per_grid_ts": np.asarray(seconds, np.float32) if video_grids else None,
    }


def flat_vision_inputs(batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values [sum num_patches, D], image_grid_thw int64 [num_images, 3]) of a batch of
    images only (`flat_vision_kwargs` for batches with videos); [B, 3] grids for one image per
    row."""
    kwargs = flat_vision_kwargs(batch)
    if kwargs["video_grid_thw"] is not None:
        raise ValueError("flat_vision_inputs: the batch holds videos; use flat_vision_kwargs")
    return kwargs["pixel_values"], kwargs["image_grid_thw"]
