"""Real datasets from disk, read without transformers/datasets, as the same Records as the
synthetic suite.

Schemas assumed (field names are tried in the order listed; the first non-empty one wins):

thinklite  ThinkLite-VL-70k parquet. ``problem`` | ``question`` (text, ``<image>`` tokens are
           removed), ``answer`` | ``solution`` (text; ``<answer>`` tags removed), ``image``
           (HF Image struct {bytes, path}, raw bytes, or a path under ``image_root``).
refcoco    VLM-R1 ``rec_jsons_processed`` jsonl/json + ``image_root`` (COCO train2014).
           ``image``: path relative to the root (a one-element list is accepted);
           question: the first human turn of ``conversations`` ({"from": "human"|"user",
           "value": "<image>..."}), else ``problem``, else ``GROUNDING_QUESTION`` filled with
           ``normal_caption``; box: ``solution`` (4 numbers, or text holding
           ``[x1, y1, x2, y2]``), else the first gpt turn's text. Boxes are absolute pixels of
           the original image.
ocr_llava  LLaVA-OneVision OCR subsets (parquet): ``conversations`` (list of {from, value};
           the first human turn is the question, the next gpt turn the answer; later turns
           are ignored), ``image`` (struct {bytes, path} or bytes).
lisa       jsonl/parquet rows: image (path | bytes | struct), ``question`` | ``problem`` |
           conversations, box in ``solution`` | ``box`` | ``bbox`` | ``answer`` (absolute
           pixels).
geoqav, sat, scienceqa
           jsonl/parquet rows: image, ``question`` | ``problem`` | conversations, ``answer`` |
           ``solution`` | ``label`` | gpt turn. Optional ``choices`` | ``options`` (list of
           str) are appended to the question as "A. …" lines, and an integer answer is then
           turned into its letter.

Common rules: the image field is one of ``image``, ``images``, ``image_path``, ``img``,
``file_name``: one image, or a list of images (a multi-image record; box sources need
exactly one). An explicitly empty list (``"images": []``) makes a text-only record; a
missing image field is a bad record unless the row has a video. An optional ``video``
field holds the already-sampled frames: a list of images (paths, bytes or structs, one
size), with the frame rate in ``fps`` | ``video_fps`` (default 2.0), or an object
``{"frames": [...], "fps": 2}``. In the prompt the images come first, then the video, then
the question (``<image>`` / ``<video>`` markers in the text are removed). Paths are confined to ``image_root``
(``..`` escapes, outside absolute paths and outward symlinks are skipped as bad records).
Bad records (invalid JSON, empty question/answer, malformed box, missing/undecodable image,
path escape, box outside the image) are skipped and counted per source in a SkipCounter,
each (file, index) logged once; text problems are found when the source is opened, image
problems when the record is loaded. A source with no usable row fails at open time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recap_jax.data import files as files_lib
from recap_jax.data.records import Answer, BadRecord, Record, SkipCounter, Video, decode_image
from recap_jax.data.tasks import GROUNDING_QUESTION, get_task

__all__ = ["ADAPTERS", "Entry", "Source", "geoqav", "lisa", "ocr_llava", "open_source",
           "refcoco", "sat", "scienceqa", "thinklite"]

IMAGE_KEYS = ("image", "images", "image_path", "img", "file_name")
VIDEO_KEYS = ("video",)
FPS_KEYS = ("fps", "video_fps")
DEFAULT_VIDEO_FPS = 2.0
MAX_IMAGES_PER_RECORD = 64
MAX_VIDEO_FRAMES = 1024
QUESTION_KEYS = ("question", "problem", "prompt", "query")
TEXT_ANSWER_KEYS = ("answer", "solution", "label")
BOX_ANSWER_KEYS = ("solution", "box", "bbox", "answer")
CHOICE_KEYS = ("choices", "options")
MAX_TEXT_CHARS = 100_000
# A box may overhang the image by this many pixels (rounding in annotation tools).
BOX_TOLERANCE_PX = 2.0

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One usable-looking row; its images are read only when the record is loaded.

    ``image`` is ("path", str), ("bytes", bytes), ("column", row) for a lazily read parquet
    column (which may hold a list of images), or None for a row without images.
    ``more_images``: the further images of a multi-image row, like ``image``. ``video``:
    (frame references like ``image``, fps) or None. ``block`` groups rows that are cheap to
    read together (a parquet row group).
    """

    file: str
    index: int
    question: str
    answer: Answer
    image: tuple[str, Any] | None
    block: int = 0
    more_images: tuple[tuple[str, Any], ...] = ()
    video: tuple[tuple[tuple[str, Any], ...], float] | None = None


