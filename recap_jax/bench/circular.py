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

__all__ = ["CIRCULAR_OFFSET", "aggregate", "group_of", "rotate_row"]

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
