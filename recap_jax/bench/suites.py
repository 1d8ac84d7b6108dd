"""Benchmark adapters: each suite read from a local copy in the format it is published in.

A suite is opened from a path (`open_suite`), which may be:
- a local snapshot of the Hugging Face dataset repository (``huggingface-cli download
  --repo-type dataset``): the split's parquet files are found by name (``<split>.parquet``
  or ``<split>-*.parquet``, under the config's subdirectory when the repo has one);
- one parquet or arrow file;
- a ``datasets.save_to_disk`` directory (a Dataset, or a DatasetDict and the split);
- a directory of the ``datasets`` cache (``HF_DATASETS_CACHE/<org>___<name>/...``) holding
  ``<builder>-<split>[-NNNNN-of-NNNNN].arrow`` files (the newest build is used);
- for the VLM-R1 grounding suites, the ``rec_jsons_processed`` json (a list) or jsonl file,
  with ``image_root`` the image directory.
Parquet/arrow files are read with ``datasets`` (its Image features decode the images).

Each suite's row → `BenchItem` (question with its choices formatted, its image(s), reference
answer, scoring rule). Repository layouts followed (columns checked against the dataset
cards) are listed in `SUITES` and in docs/benchmarks_eval.md. Items with no image, an
undecodable image, or missing fields are skipped and counted (`Suite.skips`), each named by
file and row. Questions with several images (MMMU, MMMU-Pro) carry all the images their
``<image i>`` tags reference, in the order of i (`mmmu_images`); the suite option
``multi_image="skip"`` restores the old behaviour, skipping them and counting them under their
own reason, "multi_image". OCRBench v2 rows of a task type whose metric is not implemented
(none at present) are skipped under "unscored", text translation rows with an empty answer
under "ignored" (as the published evaluation does).

MMBench's circular copies (``index % 1e6`` shared) are read as they are in the file
(``circular="auto"``), or dropped (``"off"``), or made from the original rows by rotating the
options (``"generate"``, for a file without them); `recap_jax.bench.circular`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recap_jax.bench import circular as circular_lib
from recap_jax.bench import ocrbench_v2, ocrbench_v2_text
from recap_jax.bench.circular import CIRCULAR_MODES, circular_views
from recap_jax.bench.readers import read_hf_split, read_json_rows
from recap_jax.bench.row_fields import format_options, letter_of, optional_text, string_list, text_field
from recap_jax.bench.scoring import LETTERS
from recap_jax.data import files as files_lib
from recap_jax.data.records import BadRecord, SkipCounter, decode_image
from recap_jax.data.tasks import GROUNDING_QUESTION
from recap_jax.models.qwen2_5_vl import processor as processor_lib

__all__ = ["BenchItem", "CIRCULAR_MODES", "MULTI_IMAGE_MODES", "SUITES", "Suite", "SuiteKind", "circular_views",
           "format_options", "mmmu_images", "open_suite", "parse_suite_spec", "read_hf_split", "suite_kind"]

# lmms-eval's VizWiz instruction (the answer "unanswerable" is among the references)
VIZWIZ_SUFFIX = ("\nWhen the provided information is insufficient, respond with 'Unanswerable'. "
                 "Answer the question using a single word or phrase.")
MMMU_PRO_VISION_QUESTION = "Answer the multiple-choice question shown in the image."
_IMAGE_TAG = re.compile(r"<image\s*\d*>")
_MMMU_IMAGE_TAG = re.compile(r"<image (\d+)>")  # MMMU's numbered tags, "<image 1>" .. "<image 7>"
MMMU_IMAGE_COLUMNS = 7
MULTI_IMAGE_MODES = ("all", "skip")
_SPEC_KEYS = ("split", "config", "image_root", "circular", "multi_image")



@dataclasses.dataclass(frozen=True, eq=False)
class BenchItem:
    """One benchmark question.

    Attributes:
      suite: the suite label (e.g. "mathvista", "refcoco/testA").
      id: the row's id (or "<file>:<row>").
      question: the question text with its choices formatted in, without the prompt's
        instruction (`recap_jax.bench.prompts` adds it).
      image: uint8 RGB array [H, W, 3]: the first (often the only) image.
      more_images: the second, third, ... images of a multi-image question (MMMU, MMMU-Pro),
        uint8 [H, W, 3] each, in prompt order; empty for the usual one-image question.
      answer: the reference: an option letter, a string, a list of strings (InfoVQA, VizWiz,
        OCRBench, MMMU open) or a box (x1, y1, x2, y2) in the original image's pixels.
      choices: option texts (multiple choice), in letter order.
      meta: what the suite's rule needs (question_type, answer_type, precision, dataset, ...).
    """

    suite: str
    id: str
    question: str
    image: np.ndarray
    answer: Any
    choices: tuple[str, ...] = ()
    meta: dict = dataclasses.field(default_factory=dict)
    more_images: tuple[np.ndarray, ...] = ()

    @property
    def images(self) -> tuple[np.ndarray, ...]:
        """All images in prompt order: ``(image, *more_images)``."""
        return (self.image, *self.more_images)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the first image."""
        return int(self.image.shape[0]), int(self.image.shape[1])


