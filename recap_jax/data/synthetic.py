"""Offline synthetic suite: small rendered tasks a tiny model can learn on CPU in minutes.

Three tasks (see recap_jax.data.tasks), mirroring the paper's hybrid setting:
- ``reasoning`` (RL: accuracy + format_think): flat shapes, two digits or a bar chart, with a
  question that needs counting or arithmetic over what is drawn; the answer is an integer.
- ``grounding`` (RL replay: iou + format_answer): 2–3 shapes of distinct colours; "the red
  triangle" → its tight box ``(x1, y1, x2, y2)`` in pixels, x2/y2 exclusive.
- ``ocr`` (SFT replay: ntp): 3–6 characters of a small alphabet in a 5x7 bitmap font → the
  string.

Layouts. ``"free"`` (the default) places shapes and text anywhere. ``"grid"`` aligns grounding
and OCR to the model's merged-patch grid (28 px cells for Qwen2.5-VL): one shape per cell, one
character per cell, left to right. A tiny model trained from scratch on CPU does not learn to
read free layouts (experiments/forgetting_in_miniature/RESULTS.md); on the grid, image token i
holds exactly character i or one whole shape. The reasoning task ignores the layout.

Determinism: record ``index`` of (task, split, seed, image_size, layout) is a pure function of
those arguments (numpy SeedSequence), so any record can be regenerated alone.

Disjoint splits: each candidate record has a *split key* (OCR: its text, so that evaluation
strings are never seen in training; the other tasks: the full scene description and question).
A record belongs to "eval" iff sha1(key) falls in the first 1/EVAL_SHARE_DENOMINATOR of the
hash space, else to "train"; generation draws candidates until one lands in the requested
split. The splits cannot share a key, whatever their sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

import numpy as np

from recap_jax.data import render
from recap_jax.data.records import Record
from recap_jax.data.tasks import GROUNDING_QUESTION

__all__ = ["COLOURS", "DEFAULT_IMAGE_SIZES", "GRID_CELL", "LAYOUTS", "OCR_ALPHABET", "SHAPES", "SPLITS",
           "SYNTHETIC_TASKS", "Scene", "SyntheticSource", "generate", "make_record", "split_of"]

SYNTHETIC_TASKS = ("reasoning", "grounding", "ocr")
SPLITS = ("train", "eval")
# (height, width); multiples of 28 so that smart_resize leaves them unchanged.
DEFAULT_IMAGE_SIZES = {"reasoning": (84, 84), "grounding": (84, 84), "ocr": (56, 112)}
LAYOUTS = ("free", "grid")
GRID_CELL = 28  # px: one merged token of Qwen2.5-VL (patch 14 x merge 2)
GRID_IMAGE_SIZES = {"reasoning": (84, 84), "grounding": (84, 84), "ocr": (28, 168)}
GRID_OCR_SCALE = 3  # a 5x7 glyph drawn 15 x 21 px, inside one cell
COLOURS = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 190, 20),
}
SHAPES = ("circle", "square", "triangle")
OCR_ALPHABET = "ACEHKLMNPRTUXY"
OCR_LENGTHS = (3, 6)
MAX_SHAPES = 5
BACKGROUND = (250, 250, 250)
BAR_COLOUR = (60, 60, 160)
GRID_COLOUR = (200, 200, 200)
INK_COLOURS = ((20, 20, 20), (40, 30, 90), (90, 20, 20))
EVAL_SHARE_DENOMINATOR = 8
_MAX_ATTEMPTS = 10_000
_TASK_IDS = {task: i for i, task in enumerate(SYNTHETIC_TASKS)}
_SPLIT_IDS = {split: i for i, split in enumerate(SPLITS)}


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything needed to render one record; ``repr`` of it is the split key (not for OCR)."""

    kind: str
    height: int
    width: int
    items: tuple  # kind-specific drawing instructions
    question: str
    answer: str | tuple[int, int, int, int]


def split_of(key: str) -> str:
    """"eval" if sha1(key) is in the first 1/EVAL_SHARE_DENOMINATOR of hash space, else "train"."""
    digest = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return "eval" if digest % EVAL_SHARE_DENOMINATOR == 0 else "train"


# --------------------------------------------------------------------------- layout


def _shape_size_range(height: int, width: int) -> tuple[int, int]:
    side = min(height, width)
    low = max(5, round(0.12 * side))
    return low, max(low, round(0.2 * side))


