"""The train step: loss and gradients (with optional accumulation), update, numerical guard.

`make_train_step` returns the pure function; `jit_train_step` is how the trainer (and the
pod planner) compile it: state shardings in and out, the batch split over the data axes,
the state donated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from softcon_jax import sharding
from softcon_jax.state import TrainState


def _microbatches(x, num: int, mesh):
    """(B, ...) -> (num, B/num, ...) with strided rows, so each device keeps its share."""
    x = x.reshape((x.shape[0] // num, num) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES)))


NONFINITE_INPUT = "train/nonfinite_input"  # metric: 1 for a step whose batch had NaN/inf


def all_finite(batch) -> jax.Array:
    """True when no floating leaf of `batch` holds a NaN or inf (one fused reduction)."""
    flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(batch)
             if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(flags).all() if flags else jnp.array(True)


def make_train_step(config, method, tx, schedule, mesh, preprocess=None):
    """Returns `train_step(state, batch) -> (state, metrics)`; the caller jits it.

    `preprocess` (batch -> batch, e.g. `data.build_device_views` for
    `config.data.augment_on='device'`) runs first, inside the step: each device makes the
    views of its own shard of the batch, with no extra host round trip.
    """
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
        input_finite = all_finite(batch)
        if preprocess is not None:
            batch = jax.lax.with_sharding_constraint(preprocess(batch),
                                                     sharding.batch_sharding(mesh))
            input_finite &= all_finite(batch)
        rng = jax.random.fold_in(base_key, state.step)
        loss, grads, model_state, metrics = loss_and_grads(
            state.params, state.model_state, batch, rng, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        model_state, method_metrics = method.after_update(params, model_state, state.step)

        # Numerical guard: a non-finite input, loss or gradient is never applied. The host
        # then stops or goes on, as config.nonfinite says (see the loop); a non-finite
        # input batch (flagged in the metrics) always stops it, naming the dataset.
        grad_norm = optax.tree.norm(grads)
        # The update too: a finite gradient times an overflowing learning rate is not.
        finite = (input_finite & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optax.tree.norm(updates)))
        updated = state.replace(params=params, opt_state=opt_state, model_state=model_state)
        state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
        state = state.replace(step=state.step + 1,
                              num_nonfinite=state.num_nonfinite + (~finite).astype(jnp.int32))
        metrics = {**metrics, **method_metrics, "loss/total": loss,
                   "train/lr": schedule(state.step - 1), "train/grad_norm": grad_norm,
                   NONFINITE_INPUT: (~input_finite).astype(jnp.float32)}
        return state, metrics

    return train_step


def jit_train_step(config, method, tx, schedule, mesh, state_shardings, preprocess=None):
    """Sharded, donated train step: state keeps its layout, the batch is split over devices."""
    return jax.jit(make_train_step(config, method, tx, schedule, mesh, preprocess),
                   in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))


@jax.jit
def window_mean(window: list[dict]) -> dict:
    """Mean of each metric over the steps since the last log line (one device program)."""
    return jax.tree.map(lambda *m: jnp.mean(jnp.stack(m)), *window)
