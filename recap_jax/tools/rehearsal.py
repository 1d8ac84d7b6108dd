"""Fixtures of a rehearsal: a run config executed end to end on a CPU before the real launch,
with a tiny model and a few rows of every dataset in its published format.

    overrides = write_fixtures(tmp_dir, config)      # {"model.path": ..., "rl.steps": 2, ...}
    apply_overrides(config, overrides)
    train(config, workdir)                           # everything else as configured

`write_fixtures` writes
  - ``<dir>/model``: a tiny random Qwen2.5-VL checkpoint written by transformers
    (Qwen2_5_VLForConditionalGeneration: the vision tower with window and full attention, the
    M-RoPE decoder), with a small byte-level BPE tokenizer holding Qwen2.5-VL's special tokens
    (<|im_start|>, <|vision_start|>, <|image_pad|>, <|im_end|>, ...) at the ids of the model's
    config and the Qwen2-VL chat template; the BPE learns its merges from the fixtures' prompts
    and targets (the real 151k vocabulary would dominate a tiny model);
  - for every non-synthetic source of the config, train and held-out rows in the dataset's
    published format, read by the adapter of its ``kind`` (recap_jax.data.sources):
      thinklite  parquet: problem (with "<image>"), answer, image {bytes, path} (HF Image struct)
      refcoco    VLM-R1 rec_jsons_processed jsonl: image "train2014/COCO_train2014_*.jpg" under an
                 image root, conversations (human / gpt), solution [x1, y1, x2, y2], normal_caption
      ocr_llava  LLaVA-OneVision parquet: id, image {bytes, path}, conversations, data_source
      lisa       jsonl: image path under an image root, problem, solution box (absolute pixels)
      geoqav     parquet: image struct, problem, answer
      sat        parquet: image struct, question, choices, answer (the choice text's letter)
      scienceqa  parquet: image struct, question, choices, answer (an int index), hint, subject
  - and returns the config overrides that point model.path, tokenizer.path and each source's
    train / eval / image_root at them and cut the run to a few steps (rl.steps, sft.steps, the
    checkpoint and eval cadence, eval sizes); nothing else of the config changes.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from recap_jax import run_config
from recap_jax.data.tasks import GROUNDING_QUESTION, get_task, styled_task_name
from recap_jax.models.qwen2_5_vl import config as config_lib
from recap_jax.run_config import apply_overrides  # noqa: F401 - this module's API (recap_jax.rehearse)

__all__ = ["CPU_LENGTHS", "FIXTURE_KINDS", "apply_overrides", "cpu_length_cuts", "write_fixtures",
           "write_tiny_model"]

IMAGE_SIZES = ((56, 84), (84, 56))  # (height, width): >= min_pixels (56 x 56), two sizes for image reliance
DEFAULT_VOCAB = 1024


# --------------------------------------------------------------------------- images and rows


def _image(rng: np.random.Generator, index: int) -> np.ndarray:
    """A small RGB image with a filled rectangle (so a box can point at something)."""
    height, width = IMAGE_SIZES[index % len(IMAGE_SIZES)]
    image = rng.integers(0, 64, (height, width, 3), dtype=np.uint8)
    image[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = rng.integers(128, 256, 3, dtype=np.uint8)
    return image


def _encoded(image: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def _box(image: np.ndarray) -> list[int]:
    height, width = image.shape[:2]
    return [width // 4, height // 4, 3 * width // 4, 3 * height // 4]


def _struct(image: np.ndarray, name: str) -> dict:
    """A Hugging Face ``Image`` feature as parquet stores it."""
    return {"bytes": _encoded(image), "path": name}


def _thinklite(rng, i, image, root):
    a, b = int(rng.integers(1, 20)), int(rng.integers(1, 20))
    return {"problem": f"<image>What is {a} plus {b}?", "answer": str(a + b), "image": _struct(image, f"{i}.png")}


def _refcoco(rng, i, image, root):
    name = f"train2014/COCO_train2014_{i:012d}.jpg"
    _save(image, os.path.join(root, name), "JPEG")
    phrase = "bright square in the middle"
    box = _box(image)
    return {"id": i, "image": name, "normal_caption": phrase, "solution": box,
            "conversations": [{"from": "human", "value": "<image>" + GROUNDING_QUESTION.format(phrase=phrase)},
                              {"from": "gpt", "value": str(box)}]}


def _ocr_llava(rng, i, image, root):
    text = "".join(chr(int(c)) for c in rng.integers(65, 91, 6))
    return {"id": f"ocr_{i}", "image": _struct(image, f"ocr_{i}.png"), "data_source": "rehearsal",
            "conversations": [{"from": "human", "value": "<image>\nWhat is the text in the image?"},
                              {"from": "gpt", "value": text}]}


def _lisa(rng, i, image, root):
    name = f"images/lisa_{i:05d}.jpg"
    _save(image, os.path.join(root, name), "JPEG")
    return {"image": name, "problem": "<image>Where is the bright square? Give its bounding box.",
            "solution": _box(image)}


def _geoqav(rng, i, image, root):
    angle = int(rng.integers(10, 80))
    return {"image": _struct(image, f"geo_{i}.png"), "problem": f"<image>Angle A is {angle} degrees. "
            "What is its complement?", "answer": str(90 - angle)}


def _sat(rng, i, image, root):
    choices = ["left", "right"]
    pick = int(rng.integers(0, 2))
    return {"image": _struct(image, f"sat_{i}.png"), "question": "Is the bright square left or right of the "
            "image center?", "choices": choices, "answer": "AB"[pick]}


def _scienceqa(rng, i, image, root):
    choices = ["a mammal", "a bird", "a fish"]
    return {"image": _struct(image, f"sqa_{i}.png"), "question": "Which animal group does this belong to?",
            "choices": choices, "answer": int(rng.integers(0, 3)), "hint": "", "subject": "natural science"}


def _save(image: np.ndarray, path: str, fmt: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(_encoded(image, fmt))


# kind -> (row writer, file suffix, whether images live under an image root)
FIXTURE_KINDS: dict[str, tuple[Callable, str, bool]] = {
    "thinklite": (_thinklite, "parquet", False), "refcoco": (_refcoco, "jsonl", True),
    "ocr_llava": (_ocr_llava, "parquet", False), "lisa": (_lisa, "jsonl", True),
    "geoqav": (_geoqav, "parquet", False), "sat": (_sat, "parquet", False),
    "scienceqa": (_scienceqa, "parquet", False),
}


def _write_rows(rows: list[dict], path: str) -> None:
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=8)
    else:
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)


def write_source(directory: str, name: str, kind: str, train_rows: int, eval_rows: int,
                 seed: int = 0) -> dict[str, str]:
    """Train and eval files of source ``name`` in the format of adapter ``kind``; returns the
    source's overrides ({"train": ..., "eval": ..., "image_root": ...})."""
    if kind not in FIXTURE_KINDS:
        raise ValueError(f"rehearsal: no fixture writer for data.sources.{name}.kind={kind!r}; known: "
                         f"{sorted(FIXTURE_KINDS)}")
    writer, suffix, rooted = FIXTURE_KINDS[kind]
    root = os.path.join(directory, name, "images")
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {"image_root": root if rooted else ""}
    for split, count in (("train", train_rows), ("eval", eval_rows)):
        offset = 0 if split == "train" else train_rows  # distinct image names across splits
        rows = [writer(rng, offset + i, _image(rng, i), root) for i in range(count)]
        path = os.path.join(directory, name, f"{split}.{suffix}")
        _write_rows(rows, path)
        out[split] = path
    return out


