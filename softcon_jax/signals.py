"""Stop requests the train loop polls between steps: SIGTERM (preemption) and Ctrl-C.

One process: SIGTERM and the first SIGINT (Ctrl-C) set a flag; the loop then saves a
checkpoint and exits, so neither loses the steps since the last save. A second Ctrl-C
raises KeyboardInterrupt at once (the checkpoint being written is not finished under its
final name, so the previous one stays good). Several processes: JAX's preemption service
(started by `jax.distributed.initialize`) owns SIGTERM and makes every process stop at the
same step (`Checkpointer.reached_preemption`); a Python handler would replace its C++ one
and swallow the notice, so none is installed there.
"""

from __future__ import annotations

import signal

from absl import logging


class StopSignals:
    """`reason` is None, 'preemption' (SIGTERM) or 'Ctrl-C' (SIGINT) once one arrived."""

    def __init__(self, *, sigterm: bool = True):
        self.reason: str | None = None
        self._previous = {}
        wanted = [signal.SIGINT] + ([signal.SIGTERM] if sigterm else [])
        for sig in wanted:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the defaults
                pass

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.reason == "Ctrl-C":
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.reason = "preemption" if signum == signal.SIGTERM else "Ctrl-C"
        logging.warning("%s received: saving a checkpoint and exiting%s.",
                        "SIGTERM" if signum == signal.SIGTERM else "SIGINT (Ctrl-C)",
                        " (press Ctrl-C again to stop at once)" if signum == signal.SIGINT
                        else "")

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
