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
import signal
import time

import flax.struct
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from softcon_jax import data, distributed, methods, online_eval, optim, sharding
from softcon_jax.checkpoint import Checkpointer, abstract_with_shardings
from softcon_jax.methods.common import compute_dtype
from softcon_jax import metrics as metrics_lib
from softcon_jax.metrics import MetricWriter, Progress


def _define_flags():
    # Defined only when run as a program, so other entry points (export, evaluate) can
    # import this module and define flags of the same names.
    config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")


# ==== Train state =========================================================================

@flax.struct.dataclass
class TrainState:
    step: jax.Array           # number of updates applied so far
    params: dict              # trainable (student) parameters
    opt_state: optax.OptState
    model_state: dict         # non-trained: BN statistics, EMA teacher, queues
    num_nonfinite: jax.Array  # steps whose loss or gradient was not finite (never applied)


def create_train_state(config, method, tx, mesh):
    """Initialises the state directly in its sharded layout (jit with out_shardings)."""
    example = method.example_batch(sharding.num_batch_shards(mesh))

    def init(rng):
        params, model_state = method.init(rng, example)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), model_state=model_state,
                          num_nonfinite=jnp.zeros((), jnp.int32))

    rng = jax.random.key(config.seed)
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.state_shardings(abstract, mesh)
    return jax.jit(init, out_shardings=shardings), rng, abstract, shardings


def load_pretrained_backbone(config, method, state, state_shardings):
    """Continual pretraining: both backbones start from a local PyTorch file.

    `config.init.weights` is a timm / torchvision / DINOv2 `.safetensors` or `.pth`;
    `config.init.first_layer` is 'reinit' (SoftCon's choice when the band count differs) or
    'from_rgb'. DINOv2's position embedding is resampled to `config.data.image_size`.
    """
    from softcon_jax import interop  # reading .pth needs torch, imported lazily there

    kwargs = config.model.get("backbone_kwargs", {}).to_dict()
    img_size = kwargs.pop("img_size", config.data.image_size)
    _, variables = interop.import_torch(
        config.init.weights, config.model.backbone, config.data.in_channels,
        first_layer=config.init.get("first_layer", "reinit"), img_size=img_size,
        seed=config.seed, **kwargs)
    params, model_state = method.with_backbone(state.params, state.model_state, variables)
    # Optimizer state is zeros for every optimizer here, so it stays valid.
    return jax.device_put(state.replace(params=params, model_state=model_state),
                          state_shardings)


# ==== Train step ==========================================================================

def _microbatches(x, num: int, mesh):
    """(B, ...) -> (num, B/num, ...) with strided rows, so each device keeps its share."""
    x = x.reshape((x.shape[0] // num, num) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES)))


def make_train_step(config, method, tx, schedule, mesh):
    """Returns `train_step(state, batch) -> (state, metrics)`; the caller jits it."""
    accum = int(config.get("grad_accum_steps", 1))
    base_key = jax.random.key(config.seed)

    def loss_and_grads(params, model_state, batch, rng, step):
        grad_fn = jax.value_and_grad(method.loss, has_aux=True)
        if accum == 1:
            (loss, (model_state, metrics)), grads = grad_fn(params, model_state, batch, rng,
                                                            step)
            return loss, grads, model_state, metrics

        # Gradient accumulation: each micro-batch is its own contrastive batch (its
        # negatives are the micro-batch's), gradients are averaged.
        def body(carry, xs):
            grads_sum, model_state, i = carry
            (loss, (model_state, metrics)), grads = grad_fn(
                params, model_state, xs, jax.random.fold_in(rng, i), step)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, model_state, i + 1), (loss, metrics)

        micro = jax.tree.map(lambda x: _microbatches(x, accum, mesh), batch)
        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, model_state, _), (loss, metrics) = jax.lax.scan(
            body, (zeros, model_state, 0), micro)
        grads = jax.tree.map(lambda g: g / accum, grads)
        return loss.mean(), grads, model_state, jax.tree.map(jnp.mean, metrics)

    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(base_key, state.step)
        loss, grads, model_state, metrics = loss_and_grads(
            state.params, state.model_state, batch, rng, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        model_state, method_metrics = method.after_update(params, model_state, state.step)

        # Numerical guard: a non-finite loss or gradient is never applied. The host then
        # stops or goes on, as config.nonfinite says (see the loop).
        grad_norm = optax.tree.norm(grads)
        # The update too: a finite gradient times an overflowing learning rate is not.
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optax.tree.norm(updates)))
        updated = state.replace(params=params, opt_state=opt_state, model_state=model_state)
        state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
        state = state.replace(step=state.step + 1,
                              num_nonfinite=state.num_nonfinite + (~finite).astype(jnp.int32))
        metrics = {**metrics, **method_metrics, "loss/total": loss,
                   "train/lr": schedule(state.step - 1), "train/grad_norm": grad_norm}
        return state, metrics

    return train_step


