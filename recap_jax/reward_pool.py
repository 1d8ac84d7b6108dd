"""Verifiable rewards scored in worker processes, each call under a time limit.

`rollout.score` calls every reward on the main thread, one completion after the other; a
symbolic check that takes seconds stalls the step for minutes. Here

    pool = RewardPool(workers=8, timeout_s=10.0, names=task.rewards)  # validated here
    values = pool.score(task, texts, references, image_sizes, input_sizes, names)
    metrics.update(pool.take_counts())    # reward_timeouts/<name>, reward_errors/<name>

scores the same [N, len(names)] float32 array as `rollout.score` (same arguments, same
context for box answers), with each (completion, reward) call sent to an idle worker. A call
that raises, returns something that is not a finite number, or kills its worker scores 0 and
counts as an error; a call still running after ``timeout_s`` scores 0, counts as a timeout,
and its worker is killed and replaced. ``workers=0`` scores serially in this process (errors
counted, no time limit: nothing can interrupt a call there).

Reward names are either registered names (``recap_jax.rewards.REWARDS``) or import paths
``"package.module:function"`` naming any ``fn(completion, reference, **context) -> float``;
`resolve_reward` resolves and checks them with an error naming the path. Workers are started
with the "spawn" method (a fork of a process running JAX threads is unsafe), once, and reused.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Sequence
from multiprocessing import connection
from typing import Any

import numpy as np

from recap_jax import rewards as rewards_lib

__all__ = ["RewardPool", "resolve_reward", "score", "validate_rewards"]

RewardFn = Callable[..., float]


# --------------------------------------------------------------------------- names


def resolve_reward(name: str) -> RewardFn:
    """The reward function called ``name``: a registered name or ``"package.module:function"``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name {name!r}: expected a registered name or "
                         "'package.module:function'")
    if ":" not in name:
        if name in rewards_lib.REWARDS:
            return rewards_lib.REWARDS[name]
        raise ValueError(f"unknown reward {name!r}; known: {sorted(rewards_lib.REWARDS)}, or name a "
                         "function by import path 'package.module:function'")
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise ValueError(f"reward {name!r}: an import path is 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 -- reported with the path
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} "
                         f"({type(error).__name__}: {error})") from error
    fn = module
    for part in attribute.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward {name!r}: module {module_name!r} has no attribute "
                             f"{attribute!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"reward {name!r}: {attribute!r} is a {type(fn).__name__}, not a function")
    return fn


def validate_rewards(names: Sequence[str]) -> dict[str, RewardFn]:
    """{name: function} for every name (call at start: the first bad name raises)."""
    return {name: resolve_reward(name) for name in names}


# --------------------------------------------------------------------------- one call


def _contexts(task: Any, image_sizes: Any, input_sizes: Any, rows: int) -> list[dict]:
    """The per-completion keyword context `rollout.score` passes (box answers: sizes)."""
    if getattr(task, "answer_kind", "text") != "box":
        return [{} for _ in range(rows)]
    return [dict(image_size=tuple(image_sizes[row]), input_size=tuple(input_sizes[row]))
            for row in range(rows)]


def _call(fn: RewardFn, text: str, reference: Any, context: dict) -> tuple[str, float]:
    """("ok", value) or ("error", 0.0): an exception or a non-finite / non-number value."""
    try:
        value = float(fn(text, reference, **context))
    except Exception:  # noqa: BLE001 -- a reward must never crash the step; counted
        return "error", 0.0
    return ("ok", value) if math.isfinite(value) else ("error", 0.0)


def _worker_main(conn) -> None:
    """A worker: resolves names itself, answers (task_id, status, value) per request."""
    functions: dict[str, RewardFn] = {}
    conn.send(("ready",))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        task_id, name, text, reference, context = request
        try:
            fn = functions.get(name) or functions.setdefault(name, resolve_reward(name))
        except Exception:  # noqa: BLE001
            conn.send((task_id, "error", 0.0))
            continue
        conn.send((task_id, *_call(fn, text, reference, context)))


# --------------------------------------------------------------------------- the pool


class _Worker:
    def __init__(self, context):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.task: tuple[int, float] | None = None  # (task id, deadline)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