class Source:
    """A data source opened from disk: its entries, and image loading per entry.

    Attributes:
      name: task name (objectives are ``<name>/<reward>``).
      entries: rows that passed the text checks, in file order.
      skips: the SkipCounter bad rows are counted in (shared between sources if passed in).
    """

    def __init__(self, name: str, entries: list[Entry], *, image_root: str | None,
                 skips: SkipCounter, column_readers: dict[str, files_lib.ParquetColumnReader]):
        self.name, self.entries, self.skips = name, entries, skips
        self.image_root = image_root
        self._column_readers = column_readers

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def blocks(self) -> np.ndarray:
        """int [len] block id per entry (rows sharing a block are cheap to read together)."""
        return np.asarray([entry.block for entry in self.entries], dtype=np.int64)

    def where(self, i: int) -> tuple[str, int]:
        """(file, row index) of entry ``i``, for logging."""
        return self.entries[i].file, self.entries[i].index

    def load(self, i: int) -> Record:
        """Entry ``i`` with its images (and video frames) decoded; BadRecord if it cannot be
        used."""
        entry = self.entries[i]
        images = self._images(entry)
        if not isinstance(entry.answer, str):
            if len(images) != 1:
                raise BadRecord(f"image: a box answer needs exactly one image, the row has "
                                f"{len(images)}", "image")
            _check_box_inside(entry.answer, images[0].shape[0], images[0].shape[1])
        video = None if entry.video is None else self._video(entry)
        return Record(id=f"{entry.file}:{entry.index}", source=self.name,
                      image=images[0] if images else None, question=entry.question,
                      answer=entry.answer, more_images=tuple(images[1:]), video=video)

    def load_or_skip(self, i: int) -> Record | None:
        """Like load, but a bad record is counted in ``skips`` (logged once) and gives None."""
        try:
            return self.load(i)
        except BadRecord as error:
            entry = self.entries[i]
            self.skips.skip(self.name, entry.file, entry.index, error)
            return None

    def __iter__(self) -> Iterator[Record]:
        """Usable records in file order; bad ones are counted and skipped."""
        for i in range(len(self)):
            record = self.load_or_skip(i)
            if record is not None:
                yield record

    def _images(self, entry: Entry) -> list[np.ndarray]:
        """The decoded images of ``entry`` in order (a parquet column may hold a list)."""
        if entry.image is None:
            return []
        refs = [entry.image, *entry.more_images]
        if entry.image[0] == "column":
            refs = _image_values(self._column_readers[entry.file].get(entry.image[1]))
        where = f"image of {entry.file}:{entry.index}"
        return [self._decode(ref, where if len(refs) == 1 else f"image {k} of "
                             f"{entry.file}:{entry.index}") for k, ref in enumerate(refs)]

    def _video(self, entry: Entry) -> Video:
        """The decoded frames of ``entry``'s video; BadRecord if they differ in size."""
        refs, fps = entry.video
        frames = [self._decode(ref, f"video frame {k} of {entry.file}:{entry.index}")
                  for k, ref in enumerate(refs)]
        shapes = sorted({frame.shape for frame in frames})
        if len(shapes) != 1:
            raise BadRecord(f"video: frames of {entry.file}:{entry.index} differ in size "
                            f"{shapes}", "video")
        return Video(frames=np.stack(frames), fps=fps)

    def _decode(self, ref: tuple[str, Any], where: str) -> np.ndarray:
        kind, value = ref
        if kind == "bytes":
            return decode_image(value, what=where)
        if self.image_root is None:
            raise BadRecord(f"path: {where} is a path ({value!r}) but no image_root was given",
                            "path")
        return files_lib.read_image_under(self.image_root, value, where)