# --------------------------------------------------------------------------- the model


def _corpus(config, sources: dict[str, dict[str, str]]) -> list[str]:
    """Texts the tokenizer learns its merges from: chat words, and each source's prompts and
    targets (so prompts stay short in tokens, as with a real tokenizer)."""
    from recap_jax.data import sources as sources_lib

    texts = ["system", "user", "assistant", "You are a helpful assistant."]
    style = config.data.get("prompt_style", "bare")
    for name, files in sources.items():
        task = get_task(styled_task_name(name, style))
        opened = sources_lib.open_source(name, [files["train"]], image_root=files["image_root"] or None,
                                         adapter=config.data.sources[name].kind)
        for entry in opened.entries:
            answer = entry.answer if isinstance(entry.answer, str) else str(list(entry.answer))
            texts += [task.format_prompt(entry.question), task.format_target(answer)] * 3
    return texts


def write_tiny_model(directory: str, texts: list[str], *, vocab_size: int = DEFAULT_VOCAB, seed: int = 0,
                     text_layers: int = 2, vision_depth: int = 2) -> config_lib.Qwen2_5_VLConfig:
    """A tiny random Qwen2.5-VL written by transformers (config.json + model.safetensors) with a
    BPE tokenizer of ``vocab_size`` ids learnt on ``texts`` whose special tokens sit at the
    model config's ids, and the Qwen2-VL chat template; returns the model config."""
    import torch
    import transformers

    from recap_jax.models.qwen2_5_vl.processor import build_demo_tokenizer

    model_config = config_lib.tiny(vocab_size, text_layers=text_layers, vision_depth=vision_depth,
                                   fullatt_block_indexes=(vision_depth - 1,))
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.Qwen2_5_VLConfig(**model_config.to_hf_dict()))
    model.save_pretrained(directory, safe_serialization=True)
    build_demo_tokenizer(texts, vocab_size, directory)
    return model_config


