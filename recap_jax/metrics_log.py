"""Run metrics: one JSONL file (what notebooks read) plus TensorBoard event files.

Each line of ``WORKDIR/metrics.jsonl`` is one JSON object with ``stage`` ("sft", "rl" or
"eval"), ``step`` (1-based step within the stage; an eval line carries the RL step it was
taken at, 0 = the warm-start, before any RL step) and ``time`` (unix seconds), then scalars
(see recap_jax.train for the keys). A resumed run first calls `MetricsLog.rewind` with the
checkpoint's position: lines written after that checkpoint (they are about to be recomputed)
move to ``metrics.superseded.jsonl``, so nothing written is lost and metrics.jsonl reads like
one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

__all__ = ["MetricsLog", "read_jsonl"]

STAGE_ORDER = {"sft": 0, "rl": 1, "eval": 1}


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan / inf
    return value


def read_jsonl(path: str) -> tuple[list[dict], list[int]]:
    """(records, line numbers of malformed lines) of a JSONL file; a torn last line (a kill
    mid-write) is one of the malformed lines."""
    records, bad = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(number)
    return records, bad


def _after(record: dict, stage: str, step: int) -> bool:
    """True if ``record`` was written after a checkpoint at (stage, step)."""
    order = STAGE_ORDER.get(record.get("stage"), 1)
    if order != STAGE_ORDER[stage]:
        return order > STAGE_ORDER[stage]
    return int(record.get("step", 0)) > step


class MetricsLog:
    """Appends metric records to WORKDIR/metrics.jsonl and TensorBoard (optional)."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.superseded_path = os.path.join(workdir, "metrics.superseded.jsonl")
        self._tensorboard_dir = os.path.join(workdir, "tensorboard") if tensorboard else None
        self._writer = None

    def rewind(self, stage: str, step: int) -> int:
        """Moves the lines after position (stage, step) to metrics.superseded.jsonl (and any
        malformed line, e.g. torn by a kill); returns how many lines moved."""
        if not os.path.exists(self.path):
            return 0
        records, bad = read_jsonl(self.path)
        keep = [r for r in records if not _after(r, stage, step)]
        moved = [r for r in records if _after(r, stage, step)]
        if not moved and not bad:
            return 0
        with open(self.superseded_path, "a", encoding="utf-8") as handle:
            for record in moved:
                handle.write(json.dumps(dict(record, superseded_at=time.time())) + "\n")
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            for record in keep:
                handle.write(json.dumps(record) + "\n")
        os.replace(temporary, self.path)
        return len(moved) + len(bad)

    def write(self, stage: str, step: int, values: dict[str, Any]) -> dict:
        record = {"stage": stage, "step": int(step), "time": time.time()}
        record.update({k: _json_value(v) for k, v in values.items()})
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        self._tensorboard(stage, step, values)
        return record

    def _tensorboard(self, stage: str, step: int, values: dict[str, Any]) -> None:
        if self._tensorboard_dir is None:
            return
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(self._tensorboard_dir, flush_secs=30)
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{stage}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
