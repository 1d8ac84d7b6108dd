"""Preemption: SIGTERM becomes a flag the loop polls once per step, the previous handlers come
back afterwards, a second SIGTERM is not swallowed; the multi-process modes agree on a step.
The end-to-end test (SIGTERM at random moments of a short run, then resume) is slow and waits
for the training loop's wiring."""

import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from recap_jax import preemption
from recap_jax.preemption import Preempted, PreemptionHandler


@pytest.fixture
def recording_handler():
    """A Python SIGTERM handler installed before each test (restored after): what the
    PreemptionHandler must put back."""
    calls = []
    handler = lambda number, frame: calls.append(number)
    previous = signal.signal(signal.SIGTERM, handler)
    yield handler, calls
    signal.signal(signal.SIGTERM, previous)


def _deliver(number=signal.SIGTERM):
    os.kill(os.getpid(), number)
    time.sleep(0.01)  # Python runs the handler at the next bytecode boundary


def test_sigterm_sets_the_flag_polled_per_step_and_handlers_are_restored(recording_handler):
    handler, calls = recording_handler
    with PreemptionHandler() as stop:
        assert stop.mode == "signal"
        assert not stop.should_stop(1)
        _deliver()
        assert stop.requested and stop.signal_name == "SIGTERM"
        assert stop.should_stop(2)
        assert stop.should_stop(3)  # stays decided
        assert calls == []  # the notice was ours, not the previous handler's
    assert signal.getsignal(signal.SIGTERM) is handler
    _deliver()
    assert calls == [signal.SIGTERM]


def test_a_second_sigterm_goes_to_the_previous_handler(recording_handler):
    handler, calls = recording_handler
    with PreemptionHandler() as stop:
        _deliver()
        assert calls == []
        _deliver()  # "now, really"
        assert calls == [signal.SIGTERM]
        assert stop.should_stop(1)
    assert signal.getsignal(signal.SIGTERM) is handler


def test_other_signals_can_be_notices_too(recording_handler):
    previous = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler(signals=(signal.SIGTERM, signal.SIGUSR1)) as stop:
        _deliver(signal.SIGUSR1)
        assert stop.should_stop(5) and stop.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_without_a_notice_it_never_stops():
    with PreemptionHandler() as stop:
        assert not any(stop.should_stop(step) for step in range(100))


def test_off_the_main_thread_it_warns_and_installs_nothing(caplog):
    before = signal.getsignal(signal.SIGTERM)
    results = []

    def body():
        with PreemptionHandler() as stop:
            results.append(stop.should_stop(1))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert results == [False]
    assert signal.getsignal(signal.SIGTERM) is before
    assert any("main thread" in r.getMessage() for r in caplog.records)


def test_an_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="mode: 'sometimes'"):
        PreemptionHandler(mode="sometimes")


def test_jax_mode_asks_the_sync_point_and_installs_no_handler(monkeypatch, recording_handler):
    handler, _ = recording_handler
    asked = []

    def sync_point(step):
        asked.append(step)
        return step == 3

    monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point", sync_point)
    with PreemptionHandler(mode="jax") as stop:
        assert signal.getsignal(signal.SIGTERM) is handler  # JAX's notifier keeps SIGTERM
        assert [stop.should_stop(s) for s in (1, 2, 3, 4)] == [False, False, True, True]
    assert asked == [1, 2, 3]


def test_signal_allgather_stops_every_process_when_one_got_the_notice(monkeypatch):
    """Process 1 of 3 got SIGTERM: the OR over processes is True on all (a fake allgather
    standing in for multihost_utils.process_allgather)."""
    flags = {0: False, 1: True, 2: False}
    fake = lambda local: np.stack([np.asarray([flags[p]], np.int32) for p in flags])
    assert preemption._any_process(False, allgather=fake)
    flags[1] = False
    assert not preemption._any_process(True, allgather=fake)  # the gathered flags decide
    monkeypatch.setattr(preemption.multihost_utils, "process_allgather", fake)
    with PreemptionHandler(mode="signal_allgather") as stop:
        assert not stop.should_stop(1)
        flags[2] = True
        assert stop.should_stop(2)


def test_preempted_names_the_step_and_how_to_resume():
    error = Preempted(7)
    assert error.step == 7 and "step 7" in str(error) and "resume" in str(error)


# --------------------------------------------------------------------------- end to end


def _checkpoint_steps(workdir) -> list[int]:
    directory = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in directory.glob("[0-9]*")) if directory.exists() else []


def _run_until_sigterm(workdir, should_term, timeout=900) -> tuple[int, str]:
    """Starts the short run; sends SIGTERM once ``should_term(workdir)`` says so; returns
    (exit code, stderr tail)."""
    from tests.short_run import ROOT, cli_overrides

    command = [sys.executable, "-m", "recap_jax.train", "--config", str(ROOT / "configs" / "demo.py"),
               "--workdir", str(workdir), *cli_overrides()]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, sent = time.monotonic() + timeout, False
    while process.poll() is None and time.monotonic() < deadline:
        if not sent and should_term(workdir):
            process.send_signal(signal.SIGTERM)
            sent = True
        time.sleep(0.002)
    if process.poll() is None:
        process.kill()
        raise AssertionError("training did not stop in time")
    return process.returncode, process.stderr.read()[-3000:]


@pytest.mark.slow
@pytest.mark.xdist_group("short_run")
def test_sigterm_at_random_moments_then_restart_equals_the_uninterrupted_run(short_run, tmp_path):
    """SIGTERM during a checkpoint save, then at a random moment of the restarted run: each
    time the run finishes its step, saves, and exits 0 with a checkpoint of the step it
    stopped at; the final restart ends with the leaves and metrics of the uninterrupted run."""
    from tests.test_reliability_training import _saving, assert_same_leaves, checkpoint_leaves, rows

    workdir, _, config = short_run
    preempted = tmp_path / "preempted"
    total = config.sft.steps + config.rl.steps
    rng = random.Random(0)
    code, log = _run_until_sigterm(preempted, lambda d: _saving(d) or len(_checkpoint_steps(d)) >= 1)
    assert code == 0, log
    first = _checkpoint_steps(preempted)
    assert first and first[-1] < total, first  # stopped early, with a checkpoint
    start, delay = time.monotonic(), rng.uniform(5.0, 25.0)
    code, log = _run_until_sigterm(preempted, lambda d: time.monotonic() - start > delay)
    assert code == 0, log
    code, log = _run_until_sigterm(preempted, lambda d: False)
    assert code == 0, log
    assert_same_leaves(checkpoint_leaves(workdir, total), checkpoint_leaves(preempted, total))
    drop = {"time", "tokens_per_s", "step_time_s", "eval_time_s"}
    strip = lambda records: [{k: v for k, v in r.items() if k not in drop} for r in records]
    for stage in ("sft", "rl", "eval"):
        assert strip(rows(preempted, stage)) == strip(rows(workdir, stage)), stage
