"""Builds the OCR replay set of the released hybrid run from local LLaVA-OneVision OCR parquet.

    python scripts/build_ocr_replay.py --input /data/LLaVA-OneVision-Data --output /data/ocr_replay \
        --configs "IIIT5K,TextOCR(GPT4V),ChartQA(MathV360K)" --max-rows-per-config 10000 --max-side 128

Input: one directory per dataset config under ``--input`` (the Hugging Face layout of
LLaVA-OneVision-Data: ``<config>/*.parquet`` with ``conversations`` (list of {from, value}),
``image`` ({bytes, path} struct or bytes) and optionally ``id``). ``--configs`` names the OCR
configs to take (default: every subdirectory holding parquet files).

Per config, in file and row order, the first ``--max-rows-per-config`` usable rows are kept
(released: 10,000 per config; its coreset shard: 5,000). Each image is decoded and, if its
long side exceeds ``--max-side`` pixels, downscaled (aspect ratio kept, Lanczos) so that the
long side equals it (released: 128 px; the paper says 512), then stored as PNG. A row is bad
(skipped and counted by reason, never fatal) when its image is missing or undecodable, or its
conversations lack a non-empty human turn followed by a non-empty gpt turn.

Output: ``<output>/<config>.parquet`` per config, in the schema the ``ocr_llava`` adapter
(recap_jax.data.sources) reads: ``id`` (string), ``conversations`` (list of {from, value}),
``image`` ({bytes, path}), ``data_source`` (the config name). Prints per-config counts (kept,
skipped by reason, downscaled) and a total line; the exit code is 1 if nothing was kept.
"""

from __future__ import annotations

import argparse
import collections
import io
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

DEFAULT_MAX_ROWS = 10_000
DEFAULT_MAX_SIDE = 128
MAX_IMAGE_PIXELS = 64_000_000
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("data_source", pa.string()),
])


class BadRow(ValueError):
    """A row that cannot be used; ``reason`` is the counting key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def config_files(root: Path, configs: Sequence[str] | None) -> dict[str, list[Path]]:
    """{config: its parquet files, sorted}; ValueError naming a config without files."""
    if not root.is_dir():
        raise ValueError(f"--input {root}: not a directory")
    names = list(configs) if configs else sorted(p.name for p in root.iterdir()
                                                if p.is_dir() and any(p.rglob("*.parquet")))
    if not names:
        raise ValueError(f"--input {root}: no subdirectory holds parquet files")
    out = {}
    for name in names:
        files = sorted((root / name).rglob("*.parquet"))
        if not files:
            raise ValueError(f"config {name!r}: no parquet files under {root / name}")
        out[name] = files
    return out


def conversation(value) -> list[dict[str, str]]:
    """The first human turn and the gpt turn after it, as [{from, value}, {from, value}]."""
    if not isinstance(value, (list, tuple)):
        raise BadRow("conversations", f"conversations is a {type(value).__name__}, not a list")
    human = None
    for turn in value:
        if not isinstance(turn, dict):
            continue
        role, text = str(turn.get("from", "")).lower(), turn.get("value")
        if human is None and role in ("human", "user"):
            human = text
        elif human is not None and role in ("gpt", "assistant"):
            if not isinstance(human, str) or not human.replace("<image>", "").strip():
                break
            if not isinstance(text, str) or not text.strip():
                break
            return [{"from": "human", "value": human}, {"from": "gpt", "value": text}]
    raise BadRow("conversations", "no non-empty human turn followed by a non-empty gpt turn")


def image_bytes(value, base: Path) -> bytes:
    """Encoded image bytes of an image cell ({bytes, path} struct, bytes, or a path)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return bytes(data)
        value = path
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else base / value
        if path.is_file():
            return path.read_bytes()
        raise BadRow("image", f"image file {value!r} not found")
    raise BadRow("image", "no image")


