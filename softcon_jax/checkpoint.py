"""Checkpoints through the Orbax CheckpointManager: train state, data iterator, config.

Layout: `WORKDIR/checkpoints/<step>/{state,data,config}`. Orbax writes each step into a
temporary directory and renames it when complete, so a crash or `kill -9` during a save
never leaves a half-written checkpoint under a final name; the previous one stays
restorable. Saves are asynchronous: the train loop goes on while the state is written.
Every process must call `save` (each writes its own shards and its own iterator state).
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
    """Thin wrapper so the trainer reads as: save / latest_step / restore / wait."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        # Orbax needs an absolute path (gs:// paths already are).
        workdir = workdir if "://" in str(workdir) else os.path.abspath(workdir)
        self.directory = epath.Path(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            # Steps are chosen by the trainer (every N steps, SIGTERM, stop, end).
            save_interval_steps=1)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None, config=None, *, force: bool = True):
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def has_data_state(self, step: int) -> bool:
        """Whether checkpoint `step` has the input position of this process *and* count.

        Grain writes one `process_<i>-of-<n>.json` per process, so a checkpoint from another
        process count has none that this run can restore (the trainer then repositions the
        input itself, see `train.continue_input_at`).
        """
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return (self.directory / str(step) / "data" / name).exists()

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores onto the shardings of `abstract_state` (any mesh / device count)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_config(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))
        return restored["config"]

    def reached_preemption(self, step: int) -> bool:
        """Multi-host: every process agrees that a preemption notice arrived."""
        return self.manager.reached_preemption(step)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def abstract_with_shardings(state, shardings):
    """ShapeDtypeStructs that tell Orbax where each restored array must live."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)