@dataclasses.dataclass(frozen=True)
class SuiteKind:
    """How one benchmark is read and scored.

    parse_row: row dict → dict(id, question, image or images (a list, in prompt order),
    answer[, choices, meta]); raises BadRecord.
    rule: the `recap_jax.bench.scoring.RULES` entry. split / config: defaults (config = the
    repo subdirectory, when the repo has several). layout: the published repository followed.
    reader: "hf" (parquet / arrow / save_to_disk / cache) or "json" (VLM-R1 rec json).
    multi_dir: the split's files may span several subdirectories (MMMU's 30 subjects).
    aggregate: scored item records -> suite metrics (their "score" replaces the mean item
    score), for suites whose published score is not the item mean (MMBench CircularEval,
    OCRBench v2's category means); None: the mean.
    circular: the suite has MMBench-style circular copies (the ``circular`` option applies).
    multi_image: the suite has questions with several images (the ``multi_image`` option
    applies).
    """

    name: str
    parse_row: Callable[[dict], dict]
    rule: str
    split: str
    layout: str
    config: str | None = None
    reader: str = "hf"
    multi_dir: bool = False
    aggregate: Callable[[Sequence[dict]], dict] | None = None
    circular: bool = False
    multi_image: bool = False


# --------------------------------------------------------------------------- adapters


def mathvista_row(row: dict) -> dict:
    """AI4Math/MathVista: pid, question, image (path), decoded_image, choices, unit, precision,
    answer, question_type (multi_choice | free_form), answer_type, query (the official prompt
    with its hint and choices, used as the question)."""
    choices = string_list(row.get("choices"), "choices")
    question = optional_text(row, "query")
    if not question:
        question = text_field(row, "question")
        if choices:
            question += "\nChoices:\n" + format_options(choices, "(A) ")
    precision = row.get("precision")
    return dict(id=str(row.get("pid", "")), question=question,
                image=row.get("decoded_image") or row.get("image"),
                answer=text_field(row, "answer", what="answer"), choices=tuple(choices),
                meta=dict(question_type=text_field(row, "question_type", what="question_type"),
                          answer_type=text_field(row, "answer_type", what="answer_type"),
                          precision=None if precision is None or precision != precision
                          else float(precision)))


def mathverse_row(row: dict) -> dict:
    """AI4Math/MathVerse (testmini): sample_index, problem_version, question (choices written
    in it for multi-choice), image, answer (a letter for multi-choice), question_type."""
    multiple = text_field(row, "question_type", what="question_type") == "multi-choice"
    answer = text_field(row, "answer", what="answer")
    if multiple:
        answer = letter_of(answer, len(LETTERS))
    return dict(id=str(row.get("sample_index", "")), question=text_field(row, "question"),
                image=row.get("image"), answer=answer,
                meta=dict(multiple_choice=multiple,
                          problem_version=optional_text(row, "problem_version")))


