"""Evaluate a training run's checkpoint on the held-out records of every task (greedy).

    python -m recap_jax.evaluate --config configs/demo.py --workdir DIR [--step N] [--nogreedy]

``--step`` is a checkpoint step as listed in WORKDIR/checkpoints (SFT step, or sft.steps + RL
step); the default is the newest. Prints a per-task table and writes it to
WORKDIR/eval/checkpoint_<N>.json (``--nogreedy``: checkpoint_<N>_teacher_forced.json, only the
answer-NLL / image-reliance metrics of evaluator.Evaluator, no decoding).
"""

from __future__ import annotations

import json
import os
import sys

import jax

from recap_jax import plan as plan_lib
from recap_jax import run_config
from recap_jax import train as train_lib

__all__ = ["evaluate", "main"]


def evaluate(config, workdir: str, step: int | None = None, *,
             greedy: bool = True) -> tuple[int, dict]:
    """(checkpoint step, {task: {metric: value}}) of checkpoint ``step`` (default: newest).
    ``greedy=False``: only the teacher-forced metrics (answer NLL and image reliance)."""
    run = train_lib.build_run(plan_lib.build_plan(config), workdir)
    try:
        steps = run.checkpoints.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {run.checkpoints.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint {step} in {run.checkpoints.directory}; "
                                    f"there are {steps}")
        params = train_lib.load_checkpoint_params(run, step)
        results = run.evaluator(run.graphdef, params, greedy=greedy)
    finally:
        run.log.close()
        run.checkpoints.close()
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    name = f"checkpoint_{step}.json" if greedy else f"checkpoint_{step}_teacher_forced.json"
    with open(os.path.join(workdir, "eval", name), "w") as handle:
        json.dump({"checkpoint": step, "tasks": results}, handle, indent=1)
    return step, results


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "the run's configs/*.py file",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "the run's output directory")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
    flags.DEFINE_bool("greedy", True, "decode greedily and score (--nogreedy: only the "
                                      "answer NLL / image reliance metrics, much faster)")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(_):
        from absl import logging as absl_logging

        absl_logging.set_verbosity("warning")
        try:
            step, results = evaluate(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.step,
                                     greedy=flags.FLAGS.greedy)
        except (run_config.ConfigError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1
        print(train_lib.format_eval_table(results, f"checkpoint {step} "
                                                   f"({jax.default_backend()})"), flush=True)
        return 0

    app.run(_main, argv=argv)
    return 0


if __name__ == "__main__":
    main()