class RewardPool:
    """``workers`` reward processes (0: serial in this process), ``timeout_s`` per call.

    names: reward names to validate now (in this process, with a clear error) rather than at
    the first batch. Use as a context manager, or call `close`.
    """

    def __init__(self, workers: int = 0, timeout_s: float = 10.0, names: Sequence[str] = (),
                 start_method: str = "spawn"):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"RewardPool: workers={workers!r}; expected an int >= 0 (0: serial)")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) \
                or not 0 < timeout_s < float("inf"):
            raise ValueError(f"RewardPool: timeout_s={timeout_s!r}; expected a number > 0")
        self.timeout_s = float(timeout_s)
        self._functions = validate_rewards(names)
        self._counts: Counter[str] = Counter()
        self._context = multiprocessing.get_context(start_method)
        self._workers = [_Worker(self._context) for _ in range(workers)]

    @property
    def workers(self) -> int:
        return len(self._workers)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def take_counts(self) -> dict[str, int]:
        """``reward_timeouts/<name>`` and ``reward_errors/<name>`` since the last call (only
        the nonzero ones), then reset."""
        counts, self._counts = dict(self._counts), Counter()
        return counts

    def _function(self, name: str) -> RewardFn:
        if name not in self._functions:
            self._functions[name] = resolve_reward(name)
        return self._functions[name]

    def score(self, task: Any, texts: Sequence[str], references: Sequence[Any],
              image_sizes: Any, input_sizes: Any, names: Sequence[str]) -> np.ndarray:
        """[N, len(names)] reward values, as `rollout.score` (failures 0, counted)."""
        for name in names:
            self._function(name)  # a bad name fails here, in this process
        contexts = _contexts(task, image_sizes, input_sizes, len(texts))
        jobs = [(row * len(names) + column, name, text, reference, contexts[row])
                for row, (text, reference) in enumerate(zip(texts, references))
                for column, name in enumerate(names)]
        values = self._serial(jobs) if not self._workers else self._parallel(jobs)
        out = np.zeros((len(texts), len(names)), np.float32)
        out.reshape(-1)[:len(jobs)] = values
        return out

    def _record(self, status: str, name: str) -> None:
        if status == "error":
            self._counts[f"reward_errors/{name}"] += 1
        elif status == "timeout":
            self._counts[f"reward_timeouts/{name}"] += 1

    def _serial(self, jobs: list) -> list[float]:
        values = []
        for _, name, text, reference, context in jobs:
            status, value = _call(self._function(name), text, reference, context)
            self._record(status, name)
            values.append(value)
        return values

    def _parallel(self, jobs: list) -> list[float]:
        values = [0.0] * len(jobs)
        pending = list(reversed(jobs))  # pop() takes them in order
        busy: dict[int, _Worker] = {}
        while pending or busy:
            for worker in self._workers:
                if pending and worker.ready and worker.task is None:
                    job = pending.pop()
                    worker.conn.send(job)
                    worker.task = (job[0], time.monotonic() + self.timeout_s)
                    busy[job[0]] = worker
            waiting = [w for w in self._workers if not w.ready or w.task is not None]
            deadlines = [w.task[1] for w in waiting if w.task is not None]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for conn in connection.wait([w.conn for w in waiting], timeout=wait_s):
                worker = next(w for w in self._workers if w.conn is conn)
                self._receive(worker, jobs, values, busy)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.task is not None and worker.task[1] <= now:
                    task_id = worker.task[0]
                    self._record("timeout", jobs[task_id][1])
                    busy.pop(task_id, None)
                    self._replace(worker)
        return values

    def _receive(self, worker: _Worker, jobs: list, values: list, busy: dict) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):  # the worker died (os._exit, a segfault, OOM kill)
            if not worker.ready:
                worker.kill()
                raise RuntimeError(f"RewardPool: a reward worker exited while starting (exit code "
                                   f"{worker.process.exitcode}); is recap_jax importable in a "
                                   "fresh interpreter?") from None
            if worker.task is not None:
                self._record("error", jobs[worker.task[0]][1])
                busy.pop(worker.task[0], None)
            self._replace(worker)
            return
        if message == ("ready",):
            worker.ready = True
            return
        task_id, status, value = message
        values[task_id] = value
        self._record(status, jobs[task_id][1])
        busy.pop(task_id, None)
        worker.task = None

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._context)


def score(task: Any, texts: Sequence[str], references: Sequence[Any], image_sizes: Any,
          input_sizes: Any, names: Sequence[str], *, pool: RewardPool | None = None) -> np.ndarray:
    """`rollout.score` with an optional pool (None: serial in this process, failures 0)."""
    if pool is None:
        with RewardPool(0) as serial:
            return serial.score(task, texts, references, image_sizes, input_sizes, names)
    return pool.score(task, texts, references, image_sizes, input_sizes, names)
