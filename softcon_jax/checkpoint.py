"""Checkpoints through the Orbax CheckpointManager: train state, data iterator, config.

Layout: `WORKDIR/checkpoints/<step>/{state,data,config}`. Orbax writes each step into a
temporary directory and renames it when complete, so a crash or `kill -9` during a save
never leaves a half-written checkpoint under a final name; the previous one stays
restorable. Saves are asynchronous: the train loop goes on while the state is written.
Every process must call `save` (each writes its own shards and its own iterator state).

Damaged or mismatching checkpoints are one clear error, never Orbax's traceback:

- Before restoring, the checkpoint's state tree (keys, shapes, dtypes) is compared with the
  one this config builds; a difference raises `CheckpointMismatchError` ("the checkpoint's
  state does not match this config") listing the first differing keys and shapes. Nothing
  is moved or changed: resume with the config the checkpoint was written with, or use a
  new workdir.
- A checkpoint that cannot be read (truncated, corrupt or missing files) raises
  `CheckpointUnreadableError` naming the step directory and the cause. `restore_latest`
  (what the trainer resumes with) then falls back: it logs a warning, moves the bad step
  directory aside to `WORKDIR/checkpoints_unreadable/<step>` (kept for inspection, never
  retried, never deleted) and restores the newest older checkpoint. Read-only tools
  (export) only report the error.

A save that fails (disk full, permission denied, an Orbax / TensorStore error) is one
`CheckpointSaveError` naming the directory, the step and the cause; the unfinished temporary
step directory is removed and the previous checkpoint is untouched. Asynchronous saves
report their error at the next `save` or `wait`.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from softcon_jax import cli

# After a failed save, how long an unfinished step folder must stay gone to count as removed.
SETTLE_S = 0.5

UNREADABLE_DIR = "checkpoints_unreadable"


class CheckpointMismatchError(cli.UserValueError):
    """The checkpoint holds a state of another structure than this config builds."""


class CheckpointSaveError(cli.UserError, OSError):
    """A checkpoint could not be written; the message names the directory and the cause."""


class CheckpointUnreadableError(cli.UserValueError):
    """A checkpoint step cannot be read; the message names its directory and the cause."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore_latest` restored."""

    step: int
    state: Any
    data_restored: bool  # the data iterator's position was restored too


