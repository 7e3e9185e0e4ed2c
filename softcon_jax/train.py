"""Pretraining, top to bottom: config, mesh, data, model, step, checkpoint, loop.

    python -m softcon_jax.train --config configs/quickstart.py --workdir runs/quickstart \
        [--config.total_steps=100 --config.global_batch_size=256 ...]

Reading order for newcomers: `train()` at the bottom calls the sections below in order.
What differs between SoftCon and SeCo (networks, loss, EMA/queues) lives in
`softcon_jax.methods`; everything shared lives here.

Outputs in WORKDIR: `checkpoints/<step>/` (Orbax), `tensorboard/` (event files).
Running again with the same WORKDIR resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import time

import grain
import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from softcon_jax import (cli, data, distributed, logs, methods, optim, overrides, sharding,
                         workdir_lock)
from softcon_jax.registry import import_modules
from softcon_jax.signals import StopSignals
from softcon_jax.checkpoint import Checkpointer, abstract_with_shardings
from softcon_jax.data.source import ensure_synthetic_data
from softcon_jax.evaluators.online_knn import OnlineKNN
from softcon_jax.logs import MetricWriter, Progress
from softcon_jax.state import (TrainState, create_train_state, load_pretrained_backbone,
                               validate)
from softcon_jax.step import NONFINITE_INPUT, jit_train_step, window_mean


def _define_flags():
    # Defined only when run as a program, so other entry points (export, evaluate) can
    # import this module and define flags of the same names.
    config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")


# ==== Resume on another process count =====================================================

def continue_input_at(data_iter, step: int) -> None:
    """Moves a fresh input iterator to batch `step`, for a checkpoint of another layout.

    Each process reads batches of `global_batch_size / process_count` from its slice
    `[i::process_count]` of one globally shuffled order, so batch `step` of every process
    starts at (about) global position `step * global_batch_size` whatever the process
    count: the epoch goes on where the checkpoint left it. Augmentation draws differ from
    an unchanged run (they are seeded per process).
    """
    logging.warning(
        "Checkpoint %d was written by another number of processes than this run's %d; its "
        "input iterator state is per process. Restored the train state; the input continues "
        "at batch %d of each process's shard (same global position).", step,
        jax.process_count(), step)
    try:
        grain.experimental.set_next_index(data_iter, step)
    except (NotImplementedError, ValueError) as e:
        raise InputPositionError(
            f"Cannot move this input pipeline to batch {step} ({e!r}); resume on the process "
            "count the checkpoint was written with.") from e


# ==== Resume with another batch or dataset ================================================

def run_info(config) -> dict:
    """What a resume compares with the checkpoint: the global batch and the dataset (its
    path, and the SHA-256 of its metadata.json, which lists its shards and their counts)."""
    meta = epath.Path(config.data.path) / "metadata.json"
    digest = hashlib.sha256(meta.read_bytes()).hexdigest()[:16] if meta.exists() else None
    return {"global_batch_size": int(config.global_batch_size),
            "data_path": str(config.data.path), "data_fingerprint": digest}


def warn_if_run_changed(saved: dict, now: dict, step: int) -> None:
    """One WARNING line per setting that differs from the checkpoint's run."""
    old_batch = saved.get("global_batch_size")
    if old_batch is not None and old_batch != now["global_batch_size"]:
        logging.warning(
            "Resuming checkpoint %d, trained with config.global_batch_size=%s, with "
            "config.global_batch_size=%s: the contrastive batch (its negatives) and the "
            "images per step change from here on.", step, old_batch, now["global_batch_size"])
    old_data = saved.get("data_fingerprint")
    if old_data is not None and old_data != now["data_fingerprint"]:
        logging.warning(
            "Resuming checkpoint %d, trained on the dataset %s (metadata.json sha256 %s), "
            "with the dataset %s (sha256 %s): another dataset from here on.", step,
            saved.get("data_path"), old_data, now["data_path"], now["data_fingerprint"])


# ==== Errors ==============================================================================

class InputPositionError(cli.UserError, RuntimeError):
    """A checkpoint of another process count cannot be resumed by this input pipeline."""


class NonFiniteError(cli.UserError, RuntimeError):
    """Non-finite loss or gradient with config.nonfinite='stop'."""


class NonFiniteInputError(NonFiniteError):
    """An input batch held NaN or inf (whatever config.nonfinite says)."""


# ==== The run =============================================================================