def mathvision_row(row: dict) -> dict:
    """MathLLMs/MathVision: id, question (``<image1>`` tags removed), options, image (path),
    decoded_image, answer (a letter when there are options), solution, level, subject."""
    options = string_list(row.get("options"), "options")
    question = _IMAGE_TAG.sub("", text_field(row, "question")).strip()
    answer = text_field(row, "answer", what="answer")
    if options:
        question += "\nChoices:\n" + format_options(options, "(A) ")
        answer = letter_of(answer, len(options))
    return dict(id=str(row.get("id", "")), question=question,
                image=row.get("decoded_image") or row.get("image"), answer=answer,
                choices=tuple(options),
                meta=dict(multiple_choice=bool(options), num_choices=len(options) or None))


def mmmu_images(row: dict, texts: Sequence[str]) -> tuple[list, list[int]]:
    """(images, the tag numbers i they were chosen by) of an MMMU / MMMU-Pro standard row.

    MMMU's rule (and lmms-eval's ``mmmu_doc_to_visual``): the images of a question are those
    its ``<image i>`` tags reference, in the question and in the options, taken from the
    ``image_i`` columns in the order of i (each once, however often it is referenced). A row
    with no tag at all gives its non-empty image columns in column order
    (numbers []). BadRecord "image" when a referenced column is empty or the row has no image.
    """
    numbers = sorted({int(n) for text in texts for n in _MMMU_IMAGE_TAG.findall(text)})
    if numbers:
        images = []
        for number in numbers:
            value = row.get(f"image_{number}")
            if value is None:
                raise BadRecord(f"image: <image {number}> is referenced but image_{number} is "
                                "empty", "image")
            images.append(value)
        return images, numbers
    images = [row[f"image_{k}"] for k in range(1, MMMU_IMAGE_COLUMNS + 1)
              if row.get(f"image_{k}") is not None]
    if not images:
        raise BadRecord("image: no image", "image")
    return images, []


def _renumber_image_tags(text: str, numbers: Sequence[int]) -> str:
    """``<image i>`` → ``<image j>``, j the 1-based position of image i among the shown ones
    (the identity when the tags are 1..n, as in nearly every MMMU question)."""
    position = {number: k + 1 for k, number in enumerate(numbers)}
    return _MMMU_IMAGE_TAG.sub(lambda m: f"<image {position.get(int(m.group(1)), m.group(1))}>",
                               text)


def mmmu_row(row: dict) -> dict:
    """MMMU/MMMU and MMMU/MMMU_Pro (standard configs): id, question, options (the string repr
    of a list), image_1..image_7, answer (a letter; text for MMMU open questions),
    question_type (MMMU only). MMMU_Pro's vision config (id, image, options, answer): the
    question is in the image.

    Images: those the ``<image i>`` tags of the question and options reference, in the order
    of i (`mmmu_images`); they are shown before the text, and the tags stay in the text,
    renumbered to the position of their image when the referenced numbers skip one."""
    options = string_list(row.get("options"), "options")
    if "question" not in row:  # MMMU_Pro vision
        if row.get("image") is None:
            raise BadRecord("image: no image", "image")
        images, question = [row["image"]], MMMU_PRO_VISION_QUESTION
    else:
        question = text_field(row, "question")
        images, numbers = mmmu_images(row, [question, *options])
        if numbers:
            question = _renumber_image_tags(question, numbers)
            options = [_renumber_image_tags(option, numbers) for option in options]
    multiple = row.get("question_type", "multiple-choice") == "multiple-choice" and bool(options)
    if multiple:
        if "question" in row:
            question += "\n" + format_options(options, "(A) ")
        answer = letter_of(text_field(row, "answer", what="answer"), len(options))
    else:
        answer = string_list(row.get("answer"), "answer")
        if not answer:
            raise BadRecord("text: no answer", "text")
    return dict(id=str(row.get("id", "")), question=question, images=images, answer=answer,
                choices=tuple(options),
                meta=dict(multiple_choice=multiple, num_choices=len(options) or None,
                          num_images=len(images)))


