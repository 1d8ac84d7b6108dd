"""The run a user launches, checked end to end on the plan's wiring: bf16 parameters train
(float32 master copy), the logged lambda is the released formula over the logged signals up
to and including that step (RECAP inside the step), and two processes of 4 devices give the
metrics of one process of 8 while each feeds only its own rows."""

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
from safetensors.numpy import load_file

from recap_jax import rewards, train
from recap_jax.metrics_log import read_jsonl
from tests.short_run import ROOT, cli_overrides, short_config

pytestmark = pytest.mark.xdist_group("short_run")


def rows(workdir, stage):
    return [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))[0]
            if r["stage"] == stage]


def _bf16_as_float32(path) -> dict:
    """{name: float32 array} of a safetensors file of bf16 tensors (read as raw bits)."""
    import torch
    from safetensors.torch import load_file as load_torch

    return {k: v.to(torch.float32).numpy() for k, v in load_torch(path).items()}


def test_bf16_parameters_train_through_the_float32_master_copy(tmp_path, monkeypatch):
    """param_dtype bfloat16, lr 2e-5, 20 RL steps: an Adam step of ~2e-5 is below half the
    bf16 spacing of most decoder weights (~6e-5 at |w| ~ 0.02), so without the master copy
    they would not move; with it most entries change between warmstart/ and final/, and
    every logged update_norm after the first step is > 0. (Rewards that vary per completion
    give every RL step a gradient.)"""
    monkeypatch.setitem(rewards.REWARDS, "format_think", hashed_reward)
    monkeypatch.setitem(rewards.REWARDS, "iou", hashed_reward)
    config = short_config(model__param_dtype="bfloat16", rl__learning_rate=2e-5,
                          rl__warmup_fraction=0.0, rl__steps=20, checkpoint__every_steps=0,
                          eval__num_examples=0, sft__steps=2)
    workdir = str(tmp_path / "bf16")
    train.train(config, workdir)
    before = _bf16_as_float32(os.path.join(workdir, "warmstart", "model.safetensors"))
    after = _bf16_as_float32(os.path.join(workdir, "final", "model.safetensors"))
    decoder = [k for k in before if ".layers." in k and "visual" not in k
               and k.endswith(("proj.weight",))]
    assert decoder
    changed = np.mean([np.mean(before[k] != after[k]) for k in decoder])
    assert changed > 0.5, changed
    assert all(r["update_norm"] > 0 for r in rows(workdir, "rl")[1:])


# --------------------------------------------------------------------------- RECAP timing


def released_weights(histories: list[list[float]], is_reward: list[bool], window: int,
                     temperature: float, alpha: float) -> np.ndarray:
    """recap-method.md's `released` rule, written out independently in numpy."""
    k = len(histories)
    c, i, seen = np.ones(k), np.zeros(k), np.zeros(k, bool)
    for o, history in enumerate(histories):
        h = np.asarray(history[-2 * window:], np.float64)
        seen[o] = len(h) > 0
        m = len(h) // 2
        if m == 0:
            continue
        used = h[-2 * m:]
        old, new = used[:m].sum(), used[m:].sum()
        num, den = (old, new) if is_reward[o] else (new, old)
        c[o] = 1.0 if abs(num) < 1e-9 and abs(den) < 1e-9 else num / den
        mean, std = used.mean(), used.std()
        i[o] = 0.0 if abs(std) < 1e-9 and abs(mean) < 1e-9 else std / mean

    def softmax(x):
        e = np.exp((x - x[seen].max()) / temperature) * seen
        return e / e.sum()

    weights = seen.sum() * (alpha * softmax(c) + (1 - alpha) * softmax(i))
    return np.where(seen, weights, 1.0)


def hashed_reward(completion, reference, **_):
    """A deterministic reward in [0, 1] that varies from completion to completion."""
    return (zlib.crc32(completion.encode()) % 97) / 96.0


def test_logged_lambda_is_the_released_rule_over_signals_up_to_this_step(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "format_think", hashed_reward)
    monkeypatch.setitem(rewards.REWARDS, "iou", hashed_reward)
    window, temperature, alpha = 2, 0.5, 0.5  # a small T makes lambda move visibly
    config = short_config(rl__steps=10, recap__window=window, recap__temperature=temperature,
                          recap__alpha=alpha, checkpoint__every_steps=0, eval__num_examples=0)
    workdir = str(tmp_path / "timing")
    train.train(config, workdir)
    lines = rows(workdir, "rl")
    names = [k.split("/", 1)[1] for k in lines[0] if k.startswith("weight/")]
    is_reward = [not n.endswith("/ntp") for n in names]
    histories: list[list[float]] = [[] for _ in names]
    moved = 0.0
    for line in lines:
        for o, name in enumerate(names):
            key = f"{'reward' if is_reward[o] else 'ntp_loss'}/{name}"
            if key in line:
                histories[o].append(line[key])
        expected = released_weights(histories, is_reward, window, temperature, alpha)
        logged = np.asarray([line[f"weight/{n}"] for n in names])
        np.testing.assert_allclose(logged, expected, rtol=2e-4, atol=2e-5,
                                   err_msg=f"step {line['step']}")
        moved = max(moved, float(np.abs(logged - 1).max()))
    assert moved > 0.05  # the weights did move: the comparison is not of constants


# --------------------------------------------------------------------------- distributed

DISTRIBUTED = {"mesh.spec": "fsdp=-1", "rl.prompts_per_step": 8, "rl.group_size": 2,
               "sft.batch_size": 8, "sft.steps": 2, "rl.steps": 3, "eval.batch_size": 8,
               "eval.num_examples": 8, "checkpoint.every_steps": 0}
COMPARED = ("loss", "grad_norm", "update_norm", "param_norm")


