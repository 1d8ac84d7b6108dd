"""The synthetic suite as a TensorFlow Datasets builder, built and read fully offline.

    from recap_jax.data import synthetic_tfds
    synthetic_tfds.build("reasoning", data_dir)                 # writes once, no network
    ds = synthetic_tfds.load("reasoning", "train", data_dir)    # tf.data.Dataset of dicts

which is plain tfds once this module is imported (importing registers the builder):

    tfds.load("recap_synthetic/reasoning", split="train", data_dir=data_dir,
              download=False, try_gcs=False)            # default configs by name
    tfds.load("recap_synthetic", builder_kwargs={"config": SyntheticBuilderConfig(...)}, ...)

Each example: ``id`` (str), ``source`` (str), ``image`` (uint8 [H, W, 3]), ``question`` (str),
``answer`` (str; for grounding the box as ``[x1, y1, x2, y2]``). Non-default sizes, seeds or
resolutions get their own config name (see :func:`config_name`). This module imports
tensorflow_datasets at import time; ``recap_jax.data.synthetic`` is the light path.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds
from etils import epath

from recap_jax.data import synthetic
from recap_jax.data.records import Record

__all__ = ["DEFAULT_SIZES", "RecapSynthetic", "SyntheticBuilderConfig", "build", "config_name",
           "load", "record_from_example"]

DEFAULT_SIZES = {"train": 2000, "eval": 200}


@dataclasses.dataclass
class SyntheticBuilderConfig(tfds.core.BuilderConfig):
    """One synthetic task at one size/seed/resolution."""

    task: str = "reasoning"
    num_train: int = DEFAULT_SIZES["train"]
    num_eval: int = DEFAULT_SIZES["eval"]
    seed: int = 0
    image_size: tuple[int, int] | None = None


def config_name(task: str, *, num_train: int = DEFAULT_SIZES["train"],
                num_eval: int = DEFAULT_SIZES["eval"], seed: int = 0,
                image_size: tuple[int, int] | None = None) -> str:
    """``task`` for the defaults, else ``task-s<seed>-<h>x<w>-n<train>-<eval>``."""
    height, width = image_size or synthetic.DEFAULT_IMAGE_SIZES[task]
    if ((height, width) == synthetic.DEFAULT_IMAGE_SIZES[task] and seed == 0
            and (num_train, num_eval) == (DEFAULT_SIZES["train"], DEFAULT_SIZES["eval"])):
        return task
    return f"{task}-s{seed}-{height}x{width}-n{num_train}-{num_eval}"


def _config(task, **kwargs) -> SyntheticBuilderConfig:
    return SyntheticBuilderConfig(name=config_name(task, **kwargs), task=task,
                                  description=f"synthetic {task}", **kwargs)


class RecapSynthetic(tfds.core.GeneratorBasedBuilder):
    """recap_jax's offline synthetic suite (reasoning, grounding, ocr)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [_config(task) for task in synthetic.SYNTHETIC_TASKS]

    # tfds's default code_path probes `importlib_resources`, which tfds 4.9.10 does not
    # declare as a dependency; the answer is simply this file.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "source": tfds.features.Text(),
                "image": tfds.features.Image(shape=(None, None, 3)),
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
            }),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples("train", self.builder_config.num_train),
                "eval": self._generate_examples("eval", self.builder_config.num_eval)}

    def _generate_examples(self, split: str, num_examples: int):
        config = self.builder_config
        for record in synthetic.generate(config.task, split, num_examples, seed=config.seed,
                                         image_size=config.image_size):
            yield record.id, {"id": record.id, "source": record.source, "image": record.image,
                              "question": record.question, "answer": record.answer_text}


def _builder(task: str, data_dir: str | os.PathLike, **kwargs) -> RecapSynthetic:
    name = config_name(task, **kwargs)
    config = name if name == task else _config(task, **kwargs)
    return RecapSynthetic(config=config, data_dir=os.fspath(data_dir))


def build(task: str, data_dir: str | os.PathLike, **kwargs) -> RecapSynthetic:
    """Generates and writes the task's train/eval splits under ``data_dir`` (no network).

    kwargs: num_train, num_eval, seed, image_size (see :func:`config_name`). A config that is
    already built is left as it is.
    """
    builder = _builder(task, data_dir, **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def load(task: str, split: str, data_dir: str | os.PathLike, **kwargs):
    """A built split as a tf.data.Dataset (FileNotFoundError if it was not built)."""
    name = config_name(task, **kwargs)
    common = dict(split=split, data_dir=os.fspath(data_dir), download=False, try_gcs=False)
    try:
        if name == task:
            return tfds.load(f"recap_synthetic/{name}", **common)
        return tfds.load("recap_synthetic", builder_kwargs={"config": _config(task, **kwargs)},
                         **common)
    except AssertionError as error:  # tfds's "could not find data" when not prepared
        raise FileNotFoundError(
            f"synthetic {task!r} (config {name!r}) is not built in {data_dir}: call "
            f"recap_jax.data.synthetic_tfds.build({task!r}, data_dir, ...) first ({error})"
        ) from None


def record_from_example(example: dict) -> Record:
    """A numpy example of :func:`load` (``tfds.as_numpy``) → Record (boxes parsed back)."""
    from recap_jax.rewards import parse_box

    text = lambda value: value.decode() if isinstance(value, bytes) else str(value)  # noqa: E731
    source, answer = text(example["source"]), text(example["answer"])
    if source == "grounding":
        box = parse_box(answer)
        answer = tuple(int(v) for v in box)
    return Record(id=text(example["id"]), source=source, image=example["image"],
                  question=text(example["question"]), answer=answer)