def ai2d_row(row: dict) -> dict:
    """lmms-lab/ai2d: question, options (list), answer (the 0-based option index as text),
    image."""
    options = string_list(row.get("options"), "options")
    if not options:
        raise BadRecord("schema: no options")
    return dict(id="", question=text_field(row, "question") + "\n" + format_options(options),
                image=row.get("image"), answer=letter_of(row.get("answer"), len(options)),
                choices=tuple(options))


def mmbench_row(row: dict) -> dict:
    """lmms-lab/MMBench (config en) / MMBench_EN: index, question, hint, A, B, C, D, answer
    (a letter), category, image. Options that are empty or NaN are left out. meta: group
    (index % 1e6, shared by a question's circular copies), rotation (index // 1e6)."""
    index = row.get("index")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise BadRecord(f"schema: index {index!r} is not a non-negative integer")
    group, rotation = circular_lib.group_of(index)
    options = []
    for letter in "ABCD":
        text = optional_text(row, letter)
        if not text:
            break
        options.append(text)
    if len(options) < 2:
        raise BadRecord(f"schema: {len(options)} options", "schema")
    hint = optional_text(row, "hint")
    question = (hint + "\n" if hint else "") + text_field(row, "question")
    return dict(id=str(row.get("index", "")), question=question + "\n" + format_options(options),
                image=row.get("image"),
                answer=letter_of(text_field(row, "answer", what="answer"), len(options)),
                choices=tuple(options), meta=dict(category=optional_text(row, "category"),
                                                  group=group, rotation=rotation))


def scienceqa_row(row: dict) -> dict:
    """derek-thomas/ScienceQA / lmms-lab/ScienceQA (ScienceQA-IMG): image (None for text-only
    questions, skipped), question, choices, answer (0-based index), hint."""
    if row.get("image") is None:
        raise BadRecord("image: text-only question (no image)", "image")
    choices = string_list(row.get("choices"), "choices")
    if not choices:
        raise BadRecord("schema: no choices")
    hint = optional_text(row, "hint")
    question = (f"Context: {hint}\n" if hint else "") + text_field(row, "question")
    return dict(id="", question=question + "\n" + format_options(choices), image=row["image"],
                answer=letter_of(row.get("answer"), len(choices)), choices=tuple(choices))


def chartqa_row(row: dict) -> dict:
    """lmms-lab/ChartQA: type (human_test | augmented_test), question, answer, image
    (HuggingFaceM4/ChartQA's query / label list also read)."""
    answer = row.get("answer", row.get("label"))
    answers = string_list(answer, "answer")
    if not answers:
        raise BadRecord("text: no answer", "text")
    return dict(id="", question=text_field(row, "question", "query"), image=row.get("image"),
                answer=answers, meta=dict(type=optional_text(row, "type")))


def infovqa_row(row: dict) -> dict:
    """lmms-lab/DocVQA, config InfographicVQA: questionId, question, answers (list), image."""
    answers = string_list(row.get("answers"), "answers")
    if not answers:
        raise BadRecord("text: no answers (the test split has none)", "text")
    return dict(id=str(row.get("questionId", "")), question=text_field(row, "question"),
                image=row.get("image"), answer=answers)


def vizwiz_row(row: dict) -> dict:
    """lmms-lab/VizWiz-VQA: question_id, image, question, answers (10), category."""
    answers = string_list(row.get("answers"), "answers")
    if not answers:
        raise BadRecord("text: no answers (the test split has none)", "text")
    return dict(id=str(row.get("question_id", "")), question=text_field(row, "question") + VIZWIZ_SUFFIX,
                image=row.get("image"), answer=answers)


def ocrbench_row(row: dict) -> dict:
    """echo840/OCRBench: dataset, question, question_type, answer (list), image."""
    answers = string_list(row.get("answer"), "answer")
    if not answers:
        raise BadRecord("text: no answer", "text")
    return dict(id="", question=text_field(row, "question"), image=row.get("image"), answer=answers,
                meta=dict(dataset=optional_text(row, "dataset"),
                          question_type=optional_text(row, "question_type")))