def downscale_png(data: bytes, max_side: int) -> tuple[bytes, bool]:
    """(PNG bytes of the image with its long side <= max_side, whether it was resized)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width <= 0 or height <= 0 or width * height > MAX_IMAGE_PIXELS:
                raise BadRow("image", f"image size {width}x{height} out of range")
            image = image.convert("RGB")
            resized = max(width, height) > max_side
            if resized:
                scale = max_side / max(width, height)
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                image = image.resize(size, Image.Resampling.LANCZOS)
            out = io.BytesIO()
            image.save(out, format="PNG")
            return out.getvalue(), resized
    except BadRow:
        raise
    except Exception as error:  # noqa: BLE001 -- PIL raises many types on corrupt data
        raise BadRow("image", f"cannot decode image ({type(error).__name__}: {error})") from None


def iter_rows(files: Sequence[Path]) -> Iterator[tuple[Path, int, dict]]:
    """(file, row index, row) over the files, a record batch at a time."""
    for file in files:
        parquet = pq.ParquetFile(file)
        index = 0
        for batch in parquet.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield file, index, row
                index += 1


def build_config(name: str, files: Sequence[Path], output: Path, *, max_rows: int,
                 max_side: int) -> collections.Counter:
    """Writes ``output/<name>.parquet``; returns counts (kept, resized, bad:<reason>)."""
    counts: collections.Counter = collections.Counter()
    rows = []
    for file, index, row in iter_rows(files):
        if counts["kept"] >= max_rows:
            break
        try:
            turns = conversation(row.get("conversations"))
            png, resized = downscale_png(image_bytes(row.get("image"), file.parent), max_side)
        except BadRow as bad:
            counts[f"bad:{bad.reason}"] += 1
            if counts[f"bad:{bad.reason}"] <= 3:
                print(f"  skip {file.name}:{index}: {bad}", file=sys.stderr)
            continue
        rows.append({"id": str(row.get("id") or f"{name}/{file.name}:{index}"), "conversations": turns,
                     "image": {"bytes": png, "path": None}, "data_source": name})
        counts["kept"] += 1
        counts["resized"] += resized
    if rows:
        output.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), output / f"{safe_name(name)}.parquet")
    return counts


def safe_name(name: str) -> str:
    """A file name for a config name (LLaVA-OneVision names hold parentheses and spaces)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="root with one directory per config")
    parser.add_argument("--output", required=True, type=Path, help="directory for <config>.parquet")
    parser.add_argument("--configs", default="", help="comma-separated config names (default: all)")
    parser.add_argument("--max-rows-per-config", type=int, default=DEFAULT_MAX_ROWS,
                        help="usable rows kept per config (released 10000; coreset shard 5000)")
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                        help="long side in pixels after downscaling (released 128; the paper says 512)")
    args = parser.parse_args(argv)
    if args.max_rows_per_config < 1:
        parser.error(f"--max-rows-per-config must be >= 1, got {args.max_rows_per_config}")
    if args.max_side < 1:
        parser.error(f"--max-side must be >= 1, got {args.max_side}")
    try:
        files = config_files(args.input, [c.strip() for c in args.configs.split(",") if c.strip()])
    except ValueError as error:
        parser.error(str(error))
    total: collections.Counter = collections.Counter()
    for name, paths in files.items():
        counts = build_config(name, paths, args.output, max_rows=args.max_rows_per_config,
                              max_side=args.max_side)
        total.update(counts)
        bad = ", ".join(f"{k[4:]} {v}" for k, v in sorted(counts.items()) if k.startswith("bad:")) or "none"
        print(f"{name}: kept {counts['kept']} (downscaled {counts['resized']}), skipped: {bad}")
    bad_total = sum(v for k, v in total.items() if k.startswith("bad:"))
    print(f"total: kept {total['kept']} from {len(files)} configs, skipped {bad_total}, "
          f"written to {args.output}")
    return 0 if total["kept"] else 1


if __name__ == "__main__":
    sys.exit(main())