def jit_train_step(config, method, tx, schedule, mesh, state_shardings):
    """Sharded, donated train step: state keeps its layout, the batch is split over devices."""
    return jax.jit(make_train_step(config, method, tx, schedule, mesh),
                   in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))


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
        raise RuntimeError(
            f"Cannot move this input pipeline to batch {step} ({e!r}); resume on the process "
            "count the checkpoint was written with.") from e


@jax.jit
def _window_mean(window: list[dict]) -> dict:
    """Mean of each metric over the steps since the last log line (one device program)."""
    return jax.tree.map(lambda *m: jnp.mean(jnp.stack(m)), *window)


# ==== Preemption ==========================================================================

class _SigtermFlag:
    """Turns SIGTERM (a preemption notice) into a flag the loop polls between steps."""

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting.")
        self.received = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class NonFiniteError(RuntimeError):
    pass


# ==== The run =============================================================================

def ensure_synthetic_data(data_config, key="config.data.synthetic"):
    """Writes the built-in synthetic dataset first when the config asks for one.

    `config.data.synthetic` (a dict of `data_prep.synthetic.write_dataset` arguments and
    `enabled`) makes the quickstart self-contained; it never overwrites other data (see
    `data_prep.synthetic.ensure_synthetic_dataset`).
    """
    from data_prep import synthetic  # the converters are not needed otherwise
    synthetic.ensure_synthetic_dataset(data_config.path, data_config.get("synthetic"), key=key)


def validate(config, mesh):
    """Fails early, naming the config key, on settings that cannot work."""
    sharding.check_batch_divides(config.global_batch_size, mesh)
    accum = int(config.get("grad_accum_steps", 1))
    if accum < 1:
        raise ValueError(f"config.grad_accum_steps={accum}; expected a positive integer.")
    if accum > 1:
        sharding.check_batch_divides(config.global_batch_size // accum, mesh,
                                     key="config.global_batch_size / config.grad_accum_steps")
        if config.global_batch_size % accum:
            raise ValueError(f"config.global_batch_size={config.global_batch_size} is not "
                             f"divisible by config.grad_accum_steps={accum}.")
    compute_dtype(config)  # config.model.dtype
    data.view_dtype(config.data.get("dtype"), key="config.data.dtype")
    if config.nonfinite not in ("stop", "skip"):
        raise ValueError(f"config.nonfinite={config.nonfinite!r}; expected 'stop' or 'skip'.")
    if config.global_batch_size % jax.process_count():
        raise ValueError(f"config.global_batch_size={config.global_batch_size} is not "
                         f"divisible by the {jax.process_count()} processes.")


