"""The workdir lock: who holds it, when a lock is stale, heartbeats (no JAX needed)."""

import datetime
import json
import os
import subprocess
import sys
import time

import pytest
from absl import logging

from softcon_jax.workdir_lock import WorkdirLock, WorkdirLockedError


def _write(workdir, **record):
    path = os.path.join(workdir, "lock")
    with open(path, "w") as f:
        json.dump(record, f)
    with open(path, "rb") as f:
        return f.read()


def _ago(seconds):
    t = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)
    return t.isoformat(timespec="seconds")


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def _start_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def test_live_holder_on_this_host_blocks_and_is_named(tmp_path, sleeper):
    lock = WorkdirLock(str(tmp_path))
    before = _write(tmp_path, host=lock.host, pid=sleeper.pid, pid_start=_start_ticks(sleeper.pid),
                    started="2026-01-02T03:04:05+00:00", heartbeat=_ago(3600))
    with pytest.raises(WorkdirLockedError) as err:
        lock.acquire()
    msg = str(err.value)
    assert msg.startswith(f"--workdir {tmp_path} is in use by another run (host {lock.host}, "
                          f"pid {sleeper.pid}, started 2026-01-02T03:04:05+00:00; lock file "
                          f"{tmp_path / 'lock'}).")
    assert f"kill {sleeper.pid} on {lock.host}" in msg and "\n" not in msg
    assert (tmp_path / "lock").read_bytes() == before  # an old heartbeat: same host checks pid
    assert os.listdir(tmp_path) == ["lock"]


@pytest.mark.parametrize("case", ["process_gone", "pid_reused", "heartbeat_expired"])
def test_stale_lock_is_taken_over_with_a_warning(tmp_path, sleeper, monkeypatch, case):
    lock = WorkdirLock(str(tmp_path), stale_after_s=60)
    if case == "process_gone":
        done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True)
        record = dict(host=lock.host, pid=int(done.stdout), heartbeat=_ago(0))
    elif case == "pid_reused":  # a live pid, but another process than the one that locked
        record = dict(host=lock.host, pid=sleeper.pid,
                      pid_start=_start_ticks(sleeper.pid) - 1, heartbeat=_ago(0))
    else:  # another host of a shared filesystem, silent for longer than the timeout
        record = dict(host="node-17", pid=4242, heartbeat=_ago(61))
    _write(tmp_path, started="2026-01-02T03:04:05+00:00", **record)
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
    with lock:
        held = json.loads((tmp_path / "lock").read_text())
        assert (held["host"], held["pid"]) == (lock.host, os.getpid())
    assert os.listdir(tmp_path) == []  # released, nothing left behind
    (warning,) = warnings
    assert warning.startswith(f"Took over the stale lock of {tmp_path} (host {record['host']}, "
                              f"pid {record['pid']}, started 2026-01-02T03:04:05+00:00)")


def test_other_host_with_a_fresh_heartbeat_blocks(tmp_path):
    before = _write(tmp_path, host="node-17", pid=4242, started="x", heartbeat=_ago(30))
    with pytest.raises(WorkdirLockedError, match="host node-17, pid 4242"):
        WorkdirLock(str(tmp_path), stale_after_s=60).acquire()
    assert (tmp_path / "lock").read_bytes() == before


def test_holder_refreshes_its_heartbeat_and_a_second_one_fails(tmp_path):
    with WorkdirLock(str(tmp_path), stale_after_s=1.0) as lock:
        first = json.loads((tmp_path / "lock").read_text())
        time.sleep(1.5)  # heartbeat every 0.1 s, ISO time to the second
        later = json.loads((tmp_path / "lock").read_text())
        assert later["heartbeat"] > first["heartbeat"] and later["started"] == first["started"]
        with pytest.raises(WorkdirLockedError):  # our own pid is alive: never stale
            WorkdirLock(str(tmp_path), stale_after_s=1.0).acquire()
        assert lock.path == str(tmp_path / "lock")
    assert not os.path.exists(tmp_path / "lock")