def _spotting_reference(row: dict) -> tuple[list[list[int]], list[str]]:
    """An OCRBench v2 row's bbox_list (integer boxes) and content (transcriptions as written)."""
    raw_boxes, raw_content = row.get("bbox_list"), row.get("content")
    try:
        boxes = [] if raw_boxes is None else [[int(v) for v in box] for box in raw_boxes]
    except (TypeError, ValueError):
        raise BadRecord(f"schema: bbox_list is not a list of integer boxes: {str(raw_boxes)[:80]}") from None
    contents = [] if raw_content is None else string_list(list(raw_content), "content", strip=False)
    return boxes, contents


def ocrbench_v2_row(row: dict) -> dict:
    """ling99/OCRBench_v2: id, dataset_name, question, type (the task type), answers (list),
    image, eval (None / "None", "multiple choice", "case sensitive", "exact match",
    "regression"), bbox (VQA with position), bbox_list and content (text spotting's boxes
    and transcriptions, which are its reference). Rows of a type not scored here
    (`ocrbench_v2.UNSCORED_TYPES`) are BadRecord "unscored"; a text translation row with an
    empty answer is "ignored" (the published evaluation leaves it out); a reference its
    type's rule cannot use (`ocrbench_v2.check_reference`) is "schema"."""
    task_type = text_field(row, "type", what="type")
    question = text_field(row, "question")
    method = optional_text(row, "eval")
    method = "" if method == "None" else method     # the upload script wrote str(None)
    try:
        scored = ocrbench_v2.is_scored(task_type, question)
        ocrbench_v2.check_method(task_type, method)
    except ValueError as error:
        raise BadRecord(f"schema: {error}") from None
    if not scored:
        raise BadRecord(f"unscored: OCRBench v2 type {task_type!r} needs a metric not "
                        "implemented here", "unscored")
    boxes, contents = _spotting_reference(row)
    # the text, parsing and spotting metrics see the reference as written (spaces count)
    as_written = task_type not in ocrbench_v2.CONTAINMENT_TYPES
    answers = contents if task_type == "text spotting en" else \
        string_list(row.get("answers"), "answers", strip=not as_written)
    if ocrbench_v2.is_ignored(task_type, answers):
        raise BadRecord("ignored: text translation cn with an empty answer", "ignored")
    if not answers:
        raise BadRecord("text: no answers", "text")
    try:
        ocrbench_v2.check_reference(task_type, answers, question, boxes, contents)
    except ValueError as error:
        raise BadRecord(f"schema: {error}") from None
    box = row.get("bbox")
    meta = dict(type=task_type, eval=method, dataset=optional_text(row, "dataset_name"),
                bbox=None if box is None else [int(v) for v in box])
    if task_type == "text spotting en":
        meta.update(bbox_list=boxes, content=contents)
    if ocrbench_v2.uses_text_metric(task_type, question):
        meta["meteor"] = ocrbench_v2_text.meteor_form()
    return dict(id=str(row.get("id", "")), question=question, image=row.get("image"),
                answer=answers, meta=meta)


def _conversation(row: dict) -> tuple[str | None, str | None]:
    human = gpt = None
    for turn in row.get("conversations") or []:
        if not isinstance(turn, dict):
            continue
        role = str(turn.get("from", turn.get("role", ""))).lower()
        if human is None and role in ("human", "user"):
            human = turn.get("value")
        elif human is not None and role in ("gpt", "assistant"):
            gpt = turn.get("value")
            break
    return human, gpt


def rec_row(row: dict) -> dict:
    """VLM-R1 rec_jsons_processed (RefCOCO/+/g val/testA/testB, lisa_test): image (path under
    the image root), problem (the question), solution ([x1, y1, x2, y2] in the original
    image's pixels), normal_caption; conversations (human / gpt turns) are read as fallbacks."""
    from recap_jax.rewards import parse_box

    human, gpt = _conversation(row)
    question = row.get("problem") or human
    if not question and isinstance(row.get("normal_caption"), str):
        question = GROUNDING_QUESTION.format(phrase=row["normal_caption"].strip().rstrip("."))
    question = text_field({"q": str(question or "").replace("<image>", "")}, "q")
    value = row.get("solution", gpt)
    box = parse_box(value) if isinstance(value, str) else (
        parse_box(value) if isinstance(value, (list, tuple)) and len(value) == 4 else None)
    if box is None:
        raise BadRecord(f"box: malformed box {str(value)[:80]!r}", "box")
    image = row.get("image")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    return dict(id=str(row.get("id", row.get("question_id", ""))), question=question,
                image=image, answer=tuple(box), meta=dict(caption=row.get("normal_caption")))


