"""The run's sources as the plan names them, and the warm-start's view of them.

- `open_sources`: the train or held-out sources of `plan.RunPlan.sources`, in source-id order;
- `WarmStartTargets`: a source whose answers are the task's formatted completions
  (``<think></think><answer>3</answer>``), for the SFT warm-start and the answer-NLL metrics.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recap_jax.data import sources as sources_lib
from recap_jax.data.records import Record, format_box
from recap_jax.data.synthetic import SyntheticSource
from recap_jax.data.tasks import get_task
from recap_jax.models.qwen2_5_vl.processor import smart_resize

__all__ = ["WarmStartTargets", "box_in_input_frame", "model_input_size", "open_sources"]


def open_sources(sources, split: str, skips=None) -> list:
    """The plan's sources (`plan.SourcePlan`s, in source-id order) for split "train" or
    "eval"; an eval entry is None for a source without held-out data."""
    opened = []
    for spec in sources:
        if spec.kind == "synthetic":
            size = spec.size if split == "train" else spec.eval_size
            opened.append(SyntheticSource(spec.name, split, size, layout=spec.layout)
                          if size else None)
            continue
        paths = list(spec.paths(split))
        if not paths:
            opened.append(None)
            continue
        opened.append(sources_lib.open_source(
            spec.name, paths, image_root=spec.image_root or None, skips=skips,
            max_records=(spec.max_records or None) if split == "train" else None,
            adapter=spec.kind))
    return opened


def model_input_size(processor, height: int, width: int) -> tuple[int, int]:
    """(h', w'): the size ``processor`` resizes an image of ``height`` x ``width`` to."""
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


