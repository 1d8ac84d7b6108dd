"""Preemption: a notice (SIGTERM) becomes a flag that the training loop polls once per step, so
the run finishes its current step, saves a checkpoint and exits 0; the restart resumes.

    with PreemptionHandler() as preemption:
        for step in ...:
            state = train_step(state, batch)
            if preemption.should_stop(step):      # identical on every process
                save(step); raise Preempted(step)

How the notice is received:
  - one process: a Python handler of SIGTERM (and any other ``signals``) sets a flag; the
    previous handlers are restored when the ``with`` block ends. A second notice while the
    first is being honoured restores the previous handler and re-delivers the signal (a
    scheduler's "now, really" or a user's second Ctrl-C ends the process at once).
  - several processes with JAX's preemption service (``jax.distributed`` started,
    ``jax_enable_preemption_service`` on, the default): JAX's own notifier catches SIGTERM on
    any host and agrees on a step; ``should_stop`` is
    ``multihost_utils.reached_preemption_sync_point(step)``, True at the same step on all
    processes. No Python handler is installed (it would replace JAX's notifier).
  - several processes without that service: the Python handler on each process, and the
    flags combined across processes every step (a SIGTERM to one host stops all of them at
    the same step).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["Preempted", "PreemptionHandler", "jax_sync_point_available"]

_log = logging.getLogger(__name__)


class Preempted(Exception):
    """The run stopped for a preemption notice after saving checkpoint ``step`` (exit 0)."""

    def __init__(self, step: int, signal_name: str = "SIGTERM"):
        super().__init__(f"stopped after step {step} for {signal_name} (preemption); the checkpoint "
                         "of that step is saved, run the same command again to resume")
        self.step = step


def jax_sync_point_available() -> bool:
    """Whether JAX's multi-host preemption service runs in this process."""
    from jax._src import distributed

    state = distributed.global_state
    return state.client is not None and getattr(state, "preemption_sync_manager", None) is not None


class PreemptionHandler:
    """Turns preemption notices into a per-step stop decision (see the module docstring).

    signals: the notices (default SIGTERM).
    mode: "auto" (from the process count and JAX's service), "signal" (one process's flag),
      "signal_allgather" (flags OR-ed across processes), "jax" (JAX's sync point).
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,), *, mode: str = "auto"):
        if mode not in ("auto", "signal", "signal_allgather", "jax"):
            raise ValueError(f"PreemptionHandler mode: {mode!r} is not auto | signal | "
                             "signal_allgather | jax")
        self.signals = tuple(signals)
        self.mode = mode
        self._requested: int | None = None  # the signal received, if any
        self._previous: dict[int, Any] = {}
        self._stopped_at: int | None = None

    # ------------------------------------------------------------------ install / restore

    def _resolve_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        if jax.process_count() == 1:
            return "signal"
        return "jax" if jax_sync_point_available() else "signal_allgather"

    def __enter__(self) -> PreemptionHandler:
        self.mode = self._resolve_mode()
        if self.mode == "jax":
            return self
        if threading.current_thread() is not threading.main_thread():
            _log.warning("preemption: not on the main thread, so no signal handler can be "
                         "installed; %s will end the run without a final checkpoint",
                         ", ".join(signal.Signals(s).name for s in self.signals))
            return self
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """Puts the handlers that were installed before back (idempotent)."""
        previous, self._previous = self._previous, {}
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    def _on_signal(self, number: int, frame) -> None:
        if self._requested is not None:  # a second notice: no more grace
            handler = self._previous.pop(number, signal.SIG_DFL)
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
            if callable(handler):
                handler(number, frame)
            else:
                os.kill(os.getpid(), number)
            return
        self._requested = number
        _log.warning("preemption: received %s; finishing the current step, then saving and "
                     "exiting", signal.Signals(number).name)

    # ------------------------------------------------------------------ the decision

    @property
    def requested(self) -> bool:
        """Whether this process has received a notice (not yet agreed across processes)."""
        return self._requested is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self._requested).name if self._requested else "SIGTERM"

    def should_stop(self, step: int) -> bool:
        """Whether the loop must save and stop after ``step``; the same answer on every process.
        Call it once per step, at every step, on every process (the multi-process modes are
        collective)."""
        if self._stopped_at is not None:
            return True
        if self.mode == "jax":
            stop = bool(multihost_utils.reached_preemption_sync_point(step))
        elif self.mode == "signal_allgather":
            stop = _any_process(self.requested)
        else:
            stop = self.requested
        if stop:
            self._stopped_at = step
        return stop


def _any_process(flag: bool, allgather: Callable | None = None) -> bool:
    """OR of ``flag`` over all processes (one small collective; ``allgather`` defaults to
    multihost_utils.process_allgather)."""
    allgather = allgather or multihost_utils.process_allgather
    return bool(np.any(allgather(np.asarray([flag], np.int32))))
