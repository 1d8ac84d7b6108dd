"""The record every data source yields, image decoding, and counting of skipped records."""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import threading
from typing import Union

import numpy as np

__all__ = ["BadRecord", "Box", "Record", "SkipCounter", "Video", "decode_image", "format_box"]

Box = tuple[int | float, int | float, int | float, int | float]
Answer = Union[str, Box]

# Decoding refuses images above this many pixels (decompression bombs, corrupt headers).
MAX_IMAGE_PIXELS = 64_000_000

_log = logging.getLogger(__name__)


class BadRecord(ValueError):
    """A record that cannot be used (missing/corrupt image, empty text, malformed box).

    ``kind`` groups the reasons for counting: "image", "path", "text", "box", "schema",
    "video".
    """

    def __init__(self, message: str, kind: str = "schema"):
        super().__init__(message)
        self.kind = kind


def format_box(box: Box) -> str:
    """``[x1, y1, x2, y2]`` text of a box, integers without a decimal point."""
    parts = [str(int(v)) if float(v).is_integer() else f"{float(v):g}" for v in box]
    return "[" + ", ".join(parts) + "]"


@dataclasses.dataclass(frozen=True, eq=False)
class Video:
    """An already-sampled video: uint8 frames [T, H, W, 3] (RGB, T >= 1) shown at ``fps``
    frames per second (the rate of the sampled frames, which sets M-RoPE's time axis)."""

    frames: np.ndarray
    fps: float

    def __post_init__(self):
        frames = self.frames
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 \
                or frames.shape[-1] != 3 or min(frames.shape) < 1:
            raise BadRecord(f"video: frames must be a uint8 array [T, H, W, 3] with T, H, W >= 1, "
                            f"got {getattr(frames, 'dtype', type(frames).__name__)} "
                            f"{getattr(frames, 'shape', '')}", "video")
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float, np.number)) \
                or not np.isfinite(self.fps) or self.fps <= 0:
            raise BadRecord(f"video: fps must be a positive number, got {self.fps!r}", "video")


@dataclasses.dataclass(frozen=True, eq=False)
class Record:
    """One example of any source (synthetic or from disk).

    Attributes:
      id: unique within its source (e.g. ``reasoning-train-0-17`` or ``file.jsonl:42``).
      source: task name in ``recap_jax.data.tasks.TASKS`` (e.g. "reasoning", "refcoco").
      image: uint8 array [H, W, 3] (RGB), the original (first) image; None for a record
        without images (text only, or video only).
      question: the question text, without the task's prompt suffix and without ``<image>``.
      answer: reference answer; a string, or for box tasks a 4-tuple ``(x1, y1, x2, y2)`` in
        the original image's pixel frame (x right, y down; x2, y2 exclusive edges).
      more_images: the second, third, ... images of a multi-image record (uint8 [H, W, 3]
        each); empty for the usual single-image record.
      video: an optional `Video` (sampled frames + fps), shown after the images.

    ``images`` is all images in prompt order: ``(image, *more_images)``, or () without one.
    """

    id: str
    source: str
    image: np.ndarray | None
    question: str
    answer: Answer
    more_images: tuple[np.ndarray, ...] = ()
    video: Video | None = None

    def __post_init__(self):
        if self.image is None and self.more_images:
            raise ValueError(f"record {self.id}: more_images given without a first image")
        if not isinstance(self.more_images, tuple):
            object.__setattr__(self, "more_images", tuple(self.more_images))
        if self.video is not None and not isinstance(self.video, Video):
            raise TypeError(f"record {self.id}: video must be a records.Video, "
                            f"got {type(self.video).__name__}")

    @property
    def images(self) -> tuple[np.ndarray, ...]:
        """All images in prompt order (empty for a text-only or video-only record)."""
        return () if self.image is None else (self.image, *self.more_images)

    @property
    def answer_text(self) -> str:
        """The reference as text: the string itself, or ``[x1, y1, x2, y2]`` for a box."""
        return self.answer if isinstance(self.answer, str) else format_box(self.answer)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the original (first) image; of the video's frames for a
        video-only record; (0, 0) for a text-only one."""
        if self.image is not None:
            return int(self.image.shape[0]), int(self.image.shape[1])
        if self.video is not None:
            return int(self.video.frames.shape[1]), int(self.video.frames.shape[2])
        return 0, 0


def decode_image(data: bytes, *, what: str = "image") -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) → uint8 RGB array [H, W, 3]; BadRecord if unusable."""
    from PIL import Image

    if not data:
        raise BadRecord(f"{what}: empty image bytes", "image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width <= 0 or height <= 0 or width * height > MAX_IMAGE_PIXELS:
                raise BadRecord(f"{what}: image size {width}x{height} out of range", "image")
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except BadRecord:
        raise
    except Exception as error:  # noqa: BLE001 -- PIL raises many types on corrupt data
        raise BadRecord(f"{what}: cannot decode image ({type(error).__name__}: {error})",
                        "image") from None
    return array


class SkipCounter:
    """Counts bad records per source; logs each bad (file, index) once. Thread-safe.

    A record that fails again (next epoch) is not counted twice: counts are of distinct
    (source, file, index) keys. Records that were used but altered (e.g. a prompt truncated
    to fit) are counted apart, with `note` / `notes`; they are not skips.
    """

    def __init__(self, logger: logging.Logger | None = None):
        self._logger = logger or _log
        self._lock = threading.Lock()
        self._seen: set[tuple[str, str, int]] = set()
        self._by_source: collections.Counter[str] = collections.Counter()
        self._by_reason: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter)
        self._noted: set[tuple[str, str, str, int]] = set()
        self._notes: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter)

    def skip(self, source: str, file: str, index: int, reason: BadRecord | str) -> None:
        """Records that entry ``index`` of ``file`` (of ``source``) was skipped for ``reason``."""
        kind = reason.kind if isinstance(reason, BadRecord) else "other"
        key = (source, str(file), int(index))
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            self._by_source[source] += 1
            self._by_reason[source][kind] += 1
        self._logger.warning("skipping bad record of source %r: %s, index %d: %s",
                             source, file, index, reason)

    def count(self, source: str | None = None) -> int:
        """Distinct bad records of ``source`` (of all sources if None)."""
        with self._lock:
            return sum(self._by_source.values()) if source is None else self._by_source[source]

    def counts(self) -> dict[str, int]:
        """{source: number of distinct bad records}."""
        with self._lock:
            return dict(self._by_source)

    def reasons(self, source: str) -> dict[str, int]:
        """{reason kind: count} for one source (see BadRecord.kind)."""
        with self._lock:
            return dict(self._by_reason.get(source, {}))

    def note(self, source: str, kind: str, file: str, index: int, message: str) -> None:
        """Counts that entry ``index`` of ``file`` was used but altered (``kind``, e.g.
        "truncated"). Distinct (source, kind, file, index) keys are counted; the first of
        each (source, kind) is logged as a warning, later ones at debug level."""
        key = (source, kind, str(file), int(index))
        with self._lock:
            if key in self._noted:
                return
            self._noted.add(key)
            self._notes[source][kind] += 1
            first = self._notes[source][kind] == 1
        if first:
            self._logger.warning("record of source %r %s (%s, index %d): %s; further ones of "
                                 "this source are counted, not logged", source, kind, file,
                                 index, message)
        else:
            self._logger.debug("record of source %r %s (%s, index %d): %s", source, kind, file,
                               index, message)

    def notes(self, source: str) -> dict[str, int]:
        """{kind: count} of the used-but-altered records of one source (see `note`)."""
        with self._lock:
            return dict(self._notes.get(source, {}))
