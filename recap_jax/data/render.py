"""Drawing primitives of the synthetic suite: flat-colour shapes and a 5x7 bitmap font.

Everything is drawn without anti-aliasing, so every pixel of an object has exactly its
colour (tests and boxes rely on that), and the output is bit-identical across machines and
Pillow versions (no system fonts).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["GLYPHS", "GLYPH_HEIGHT", "GLYPH_WIDTH", "draw_shape", "draw_text", "new_canvas",
           "shape_mask", "text_size"]

GLYPH_WIDTH, GLYPH_HEIGHT = 5, 7
# Rows top to bottom, 5 bits each, most significant bit = leftmost column. Every glyph's
# ink columns are contiguous, so glyphs separated by a blank column never touch.
GLYPHS: dict[str, tuple[int, ...]] = {
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E),
    "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F),
    "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02),
    "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E),
    "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E),
    "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    "A": (0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E),
    "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F),
    "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11),
    "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11),
    "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E),
    "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04),
    "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
}

RGB = tuple[int, int, int]


def new_canvas(height: int, width: int, background: RGB) -> Image.Image:
    return Image.new("RGB", (width, height), background)


def _shape_outline(shape: str, x: int, y: int, size: int):
    """PIL primitive and its coordinates for a shape in the square [x, x+size) x [y, y+size)."""
    last = size - 1
    if shape == "circle":
        return "ellipse", [x, y, x + last, y + last]
    if shape == "square":
        return "rectangle", [x, y, x + last, y + last]
    if shape == "triangle":
        return "polygon", [(x, y + last), (x + last, y + last), (x + last / 2, y)]
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(image: Image.Image, shape: str, x: int, y: int, size: int, colour: RGB) -> None:
    """Draws a filled shape (circle, square, triangle) inside [x, x+size) x [y, y+size)."""
    primitive, coords = _shape_outline(shape, x, y, size)
    getattr(ImageDraw.Draw(image), primitive)(coords, fill=colour)


def shape_mask(height: int, width: int, shape: str, x: int, y: int, size: int) -> np.ndarray:
    """Boolean [H, W] mask of exactly the pixels draw_shape paints."""
    mask = Image.new("L", (width, height), 0)
    primitive, coords = _shape_outline(shape, x, y, size)
    getattr(ImageDraw.Draw(mask), primitive)(coords, fill=255)
    return np.asarray(mask) > 0


def text_size(text: str, scale: int) -> tuple[int, int]:
    """(height, width) in pixels of ``text`` drawn at integer ``scale`` (1 blank column apart)."""
    columns = len(text) * (GLYPH_WIDTH + 1) - 1
    return GLYPH_HEIGHT * scale, max(columns, 0) * scale


def draw_text(image: Image.Image, text: str, x: int, y: int, scale: int, colour: RGB) -> None:
    """Draws ``text`` (characters of GLYPHS) with its top-left corner at (x, y)."""
    draw = ImageDraw.Draw(image)
    for position, char in enumerate(text):
        rows = GLYPHS[char]
        left = x + position * (GLYPH_WIDTH + 1) * scale
        for row, bits in enumerate(rows):
            for column in range(GLYPH_WIDTH):
                if bits & (1 << (GLYPH_WIDTH - 1 - column)):
                    x0, y0 = left + column * scale, y + row * scale
                    draw.rectangle([x0, y0, x0 + scale - 1, y0 + scale - 1], fill=colour)
