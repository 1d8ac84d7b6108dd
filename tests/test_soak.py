"""Soak: a long CPU run of the demo's RL loop (500 RL steps, the three synthetic sources in
turn, RECAP on) with host memory sampled every 50 steps and every XLA compilation counted.

Bounds (stated in RELIABILITY.md): after the warm-up (the first 50 steps, where each source's
sampler and train step compile once), no compilation at all, and resident memory grows by less
than MEMORY_GROWTH_BOUND_MB between step 100 and step 500.
"""

import resource

import jax
import pytest

from recap_jax import train
from tests.short_run import load_config, override

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("soak")]
RL_STEPS = 500
SAMPLE_EVERY = 50
WARMUP_STEPS = 50
MEMORY_GROWTH_BOUND_MB = 150


def resident_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_500_rl_steps_without_recompilation_or_memory_growth(tmp_path):
    config = override(load_config("demo"), {
        "sft.steps": 0, "rl.steps": RL_STEPS, "checkpoint.every_steps": WARMUP_STEPS,
        "eval.num_examples": 8, "eval.batch_size": 8, "log.every_steps": 100,
        "model.hidden_size": 64, "model.intermediate_size": 128, "model.vision_hidden_size": 32,
        "rl.max_new_tokens": 16})
    compiles: list[tuple[int, str]] = []
    current = {"step": 0}
    memory: dict[int, float] = {}

    def on_compile(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append((current["step"], kwargs.get("fun_name", "?")))

    def on_step(stage, step, line):
        current["step"] = step
        if stage == "rl" and step % SAMPLE_EVERY == 0:
            memory[step] = resident_mb()

    jax.monitoring.register_event_duration_secs_listener(on_compile)
    try:
        train.train(config, str(tmp_path / "soak"), on_step=on_step)
    finally:
        jax.monitoring.clear_event_listeners()
    print("resident MB by step:", {k: round(v) for k, v in memory.items()})
    print("compilations (step, function):", compiles)
    # step 500's closing eval/checkpoint runs after the last on_step: not counted as "late"
    late = [c for c in compiles if WARMUP_STEPS < c[0] < RL_STEPS]
    assert not late, late
    growth = memory[RL_STEPS] - memory[100]
    assert growth < MEMORY_GROWTH_BOUND_MB, memory