def train(config, workdir: str, *, devices=None) -> TrainState:
    """Runs (or resumes) pretraining in `workdir`; returns the final train state."""
    import_modules(config.get("imports"))  # user losses / backbones / methods register here
    distributed.maybe_initialize()
    # One run per workdir: a second trainer on it stops here, before it touches the data or
    # the checkpoints (process 0 holds WORKDIR/lock for the job; see workdir_lock).
    with workdir_lock.hold(workdir, config.get("workdir_lock_stale_after_s",
                                               workdir_lock.DEFAULT_STALE_AFTER_S)):
        return _train_locked(config, workdir, devices)


def _train_locked(config, workdir: str, devices) -> TrainState:
    # --- mesh -----------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh, devices)
    validate(config, mesh)
    logging.info("Mesh %s over %d devices, %d processes.", dict(mesh.shape), mesh.size,
                 jax.process_count())

    # --- data -----------------------------------------------------------------------------
    ensure_synthetic_data(config.data)
    # Views leave the host in the model's compute dtype unless config.data.dtype says
    # otherwise (data.input_dtype).
    # The method's own views (its batch contract), unless config.data.views names others.
    views = config.data.get("views") or methods.get(config.method).views
    dataset = data.build_dataset(config.data, global_batch_size=config.global_batch_size,
                                 seed=config.seed, process_index=jax.process_index(),
                                 process_count=jax.process_count(),
                                 dtype=data.input_dtype(config).name, views=views)
    data_iter = iter(dataset)
    info = run_info(config)  # saved with every checkpoint, compared on resume

    # --- model and optimizer --------------------------------------------------------------
    method = methods.get(config.method)(config, mesh)
    tx, schedule = optim.make_optimizer(config)
    init_fn, rng, abstract, state_shardings = create_train_state(config, method, tx, mesh)

    # --- checkpoint: resume when the workdir has one --------------------------------------
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep,
                        async_save=config.checkpoint.get("async_save", True))
    restored = ckpt.restore_latest(abstract_with_shardings(abstract, state_shardings),
                                   data_iter)
    if restored is None:
        state = init_fn(rng)
        start = 0
        if config.get("init") and config.init.get("weights"):
            logging.info("Initialising the backbones from %s.", config.init.weights)
            state = load_pretrained_backbone(config, method, state, state_shardings)
    else:
        start, state = restored.step, restored.state
        if start >= config.total_steps:
            logging.info("Nothing to do: checkpoint %d in %s >= config.total_steps=%d. Raise "
                         "--config.total_steps to train further.", start, ckpt.directory,
                         config.total_steps)
            ckpt.close()
            return state
        logging.info("Resuming from %s/%d.", ckpt.directory, start)
        saved = ckpt.restore_run_info(start) or {  # older checkpoints: their config
            "global_batch_size": ckpt.restore_config(start).get("global_batch_size")}
        warn_if_run_changed(saved, info, start)
        # The input position is saved per process (process_i-of-n); a checkpoint written
        # by another process count has none for this run. Then only the train state is
        # restored, see continue_input_at.
        if not restored.data_restored:
            continue_input_at(data_iter, start)

    # --- loop -----------------------------------------------------------------------------
    # config.data.augment_on='device': the step makes the views from the raw images.
    preprocess = data.build_device_views(config.data, data.input_dtype(config).name, views)
    step_fn = jit_train_step(config, method, tx, schedule, mesh, state_shardings, preprocess)
    # A background thread reads and places batches on the devices, prefetch_to_device
    # ahead, so this thread only dispatches steps. Its get_state() is the input position
    # of the batches consumed so far: that is what checkpoints store.
    batches = data.DevicePrefetcher(
        data_iter, lambda b: sharding.host_batch_to_global(b, mesh),
        int(config.get("prefetch_to_device", 2)))
    monitor = OnlineKNN.for_method(config, mesh, method)  # off unless config.eval asks
    writer = MetricWriter(workdir)
    progress = Progress(config.total_steps, config.global_batch_size, start)
    # SIGTERM / Ctrl-C save and exit (one process); several processes agree on preemption
    # through JAX's service instead (see softcon_jax/signals.py).
    signals = StopSignals() if jax.process_count() == 1 else None
    stop_after = config.get("stop_after_step") or None
    last_good = ckpt.latest_step()
    # config.debug_transfer_guard ('log' | 'disallow'): the loop runs under
    # jax.transfer_guard, so an implicit host<->device transfer in it is logged or raises.
    # Batches go in with make_array_from_process_local_data, metrics come out with
    # jax.device_get: both explicit. Set-up (init, restore) is outside the guard.
    guard = contextlib.ExitStack()
    if config.get("debug_transfer_guard"):
        guard.enter_context(jax.transfer_guard(config.debug_transfer_guard))

    def last_good_text():
        return (f"The last good checkpoint is step {last_good} in {ckpt.directory}."
                if last_good is not None else "No checkpoint was written yet.")

    def check_finite(step, bad=None, bad_input=None):
        if bad is None:  # at a save: the input flags of the steps since the last log count
            bad, flags = jax.device_get((state.num_nonfinite,
                                         [m[NONFINITE_INPUT] for m in window]))
            bad_input = any(flags)
        if bad_input:
            raise NonFiniteInputError(
                f"Non-finite input: a batch from the dataset {config.data.path} held NaN or "
                f"inf (images or labels) in the steps up to step {step}; those updates were "
                f"not applied. Stopping (whatever config.nonfinite says). {last_good_text()} "
                f"Check the data with python -m data_prep.verify {config.data.path}, and "
                f"convert it again with a non-finite policy.")
        if bad and config.nonfinite == "stop":
            raise NonFiniteError(
                f"Non-finite loss or gradient in {bad} step(s) up to step {step}; those "
                f"updates were not applied. Stopping (config.nonfinite='stop'). "
                + last_good_text() + " Lower config.optimizer.lr, check the data's "
                "normalisation (config.data.stats), or set config.nonfinite='skip'.")
        return bad

    def save(step):
        nonlocal last_good
        check_finite(step)
        with progress.paused():  # saving is not training time (img/s, ETA)
            ckpt.save(step, state, batches, config, run_info=info)
        last_good = step

    try:
        if start == 0:  # the step-0 score: what pretraining starts from (a random backbone)
            with progress.paused():
                if scalars := monitor.maybe_run(0, state):
                    writer.write_scalars(0, scalars)
                    progress.report_eval(0, scalars)
        step, window = start, []  # window: metrics since the last log line, averaged there
        t_compile = time.perf_counter()
        while step < config.total_steps:
            state, metrics = step_fn(state, next(batches))
            step += 1
            if step == start + 1:
                jax.block_until_ready(state)
                logging.info("First step (including compilation) took %.1f s.",
                             time.perf_counter() - t_compile)
                progress.timing(step)

            window.append(metrics)  # device arrays: no host sync until the log step
            if step % config.log_every_steps == 0 or step == config.total_steps:
                # One fetch of the window's means and the non-finite count.
                metrics, bad = jax.device_get((window_mean(window), state.num_nonfinite))
                window.clear()
                timing = progress.timing(step)
                bad = check_finite(step, int(bad), float(metrics.pop(NONFINITE_INPUT)) > 0)
                writer.write_scalars(step, {**metrics, **timing, "train/nonfinite_steps": bad})
                progress.report(step, float(metrics["loss/total"]), timing)
            # Every process runs it: the kNN forward is one jitted function over the mesh.
            with progress.paused():
                if scalars := monitor.maybe_run(step, state):
                    writer.write_scalars(step, scalars)
                    progress.report_eval(step, scalars)

            stop = ("preemption" if ckpt.reached_preemption(step) else None
                    ) if signals is None else signals.reason
            if stop or step == stop_after:
                save(step)
                ckpt.wait()
                logging.info("Stopped at step %d (%s); checkpoint saved. Run again with the "
                             "same --workdir to resume.", step,
                             stop or "config.stop_after_step")
                return state
            if step % config.checkpoint.every_steps == 0 or step == config.total_steps:
                save(step)
        ckpt.wait()
        if progress.first_loss is not None:
            logging.info("Finished at step %d: loss %.4f (first logged: %.4f).", step,
                         progress.last_loss, progress.first_loss)
        if summary := progress.eval_summary():
            logging.info("%s", summary)
        return state
    finally:
        guard.close()
        batches.close()
        if signals is not None:
            signals.restore()
        ckpt.wait()
        ckpt.close()
        writer.close()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logs.quiet_library_logs()
    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    import sys

    # A misspelt --config.<key> is one line naming the valid keys at its level.
    if rc := cli.call(overrides.check_argv, sys.argv[1:]):
        sys.exit(rc)
    _define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run_absl(main)