SUITES: dict[str, SuiteKind] = {kind.name: kind for kind in [
    SuiteKind("mathvista", mathvista_row, "mathvista", "testmini",
              "AI4Math/MathVista: data/testmini-*.parquet"),
    SuiteKind("mathverse", mathverse_row, "math", "testmini",
              "AI4Math/MathVerse: testmini.parquet (config testmini)"),
    SuiteKind("mathvision", mathvision_row, "math", "test",
              "MathLLMs/MathVision: data/test-*.parquet (or testmini)"),
    SuiteKind("mmmu", mmmu_row, "mmmu", "validation",
              "MMMU/MMMU: <Subject>/validation-*.parquet (all 30 subjects)", multi_dir=True,
              multi_image=True),
    SuiteKind("mmmu_pro", mmmu_row, "choice", "test",
              "MMMU/MMMU_Pro: 'standard (10 options)'/test-*.parquet (or 'standard (4 options)', "
              "'vision')", config="standard (10 options)", multi_image=True),
    SuiteKind("ai2d", ai2d_row, "choice", "test", "lmms-lab/ai2d: data/test-*.parquet"),
    SuiteKind("mmbench", mmbench_row, "choice", "dev",
              "lmms-lab/MMBench: en/dev-*.parquet (or lmms-lab/MMBench_EN: data/dev-*.parquet)",
              config="en", aggregate=circular_lib.aggregate, circular=True),
    SuiteKind("scienceqa", scienceqa_row, "choice", "test",
              "derek-thomas/ScienceQA: data/test-*.parquet (or lmms-lab/ScienceQA: "
              "ScienceQA-IMG/test-*.parquet); text-only questions skipped", config="ScienceQA-IMG"),
    SuiteKind("chartqa", chartqa_row, "relaxed", "test", "lmms-lab/ChartQA: data/test-*.parquet"),
    SuiteKind("infovqa", infovqa_row, "anls", "validation",
              "lmms-lab/DocVQA: InfographicVQA/validation-*.parquet", config="InfographicVQA"),
    SuiteKind("vizwiz", vizwiz_row, "vqa", "val", "lmms-lab/VizWiz-VQA: data/val-*.parquet"),
    SuiteKind("ocrbench", ocrbench_row, "ocrbench", "test", "echo840/OCRBench: data/test-*.parquet"),
    SuiteKind("ocrbench_v2", ocrbench_v2_row, "ocrbench_v2", "test",
              "ling99/OCRBench_v2: data/test-*.parquet", aggregate=ocrbench_v2.aggregate),
    SuiteKind("refcoco", rec_row, "grounding", "",
              "VLM-R1 rec_jsons_processed/refcoco{,p,g}_{val,testA,testB,test}.json + COCO "
              "train2014", reader="json"),
    SuiteKind("lisa", rec_row, "grounding", "",
              "VLM-R1 rec_jsons_processed/lisa_test.json + LISA ReasonSeg images", reader="json"),
]}


def suite_kind(label: str) -> SuiteKind:
    """The SuiteKind of a label: its part before the first "/" (e.g. "refcoco/testA")."""
    name = label.split("/", 1)[0]
    if name not in SUITES:
        raise ValueError(f"unknown benchmark suite {name!r} (from {label!r}); known: "
                         f"{sorted(SUITES)}")
    return SUITES[name]


# --------------------------------------------------------------------------- opened suites


