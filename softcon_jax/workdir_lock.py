"""One run per workdir: a lock file `WORKDIR/lock` naming its holder.

A second trainer on a workdir that a live run holds stops at once with one line naming the
holder (host, pid, start time) and how to go on; it touches nothing there (nor the
synthetic data the config would write). The file is JSON: `host`, `pid`, `pid_start` (the
process's start time in clock ticks from `/proc/<pid>/stat`, so a reused pid is not taken
for the holder), `started` and `heartbeat` (UTC, ISO 8601), `command`.

A lock is *stale*, and a new run (a resume) takes it over with a warning, when

- it was written on this host and its process is gone (or the pid now belongs to another
  process), or
- its heartbeat is older than `stale_after_s` (`config.workdir_lock_stale_after_s`,
  default 600 s). The holder rewrites the heartbeat every `stale_after_s / 10` seconds from
  a daemon thread, so a run on another host of a shared filesystem (NFS, Lustre, GCS FUSE),
  whose process cannot be checked from here, counts as gone only after it stopped
  heartbeating for that long. Hosts' clocks must agree to well within that timeout.

The lock is taken by creating the file under a temporary name and hard-linking it to
`lock` (atomic, and it fails when `lock` exists, also on NFS); where the filesystem has no
hard links, `open(O_CREAT | O_EXCL)`. Object-store workdirs (`gs://...`) have neither:
there the file is checked, then written (a resubmitted job is caught; two started within
the same second may both pass). Multi-host runs: only process 0 takes the lock, once
for the job (see `softcon_jax.train`). A run that ends normally, with an error, or by
SIGTERM / Ctrl-C removes its lock; after `kill -9` the next run finds it stale.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time

from absl import logging
from etils import epath

from softcon_jax import cli

LOCK_NAME = "lock"
DEFAULT_STALE_AFTER_S = 600.0


class WorkdirLockedError(cli.UserError, RuntimeError):
    """Another live run holds the workdir."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _pid_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (Linux), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22; the command name (field 2) may contain spaces, so split after it.
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, pid_start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    current = _pid_start(pid)
    return pid_start is None or current is None or current == pid_start


def _parse_time(text: str | None) -> float | None:
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


class WorkdirLock:
    """`acquire()` / `release()` of `WORKDIR/lock`; also a context manager."""

    def __init__(self, workdir: str, *, stale_after_s: float = DEFAULT_STALE_AFTER_S):
        self.remote = "://" in str(workdir)
        self.workdir = str(workdir) if self.remote else os.path.abspath(workdir)
        self.path = str(epath.Path(self.workdir) / LOCK_NAME)
        self.stale_after_s = float(stale_after_s)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = _now()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False

    # --- the record --------------------------------------------------------------------
    def _record(self) -> dict:
        return {"host": self.host, "pid": self.pid, "pid_start": _pid_start(self.pid),
                "started": self.started, "heartbeat": _now(),
                "command": " ".join(sys.argv)}

    def _write_tmp(self) -> str:
        tmp = f"{self.path}.{self.host}.{self.pid}.tmp"
        try:
            epath.Path(tmp).write_text(json.dumps(self._record()) + "\n")
        except BaseException:  # e.g. a full disk: leave nothing behind
            epath.Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    def _read(self, path: str | None = None) -> dict | None:
        """The holder's record; {} if unreadable (being written); None if there is none."""
        try:
            text = epath.Path(path or self.path).read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    # --- taking and giving back ----------------------------------------------------------
    def _create(self) -> bool:
        """Creates `lock` atomically with our record; False if it exists."""
        epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
        if self.remote:  # no atomic create on object stores: check, then write
            if epath.Path(self.path).exists():
                return False
            epath.Path(self.path).write_text(json.dumps(self._record()) + "\n")
            return True
        tmp = self._write_tmp()
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem
            pass
        finally:
            os.remove(tmp)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self._record()) + "\n")
        return True

    def stale_reason(self, record: dict) -> str | None:
        """Why the holder of `record` is gone, or None while it may be alive."""
        host, pid = record.get("host"), record.get("pid")
        if host == self.host and isinstance(pid, int):
            if not _alive(pid, record.get("pid_start")):
                return f"its process {pid} on {host} is gone"
            return None
        beat = _parse_time(record.get("heartbeat"))
        if beat is not None and time.time() - beat > self.stale_after_s:
            return (f"its heartbeat is {time.time() - beat:.0f} s old (stale after "
                    f"{self.stale_after_s:.0f} s, config.workdir_lock_stale_after_s)")
        return None

    def _locked_error(self, record: dict) -> WorkdirLockedError:
        host, pid = record.get("host", "?"), record.get("pid", "?")
        return WorkdirLockedError(
            f"--workdir {self.workdir} is in use by another run (host {host}, pid {pid}, "
            f"started {record.get('started', '?')}; lock file {self.path}). Wait for it to "
            f"finish or stop it (kill {pid} on {host}), or use another --workdir; if that run "
            f"is gone (e.g. its node died), delete {self.path}.")

    def _take_over(self, record: dict) -> bool:
        """Moves the stale lock aside; False if someone else replaced it meanwhile."""
        if self.remote:
            epath.Path(self.path).unlink(missing_ok=True)
            return True
        aside = f"{self.path}.stale.{self.host}.{self.pid}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # already gone
        moved = self._read(aside)
        if moved != record:  # a fresh lock of another run: put it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            os.remove(aside)
            return False
        os.remove(aside)
        return True

    def acquire(self) -> "WorkdirLock":
        for _ in range(20):
            if self._create():
                self._held = True
                self._start_heartbeat()
                return self
            record = self._read()
            if record is None:
                continue  # released meanwhile: try again
            if not record:  # being written by an O_EXCL creator: give it a moment
                time.sleep(0.1)
                record = self._read() or {}
                if not record:
                    raise self._locked_error(record)
            reason = self.stale_reason(record)
            if reason is None:
                raise self._locked_error(record)
            if not self._take_over(record):
                raise self._locked_error(self._read() or record)
            logging.warning("Took over the stale lock of %s (host %s, pid %s, started %s): %s.",
                            self.workdir, record.get("host"), record.get("pid"),
                            record.get("started"), reason)
        raise self._locked_error(self._read() or {})

    def _start_heartbeat(self) -> None:
        period = max(self.stale_after_s / 10, 0.05)

        def beat():
            while not self._stop.wait(period):
                try:
                    if (self._read() or {}).get("pid") != self.pid:
                        return  # taken over or removed: not ours any more
                    if self.remote:
                        epath.Path(self.path).write_text(json.dumps(self._record()) + "\n")
                    else:
                        os.replace(self._write_tmp(), self.path)
                except OSError as e:  # a full or flaky disk must not stop training
                    logging.warning("Could not refresh the workdir lock %s: %s", self.path, e)

        self._thread = threading.Thread(target=beat, name="workdir-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        record = self._read()
        if record and record.get("host") == self.host and record.get("pid") == self.pid:
            epath.Path(self.path).unlink(missing_ok=True)

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold(workdir: str, stale_after_s: float = DEFAULT_STALE_AFTER_S):
    """Holds the workdir for the job: process 0 takes the lock; every process learns whether
    it did (a collective), so all of them stop together when another run holds it."""
    import jax

    lock = WorkdirLock(workdir, stale_after_s=stale_after_s)
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if error is None and int(failed):
            error = WorkdirLockedError(f"--workdir {lock.workdir} is in use by another run; "
                                       "process 0 says by which.")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        lock.release()
