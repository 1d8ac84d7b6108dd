"""Build the paper's RefCOCO/+/g grounding replay set from local downloads.

    python scripts/build_grounding_replay.py --rec /data/rec_jsons_processed \\
        --image-root /data/coco --out /data/grounding_replay.jsonl [--max-per-file N]

Inputs: VLM-R1's ``rec_jsons_processed`` (``refcoco_train.json``, ``refcocop_train.json``,
``refcocog_train.json``: JSON lists, or jsonl; a directory means its ``*_train.json[l]``
files) and the COCO train2014 images (``--image-root``, the directory their ``image`` paths
are relative to; a bare file name is also looked up under ``train2014/``).

Output: one jsonl row per usable annotation, in the form recap_jax.data.sources' ``refcoco``
adapter reads: ``{"image": <path relative to --image-root>, "problem": <question>,
"solution": [x1, y1, x2, y2], "normal_caption": <phrase>, "source": <file>}`` (boxes in the
original image's pixels, as VLM-R1 gives them). Point ``data.sources.refcoco.train`` at the
file and ``image_root`` at ``--image-root``.

Bad rows are skipped and counted by reason (invalid JSON, no question, malformed box, image
path escaping the root, missing or unreadable image, box outside the image); the counts are
printed per file and in total, with the first few bad rows named by file and row.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recap_jax.bench.readers import read_json_rows  # noqa: E402
from recap_jax.data import files as files_lib  # noqa: E402
from recap_jax.data.records import BadRecord  # noqa: E402
from recap_jax.data.tasks import GROUNDING_QUESTION  # noqa: E402
from recap_jax.rewards import parse_box  # noqa: E402

BOX_TOLERANCE_PX = 2.0
SHOWN_BAD_ROWS = 5


def input_files(paths: list[str]) -> list[Path]:
    """The annotation files: the given files, and a directory's ``*_train.json[l]``."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.suffix in (".json", ".jsonl") and p.stem.endswith("_train"))
            if not found:
                raise FileNotFoundError(f"{path}: no *_train.json or *_train.jsonl files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"annotation file not found: {path}")
    return files


def question_of(row: dict) -> str:
    """The grounding question: ``problem``, else the first human turn, else VLM-R1's
    question around ``normal_caption``."""
    question = row.get("problem")
    if not question:
        for turn in row.get("conversations") or []:
            if isinstance(turn, dict) and str(turn.get("from", turn.get("role"))).lower() in (
                    "human", "user"):
                question = turn.get("value")
                break
    if not question and isinstance(row.get("normal_caption"), str) and row["normal_caption"].strip():
        question = GROUNDING_QUESTION.format(phrase=row["normal_caption"].strip().rstrip("."))
    if not isinstance(question, str) or not question.replace("<image>", "").strip():
        raise BadRecord("no question (problem, human turn or normal_caption)", "question")
    return question.replace("<image>", "").strip()


def box_of(row: dict) -> tuple[float, float, float, float]:
    """The reference box ``solution`` ([x1, y1, x2, y2] or text holding it)."""
    value = row.get("solution")
    box = parse_box(value) if isinstance(value, (str, list, tuple)) else None
    if box is None:
        raise BadRecord(f"malformed box {str(value)[:60]!r}", "box")
    if min(box) < -BOX_TOLERANCE_PX:
        raise BadRecord(f"negative box coordinates {list(box)}", "box")
    return box


def image_path(row: dict, root: Path) -> Path:
    """The image file under ``root`` (also tried under root/train2014 for a bare name)."""
    value = row.get("image")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise BadRecord("no image path", "image")
    path = files_lib.resolve_under(root, value.strip())
    if not path.is_file() and "/" not in value.strip():
        path = files_lib.resolve_under(root, "train2014/" + value.strip())
    if not path.is_file():
        raise BadRecord(f"image file not found: {path}", "image")
    return path


def check_inside(box, path: Path) -> None:
    """BadRecord if the image cannot be opened or the box extends outside it."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as error:  # noqa: BLE001 -- PIL raises many types on corrupt files
        raise BadRecord(f"cannot read image {path} ({type(error).__name__})", "image") from None
    if box[2] > width + BOX_TOLERANCE_PX or box[3] > height + BOX_TOLERANCE_PX:
        raise BadRecord(f"box {list(box)} outside the {width}x{height} image", "box")


def convert_row(row, root: Path, check_images: bool) -> dict:
    """One VLM-R1 row → the output row; BadRecord if unusable."""
    if isinstance(row, BadRecord):
        raise row
    if not isinstance(row, dict):
        raise BadRecord(f"row is a {type(row).__name__}, not an object", "json")
    question, box = question_of(row), box_of(row)
    path = image_path(row, root)
    if check_images:
        check_inside(box, path)
    out = {"image": str(path.relative_to(root.resolve())), "problem": question,
           "solution": [int(v) if float(v).is_integer() else v for v in box]}
    if isinstance(row.get("normal_caption"), str):
        out["normal_caption"] = row["normal_caption"]
    return out


def build(files: list[Path], root: Path, out: Path, *, max_per_file: int | None = None,
          check_images: bool = True, log=print) -> dict:
    """Writes ``out`` (jsonl, atomically); returns {file: {"kept": n, "skipped": {reason: n}}}."""
    counts: dict[str, dict] = {}
    shown = 0
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w", encoding="utf-8") as handle:
        for file in files:
            kept, skipped = 0, collections.Counter()
            for index, row in enumerate(read_json_rows(file)):
                if max_per_file is not None and kept >= max_per_file:
                    break
                try:
                    converted = convert_row(row, root, check_images)
                except BadRecord as error:
                    skipped[error.kind] += 1
                    if shown < SHOWN_BAD_ROWS:
                        log(f"  skipped {file}:{index}: {error}")
                        shown += 1
                    continue
                converted["source"] = file.stem
                handle.write(json.dumps(converted) + "\n")
                kept += 1
            counts[str(file)] = {"kept": kept, "skipped": dict(skipped)}
            log(f"{file}: kept {kept}, skipped {sum(skipped.values())} {dict(skipped)}")
    os.replace(tmp, out)
    total_kept = sum(c["kept"] for c in counts.values())
    total_skipped = collections.Counter()
    for c in counts.values():
        total_skipped.update(c["skipped"])
    log(f"total: kept {total_kept}, skipped {sum(total_skipped.values())} {dict(total_skipped)} "
        f"-> {out}")
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rec", nargs="+", required=True,
                        help="rec_jsons_processed directory or refcoco*_train.json[l] files")
    parser.add_argument("--image-root", required=True, help="COCO directory (holding train2014/)")
    parser.add_argument("--out", required=True, help="output jsonl")
    parser.add_argument("--max-per-file", type=int, default=None, help="cap rows kept per file")
    parser.add_argument("--no-check-images", action="store_true",
                        help="only check that image files exist (do not open them)")
    args = parser.parse_args(argv)
    root = Path(args.image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root not found: {root}")
    build(input_files(args.rec), root, Path(args.out), max_per_file=args.max_per_file,
          check_images=not args.no_check_images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