def _place_squares(rng, height, width, sizes, gap=3, tries=400):
    """Top-left corners of non-overlapping squares (``gap`` px apart), or None."""
    placed = []
    for size in sizes:
        for _ in range(tries):
            x = int(rng.integers(1, width - size))
            y = int(rng.integers(1, height - size))
            if all(x + size + gap <= px or px + ps + gap <= x or
                   y + size + gap <= py or py + ps + gap <= y for px, py, ps in placed):
                placed.append((x, y, size))
                break
        else:
            return None
    return placed


def _random_objects(rng, height, width, count, colours):
    low, high = _shape_size_range(height, width)
    sizes = [int(rng.integers(low, high + 1)) for _ in range(count)]
    corners = _place_squares(rng, height, width, sizes)
    if corners is None:
        return None
    shapes = [SHAPES[int(rng.integers(len(SHAPES)))] for _ in range(count)]
    return tuple((shape, colour, x, y, size)
                 for shape, colour, (x, y, size) in zip(shapes, colours, corners))


# --------------------------------------------------------------------------- scenes


def _reasoning_scene(rng, height, width) -> Scene | None:
    kind = ("count_all", "count_colour", "count_shape", "digit_sum", "bar_max")[
        int(rng.integers(5))]
    if kind == "digit_sum":
        return _digit_scene(rng, height, width)
    if kind == "bar_max":
        return _bar_scene(rng, height, width)
    count = int(rng.integers(1, MAX_SHAPES + 1))
    names = list(COLOURS)
    colours = [names[int(rng.integers(len(names)))] for _ in range(count)]
    objects = _random_objects(rng, height, width, count, colours)
    if objects is None:
        return None
    if kind == "count_all":
        question, answer = "How many shapes are in the image?", count
    elif kind == "count_colour":
        colour = names[int(rng.integers(len(names)))]
        question = f"How many {colour} shapes are in the image?"
        answer = sum(obj[1] == colour for obj in objects)
    else:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        question = f"How many {shape}s are in the image?"
        answer = sum(obj[0] == shape for obj in objects)
    return Scene("shapes", height, width, objects, question, str(answer))