# --------------------------------------------------------------------------- the overrides


def _rows_needed(config) -> int:
    """Train rows per source: every batch size of the config, and a few more."""
    return max(config.rl.prompts_per_step, config.sft.batch_size, config.eval.batch_size) + 4


def write_fixtures(directory: str, config, *, steps: int = 2, eval_examples: int = 4,
                   vocab_size: int = DEFAULT_VOCAB, cpu_lengths: bool = False) -> dict[str, Any]:
    """Writes the rehearsal's model and data for run config ``config`` into ``directory`` and
    returns the overrides ({dotted field: value}) that make the run use them and stop after
    ``steps`` steps per stage (module docstring). ``config`` is not changed.

    cpu_lengths: also cut the sequence lengths a CPU cannot hold (`CPU_LENGTHS`: sampled and
    eval completions of 64 tokens, answer buckets up to 256). With the paper configs' own
    lengths (2,048-token answers) the evaluation's NLL pass over 8 simulated devices needed more
    than 21 GB; with these cuts a rehearsal of hybrid_7b ran in 4 min at about 5 GB."""
    if steps < 1 or eval_examples < 1:
        raise ValueError(f"rehearsal: steps ({steps}) and eval_examples ({eval_examples}) must be >= 1")
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    overrides: dict[str, Any] = {}
    written = {}
    for seed, name in enumerate(run_config.source_names(config)):
        source = config.data.sources[name]
        if source.kind == "synthetic":
            continue
        files = write_source(os.path.join(directory, "data"), name, source.kind, _rows_needed(config),
                             eval_examples, seed=seed)
        written[name] = files
        for key, value in files.items():
            overrides[f"data.sources.{name}.{key}"] = value
    model_dir = os.path.join(directory, "model")
    write_tiny_model(model_dir, _corpus(config, written), vocab_size=vocab_size, seed=config.seed)
    overrides.update({"model.path": model_dir, "tokenizer.path": model_dir})
    overrides.update(_short_run(config, steps, eval_examples))
    if cpu_lengths:
        overrides.update(cpu_length_cuts(config))
    return overrides


CPU_LENGTHS = {"max_new_tokens": 64, "max_answer_bucket": 256}


def cpu_length_cuts(config) -> dict[str, Any]:
    """Overrides capping completions and answer buckets at `CPU_LENGTHS` (never raising them)."""
    cap = CPU_LENGTHS["max_answer_bucket"]
    buckets = tuple(b for b in config.data.answer_buckets if b <= cap) or (min(config.data.answer_buckets),)
    new_tokens = CPU_LENGTHS["max_new_tokens"]
    return {"rl.max_new_tokens": min(config.rl.max_new_tokens, new_tokens),
            "eval.max_new_tokens": min(config.eval.max_new_tokens, new_tokens),
            "data.answer_buckets": buckets}


def _short_run(config, steps: int, eval_examples: int) -> dict[str, Any]:
    """Steps cut to ``steps`` per stage, a checkpoint every step, evaluation at the end (and at
    every ``steps`` when the config evaluates periodically), few eval examples."""
    out: dict[str, Any] = {"checkpoint.every_steps": 1, "log.every_steps": 1,
                           "eval.num_examples": min(config.eval.num_examples, eval_examples)}
    for stage in ("sft", "rl"):
        if config[stage].steps > 0:
            out[f"{stage}.steps"] = min(config[stage].steps, steps)
    if config.eval.every_steps > 0:
        out["eval.every_steps"] = min(config.eval.every_steps, steps)
    return out
