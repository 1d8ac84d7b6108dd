"""The CPU demo against its budget: wall time and peak host memory of README's main command.

    python -m benchmarks.demo_run [--workdir /tmp/recap_demo_bench] [-- extra --config.x=v ...]

Runs `python -m recap_jax.train --config configs/demo.py` in a fresh workdir as a child
process, measures its wall time and peak resident memory (getrusage of the children), reads the
run's metrics.jsonl for the stage split, and prints a table against the goals (10 minutes,
6 GB on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

GOAL_SECONDS = 600
GOAL_BYTES = 6 * 1024 ** 3


def stage_seconds(workdir: str) -> dict[str, float]:
    """Wall time of each stage, from the metrics lines' timestamps."""
    times: dict[str, list[float]] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            times.setdefault(record["stage"], []).append(record["time"])
    return {stage: max(t) - min(t) for stage, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/recap_demo_bench")
    parser.add_argument("overrides", nargs="*", help="extra --config.x=v arguments")
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    command = [sys.executable, "-m", "recap_jax.train", "--config", "configs/demo.py",
               "--workdir", args.workdir, *args.overrides]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"demo failed:\n{result.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    stages = stage_seconds(args.workdir)
    print(f"{'measure':<34} {'value':>10} {'goal':>10} {'share of goal':>14}")
    print(f"{'wall time (s)':<34} {seconds:10.1f} {GOAL_SECONDS:10d} {seconds / GOAL_SECONDS:14.2f}")
    print(f"{'peak resident memory (GiB)':<34} {peak / 1024 ** 3:10.2f} "
          f"{GOAL_BYTES / 1024 ** 3:10.1f} {peak / GOAL_BYTES:14.2f}")
    for stage, value in stages.items():
        print(f"{'  of which ' + stage + ' (s, first to last line)':<34} {value:10.1f}")
    final = [line for line in result.stdout.splitlines() if line.startswith("[rl]")][-1:]
    print("last progress line:", *final)


if __name__ == "__main__":
    main()
