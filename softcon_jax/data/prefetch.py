"""Device prefetch: the next batches go onto the devices while the current step runs.

A background thread pulls host batches from the Grain iterator and places them on the mesh
(`sharding.host_batch_to_global`), `size` batches ahead, as big_vision's
`prefetch_iterator`. The train loop's own thread then only dispatches steps: reading,
stacking and copying a batch (hundreds of MB for 13-band 224 px views) no longer sits between
two dispatches.

Checkpoints stay exact: the thread records the Grain iterator's state right after each batch
it reads, and `get_state()` returns the state that goes with the last batch *handed out*, not
the batches waiting in the queue. `Checkpointer.save` stores it in the same JSON file Grain
writes for its own iterators, so a checkpoint restores into a plain Grain iterator and the
run continues with the first batch the previous run had not consumed.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from softcon_jax.cli import UserValueError

_POLL_S = 0.1  # how often a blocked producer checks for close()


class _Raised:
    """An exception from the producer thread, re-raised in the consumer."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class DevicePrefetcher(Iterator):
    """Iterator of device batches, `size` ahead, with Grain's get_state / set_state.

    Args:
      host_iter: a Grain `DatasetIterator` (anything with `__next__`, `get_state()`,
        `set_state(state)` where state is JSON-serialisable).
      to_device: host batch -> device batch (e.g. `sharding.host_batch_to_global`).
      size: batches placed on the devices ahead of the consumer; 0 places each batch in the
        calling thread, when it is asked for (no thread).

    The state is JSON bytes, as Grain's checkpoint handler expects of iterators that are not
    `DatasetIterator`s; its content is the wrapped iterator's state.
    """

    def __init__(self, host_iter: Any, to_device: Callable[[Any], Any], size: int = 2):
        if size < 0:
            raise UserValueError(f"config.prefetch_to_device={size}; expected an integer >= 0.")
        self._it = host_iter
        self._to_device = to_device
        self._size = int(size)
        self._state = self._snapshot()  # input position of the next batch handed out
        self._queue: queue.Queue = queue.Queue(maxsize=max(self._size, 1))
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    # --- Grain iterator protocol ---------------------------------------------------------

    def get_state(self) -> bytes:
        return self._state

    def set_state(self, state: bytes | dict) -> None:
        """Moves the input to `state` (bytes from `get_state`, or the wrapped iterator's)."""
        self.close()  # batches read ahead belong to the old position
        self._it.set_state(json.loads(state) if isinstance(state, (bytes, str)) else state)
        self._state = self._snapshot()
        self._closing.clear()

    def start_prefetch(self) -> None:
        """Called by Grain's checkpoint handler after a restore; the thread starts lazily."""

    # --- iteration -----------------------------------------------------------------------

    def __next__(self):
        if self._size == 0:
            batch = self._to_device(next(self._it))
            self._state = self._snapshot()
            return batch
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="device_prefetch",
                                            daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, _Raised):
            self._thread.join()
            self._thread = None
            raise item.exc  # the producer's exception, with its traceback
        batch, self._state = item
        return batch

    def close(self) -> None:
        """Stops the thread and drops the batches read ahead (idempotent)."""
        if self._thread is None:
            return
        self._closing.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = None
        self._queue = queue.Queue(maxsize=max(self._size, 1))

    # --- producer ------------------------------------------------------------------------

    def _snapshot(self) -> bytes:
        # Serialised at once: the iterator may reuse and mutate its state objects.
        return json.dumps(self._it.get_state(), indent=4).encode()

    def _put(self, item) -> bool:
        while not self._closing.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self) -> None:
        while not self._closing.is_set():
            try:
                batch = self._to_device(next(self._it))
                state = self._snapshot()
            except BaseException as e:  # noqa: BLE001 - StopIteration too: handed over as is
                self._put(_Raised(e))
                return
            if not self._put((batch, state)):
                return
