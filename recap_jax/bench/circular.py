"""MMBench's circular evaluation (CircularEval).

MMBench asks each question once per rotation of its options: the published dev/test files
(lmms-lab/MMBench, VLMEvalKit's MMBench_DEV_EN.tsv) already hold the copies, a copy's
``index`` being the original's plus k * 1,000,000 (k = 1 .. n-1 for n options), so copies
share ``index % 1_000_000``. A question counts as correct under CircularEval only if every
copy of it is answered correctly (VLMEvalKit ``mcq_circular_eval``: the group of a question
is every row with that ``index % 1e6``). Vanilla accuracy is the accuracy on the original
rows (``index < 1e6``) alone.

`rotate_row` makes the copies for a file that has none (the ``circular=generate`` suite
option): copy k shifts the options by k places, option j of the copy being option
(j + k) mod n of the original, so the answer letter moves back by k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CIRCULAR_MODES", "CIRCULAR_OFFSET", "aggregate", "circular_views", "group_of", "row_option_counts",
           "rotate_row"]

CIRCULAR_OFFSET = 1_000_000
OPTION_LETTERS = "ABCD"


def group_of(index: int) -> tuple[int, int]:
    """(question group, rotation) of an MMBench ``index``: (index % 1e6, index // 1e6)."""
    index = int(index)
    if index < 0:
        raise ValueError(f"MMBench index must be >= 0, got {index}")
    return index % CIRCULAR_OFFSET, index // CIRCULAR_OFFSET


def option_count(row: Mapping[str, Any]) -> int:
    """The number of options A, B, ... before the first empty / missing / NaN one."""
    count = 0
    for letter in OPTION_LETTERS:
        value = row.get(letter)
        if value is None or (isinstance(value, float) and value != value) or \
                not str(value).strip() or str(value).strip().lower() == "nan":
            break
        count += 1
    return count


def rotate_row(row: Mapping[str, Any], shift: int) -> dict:
    """The row's copy rotated by ``shift`` places: options A..(n-1) become options
    (j + shift) mod n of the original, the answer letter moves to match, and ``index``
    becomes index + shift * 1e6. ``shift`` must be in [0, n)."""
    count = option_count(row)
    if not 0 <= shift < max(count, 1):
        raise ValueError(f"rotation {shift} of a question with {count} options")
    if shift == 0:
        return dict(row)
    answer = str(row["answer"]).strip().upper()
    if len(answer) != 1 or answer not in OPTION_LETTERS[:count]:
        raise ValueError(f"answer {row['answer']!r} is not one of the {count} options")
    rotated = dict(row)
    for j in range(count):
        rotated[OPTION_LETTERS[j]] = row[OPTION_LETTERS[(j + shift) % count]]
    rotated["answer"] = OPTION_LETTERS[(OPTION_LETTERS.index(answer) - shift) % count]
    rotated["index"] = int(row["index"]) + shift * CIRCULAR_OFFSET
    return rotated


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict:
    """Vanilla and circular accuracy of scored MMBench items (records with ``score`` and
    ``meta`` {group, rotation, category}). ``score`` is the circular accuracy (MMBench's
    official metric); ``questions``: the number of question groups; ``circular_by_category``
    the circular accuracy per category."""
    originals = [float(r["score"]) for r in records if r["meta"]["rotation"] == 0]
    groups: dict[int, list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(int(record["meta"]["group"]), []).append(record)
    if not groups:
        return {}
    passed = {g: all(float(r["score"]) == 1.0 for r in rs) for g, rs in groups.items()}
    by_category: dict[str, list[bool]] = {}
    for group, rs in groups.items():
        by_category.setdefault(str(rs[0]["meta"].get("category", "")), []).append(passed[group])
    circular = sum(passed.values()) / len(passed)
    return {"score": circular, "circular": circular,
            "vanilla": sum(originals) / len(originals) if originals else float("nan"),
            "questions": len(groups), "copies": len(records),
            "circular_by_category": {c: sum(v) / len(v) for c, v in sorted(by_category.items())}}


CIRCULAR_MODES = ("auto", "off", "generate")


def circular_views(indices: Sequence[Any], option_counts: Sequence[int], mode: str
                   ) -> list[tuple[int, int]] | None:
    """The (row, rotation) items of an MMBench-style suite: "auto" None (every row as it is),
    "off" the original rows (index < 1e6), "generate" each original row once per rotation of
    its options (the file's own copies dropped)."""
    if mode not in CIRCULAR_MODES:
        raise ValueError(f"circular must be one of {CIRCULAR_MODES}, got {mode!r}")
    if mode == "auto":
        return None
    originals = [row for row, index in enumerate(indices)
                 if index is not None and int(index) < CIRCULAR_OFFSET]
    if mode == "off":
        return [(row, 0) for row in originals]
    return [(row, k) for row in originals for k in range(max(option_counts[row], 1))]


def row_option_counts(rows: Any) -> list[int]:
    """The number of options of every row of a table (columns A, B, ...) of an MMBench file."""
    letters = [letter for letter in OPTION_LETTERS
               if letter in getattr(rows, "column_names", ())]
    columns = {letter: list(rows[letter]) for letter in letters}
    return [option_count({letter: columns[letter][k] for letter in letters})
            for k in range(len(rows))]
