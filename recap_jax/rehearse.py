"""Rehearsal of a run config before a launch (``python -m recap_jax.train --rehearse``): the
config on a tiny random model of the same architecture and a few rows of every dataset in its
published format, cut to a few steps, then the checks a launch must pass."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
import numpy as np

from recap_jax import parallel
from recap_jax import plan as plan_lib
from recap_jax.metrics_log import read_jsonl
from recap_jax.rollout import gather
from recap_jax.tools import rehearsal
from recap_jax.train import build_run, load_checkpoint_params, load_final_params, train

REHEARSAL_ENTROPY_COEF = 1e-3


def rehearse(config, workdir: str) -> dict[str, Any]:
    """The config run end to end on a tiny random model of the same architecture and a few
    rows of every dataset in its published format (tools.rehearsal.write_fixtures, written
    under WORKDIR/rehearsal_fixtures), cut to a few steps; everything else (precision, remat,
    logits chunk, mesh, method, RECAP, replay, checkpoints, eval, export) as configured.
    Returns the checks of `rehearsal_summary`."""
    # one fixture directory per process: the processes of a multi-host rehearsal write the
    # same rows, never into each other's files
    process = "0"
    if config.mesh.distributed:  # an environment-driven launch names no process id here
        process = str(config.mesh.process_id) if config.mesh.process_id >= 0 else f"pid{os.getpid()}"
    fixtures = os.path.join(workdir, "rehearsal_fixtures", f"process_{process}")
    # 4 steps: two optimizer updates even with rl.sources_per_update=2; on a CPU the lengths
    # are cut (a 7B config's 2,048-token completions for 64 rows do not fit a CPU host's
    # memory even on the tiny model); learning rates raised so that a few bf16 updates of a
    # random model are visible in update_norm (at 1e-6 they round away, as they would in the
    # first steps of the real run without the float32 master copy), and no warm-up: its first
    # update has learning rate 0 (train_state.make_lr_schedule), a third of a 4-step run. A
    # small entropy bonus gives every RL step a gradient: a random model's rewards are all
    # equal (0), so without it an RL-only config would never apply an update
    parallel.initialize_distributed(plan_lib.mesh_plan(config))  # before jax.devices()
    overrides = rehearsal.write_fixtures(fixtures, config, steps=4,
                                         cpu_lengths=jax.devices()[0].platform == "cpu")
    for stage in ("sft", "rl"):
        overrides[f"{stage}.learning_rate"] = max(config[stage].learning_rate, 1e-3)
        overrides[f"{stage}.warmup_fraction"] = 0.0
    if not config.rl.entropy_coef:
        overrides["rl.entropy_coef"] = REHEARSAL_ENTROPY_COEF
    with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
        rehearsal.apply_overrides(config, overrides)
    train(config, workdir)
    return rehearsal_summary(config, workdir)


def rehearsal_summary(config, workdir: str) -> dict[str, Any]:
    """What a rehearsal must show before the real launch: {check: (ok, detail)}."""
    plan = plan_lib.build_plan(config)
    lines, _ = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    steps = {stage.name: [r for r in lines if r["stage"] == stage.name] for stage in plan.stages}
    trained = [r for stage_lines in steps.values() for r in stage_lines]
    objectives = plan.stage("rl").objectives.names if plan.stage("rl") else ()
    missing = [o for o in objectives if any(f"weight/{o}" not in r for r in steps.get("rl", []))]
    run = build_run(plan, workdir)
    try:  # the newest checkpoint re-read (params only) and compared with the exported policy
        step = run.checkpoints.steps()[-1]
        restored = load_checkpoint_params(run, step)
        exported = load_final_params(run)
        same = all(np.array_equal(np.asarray(gather(a)), np.asarray(gather(b))) for a, b in
                   zip(jax.tree.leaves(restored), jax.tree.leaves(exported)))
    finally:
        run.log.close()
        run.checkpoints.close()
    rounded_away, with_gradient = [], 0
    for stage in plan.stages:
        accumulate = config.rl.sources_per_update if stage.is_rl else 1
        lost, gradients = _updates_rounded_away(steps[stage.name], accumulate)
        rounded_away += [f"{stage.name} {step}" for step in lost]
        with_gradient += gradients
    return {
        "steps run": (all(len(steps[s.name]) == s.steps for s in plan.stages),
                      ", ".join(f"{name} {len(v)}" for name, v in steps.items())),
        "finite losses": (bool(trained) and all(np.isfinite(r["loss"]) for r in trained),
                          f"{len(trained)} steps"),
        "update_norm > 0 wherever there is a gradient": (
            not rounded_away, f"{with_gradient} of {len(trained)} steps had a gradient"
            + (f"; updates rounded away at steps {rounded_away}" if rounded_away else "")),
        "every objective's lambda logged": (not missing, f"{len(objectives)} objectives"
                                            + (f", missing {missing}" if missing else "")),
        "checkpoint re-read, equal to the exported final/": (same, f"checkpoint {step}"),
    }


def _updates_rounded_away(lines: list[dict], accumulate: int) -> tuple[list[int], int]:
    """(the steps that should have moved the parameters and did not, the steps with a
    gradient). Each window of ``accumulate`` steps (optax.MultiSteps) applies one update at its
    last step, which must move the stored parameters when any step of the window had a
    gradient (a random model's RL steps have none when every group's rewards are equal)."""
    lost, gradients = [], 0
    for start in range(0, len(lines) - accumulate + 1, accumulate):
        window = lines[start:start + accumulate]
        had_gradient = sum(r.get("grad_norm", 0.0) > 0 for r in window)
        gradients += had_gradient
        if had_gradient and not window[-1].get("update_norm", 0.0) > 0:
            lost.append(window[-1]["step"])
    return lost, gradients


def format_summary(summary: dict[str, Any]) -> str:
    return "\n".join(["rehearsal"] + [f"  [{'ok' if ok else 'FAIL'}] {check}: {detail}"
                                        for check, (ok, detail) in summary.items()])