# --------------------------------------------------------------------------- row parsing


def _first(row: dict, keys: Sequence[str]) -> Any:
    for key in keys:
        value = row.get(key)
        if value is not None and not (isinstance(value, (str, list, dict)) and not value):
            return value
    return None


def _clean_text(value: Any, what: str) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise BadRecord(f"text: {what} is missing or not text", "text")
    text = str(value).replace("<image>", "").replace("<video>", "").strip()
    if not text:
        raise BadRecord(f"text: {what} is empty", "text")
    if len(text) > MAX_TEXT_CHARS:
        raise BadRecord(f"text: {what} is longer than {MAX_TEXT_CHARS} characters", "text")
    return text


def _conversation_pair(row: dict) -> tuple[str | None, str | None]:
    """(first human turn, the next assistant turn) of ``conversations`` / ``messages``."""
    turns = row.get("conversations") or row.get("messages")
    if not isinstance(turns, list):
        return None, None
    question = answer = None
    for turn in turns:
        if not isinstance(turn, dict):
            continue
        role = str(turn.get("from", turn.get("role", ""))).lower()
        value = turn.get("value", turn.get("content"))
        if question is None and role in ("human", "user"):
            question = value
        elif question is not None and role in ("gpt", "assistant"):
            answer = value
            break
    return question, answer


def _strip_answer_tags(text: str) -> str:
    return text.replace("<answer>", "").replace("</answer>", "").strip()


def _with_choices(question: str, answer: Any, choices: Any) -> tuple[str, Any]:
    if not isinstance(choices, list) or not choices:
        return question, answer
    if len(choices) > 26:
        raise BadRecord(f"schema: {len(choices)} choices (at most 26)", "schema")
    lines = [f"{chr(65 + i)}. {str(choice).strip()}" for i, choice in enumerate(choices)]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise BadRecord(f"text: answer index {answer} outside {len(choices)} choices", "text")
        answer = chr(65 + answer)
    return question + "\n" + "\n".join(lines), answer


def _parse_box(value: Any) -> tuple[float, float, float, float]:
    from recap_jax.rewards import parse_box

    box = None
    if isinstance(value, str):
        box = parse_box(_strip_answer_tags(value))
    elif isinstance(value, (list, tuple)) and len(value) == 4:
        try:
            box = parse_box([float(v) for v in value])
        except (TypeError, ValueError):
            box = None
    if box is None:
        raise BadRecord(f"box: malformed box {str(value)[:80]!r}", "box")
    if min(box) < -BOX_TOLERANCE_PX:
        raise BadRecord(f"box: negative coordinates {box}", "box")
    return tuple(int(v) if float(v).is_integer() else v for v in box)


def _check_box_inside(box, height: int, width: int) -> None:
    x1, y1, x2, y2 = box
    if x2 > width + BOX_TOLERANCE_PX or y2 > height + BOX_TOLERANCE_PX:
        raise BadRecord(f"box: {list(box)} outside the {width}x{height} image", "box")


