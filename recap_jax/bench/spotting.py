"""OCRBench v2's text spotting score: ICDAR 2015's end-to-end evaluation (the RRC
``E2E_iou_1_1`` script that ``spotting_metric.py`` runs, IOU_CONSTRAINT 0.5, no word
spotting) on one image, reported as its h-mean (F-score).

- Prediction: `spotting_boxes` reads ``[[x1, y1, x2, y2, "text"], ...]`` as a Python literal,
  else every bracketed "x1, y1, x2, y2, text" group; corner coordinates must be integers in
  0..1000, duplicates are dropped and boxes with x1 >= x2 or y1 >= y2 ignored.
- Reference: each polygon (x, y pairs) becomes its bounding rectangle; a transcription
  "###" is "don't care": detections covering more than half their area with such a box are
  dropped from both counts.
- Matching: reference boxes in order, each with the first unmatched detection (in order)
  whose IoU with it is above 0.5; a matched pair counts when the transcriptions are equal in
  upper case, the reference allowed one special character (``!?.:,*"()·[]/'``) more at its
  start and / or end. recall = correct / reference boxes, precision = correct / detections,
  score = 2 P R / (P + R).

The published script writes both sides to text files and reads them back; we compare in
memory and apply the same reading of a transcription (carriage returns dropped, a "quoted"
one unquoted). Inputs it cannot read (a reference transcription with a newline, an empty
one) make the published run fail; here they are compared as they are.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["IOU_THRESHOLD", "SPECIAL_CHARACTERS", "spotting_boxes", "spotting_score",
           "transcription_match"]

IOU_THRESHOLD = 0.5
DONT_CARE_AREA = 0.5
SPECIAL_CHARACTERS = "!?.:,*\"()·[]/'"
_BRACKETED = re.compile(r"[\[\(]\s*([^\[\]\(\)]*?)\s*[\]\)]")
_QUOTED = re.compile(r'^\s*"(.*)"\s*$')

Box = tuple[int, int, int, int]


def _box_entry(values: Sequence[Any], text: Any) -> tuple[Box, str] | None:
    try:
        box = tuple(int(str(v).strip()) for v in values)
    except ValueError:
        return None
    if not all(0 <= v <= 1000 for v in box):
        return None
    return box, str(text).replace("\n", "").strip().strip('"').strip("'")


def spotting_boxes(prediction: str) -> list[tuple[Box, str]]:
    """``extract_bounding_boxes_robust``: the distinct ((x1, y1, x2, y2), text) entries of
    the prediction, read as a Python list of 5+-element lists, else from bracketed groups
    "x1, y1, x2, y2, text"; [] when none."""
    try:
        data = ast.literal_eval(prediction)
    except Exception:  # noqa: BLE001 -- literal_eval raises many kinds on model text
        data = None
    candidates: list[tuple[Sequence[Any], Any]] = []
    if data is not None:
        if isinstance(data, (list, tuple)):
            candidates = [(item[:4], item[4]) for item in data
                          if isinstance(item, (list, tuple)) and len(item) >= 5]
    else:
        for group in _BRACKETED.findall(prediction):
            parts = group.split(",", 4)
            if len(parts) == 5:
                candidates.append((parts[:4], parts[4]))
    entries, seen = [], set()
    for values, text in candidates:
        entry = _box_entry(values, text)
        if entry is not None and entry not in seen:
            seen.add(entry)
            entries.append(entry)
    return entries


def _read_transcription(text: str) -> str:
    """How the published script reads a transcription back from its file."""
    text = str(text).replace("\r", "")
    quoted = _QUOTED.match(text)
    return quoted.group(1).replace("\\\\", "\\").replace('\\"', '"') if quoted else text


def transcription_match(reference: str, detected: str) -> bool:
    """Equal, or equal once one special character is dropped from the reference's start,
    its end, or both (both already upper-cased by the caller)."""
    if reference == detected:
        return True
    if not reference:
        return False
    first, last = reference[0] in SPECIAL_CHARACTERS, reference[-1] in SPECIAL_CHARACTERS
    return ((first and reference[1:] == detected) or (last and reference[:-1] == detected)
            or (first and last and reference[1:-1] == detected))


def _area(box: Box) -> int:
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


def _intersection(a: Box, b: Box) -> int:
    return (max(0, min(a[2], b[2]) - max(a[0], b[0]))
            * max(0, min(a[3], b[3]) - max(a[1], b[1])))


def _iou(a: Box, b: Box) -> float:
    inter = _intersection(a, b)
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def _reference_rectangle(polygon: Sequence[Any]) -> Box:
    values = [int(v) for v in polygon]
    if len(values) < 4 or len(values) % 2:
        raise ValueError(f"text spotting: a reference box needs x, y pairs, got {values}")
    xs, ys = values[0::2], values[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def spotting_score(prediction: str, boxes: Sequence[Sequence[Any]],
                   transcriptions: Sequence[Any]) -> float:
    """The end-to-end h-mean of ``prediction`` against reference polygons ``boxes`` (the
    row's ``bbox_list``) and their ``transcriptions`` (its ``content``); 0 when either side
    has no box. ValueError when the reference lists differ in length."""
    if len(boxes) != len(transcriptions):
        raise ValueError(f"text spotting: {len(boxes)} reference boxes but "
                         f"{len(transcriptions)} transcriptions")
    references = [(_reference_rectangle(b), _read_transcription(t))
                  for b, t in zip(boxes, transcriptions)]
    detections = [(box, _read_transcription(text)) for box, text in spotting_boxes(prediction)
                  if box[0] < box[2] and box[1] < box[3]]
    if not references or not detections:
        return 0.0
    dont_care = [box for box, text in references if text == "###"]
    ignored_det = {k for k, (box, _) in enumerate(detections)
                   if any(_intersection(d, box) / _area(box) > DONT_CARE_AREA for d in dont_care)}
    matched_det: set[int] = set()
    correct = 0
    for ref_box, ref_text in references:
        if ref_text == "###":
            continue
        for k, (det_box, det_text) in enumerate(detections):
            if k in matched_det or k in ignored_det:
                continue
            if _iou(det_box, ref_box) > IOU_THRESHOLD:
                matched_det.add(k)
                correct += transcription_match(ref_text.upper(), det_text.upper())
                break
    care_references = len(references) - len(dont_care)
    care_detections = len(detections) - len(ignored_det)
    recall = correct / care_references if care_references else 0.0
    precision = correct / care_detections if care_detections else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0
