"""One writer per workdir: a live holder (another process) makes a second run refuse with its
identity; a dead holder's lock (SIGKILLed, or a leftover child keeping the file locked) is
taken over with a warning; release leaves the lock free."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from recap_jax.workdir_lock import LOCK_NAME, WorkdirBusy, WorkdirLock, read_holder

HOLD = textwrap.dedent("""
    import sys, time
    from recap_jax.workdir_lock import WorkdirLock
    lock = WorkdirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def _holder_process(workdir):
    """A second Python process that takes the lock and sleeps (returned once it holds it)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE,
                               text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_run_on_a_live_workdir_is_refused_naming_the_holder(tmp_path):
    process = _holder_process(tmp_path)
    try:
        with pytest.raises(WorkdirBusy) as error:
            WorkdirLock(str(tmp_path)).acquire()
        message = str(error.value)
        assert f"pid {process.pid}" in message and socket.gethostname() in message
        assert str(tmp_path) in message and "--workdir" in message
    finally:
        process.kill()
        process.wait()


def test_the_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    process = _holder_process(tmp_path)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert read_holder(str(tmp_path / LOCK_NAME)).pid == process.pid  # identity left behind
    with WorkdirLock(str(tmp_path)) as lock:
        assert lock.previous.pid == process.pid
        assert read_holder(lock.path).pid == os.getpid()
    assert any("no longer alive" in r.getMessage() and str(process.pid) in r.getMessage()
               for r in caplog.records)


def test_a_dead_holders_lock_kept_by_a_leftover_child_is_broken(tmp_path, caplog):
    """The recorded pid is dead on this host but a forked child still holds the flock."""
    script = textwrap.dedent("""
        import os, sys, time
        from recap_jax.workdir_lock import WorkdirLock
        lock = WorkdirLock(sys.argv[1]).acquire()
        child = os.fork()
        if child == 0:              # the child inherits the locked descriptor and lives on
            time.sleep(120)
            os._exit(0)
        print(child, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    child = int(parent.stdout.readline())
    dead_pid = parent.pid
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    try:
        with WorkdirLock(str(tmp_path)) as lock:
            assert lock.previous.pid == dead_pid
            assert read_holder(lock.path).pid == os.getpid()
        assert any("leftover process" in r.getMessage() for r in caplog.records)
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_live_holder_on_another_host_with_a_free_flock_is_taken_over(tmp_path, caplog):
    """flock free = no process on this file system holds it: the recorded identity is stale."""
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time()}))
    with WorkdirLock(str(tmp_path)) as lock:
        assert lock.previous.host == "elsewhere"


def test_release_leaves_no_identity_and_the_next_run_takes_it_silently(tmp_path, caplog):
    with WorkdirLock(str(tmp_path)) as lock:
        assert lock.held
        with pytest.raises(WorkdirBusy):  # a second lock in the same process is refused too
            WorkdirLock(str(tmp_path)).acquire()
    assert not lock.held
    assert read_holder(str(tmp_path / LOCK_NAME)) is None
    with WorkdirLock(str(tmp_path)) as again:
        assert again.previous is None
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    lock.release()  # idempotent


def test_a_process_after_the_holder_exits_cleanly_gets_the_lock(tmp_path):
    process = _holder_process(tmp_path)
    process.send_signal(signal.SIGTERM)
    process.wait()
    with WorkdirLock(str(tmp_path)) as lock:
        assert lock.held