def _launch(workdir, devices, extra, process_id=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         "--xla_cpu_collective_call_terminate_timeout_seconds=900")
    command = [sys.executable, "-m", "recap_jax.train", "--config", str(ROOT / "configs/demo.py"),
               "--workdir", str(workdir)] + cli_overrides(dict(DISTRIBUTED, **extra))
    return subprocess.Popen(command, env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _two_processes_and_one(tmp_path, extra=None) -> None:
    """The same run on 2 processes x 4 devices (tmp_path/two) and 1 x 8 (tmp_path/one)."""
    from tests.test_multihost import free_port

    extra = extra or {}
    port = free_port()
    coordinator = {"mesh.distributed": True, "mesh.coordinator_address": f"127.0.0.1:{port}",
                   "mesh.num_processes": 2}
    procs = [_launch(tmp_path / "two", 4, dict(coordinator, **extra, **{"mesh.process_id": i}))
             for i in range(2)]
    single = _launch(tmp_path / "one", 8, extra)
    try:
        logs = [p.communicate(timeout=1500)[0] for p in procs + [single]]
    finally:
        for p in procs + [single]:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs + [single], logs):
        assert p.returncode == 0, log[-5000:]


@pytest.mark.slow
def test_two_processes_give_the_metrics_of_one_and_feed_only_their_rows(tmp_path):
    _two_processes_and_one(tmp_path)
    for stage in ("sft", "rl"):
        two, one = rows(tmp_path / "two", stage), rows(tmp_path / "one", stage)
        assert len(two) == len(one) > 0
        for a, b in zip(two, one):
            for key in b:
                if key in COMPARED or key.startswith(("reward/", "ntp_loss/", "weight/")):
                    np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6,
                                               err_msg=f"{stage} step {b['step']} {key}")
            rows_total = 8 * (2 if stage == "rl" and b.get("source") != "ocr" else 1)
            assert (a["process_rows"], b["process_rows"]) == (rows_total // 2, rows_total)
    evals = [json.loads((tmp_path / w / "eval" / "rl_step_3.json").read_text())
             for w in ("two", "one")]
    assert evals[0]["tasks"].keys() == evals[1]["tasks"].keys()
    final = [load_file(str(tmp_path / w / "final" / "model.safetensors")) for w in ("two", "one")]
    for key in final[1]:
        np.testing.assert_allclose(final[0][key], final[1][key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_dynamic_sampling_on_two_processes_keeps_the_groups_one_process_keeps(tmp_path):
    """Dynamic sampling chooses groups by every process's rewards: 2 x 4 devices must keep
    (and resample) exactly what 1 x 8 keeps, so the counts, the rewards and the step agree.
    A reward of the completion's length parity makes about half of the G = 2 groups
    zero-variance, so groups are both dropped and kept."""
    extra = {"sft.steps": 0, "rl.steps": 2, "rl.method": "reasoning_only",
             "rl.dynamic_sampling_extra_draws": 2,
             "data.sources.reasoning.rewards": "tests.reward_fixtures:length_parity_reward"}
    _two_processes_and_one(tmp_path, extra)
    two, one = rows(tmp_path / "two", "rl"), rows(tmp_path / "one", "rl")
    assert len(two) == len(one) == 2
    counted = [k for k in one[0] if k.startswith("dynamic_sampling/")]
    assert len(counted) == 5
    for a, b in zip(two, one):
        assert {k: a[k] for k in counted} == {k: b[k] for k in counted}, b["step"]
        for key in ("loss", "grad_norm", "update_norm", "reward/reasoning/tests.reward_fixtures:"
                    "length_parity_reward"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
        assert (a["process_rows"], b["process_rows"]) == (8, 16)
    kept_informative = [8 - b["dynamic_sampling/filled_zero_variance"] for b in one]
    assert sum(b["dynamic_sampling/dropped"] for b in one) > 0 and sum(kept_informative) > 0


def test_eval_benchmarks_run_at_every_evaluation_of_a_training_run(tmp_path):
    """eval.benchmarks: the public suites (fixtures in their published formats) are scored at
    the evaluation before RL and at the end; the eval lines carry bench/<label> and the
    per-suite JSON lands in eval/bench_rl_step_<n>/."""
    from tests.bench.make_fixtures import write_fixtures

    specs = write_fixtures(str(tmp_path / "bench"))
    config = short_config(eval__benchmarks=",".join(specs[s] for s in ("ai2d", "ocrbench")),
                          eval__benchmarks_max_new_tokens=4, eval__benchmarks_batch_size=2,
                          eval__num_examples=0, checkpoint__every_steps=0)
    workdir = tmp_path / "bench_run"
    train.train(config, str(workdir))
    evals = [r for r in read_jsonl(str(workdir / "metrics.jsonl"))[0] if r["stage"] == "eval"]
    assert [r["step"] for r in evals] == [0, config.rl.steps]
    for line in evals:
        assert 0.0 <= line["bench/ai2d"] <= 1.0 and 0.0 <= line["bench/ocrbench"] <= 1.0
    summary = json.loads((workdir / "eval" / f"bench_rl_step_{config.rl.steps}" / "summary.json").read_text())
    assert set(summary["suites"]) == {"ai2d", "ocrbench"}
    assert summary["suites"]["ai2d"]["n"] == 2


def test_a_second_run_on_a_live_workdir_refuses_to_start(tmp_path):
    """The workdir lock is taken by train(): while another run holds it, train() refuses
    before building anything and names the holder."""
    from recap_jax.workdir_lock import WorkdirBusy, WorkdirLock

    workdir = tmp_path / "busy"
    with WorkdirLock(str(workdir)):
        with pytest.raises(WorkdirBusy, match=str(os.getpid())):
            train.train(short_config(), str(workdir))
    assert not (workdir / "checkpoints").exists()
