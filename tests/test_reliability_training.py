"""Reliability of a training run: non-finite steps skipped then a clean stop, damaged
checkpoints detected and skipped, and SIGKILL at any moment (during a checkpoint save too)
followed by a restart that ends exactly where an uninterrupted run ends."""

import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from recap_jax import rollout, train
from recap_jax.metrics_log import read_jsonl
from tests.short_run import ROOT, cli_overrides, short_config

pytestmark = pytest.mark.xdist_group("short_run")


def checkpoint_leaves(workdir, step) -> dict:
    """The raw saved leaves of checkpoint ``step`` (read without any target structure), as
    {dotted name: array}: the named tree orbax holds, e.g. "params.language_model.norm.scale.value"."""
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"

    def flatten(node, prefix=""):
        if isinstance(node, dict):
            return {k: v for key, child in node.items() for k, v in flatten(child, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    return flatten(ocp.StandardCheckpointer().restore(path))


def _dotted(path: str) -> str:
    """A pytree path as describe_leaves writes it (".params['a'][0].value") -> the name of its
    leaf in the checkpoint ("params.a.0.value")."""
    return ".".join(a or b or c for a, b, c in re.findall(r"\.(\w+)|\['([^']*)'\]|\[(\d+)\]", path))


def named_leaves(workdir, step, prefixes=(".params", ".opt_state")) -> dict:
    """{pytree path: array} of the checkpoint's leaves whose path starts with ``prefixes``
    (paths from the leaf listing saved beside them, found in the named tree by their names)."""
    import json

    meta_dir = pathlib.Path(workdir) / "checkpoints" / str(step) / "meta"
    meta = json.loads((meta_dir / "metadata").read_text())
    leaves = checkpoint_leaves(workdir, step)
    return {path: leaves[_dotted(path)] for path, _, _ in meta["leaves"] if path.startswith(prefixes)}


def assert_same_leaves(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def rows(workdir, stage):
    return [r for r in read_jsonl(str(pathlib.Path(workdir) / "metrics.jsonl"))[0]
            if r["stage"] == stage]


# --------------------------------------------------------------------------- numerics


def test_nan_rewards_are_skipped_then_the_run_saves_and_stops(tmp_path, monkeypatch):
    """Every reward NaN when it reaches the step: each step is skipped (params untouched),
    counted, logged; after rl.max_bad_steps in a row the run saves and stops with a clear
    message. (A reward *function* returning NaN is scored 0 and counted by the reward pool;
    NaNs are injected after scoring here, where only a bug could put them.)"""
    from recap_jax.reward_pool import RewardPool

    monkeypatch.setattr(RewardPool, "score", lambda self, task, texts, refs, sizes, inputs, names:
                        np.full((len(texts), len(names)), np.nan, np.float32))
    config = short_config(sft__steps=0, rl__method="reasoning_only", rl__steps=6,
                          rl__max_bad_steps=3, checkpoint__every_steps=1, checkpoint__keep=10)
    workdir = tmp_path / "nan"
    with pytest.raises(train.TrainingStopped, match=r"3 steps in a row.*max_bad_steps=3"):
        train.train(config, str(workdir))
    lines = rows(workdir, "rl")
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(r["skipped"] == 1.0 for r in lines)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1, 2, 3]
    # no update was applied: params and optimizer state equal after steps 1 and 3
    assert_same_leaves(named_leaves(workdir, 1), named_leaves(workdir, 3))


def test_a_nan_gradient_skips_that_step_only(tmp_path, monkeypatch):
    """NaN pixels in SFT step 2's batch give a NaN loss and gradient: that update is skipped
    (params equal before and after), the counter resets, later steps train normally."""
    real_sft_batch = rollout.sft_batch
    calls = []

    def poisoned(**kwargs):
        batch, stats = real_sft_batch(**kwargs)
        calls.append(1)
        if len(calls) == 2:
            pixels = np.array(batch.prompt.pixel_values)
            pixels[:] = np.nan
            batch = batch.replace(prompt=batch.prompt._replace(pixel_values=pixels))
        return batch, stats

    monkeypatch.setattr(rollout, "sft_batch", poisoned)
    config = short_config(sft__steps=3, rl__steps=0, checkpoint__every_steps=1,
                          checkpoint__keep=10, rl__max_bad_steps=2)
    workdir = tmp_path / "nan_grad"
    train.train(config, str(workdir))
    assert [r["skipped"] for r in rows(workdir, "sft")] == [0.0, 1.0, 0.0]
    one, two, three = (named_leaves(workdir, s) for s in (1, 2, 3))
    assert_same_leaves(one, two)  # step 2 skipped: params and optimizer state untouched
    assert any(not np.array_equal(two[k], three[k]) for k in two if k.startswith(".params"))


# --------------------------------------------------------------------------- checkpoints


def _truncate_files(directory: pathlib.Path) -> int:
    count = 0
    for path in directory.rglob("*"):
        if path.is_file() and path.stat().st_size > 64:
            with open(path, "r+b") as handle:
                handle.truncate(path.stat().st_size // 2)
            count += 1
    return count


def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_one_used(
        short_run, tmp_path, capsys, caplog):
    workdir, params, config = short_run
    copy = tmp_path / "corrupt"
    shutil.copytree(workdir, copy)
    total = config.sft.steps + config.rl.steps
    assert _truncate_files(copy / "checkpoints" / str(total) / "state") > 0
    resumed = train.train(short_config(), str(copy))
    damaged = str(copy / "checkpoints" / str(total))
    assert any(damaged in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert f"resuming from {copy / 'checkpoints' / str(total - 2)}" in capsys.readouterr().out
    assert [p.name.split("-")[0] for p in (tmp_path / "corrupt" / "checkpoints_damaged").iterdir()] \
        == [str(total)]  # set aside, not deleted
    import jax

    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_when_every_checkpoint_is_damaged_the_run_refuses_to_start_over(short_run, tmp_path):
    workdir, _, _ = short_run
    copy = tmp_path / "all_damaged"
    shutil.copytree(workdir, copy)
    for step in (copy / "checkpoints").iterdir():
        if step.name.isdigit():
            (step / "meta" / "metadata").write_text("{not json")
    with pytest.raises(train.CheckpointsUnreadable, match="nothing was deleted"):
        train.train(short_config(), str(copy))


def test_a_checkpoint_from_another_config_is_refused_with_the_mismatches(short_run, tmp_path):
    from recap_jax.checkpointing import CheckpointMismatch

    workdir, _, _ = short_run
    copy = tmp_path / "other_config"
    shutil.copytree(workdir, copy)
    with pytest.raises(CheckpointMismatch) as error:
        train.train(short_config(model__hidden_size=48, model__intermediate_size=96), str(copy))
    message = str(error.value)
    assert "expected [" in message and "found [" in message and "embed" in message


# --------------------------------------------------------------------------- SIGKILL


def _command(workdir):
    return [sys.executable, "-m", "recap_jax.train", "--config", str(ROOT / "configs" / "demo.py"),
            "--workdir", str(workdir), *cli_overrides()]


def _run_until(workdir, should_kill, timeout=600) -> str:
    """Starts training; polls ``should_kill(workdir)`` and SIGKILLs when it says so. Returns
    "killed" or "finished"."""
    env = dict(os.environ)
    process = subprocess.Popen(_command(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if should_kill(workdir):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return "killed"
        time.sleep(0.002)
    if process.poll() is None:
        process.kill()
        raise AssertionError("training did not finish in time")
    assert process.returncode == 0, process.stderr.read()[-3000:]
    return "finished"


def _saving(workdir) -> bool:
    """True while orbax writes a checkpoint: its temporary directory exists from the start of
    `save` until the background (async) write is finalised and renamed to <step>/."""
    directory = pathlib.Path(workdir) / "checkpoints"
    return directory.exists() and any("tmp" in p.name for p in directory.iterdir())


def test_sigkill_at_random_moments_then_restart_equals_the_uninterrupted_run(short_run, tmp_path):
    workdir, _, config = short_run
    killed = tmp_path / "killed"
    rng = random.Random(0)
    # 1) killed while a checkpoint is being written (or right after one, if the save is too
    #    quick to catch); 2) killed at a random moment of the restarted run; 3) run to the end.
    first = _run_until(killed, lambda d: _saving(d) or len(list(
        (pathlib.Path(d) / "checkpoints").glob("[0-9]*"))) >= 2)
    assert first == "killed"
    start = time.monotonic()
    delay = rng.uniform(5.0, 25.0)
    second = _run_until(killed, lambda d: time.monotonic() - start > delay)
    third = _run_until(killed, lambda d: False)
    assert third == "finished", (first, second)
    total = config.sft.steps + config.rl.steps
    assert_same_leaves(checkpoint_leaves(workdir, total), checkpoint_leaves(killed, total))
    drop = {"time", "tokens_per_s", "step_time_s", "eval_time_s"}
    strip = lambda records: [{k: v for k, v in r.items() if k not in drop} for r in records]  # noqa: E731
    for stage in ("sft", "rl", "eval"):
        assert strip(rows(killed, stage)) == strip(rows(workdir, stage)), stage