class Checkpointer:
    """Thin wrapper so the trainer reads as: save / latest_step / restore / wait."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
                 create: bool = True):
        # Orbax needs an absolute path (gs:// paths already are).
        workdir = workdir if "://" in str(workdir) else os.path.abspath(workdir)
        self.directory = epath.Path(workdir) / "checkpoints"
        if not create and not self.directory.is_dir():
            raise cli.UserFileNotFoundError(
                f"no checkpoints in --workdir {workdir}: {self.directory} does not exist; "
                f"train first (python -m softcon_jax.train ... --workdir {workdir}), or give "
                f"the workdir of a training run.")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create, enable_async_checkpointing=async_save,
            # Steps are chosen by the trainer (every N steps, SIGTERM, stop, end).
            save_interval_steps=1)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._failed = False  # a save failed: closing may raise the same error again
        self._pending: int | None = None  # step of the last save started

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None, config=None, *, force: bool = True,
             run_info: dict | None = None):
        """Starts saving step `step` (asynchronously unless `async_save=False`).

        `run_info`: a JSON dict stored beside the config (the trainer records the dataset's
        fingerprint there, to warn when a resume reads other data).
        """
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
        if run_info is not None:
            items["run"] = ocp.args.JsonSave(run_info)
        with self._save_errors(self._pending):  # the previous async save failed ...
            self.manager.wait_until_finished()
        self._pending = step
        with self._save_errors(step):  # ... or this one (synchronous part)
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    @contextlib.contextmanager
    def _save_errors(self, step: int | None):
        """A failed write (disk full, permission denied, a storage library's own error) ->
        one `CheckpointSaveError` naming the directory; the unfinished temporary directory
        is removed, the previous checkpoint is untouched (Orbax renames only when done)."""
        try:
            yield
        except CheckpointSaveError:
            raise
        except Exception as e:  # OSError, TensorStore's ValueError, Orbax's own types ...
            self._failed = True
            _ignore_closed_loop_callbacks()
            removed = self._remove_unfinished()
            # Orbax's cancelled writes may still create files there until they end (TensorStore
            # writes from its own threads and re-creates missing parent folders): removed
            # again at close and at exit, until the folder stays gone.
            atexit.register(self._remove_unfinished, settle_s=SETTLE_S)
            good = [s for s in self.all_steps() if s != step]
            raise CheckpointSaveError(
                f"could not write checkpoint {'step ' + str(step) if step is not None else ''}"
                f" to {self.directory} ({cli.storage_error_cause(e)}). "
                + (f"The last good checkpoint is step {max(good)} (untouched)"
                   if good else "No earlier checkpoint exists")
                + (f"; removed the unfinished {', '.join(removed)}" if removed else "")
                + ". Free space or fix permissions there, then run again to resume.") from e

    def _remove_unfinished(self, settle_s: float = 0.0) -> list[str]:
        """Deletes Orbax's temporary step directories (process 0); their names. With
        ``settle_s``, removes them again until none has come back for that long (the writes
        of a failed save that were still in flight; bounded by 30 tries)."""
        removed = self._remove_unfinished_once()
        for _ in range(30 if settle_s else 0):
            time.sleep(settle_s)
            again = self._remove_unfinished_once()
            if not again:
                break
            removed += [name for name in again if name not in removed]
        return removed

    def _remove_unfinished_once(self) -> list[str]:
        if jax.process_index() != 0 or not self.directory.exists():
            return []
        removed = []
        try:
            for path in self.directory.iterdir():
                if ".orbax-checkpoint-tmp" in path.name:
                    if "://" in str(path):
                        path.rmtree()
                    else:
                        # A writer thread may still be adding files while this removes
                        # them ("directory not empty"): try again until it is gone.
                        for _ in range(50):
                            shutil.rmtree(path, ignore_errors=True)
                            if not os.path.lexists(path):
                                break
                            time.sleep(0.1)
                    removed.append(path.name)
        except OSError as e:
            logging.warning("Could not remove the unfinished checkpoint in %s: %s",
                            self.directory, e)
        return removed

    def has_data_state(self, step: int) -> bool:
        """Whether checkpoint `step` has the input position of this process *and* count.

        Grain writes one `process_<i>-of-<n>.json` per process, so a checkpoint from another
        process count has none that this run can restore (the trainer then repositions the
        input itself, see `train.continue_input_at`).
        """
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return (self.directory / str(step) / "data" / name).exists()

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores onto the shardings of `abstract_state` (any mesh / device count).

        Raises `CheckpointMismatchError` when the stored state has other keys or shapes,
        `CheckpointUnreadableError` when the step cannot be read.
        """
        differences = self.state_differences(step, abstract_state)
        if differences:
            shown = "; ".join(differences[:6])
            more = f" (and {len(differences) - 6} more)" if len(differences) > 6 else ""
            raise CheckpointMismatchError(
                f"checkpoint {self.step_dir(step)}: the checkpoint's state does not match "
                f"this config: {shown}{more}. Resume with the config it was written with "
                f"(stored in {self.step_dir(step) / 'config'}), or train the changed model "
                f"in a new --workdir.")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax/TensorStore/grain raise many unrelated types
            raise self._unreadable(step, e) from e
        return restored["state"]

    def _unreadable(self, step: int, e: BaseException) -> CheckpointUnreadableError:
        cause = " ".join(str(e).split())
        cause = cause if len(cause) <= 300 else cause[:300] + " ..."
        return CheckpointUnreadableError(
            f"checkpoint {self.step_dir(step)} cannot be read ({type(e).__name__}: "
            f"{cause}).", step)

    def state_differences(self, step: int, abstract_state) -> list[str]:
        """The first differences between stored state `step` and `abstract_state`.

        One line each: a key only in the checkpoint, only in this config, or with another
        shape/dtype. Raises `CheckpointUnreadableError` if the stored tree cannot be read.
        """
        try:
            stored = ocp.StandardCheckpointHandler().metadata(self.step_dir(step) / "state")
            stored = _flat(getattr(stored, "tree", stored))
        except Exception as e:
            raise self._unreadable(step, e) from e
        wanted = _flat(abstract_state)
        out = []
        for key in wanted:
            if key not in stored:
                out.append(f"{key}: in this config {_desc(wanted[key])}, not in the checkpoint")
            elif (tuple(stored[key].shape) != tuple(wanted[key].shape)
                  or jax.numpy.dtype(stored[key].dtype) != jax.numpy.dtype(wanted[key].dtype)):
                out.append(f"{key}: checkpoint {_desc(stored[key])}, this config "
                           f"{_desc(wanted[key])}")
        out += [f"{key}: in the checkpoint {_desc(stored[key])}, not in this config"
                for key in stored if key not in wanted]
        return out

    def restore_latest(self, abstract_state, data_iterator=None, *,
                       move_aside: bool = True) -> Restored | None:
        """Restores the newest readable checkpoint; None when the workdir has none.

        The data iterator's position is restored when the checkpoint has it for this
        process count (see `has_data_state`). An unreadable checkpoint is logged, moved to
        `checkpoints_unreadable/` (with `move_aside`; else the error is raised) and the next
        older one tried; when none can be read, `CheckpointUnreadableError` says so.
        A state that does not match raises `CheckpointMismatchError` (nothing moved).
        """
        moved = []
        for step in sorted(self.all_steps(), reverse=True):
            with_data = data_iterator is not None and self.has_data_state(step)
            try:
                state = self.restore(step, abstract_state, data_iterator if with_data else None)
            except CheckpointUnreadableError as e:
                if not move_aside:
                    raise
                where = self.move_aside(step)
                moved.append(where)
                logging.warning("%s Moved it to %s (kept, not retried); falling back to the "
                                "previous checkpoint.", e, where)
                continue
            if moved:
                logging.warning("Resuming from step %d, the newest readable checkpoint in %s.",
                                step, self.directory)
            return Restored(step, state, with_data)
        if moved:
            raise CheckpointUnreadableError(
                f"no checkpoint in {self.directory} can be read; moved "
                f"{', '.join(str(m) for m in moved)} aside (see the warnings above). Run "
                f"again to start from step 0, or restore a good checkpoint into "
                f"{self.directory}.")
        return None

    def move_aside(self, step: int) -> epath.Path:
        """Moves step directory `step` to `checkpoints_unreadable/<step>[-<time>]`."""
        target_dir = self.directory.parent / UNREADABLE_DIR
        target = target_dir / str(step)
        if jax.process_index() == 0:
            target_dir.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target = target_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            self.step_dir(step).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()
        return target

    def _restore_json(self, step: int, item: str) -> dict:
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                **{item: ocp.args.JsonRestore()}))
        except Exception as e:
            raise self._unreadable(step, e) from e
        return restored[item]

    def restore_config(self, step: int) -> dict:
        return self._restore_json(step, "config")

    def restore_run_info(self, step: int) -> dict | None:
        """The `run_info` saved with step `step`; None when it has none (older checkpoints)."""
        if not (self.step_dir(step) / "run").exists():
            return None
        return self._restore_json(step, "run")

    def reached_preemption(self, step: int) -> bool:
        """Multi-host: every process agrees that a preemption notice arrived."""
        return self.manager.reached_preemption(step)

    def wait(self):
        """Waits until the asynchronous save is written (nothing to wait for after one
        failed: its error was raised)."""
        if self._failed:
            return
        with self._save_errors(self._pending):
            self.manager.wait_until_finished()

    def close(self):
        """Ends the manager; after a failed save only logs what closing raises again."""
        try:
            self.manager.close()
        except Exception as e:
            if not self._failed:
                raise
            logging.info("Closing the checkpoint manager after a failed save: %r", e)
        if self._failed:  # writes still in flight at the failure may have re-created it
            self._remove_unfinished(settle_s=SETTLE_S)


def _ignore_closed_loop_callbacks() -> None:
    """After a failed save, Orbax's cancelled writer threads still report to event loops
    that are closed ("Event loop is closed", at exit): nothing is lost, so those go to the
    log at debug level instead of the terminal. Every other unraisable error is printed."""
    previous = sys.unraisablehook
    if getattr(previous, "_softcon_closed_loop", False):
        return

    def hook(unraisable):
        if (isinstance(unraisable.exc_value, RuntimeError)
                and "Event loop is closed" in str(unraisable.exc_value)):
            logging.debug("After a failed save: %r", unraisable.exc_value)
        else:
            previous(unraisable)

    hook._softcon_closed_loop = True
    sys.unraisablehook = hook


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat(tree) -> dict[str, Any]:
    """{'params/backbone/kernel': leaf} of the array leaves of a pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_str(k) for k in path): leaf for path, leaf in leaves
            if hasattr(leaf, "shape")}


def _desc(leaf) -> str:
    return f"{jax.numpy.dtype(leaf.dtype).name}{list(leaf.shape)}"


def abstract_with_shardings(state, shardings):
    """ShapeDtypeStructs that tell Orbax where each restored array must live."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)

