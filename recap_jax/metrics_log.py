"""Run metrics: one JSONL file (what notebooks read) plus TensorBoard event files, and
optionally Weights & Biases (`WandbConfig`, off by default).

Each line of ``WORKDIR/metrics.jsonl`` is one JSON object with ``stage`` ("sft", "rl" or
"eval"), ``step`` (1-based step within the stage; an eval line carries the RL step it was
taken at, 0 = the warm-start, before any RL step) and ``time`` (unix seconds), then scalars
(see recap_jax.train for the keys). A resumed run first calls `MetricsLog.rewind` with the
checkpoint's position: lines written after that checkpoint (they are about to be recomputed)
move to ``metrics.superseded.jsonl``, so nothing written is lost and metrics.jsonl reads like
one uninterrupted run.

Weights & Biases: ``MetricsLog(workdir, wandb=WandbConfig(enabled=True, project=...,
mode="offline"))`` also logs each record's numeric scalars as ``<stage>/<key>`` against the
stage's own step axis ``<stage>/step`` (stages restart their step count, which wandb's
global step cannot express). The run id is kept in ``WORKDIR/wandb_run_id`` so a resumed
run continues the same wandb run (steps recomputed after a rewind are logged again there).
``mode="offline"`` writes under ``WORKDIR/wandb`` without network (``wandb sync`` uploads it
later). The ``wandb`` package is optional: imported only when enabled, with a clear error
if it is missing.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import time
import uuid
from typing import Any

__all__ = ["MetricsLog", "WandbConfig", "read_jsonl"]

WANDB_MODES = ("online", "offline", "disabled")

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


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """The optional Weights & Biases writer (config section ``log``).

    enabled: ``log.wandb``; False (default) never imports wandb.
    project: ``log.wandb_project``, the wandb project.
    run_name: ``log.wandb_run_name``; "" lets wandb name the run.
    mode: ``log.wandb_mode``: "online", "offline" (no network; `wandb sync` later) or
      "disabled" (wandb's no-op run).
    entity: ``log.wandb_entity``; "" for the default entity.
    """

    enabled: bool = False
    project: str = "recap_jax"
    run_name: str = ""
    mode: str = "offline"
    entity: str = ""

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"log.wandb={self.enabled!r}: expected True | False")
        if self.mode not in WANDB_MODES:
            raise ValueError(f"log.wandb_mode={self.mode!r}: expected one of {' | '.join(WANDB_MODES)}")
        if self.enabled and (not isinstance(self.project, str) or not self.project):
            raise ValueError(f"log.wandb_project={self.project!r}: a non-empty project name is "
                             "required when log.wandb=True")
        for field in ("run_name", "entity"):
            if not isinstance(getattr(self, field), str):
                raise ValueError(f"log.wandb_{field}={getattr(self, field)!r}: expected a string")


def _import_wandb():
    try:
        return importlib.import_module("wandb")
    except ImportError as error:
        raise ImportError("log.wandb=True but the 'wandb' package is not installed: pip install "
                          "wandb, or set log.wandb=False") from error


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    """The numeric scalars of a record (what TensorBoard and wandb plot)."""
    return {k: v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _WandbWriter:
    """One wandb run per workdir; each stage plotted against its own step axis."""

    def __init__(self, config: WandbConfig, workdir: str):
        wandb = _import_wandb()
        id_path = os.path.join(workdir, "wandb_run_id")
        if os.path.exists(id_path):
            with open(id_path, encoding="utf-8") as handle:
                run_id = handle.read().strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            with open(id_path, "w", encoding="utf-8") as handle:
                handle.write(run_id + "\n")
        self._run = wandb.init(project=config.project, name=config.run_name or None,
                               entity=config.entity or None, mode=config.mode, dir=workdir,
                               id=run_id, resume="allow")
        self._stages: set[str] = set()

    def write(self, stage: str, step: int, values: dict[str, Any]) -> None:
        if stage not in self._stages:
            self._run.define_metric(f"{stage}/step")
            self._run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self._stages.add(stage)
        record = {f"{stage}/{key}": value for key, value in _scalars(values).items()}
        record[f"{stage}/step"] = int(step)
        self._run.log(record)

    def close(self) -> None:
        self._run.finish()


class MetricsLog:
    """Appends metric records to WORKDIR/metrics.jsonl, TensorBoard (optional) and Weights &
    Biases (optional, `WandbConfig`)."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, wandb: WandbConfig | None = None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.superseded_path = os.path.join(workdir, "metrics.superseded.jsonl")
        self._tensorboard_dir = os.path.join(workdir, "tensorboard") if tensorboard else None
        self._writer = None
        self._wandb = _WandbWriter(wandb, workdir) if wandb is not None and wandb.enabled else None

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
        if self._wandb is not None:
            self._wandb.write(stage, step, values)
        return record

    def _tensorboard(self, stage: str, step: int, values: dict[str, Any]) -> None:
        if self._tensorboard_dir is None:
            return
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(self._tensorboard_dir, flush_secs=30)
        for key, value in _scalars(values).items():
            self._writer.add_scalar(f"{stage}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