def _image_array(value: Any, image_root: str | None, where: str) -> np.ndarray:
    """A row's image value (PIL image, {bytes, path} struct, bytes, or a path under
    ``image_root``) → uint8 RGB [H, W, 3]; BadRecord if unusable."""
    if value is None:
        raise BadRecord(f"image: {where} has no image", "image")
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return decode_image(bytes(value), what=where)
    if isinstance(value, str):
        if image_root is None:
            raise BadRecord(f"path: {where} names its image by path ({value!r}); pass "
                            "image_root", "path")
        return files_lib.read_image_under(image_root, value, where)
    try:
        return processor_lib.to_rgb_array(value)
    except (TypeError, ValueError, OSError) as error:
        raise BadRecord(f"image: {where}: {error}", "image") from None


class Suite:
    """One opened benchmark: its items, and `load` (item index → BenchItem).

    Attributes: label, kind (SuiteKind), path, image_root, skips (a SkipCounter: bad items are
    counted under ``label``), multi_image ("all": a question's images are all kept; "skip":
    questions with several are skipped and counted under "multi_image"), views (None: item k
    is row k; else item k is row views[k][0] rotated by views[k][1], MMBench's generated
    circular copies).
    """

    def __init__(self, label: str, kind: SuiteKind, path: str, rows: Any, *,
                 image_root: str | None, skips: SkipCounter,
                 views: Sequence[tuple[int, int]] | None = None, multi_image: str = "all"):
        if multi_image not in MULTI_IMAGE_MODES:
            raise ValueError(f"suite {label!r}: multi_image must be one of {MULTI_IMAGE_MODES}, "
                             f"got {multi_image!r}")
        self.label, self.kind, self.path, self._rows = label, kind, path, rows
        self.image_root, self.skips, self.multi_image = image_root, skips, multi_image
        self.views = None if views is None else list(views)

    def __len__(self) -> int:
        return len(self._rows) if self.views is None else len(self.views)

    def load(self, index: int) -> BenchItem:
        """Item ``index`` as a BenchItem; BadRecord naming the file and row if unusable."""
        row_index, rotation = (index, 0) if self.views is None else self.views[index]
        where = f"{self.path} row {row_index}" + (f" (rotation {rotation})" if rotation else "")
        try:
            row = self._rows[row_index]
        except Exception as error:  # noqa: BLE001 -- datasets decodes images on access
            raise BadRecord(f"image: {where}: cannot read the row ({type(error).__name__}: "
                            f"{error})", "image") from None
        if isinstance(row, BadRecord):
            raise BadRecord(f"{where}: {row}", row.kind)
        if not isinstance(row, dict):
            raise BadRecord(f"schema: {where} is a {type(row).__name__}, not an object")
        try:
            if rotation:
                row = circular_lib.rotate_row(row, rotation)
            fields = self.kind.parse_row(row)
        except BadRecord as error:
            raise BadRecord(f"{where}: {error}", error.kind) from None
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise BadRecord(f"schema: {where}: {type(error).__name__}: {error}") from None
        values = fields["images"] if "images" in fields else [fields["image"]]
        if len(values) > 1 and self.multi_image == "skip":
            raise BadRecord(f"multi_image: {where}: {len(values)} images (skipped: "
                            "multi_image=skip)", "multi_image")
        images = [_image_array(value, self.image_root,
                               where if len(values) == 1 else f"{where} image {k + 1}")
                  for k, value in enumerate(values)]
        if self.kind.rule == "grounding":
            _check_box(fields["answer"], images[0].shape, where)
        return BenchItem(suite=self.label, id=fields.get("id") or f"{Path(self.path).name}:{index}",
                         question=fields["question"], image=images[0], answer=fields["answer"],
                         choices=tuple(fields.get("choices", ())), meta=fields.get("meta", {}),
                         more_images=tuple(images[1:]))

    def load_or_skip(self, index: int) -> BenchItem | None:
        """`load`, or None with the row counted in ``skips`` (logged once)."""
        try:
            return self.load(index)
        except BadRecord as error:
            self.skips.skip(self.label, self.path, index, error)
            return None


def _check_box(box, shape, where: str, tolerance: float = 2.0) -> None:
    x1, y1, x2, y2 = box
    if min(box) < -tolerance or x2 > shape[1] + tolerance or y2 > shape[0] + tolerance:
        raise BadRecord(f"box: {where}: {list(box)} outside the {shape[1]}x{shape[0]} image", "box")