def _image_ref(value: Any) -> tuple[str, Any]:
    """One image value → ("bytes", data) or ("path", str); BadRecord if absent."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return "bytes", value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)) and value:
        return "bytes", bytes(value)
    if isinstance(value, str) and value.strip():
        return "path", value.strip()
    raise BadRecord("image: missing image", "image")


def _image_values(value: Any) -> list[tuple[str, Any]]:
    """An image field (one image or a list of them) → its references in order."""
    values = value if isinstance(value, list) else [value]
    if len(values) > MAX_IMAGES_PER_RECORD:
        raise BadRecord(f"image: {len(values)} images in one record (at most "
                        f"{MAX_IMAGES_PER_RECORD})", "image")
    return [_image_ref(v) for v in values]


def _row_images(row: dict, has_video: bool) -> list[tuple[str, Any]]:
    """The image references of a row: its image field's, or [] for an explicitly empty list
    (a text-only row) or a video row without images; BadRecord if the field is missing."""
    value = _first(row, IMAGE_KEYS)
    if value is None:
        if has_video or any(row.get(key) == [] for key in IMAGE_KEYS):
            return []
        raise BadRecord("image: missing image", "image")
    return _image_values(value)


def _row_video(row: dict) -> tuple[tuple[tuple[str, Any], ...], float] | None:
    """(frame references, fps) of a row's ``video`` field, or None without one."""
    value = _first(row, VIDEO_KEYS)
    if value is None:
        return None
    fps = _first(row, FPS_KEYS)
    if isinstance(value, dict):
        fps = value.get("fps", fps)
        value = value.get("frames")
    if not isinstance(value, list) or not value:
        raise BadRecord("video: needs a non-empty list of frames", "video")
    if len(value) > MAX_VIDEO_FRAMES:
        raise BadRecord(f"video: {len(value)} frames (at most {MAX_VIDEO_FRAMES})", "video")
    fps = DEFAULT_VIDEO_FPS if fps is None else fps
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < float("inf"):
        raise BadRecord(f"video: fps must be a positive number, got {fps!r}", "video")
    return tuple(_image_ref(frame) for frame in value), float(fps)


# Row parsers: row dict → (question, answer). Raise BadRecord.
RowParser = Callable[[dict], tuple[str, Answer]]


def _text_row(row: dict) -> tuple[str, Answer]:
    human, gpt = _conversation_pair(row)
    question = _first(row, QUESTION_KEYS) or human
    answer = _first(row, TEXT_ANSWER_KEYS)
    answer = gpt if answer is None else answer
    question = _clean_text(question, "question")
    question, answer = _with_choices(question, answer, _first(row, CHOICE_KEYS))
    return question, _strip_answer_tags(_clean_text(answer, "answer"))


def _box_row(row: dict) -> tuple[str, Answer]:
    human, gpt = _conversation_pair(row)
    question = human or _first(row, QUESTION_KEYS)
    if question is None and isinstance(row.get("normal_caption"), str):
        question = GROUNDING_QUESTION.format(phrase=row["normal_caption"].strip().rstrip("."))
    value = _first(row, BOX_ANSWER_KEYS)
    return _clean_text(question, "question"), _parse_box(gpt if value is None else value)


def _conversation_row(row: dict) -> tuple[str, Answer]:
    human, gpt = _conversation_pair(row)
    return _clean_text(human, "question"), _clean_text(gpt, "answer")


# --------------------------------------------------------------------------- opening