def _digit_scene(rng, height, width) -> Scene | None:
    digits = [int(rng.integers(10)) for _ in range(2)]
    scale = max(1, min((height - 4) // render.GLYPH_HEIGHT,
                       (width // 2 - 4) // render.GLYPH_WIDTH, 4))
    glyph_h, glyph_w = render.text_size("0", scale)
    items = []
    for half, digit in enumerate(digits):
        x0 = half * (width // 2)
        x = x0 + 2 + int(rng.integers(0, max(1, width // 2 - glyph_w - 3)))
        y = 2 + int(rng.integers(0, max(1, height - glyph_h - 3)))
        items.append((str(digit), x, y, scale))
    question = "What is the sum of the two digits in the image?"
    return Scene("digits", height, width, tuple(items), question, str(sum(digits)))


def _bar_scene(rng, height, width) -> Scene | None:
    count = int(rng.integers(2, 5))
    heights = [int(rng.integers(1, 6)) for _ in range(count)]
    unit = (height - 8) // 5
    if unit < 2:
        return None
    slot = (width - 4) // count  # each bar lies inside its own slot, 1+ px from the next
    bars = []
    for i, bar_height in enumerate(heights):
        bar_width = int(rng.integers(max(2, slot // 3), max(3, slot * 2 // 3) + 1))
        x = 2 + i * slot + int(rng.integers(0, max(1, slot - bar_width)))
        bars.append((x, bar_width, bar_height))
    if int(rng.integers(2)) == 0:
        question, answer = "What is the height of the tallest bar?", max(heights)
    else:
        question, answer = "How many bars are in the chart?", count
    return Scene("bars", height, width, (unit, tuple(bars)), question, str(answer))


def _grounding_scene(rng, height, width) -> Scene | None:
    count = int(rng.integers(2, 4))
    names = list(COLOURS)
    colours = [names[i] for i in rng.permutation(len(names))[:count]]
    objects = _random_objects(rng, height, width, count, colours)
    if objects is None:
        return None
    return _grounding_question(rng, height, width, objects)


def _grounding_question(rng, height, width, objects) -> Scene:
    """One of ``objects`` as "the <colour> <shape>" and its tight box."""
    shape, colour, x, y, size = objects[int(rng.integers(len(objects)))]
    mask = render.shape_mask(height, width, shape, x, y, size)
    rows, columns = np.nonzero(mask)
    box = (int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1)
    question = GROUNDING_QUESTION.format(phrase=f"the {colour} {shape}")
    return Scene("shapes", height, width, objects, question, box)


def _ocr_scene(rng, height, width) -> Scene | None:
    length = int(rng.integers(OCR_LENGTHS[0], OCR_LENGTHS[1] + 1))
    text = "".join(OCR_ALPHABET[int(i)] for i in rng.integers(len(OCR_ALPHABET), size=length))
    fits = [s for s in (1, 2, 3) if render.text_size(text, s)[0] + 4 <= height
            and render.text_size(text, s)[1] + 4 <= width]
    scales = [s for s in fits if s >= 2] or fits  # 1-px strokes only if nothing larger fits
    if not scales:
        return None
    scale = scales[int(rng.integers(len(scales)))]
    text_h, text_w = render.text_size(text, scale)
    x = 2 + int(rng.integers(0, width - text_w - 3))
    y = 2 + int(rng.integers(0, height - text_h - 3))
    ink = INK_COLOURS[int(rng.integers(len(INK_COLOURS)))]
    return Scene("text", height, width, ((text, x, y, scale, ink),),
                 "What is the text in the image?", text)


def _grid_cells(height: int, width: int) -> list[tuple[int, int]]:
    """(x, y) top-left corners of the GRID_CELL cells that fit the image, row-major."""
    return [(x * GRID_CELL, y * GRID_CELL) for y in range(height // GRID_CELL)
            for x in range(width // GRID_CELL)]


def _grounding_scene_grid(rng, height, width) -> Scene | None:
    """2-3 shapes of distinct colours, each inside its own cell (size 14-24 px, random offset)."""
    cells = _grid_cells(height, width)
    count = int(rng.integers(2, 4))
    if len(cells) < count:
        return None
    names = list(COLOURS)
    colours = [names[i] for i in rng.permutation(len(names))[:count]]
    objects = []
    for colour, cell in zip(colours, rng.permutation(len(cells))[:count]):
        size = int(rng.integers(14, 25))
        x0, y0 = cells[int(cell)]
        x = x0 + int(rng.integers(0, GRID_CELL - size + 1))
        y = y0 + int(rng.integers(0, GRID_CELL - size + 1))
        objects.append((SHAPES[int(rng.integers(len(SHAPES)))], colour, x, y, size))
    return _grounding_question(rng, height, width, tuple(objects))


def _ocr_scene_grid(rng, height, width) -> Scene | None:
    """3-6 characters (at most one per cell of the first row), character i centred in cell i
    with up to 2 px of jitter."""
    cells = width // GRID_CELL
    if cells < OCR_LENGTHS[0] or height < GRID_CELL:
        return None
    length = int(rng.integers(OCR_LENGTHS[0], min(OCR_LENGTHS[1], cells) + 1))
    text = "".join(OCR_ALPHABET[int(i)] for i in rng.integers(len(OCR_ALPHABET), size=length))
    glyph_h, glyph_w = render.text_size("A", GRID_OCR_SCALE)
    ink = INK_COLOURS[int(rng.integers(len(INK_COLOURS)))]
    items = []
    for i, char in enumerate(text):
        x = i * GRID_CELL + (GRID_CELL - glyph_w) // 2 + int(rng.integers(-2, 3))
        y = (GRID_CELL - glyph_h) // 2 + int(rng.integers(-2, 3))
        items.append((char, x, y, GRID_OCR_SCALE, ink))
    return Scene("text", height, width, tuple(items), "What is the text in the image?", text)


_SCENES = {"free": {"reasoning": _reasoning_scene, "grounding": _grounding_scene,
                    "ocr": _ocr_scene},
           "grid": {"reasoning": _reasoning_scene, "grounding": _grounding_scene_grid,
                    "ocr": _ocr_scene_grid}}


def render_scene(scene: Scene) -> np.ndarray:
    """uint8 [H, W, 3] image of a scene."""
    image = render.new_canvas(scene.height, scene.width, BACKGROUND)
    if scene.kind == "shapes":
        for shape, colour, x, y, size in scene.items:
            render.draw_shape(image, shape, x, y, size, COLOURS[colour])
    elif scene.kind == "digits":
        for digit, x, y, scale in scene.items:
            render.draw_text(image, digit, x, y, scale, (20, 20, 20))
    elif scene.kind == "bars":
        unit, bars = scene.items
        _draw_bars(image, scene.height, scene.width, unit, bars)
    elif scene.kind == "text":
        for text, x, y, scale, ink in scene.items:
            render.draw_text(image, text, x, y, scale, ink)
    else:
        raise ValueError(f"unknown scene kind {scene.kind!r}")
    return np.asarray(image, dtype=np.uint8)


def _draw_bars(image, height, width, unit, bars):
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    base = height - 4  # baseline row; bars occupy rows [base - h * unit, base)
    for level in range(1, 6):  # one grid line per unit, drawn under the bars
        draw.line([(0, base - level * unit), (width - 1, base - level * unit)], fill=GRID_COLOUR)
    for x, bar_width, bar_height in bars:
        draw.rectangle([x, base - bar_height * unit, x + bar_width - 1, base - 1], fill=BAR_COLOUR)


# --------------------------------------------------------------------------- public API


def _check(task: str, split: str, image_size, layout: str = "free") -> tuple[int, int]:
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {SYNTHETIC_TASKS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown synthetic layout {layout!r}; known: {LAYOUTS}")
    defaults = GRID_IMAGE_SIZES if layout == "grid" else DEFAULT_IMAGE_SIZES
    height, width = defaults[task] if image_size is None else image_size
    if int(height) < 28 or int(width) < 28:
        raise ValueError(f"image_size {image_size} too small: each side must be >= 28 pixels")
    return int(height), int(width)


def _split_key(task: str, scene: Scene) -> str:
    return f"ocr|{scene.answer}" if task == "ocr" else f"{task}|{scene!r}"


def make_scene(task: str, split: str, index: int, *, seed: int = 0,
               image_size: tuple[int, int] | None = None, layout: str = "free") -> Scene:
    """The scene of record ``index``: the first candidate whose split key lands in ``split``."""
    height, width = _check(task, split, image_size, layout)
    for attempt in range(_MAX_ATTEMPTS):
        entropy = [int(seed), _TASK_IDS[task], _SPLIT_IDS[split], int(index), attempt]
        rng = np.random.default_rng(np.random.SeedSequence(entropy))
        scene = _SCENES[layout][task](rng, height, width)
        if scene is not None and split_of(_split_key(task, scene)) == split:
            return scene
    raise RuntimeError(f"no {split} scene for {task} index {index} after {_MAX_ATTEMPTS} "
                       f"attempts; image_size {image_size} is probably too small")


def make_record(task: str, split: str, index: int, *, seed: int = 0,
                image_size: tuple[int, int] | None = None, layout: str = "free") -> Record:
    """Record ``index`` of a synthetic task's split; a pure function of its arguments."""
    scene = make_scene(task, split, index, seed=seed, image_size=image_size, layout=layout)
    return Record(id=f"{task}-{split}-{seed}-{index}", source=task, image=render_scene(scene),
                  question=scene.question, answer=scene.answer)


def generate(task: str, split: str, num_examples: int, *, seed: int = 0,
             image_size: tuple[int, int] | None = None, start: int = 0,
             layout: str = "free") -> Iterator[Record]:
    """Records ``start .. start + num_examples - 1`` of a synthetic task's split (plain python)."""
    _check(task, split, image_size, layout)
    for index in range(start, start + num_examples):
        yield make_record(task, split, index, seed=seed, image_size=image_size, layout=layout)


class SyntheticSource:
    """A synthetic task's split as a random-access source (the interface replay.py reads:
    name, len, load(i) -> Record, where(i) -> (file, index), blocks)."""

    def __init__(self, task: str, split: str = "train", size: int = 2000, *, seed: int = 0,
                 image_size: tuple[int, int] | None = None, name: str | None = None,
                 layout: str = "free"):
        _check(task, split, image_size, layout)
        self.layout = layout
        if size <= 0:
            raise ValueError(f"synthetic source {task!r}: size must be positive, got {size}")
        self.task, self.split, self.size, self.seed = task, split, int(size), int(seed)
        self.image_size = image_size
        self.name = name or task

    def __len__(self) -> int:
        return self.size

    @property
    def blocks(self) -> np.ndarray:
        return np.zeros(self.size, np.int64)

    def where(self, i: int) -> tuple[str, int]:
        layout = "" if self.layout == "free" else f"/{self.layout}"
        return f"synthetic:{self.task}/{self.split}/seed{self.seed}{layout}", int(i)

    def load(self, i: int) -> Record:
        if not 0 <= i < self.size:
            raise IndexError(f"synthetic source {self.name!r}: index {i} outside [0, {self.size})")
        record = make_record(self.task, self.split, int(i), seed=self.seed,
                             image_size=self.image_size, layout=self.layout)
        return dataclasses.replace(record, source=self.name)