def open_suite(label: str, path: str | os.PathLike, *, split: str | None = None,
               config: str | None = None, image_root: str | os.PathLike | None = None,
               cache_dir: str | None = None, limit: int | None = None,
               skips: SkipCounter | None = None, circular: str = "auto",
               multi_image: str = "all") -> Suite:
    """Opens suite ``label`` (a SUITES name, optionally "/variant", e.g. "refcoco/testA")
    from ``path``; ``split`` / ``config`` default to the suite's; ``limit`` keeps the first
    rows. Path-named images are read under ``image_root`` (default: the file's directory for
    json suites). ``circular`` ("auto", "off", "generate"; `circular_views`) applies to
    MMBench only; ``multi_image`` ("all", "skip"; `Suite`) to MMMU and MMMU-Pro only."""
    kind = suite_kind(label)
    if multi_image not in MULTI_IMAGE_MODES:
        raise ValueError(f"suite {label!r}: multi_image must be one of {MULTI_IMAGE_MODES}, "
                         f"got {multi_image!r}")
    if multi_image != "all" and not kind.multi_image:
        raise ValueError(f"suite {label!r}: the multi_image option applies to MMMU and MMMU-Pro "
                         "only")
    path = os.fspath(path)
    if kind.reader == "json":
        rows = read_json_rows(path)
        image_root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    else:
        rows = read_hf_split(path, split or kind.split, config if config is not None else kind.config,
                             cache_dir=cache_dir, multi_dir=kind.multi_dir)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows)))) if hasattr(rows, "select") else rows[:limit]
    if len(rows) == 0:
        raise ValueError(f"suite {label!r}: no rows in {path}")
    views = None
    if circular != "auto":
        if not kind.circular:
            raise ValueError(f"suite {label!r}: the circular option applies to MMBench only")
        if "index" not in getattr(rows, "column_names", ()):
            raise ValueError(f"suite {label!r}: {path} has no 'index' column (needed for circular)")
        views = circular_views(list(rows["index"]), circular_lib.row_option_counts(rows), circular)
        if not views:
            raise ValueError(f"suite {label!r}: no original rows (index < 1e6) in {path}")
    root = None if image_root is None else os.fspath(image_root)
    return Suite(label, kind, path, rows, image_root=root,
                 skips=SkipCounter() if skips is None else skips, views=views,
                 multi_image=multi_image)


def parse_suite_spec(text: str) -> dict:
    """``LABEL=PATH[;key=value...]`` → dict(label, path, **options); keys: split, config,
    image_root, circular (MMBench: auto | off | generate), multi_image (MMMU, MMMU-Pro: all |
    skip). E.g.
    ``refcoco/testA=/d/rec/refcoco_testA.json;image_root=/d/coco``."""
    label, sep, rest = text.partition("=")
    if not sep or not label.strip() or not rest.strip():
        raise ValueError(f"benchmark spec {text!r}: expected NAME=PATH[;split=..][;config=..]"
                         "[;image_root=..][;circular=..][;multi_image=..]")
    path, *options = rest.split(";")
    spec = {"label": label.strip(), "path": path.strip()}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key.strip() not in _SPEC_KEYS:
            raise ValueError(f"benchmark spec {text!r}: cannot read option {option!r} (keys: "
                             f"{', '.join(_SPEC_KEYS)})")
        spec[key.strip()] = value.strip()
    kind = suite_kind(spec["label"])
    if "circular" in spec and (not kind.circular or spec["circular"] not in CIRCULAR_MODES):
        raise ValueError(f"benchmark spec {text!r}: circular={spec['circular']!r} (MMBench only; "
                         f"one of {CIRCULAR_MODES})")
    if "multi_image" in spec and (not kind.multi_image
                                  or spec["multi_image"] not in MULTI_IMAGE_MODES):
        raise ValueError(f"benchmark spec {text!r}: multi_image={spec['multi_image']!r} (MMMU and "
                         f"MMMU-Pro only; one of {MULTI_IMAGE_MODES})")
    return spec