def _image_column(file: Path) -> str | None:
    """The parquet column holding image data (binary/struct), if any."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(file)
    for key in IMAGE_KEYS:
        if key in schema.names:
            kind = schema.field(key).type
            while pa.types.is_list(kind) or pa.types.is_large_list(kind):
                kind = kind.value_type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                return key
            return None
    return None


def _open(name: str, paths, parse_row: RowParser, *, image_root: str | os.PathLike | None,
          skips: SkipCounter | None, max_records: int | None) -> Source:
    skips = SkipCounter() if skips is None else skips
    entries: list[Entry] = []
    readers: dict[str, files_lib.ParquetColumnReader] = {}
    files = files_lib.expand_paths(paths)
    for file in files:
        column = _image_column(file) if file.suffix == ".parquet" else None
        if column is not None:
            readers[str(file)] = files_lib.ParquetColumnReader(file, column)
        for index, row in files_lib.iter_rows(file, skip_columns=[column] if column else ()):
            if max_records is not None and len(entries) >= max_records:
                break
            try:
                if isinstance(row, BadRecord):
                    raise row
                if not isinstance(row, dict):
                    raise BadRecord(f"schema: record is a {type(row).__name__}, not an object")
                question, answer = parse_row(row)
                video = _row_video(row)
                if column is not None:
                    images, block = [("column", index)], readers[str(file)].group_of(index)
                else:
                    images, block = _row_images(row, video is not None), 0
                if not isinstance(answer, str) and len(images) != 1:
                    raise BadRecord(f"image: {len(images)} images in one record (a box "
                                    "answer needs exactly 1)", "image")
            except BadRecord as error:
                skips.skip(name, str(file), index, error)
                continue
            except (TypeError, ValueError, AttributeError, KeyError, IndexError) as error:
                # Unexpected field types: the record is bad, the source is not.
                skips.skip(name, str(file), index,
                           BadRecord(f"schema: {type(error).__name__}: {error}"))
                continue
            refs = images + list(video[0] if video else ())
            by_path = [ref[1] for ref in refs if ref[0] == "path"]
            if by_path and image_root is None:
                raise ValueError(f"source {name!r}: {file} row {index} names its image by path "
                                 f"({by_path[0]!r}); pass image_root")
            entries.append(Entry(str(file), index, question, answer,
                                 images[0] if images else None, block,
                                 more_images=tuple(images[1:]), video=video))
    if not entries:
        raise ValueError(
            f"source {name!r}: no usable records in {[str(f) for f in files]} "
            f"({skips.count(name)} bad: {skips.reasons(name)})")
    _log.info("source %r: %d records from %d files (%d bad)", name, len(entries), len(files),
              skips.count(name))
    root = None if image_root is None else os.fspath(image_root)
    return Source(name, entries, image_root=root, skips=skips, column_readers=readers)


def _adapter(name: str, parse_row: RowParser, doc: str):
    def open_(paths, *, image_root=None, skips: SkipCounter | None = None,
              max_records: int | None = None, source_name: str = name) -> Source:
        return _open(source_name, paths, parse_row, image_root=image_root, skips=skips,
                     max_records=max_records)

    open_.__name__ = name
    open_.__doc__ = (f"Opens {doc} (see the module docstring for the schema).\n\n"
                     "Args: paths (files, directories or globs), image_root (required for "
                     "path-named images), skips (a shared SkipCounter), max_records, "
                     "source_name (task name, default "
                     f"{name!r}).")
    return open_


thinklite = _adapter("thinklite", _text_row, "ThinkLite-VL-70k parquet")
refcoco = _adapter("refcoco", _box_row, "VLM-R1 RefCOCO/+/g jsonl")
ocr_llava = _adapter("ocr_llava", _conversation_row, "LLaVA-OneVision OCR parquet")
lisa = _adapter("lisa", _box_row, "LISA-train grounding rows")
geoqav = _adapter("geoqav", _text_row, "GeoQAV rows")
sat = _adapter("sat", _text_row, "SAT rows")
scienceqa = _adapter("scienceqa", _text_row, "ScienceQA rows")

ADAPTERS: dict[str, Callable[..., Source]] = {
    "thinklite": thinklite, "refcoco": refcoco, "ocr_llava": ocr_llava, "lisa": lisa,
    "geoqav": geoqav, "sat": sat, "scienceqa": scienceqa,
}


def open_source(name: str, paths, *, image_root=None, skips: SkipCounter | None = None,
                max_records: int | None = None, adapter: str | None = None) -> Source:
    """Opens source ``name`` with the adapter ``adapter`` (default: the one called ``name``)."""
    adapter = adapter or name
    if adapter not in ADAPTERS:
        raise ValueError(f"no adapter {adapter!r} for source {name!r}; known: {sorted(ADAPTERS)}")
    get_task(name)  # the source must be a registered task
    return ADAPTERS[adapter](paths, image_root=image_root, skips=skips, max_records=max_records,
                             source_name=name)
