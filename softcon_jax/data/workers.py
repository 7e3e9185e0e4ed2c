"""The local engine: shards written by a pool of worker processes that die with their parent.

``run`` writes each task with ``write`` (``shards.write_shard``) in ``num_workers`` spawned
processes (0 = in this process) and shows one progress bar. Workers never outlive the converter:

- On Linux each worker asks the kernel to kill it when its parent dies
  (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), so ``kill -9`` or SIGTERM of the converter takes
  its workers with it; a thread also watches the parent (other systems).
- A worker renames a finished shard into place only while its parent is alive
  (``still_allowed``), so no shard appears after the converter is gone.
- When the converter stops on an error or Ctrl-C, it terminates the workers instead of
  waiting for their shards, and removes their temporary files (``write_shards``).
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import logging
import multiprocessing as mp
import os
import queue as queue_lib
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

_PROGRESS: Any = None   # the progress queue's put, in worker processes
_PARENT: int | None = None  # the converter's pid, in worker processes


def _parent_alive() -> bool:
    return _PARENT is None or os.getppid() == _PARENT


def _die_with_parent(parent: int) -> None:
    global _PARENT
    _PARENT = parent
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if not _parent_alive():  # the parent died before the line above took effect
        os._exit(1)

    def watch():
        while _parent_alive():
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _init_worker(progress_queue: Any, parent: int) -> None:
    global _PROGRESS
    _die_with_parent(parent)
    _PROGRESS = progress_queue.put
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        force=True)


def _write_in_worker(write: Callable[..., dict], task: Any) -> dict:
    return write(task, _PROGRESS, _parent_alive)


def run(todo: Sequence[Any], num_workers: int, desc: str,
        write: Callable[..., dict]) -> dict[str, dict]:
    """{shard filename: marker} after writing every task of ``todo`` (``shards.Task``) with
    ``write(task, progress, still_allowed)`` (``shards.write_shard``)."""
    markers = {}
    total = sum(len(t.items) for t in todo)
    with tqdm(total=total, desc=desc, unit="rec", disable=total == 0) as bar:
        if num_workers <= 0 or not todo:
            for task in todo:
                markers[task.filename] = write(task, bar.update)
            return markers
        if threading.current_thread() is threading.main_thread():
            # SIGTERM stops the workers and removes their temporary files, as Ctrl-C does.
            previous = signal.signal(signal.SIGTERM, _terminated)
        else:
            previous = None
        try:
            _run_pool(todo, num_workers, bar, markers, write)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    return markers


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def _run_pool(todo, num_workers: int, bar: tqdm, markers: dict, write) -> None:
    ctx = mp.get_context("spawn")  # safe even if the parent has threads (jax, tqdm)
    progress_queue = ctx.Queue()
    pool = cf.ProcessPoolExecutor(
        max_workers=min(num_workers, len(todo)), mp_context=ctx,
        initializer=_init_worker, initargs=(progress_queue, os.getpid()))
    try:
        futures = {pool.submit(_write_in_worker, write, t): t for t in todo}
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
            _drain(progress_queue, bar)
            for fut in done:
                markers[futures[fut].filename] = fut.result()
        _drain(progress_queue, bar)
    except BaseException:
        _terminate(pool)
        raise
    pool.shutdown()


def _terminate(pool: cf.ProcessPoolExecutor) -> None:
    """Stops the workers now: a shard in progress is abandoned, never published."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()


def _drain(progress_queue: Any, bar: tqdm) -> None:
    n = 0
    while True:
        try:
            n += progress_queue.get_nowait()
        except queue_lib.Empty:
            break
    if n:
        bar.update(n)
