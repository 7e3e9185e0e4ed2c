"""Run logs: TensorBoard scalars (process 0 only), the console progress line, quiet libraries.

The metrics themselves (mAP, kNN, ...) live in `softcon_jax.evaluators`.
"""

from __future__ import annotations

import contextlib
import logging as logging_std
import os
import time

import jax
from absl import logging


class _DropLibraryInfo(logging_std.Filter):
    """Hides INFO chatter of Orbax/Grain/XLA start-up so the progress lines stay readable,
    and the tracebacks that Orbax's writer threads (and asyncio, for their unretrieved
    futures) log before Orbax raises the same error to the caller (a failed save: the
    trainer reports it in one line, the traceback goes to the log file)."""

    _NOISY = ("/orbax/", "/grain/", "/jax/_src/")

    def filter(self, record):
        if record.exc_info and ("/orbax/" in record.pathname or record.name == "asyncio"):
            return False
        return record.levelno >= logging_std.WARNING or not any(
            part in record.pathname for part in self._NOISY)


def quiet_library_logs():
    logging.get_absl_handler().addFilter(_DropLibraryInfo())


class MetricWriter:
    """Writes scalars to `WORKDIR/<subdir>` on process 0; a no-op on other processes."""

    def __init__(self, workdir: str, subdir: str = "tensorboard"):
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes
            self._writer = SummaryWriter(os.path.join(workdir, subdir) if subdir else workdir)

    def write_scalars(self, step: int, scalars: dict):
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), step)
        self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()


class Progress:
    """Console line: step, loss, images/s, ETA (process 0 only)."""

    EVAL_KEY = "eval/knn_map_macro"

    def __init__(self, total_steps: int, global_batch_size: int, first_step: int):
        self.total, self.batch = total_steps, global_batch_size
        self._last_time, self._last_step = time.perf_counter(), first_step
        self.first_loss = self.last_loss = None
        self._paused = 0.0
        self.evals: list[tuple[int, float]] = []  # (step, online kNN macro mAP)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpointing) does not count as step time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0

    def timing(self, step: int) -> dict:
        """Step time and throughput since the previous call (host wall-clock, pauses out)."""
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        step_time = max(now - self._last_time - self._paused, 1e-9) / steps
        self._last_time, self._last_step, self._paused = now, step, 0.0
        return {"perf/step_time_s": step_time, "perf/images_per_s": self.batch / step_time}

    def report(self, step: int, loss: float, timing: dict):
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss
        if jax.process_index() != 0:
            return
        eta = (self.total - step) * timing["perf/step_time_s"]
        logging.info("step %d/%d | loss %.4f | %.1f img/s | %.3f s/step | ETA %s", step,
                     self.total, loss, timing["perf/images_per_s"], timing["perf/step_time_s"],
                     _format_seconds(eta))


    def report_eval(self, step: int, scalars: dict):
        """Console line of an online evaluation (process 0 only); remembers the kNN mAP."""
        if (score := scalars.get(self.EVAL_KEY)) is not None:
            self.evals.append((step, float(score)))
        if jax.process_index() != 0:
            return
        shown = " | ".join(f"{k.split('/')[-1]} {float(v):.4f}" for k, v in scalars.items()
                           if not k.endswith("_time_s"))
        logging.info("step %d/%d | eval: %s", step, self.total, shown)


    def eval_summary(self) -> str | None:
        """Whether the online kNN score rose from its first to its last evaluation."""
        if len(self.evals) < 2:
            return None
        (s0, v0), (s1, v1) = self.evals[0], self.evals[-1]
        verdict = "rose" if v1 > v0 else "did not rise"
        return (f"Online kNN mAP (macro) {verdict}: {v0:.3f} at step {s0} -> {v1:.3f} at "
                f"step {s1} ({v1 - v0:+.3f}).")


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
