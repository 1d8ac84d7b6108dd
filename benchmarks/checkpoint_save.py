"""Step-time overhead of a checkpoint save, synchronous vs asynchronous (RunCheckpoints).

    python -m benchmarks.checkpoint_save [--state-mb 300] [--saves 4] [--steps-between 5] [--dir DIR]

A train-state-shaped pytree (params and AdamW's two moments, float32, --state-mb in all, a
typed PRNG key, a step counter) is updated by a jitted, donated step that reads and writes every
byte of it (memory-bound, like an optimizer update). Each mode runs the same cycles: one step
followed by a save, then --steps-between plain steps, --saves times; the overhead of a save is
(the cycle's wall time - the same number of steps without saving) / saves. The async save
returns once the arrays are copied off the devices and writes in a background thread while
the next steps run; the next save (or close) waits for it, so a write slower than the steps
between saves shows up as overhead too. The sync row is the reference measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from recap_jax.checkpointing import RunCheckpoints


class State(NamedTuple):
    params: Any
    opt_state: Any
    rng: Any
    step: Any


def make_state(total_mb: float, leaves: int = 12, seed: int = 0) -> State:
    """params + mu + nu of ``total_mb`` MB float32 in all, split over ``leaves`` tensors."""
    per_leaf = max(1, int(total_mb * 2 ** 20 / 3 / 4 / leaves))
    rng = np.random.default_rng(seed)
    params = {f"layer_{i:02d}": {"kernel": jnp.asarray(rng.normal(size=per_leaf), jnp.float32)}
              for i in range(leaves)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    return State(params, {"mu": zeros, "nu": jax.tree.map(jnp.zeros_like, params)}, jax.random.key(seed),
                 jnp.zeros((), jnp.int32))


def _update(state: State) -> State:
    """An AdamW-like update of every leaf (each byte read and written once)."""
    def leaf(p, m, v):
        g = jnp.sin(p)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        return p - 1e-3 * m / (jnp.sqrt(v) + 1e-8), m, v

    out = jax.tree.map(leaf, state.params, state.opt_state["mu"], state.opt_state["nu"])
    params = jax.tree.map(lambda t: t[0], out, is_leaf=lambda x: isinstance(x, tuple))
    mu = jax.tree.map(lambda t: t[1], out, is_leaf=lambda x: isinstance(x, tuple))
    nu = jax.tree.map(lambda t: t[2], out, is_leaf=lambda x: isinstance(x, tuple))
    return State(params, {"mu": mu, "nu": nu}, jax.random.fold_in(state.rng, 1), state.step + 1)


step_fn = jax.jit(_update, donate_argnums=0)


def run_cycles(state: State, saves: int, between: int, manager: RunCheckpoints | None) -> tuple[State, dict]:
    """``saves`` cycles of (step, save, ``between`` steps); returns the state and timings (s)."""
    blocking, start = [], time.perf_counter()
    for cycle in range(saves):
        state = step_fn(state)
        if manager is not None:
            began = time.perf_counter()
            manager.save(cycle + 1, state, {"cycle": cycle})
            blocking.append(time.perf_counter() - began)
        for _ in range(between):
            state = step_fn(state)
        jax.block_until_ready(state)
    cycles = time.perf_counter() - start
    drain = 0.0
    if manager is not None:
        began = time.perf_counter()
        manager.close()  # the last async write finishing
        drain = time.perf_counter() - began
    return state, {"cycles": cycles, "blocking": float(np.mean(blocking)) if blocking else 0.0, "drain": drain}


def measure(total_mb: float, saves: int, between: int, directory: str) -> dict[str, dict]:
    """Timings of no save, sync and async saves on the same state, interleaved twice (best kept)."""
    state = make_state(total_mb)
    state = step_fn(state)  # compile
    jax.block_until_ready(state)
    results: dict[str, dict] = {}
    for _ in range(2):
        for mode in ("none", "sync", "async"):
            path = os.path.join(directory, mode)
            shutil.rmtree(path, ignore_errors=True)
            manager = None if mode == "none" else RunCheckpoints(path, keep=2, async_save=mode == "async")
            state, timing = run_cycles(state, saves, between, manager)
            if mode not in results or timing["cycles"] < results[mode]["cycles"]:
                results[mode] = timing
    return results


def format_table(results: dict[str, dict], total_mb: float, saves: int, between: int) -> str:
    step = results["none"]["cycles"] / (saves * (between + 1))
    lines = [f"checkpoint save overhead: state {total_mb:.0f} MB (params + 2 AdamW moments, float32), a save every "
             f"{between + 1} steps, {saves} saves; {platform.node()} ({os.cpu_count()} CPUs, "
             f"{jax.devices()[0].platform}), jax {jax.__version__}",
             f"  step without saving: {1e3 * step:.1f} ms",
             f"{'mode':<6} {'save call (ms)':>15} {'overhead / save (ms)':>21} {'in steps':>9} {'vs sync':>8}"]
    sync_overhead = None
    for mode in ("sync", "async"):
        timing = results[mode]
        overhead = (timing["cycles"] - results["none"]["cycles"]) / saves
        sync_overhead = overhead if mode == "sync" else sync_overhead
        ratio = overhead / sync_overhead if sync_overhead else float("nan")
        lines.append(f"{mode:<6} {1e3 * timing['blocking']:15.1f} {1e3 * overhead:21.1f} {overhead / step:9.2f} "
                     f"{ratio:8.2f}")
    lines.append(f"  (after the last cycle, close() waited {1e3 * results['async']['drain']:.1f} ms for the last "
                 "async write)")
    return "\n".join(lines)


def main(argv=None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_save", description=__doc__.split("\n")[0])
    parser.add_argument("--state-mb", type=float, default=300.0, help="params + optimizer state, MB")
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--steps-between", type=int, default=5, help="plain steps after each save")
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: a temp dir)")
    args = parser.parse_args(argv)
    directory = args.dir or tempfile.mkdtemp(prefix="checkpoint_save_")
    try:
        results = measure(args.state_mb, args.saves, args.steps_between, directory)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    print(format_table(results, args.state_mb, args.saves, args.steps_between), flush=True)
    return results


if __name__ == "__main__":
    main()