def train(config, workdir: str, *, devices=None) -> TrainState:
    """Runs (or resumes) pretraining in `workdir`; returns the final train state."""
    # --- mesh -----------------------------------------------------------------------------
    distributed.maybe_initialize()
    mesh = sharding.make_mesh(config.mesh, devices)
    validate(config, mesh)
    logging.info("Mesh %s over %d devices, %d processes.", dict(mesh.shape), mesh.size,
                 jax.process_count())

    # --- data -----------------------------------------------------------------------------
    ensure_synthetic_data(config.data)
    # Views leave the host in the model's compute dtype (unless config.data.dtype says
    # otherwise): the first layer casts to it anyway, and bf16 halves the bytes to copy.
    dataset = data.build_dataset(config.data, global_batch_size=config.global_batch_size,
                                 seed=config.seed, process_index=jax.process_index(),
                                 process_count=jax.process_count(),
                                 dtype=config.data.get("dtype") or config.model.dtype)
    data_iter = iter(dataset)

    # --- model and optimizer --------------------------------------------------------------
    method = methods.get(config.method)(config, mesh)
    tx, schedule = optim.make_optimizer(config)
    init_fn, rng, abstract, state_shardings = create_train_state(config, method, tx, mesh)

    # --- checkpoint: resume when the workdir has one --------------------------------------
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep,
                        async_save=config.checkpoint.get("async_save", True))
    start = ckpt.latest_step()
    if start is None:
        state = init_fn(rng)
        start = 0
        if config.get("init") and config.init.get("weights"):
            logging.info("Initialising the backbones from %s.", config.init.weights)
            state = load_pretrained_backbone(config, method, state, state_shardings)
    else:
        logging.info("Resuming from %s/%d.", ckpt.directory, start)
        # The input position is saved per process (process_i-of-n); a checkpoint written
        # by another process count has none for this run (issue 6: resume on another
        # slice size). Then only the train state is restored, see continue_input_at.
        same_layout = ckpt.has_data_state(start)
        state = ckpt.restore(start, abstract_with_shardings(abstract, state_shardings),
                             data_iter if same_layout else None)
        if not same_layout:
            continue_input_at(data_iter, start)

    # --- loop -----------------------------------------------------------------------------
    step_fn = jit_train_step(config, method, tx, schedule, mesh, state_shardings)
    # A background thread reads and places batches on the devices, prefetch_to_device
    # ahead, so this thread only dispatches steps. Its get_state() is the input position
    # of the batches consumed so far: that is what checkpoints store.
    batches = data.DevicePrefetcher(
        data_iter, lambda b: sharding.host_batch_to_global(b, mesh),
        int(config.get("prefetch_to_device", 2)))
    monitor = online_eval.OnlineKNN(config, mesh, method)  # off unless config.eval asks
    writer = MetricWriter(workdir)
    progress = Progress(config.total_steps, config.global_batch_size, start)
    # One process: a Python SIGTERM handler sets a flag. Several: JAX's preemption service
    # (started by jax.distributed.initialize) owns SIGTERM and makes all processes stop at
    # the same step (ckpt.reached_preemption). A Python handler would replace its C++ one,
    # and the notice would be swallowed: no process would stop or save (issue 6 test).
    sigterm = _SigtermFlag() if jax.process_count() == 1 else None
    stop_after = config.get("stop_after_step") or None
    last_good = ckpt.latest_step()
    # config.debug_transfer_guard ('log' | 'disallow'; issue 6): the loop runs under
    # jax.transfer_guard, so an implicit host<->device transfer in it is logged or raises.
    # Batches go in with make_array_from_process_local_data, metrics come out with
    # jax.device_get: both explicit. Set-up (init, restore) is outside the guard.
    guard = contextlib.ExitStack()
    if config.get("debug_transfer_guard"):
        guard.enter_context(jax.transfer_guard(config.debug_transfer_guard))

    def check_finite(step, bad=None):
        if bad is None:
            bad = int(jax.device_get(state.num_nonfinite))
        if bad and config.nonfinite == "stop":
            raise NonFiniteError(
                f"Non-finite loss or gradient in {bad} step(s) up to step {step}; those "
                f"updates were not applied. Stopping (config.nonfinite='stop'). The last good "
                f"checkpoint is step {last_good} in {ckpt.directory}.")
        return bad

    def save(step):
        nonlocal last_good
        check_finite(step)
        ckpt.save(step, state, batches, config)
        last_good = step

    try:
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
                metrics, bad = jax.device_get((_window_mean(window), state.num_nonfinite))
                window.clear()
                timing = progress.timing(step)
                bad = check_finite(step, int(bad))
                writer.write_scalars(step, {**metrics, **timing, "train/nonfinite_steps": bad})
                progress.report(step, float(metrics["loss/total"]), timing)
            # Every process runs it: the kNN forward is one jitted function over the mesh.
            if scalars := monitor.maybe_run(step, state):
                writer.write_scalars(step, scalars)

            preempted = (ckpt.reached_preemption(step) if jax.process_count() > 1
                         else sigterm.received)
            if preempted or step == stop_after:
                save(step)
                ckpt.wait()
                logging.info("Stopped at step %d (%s); checkpoint saved. Run again with the "
                             "same --workdir to resume.", step,
                             "preemption" if preempted else "config.stop_after_step")
                return state
            if step % config.checkpoint.every_steps == 0 or step == config.total_steps:
                save(step)
        ckpt.wait()
        if progress.first_loss is not None:
            logging.info("Finished at step %d: loss %.4f (first logged: %.4f).", step,
                         progress.last_loss, progress.first_loss)
        return state
    finally:
        guard.close()
        batches.close()
        if sigterm is not None:
            sigterm.restore()
        ckpt.wait()
        ckpt.close()
        writer.close()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    metrics_lib.quiet_library_logs()
    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
