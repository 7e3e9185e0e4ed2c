"""Optimizers and learning-rate schedules, chosen by name from `config.optimizer` / `config.schedule`."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

# timm's convention: these embeddings get no weight decay, like norms and biases.
_NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token")


def decay_mask(params):
    """True where weight decay applies: kernels only, not norms, biases, LayerScale or tokens."""

    def wants_decay(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        if any(n in _NO_DECAY_NAMES for n in names):
            return False
        return leaf.ndim > 1

    return jax.tree_util.tree_map_with_path(wants_decay, params)


# --- schedules -------------------------------------------------------------------------

def _cosine(config, total_steps: int) -> Callable:
    return optax.cosine_decay_schedule(1.0, max(total_steps, 1),
                                       alpha=config.schedule.get("end_factor", 0.0))


def _step(config, total_steps: int) -> Callable:
    # Boundaries as fractions of the decay phase (SeCo: epochs 120 and 160 of 200).
    fractions = config.schedule.get("boundaries", (0.6, 0.8))
    factor = config.schedule.get("decay_factor", 0.1)
    return optax.piecewise_constant_schedule(
        1.0, {int(f * total_steps): factor for f in fractions})


def _constant(config, total_steps: int) -> Callable:
    return optax.constant_schedule(1.0)


SCHEDULES = {"cosine": _cosine, "step": _step, "constant": _constant}


def make_schedule(config) -> Callable:
    """Linear warm-up from 0 to the peak, then the named decay; returns step -> lr."""
    name = config.schedule.name
    if name not in SCHEDULES:
        raise ValueError(f"config.schedule.name={name!r} is unknown; available: "
                         f"{sorted(SCHEDULES)}.")
    peak = config.optimizer.lr
    # MoCo-style linear scaling: lr = base_lr * global_batch / 256 when asked for.
    if config.optimizer.get("lr_scale_batch", 0):
        peak = peak * config.global_batch_size / config.optimizer.lr_scale_batch
    warmup = int(config.schedule.get("warmup_steps", 0))
    decay = SCHEDULES[name](config, config.total_steps - warmup)
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    return optax.join_schedules([warm, lambda s: peak * decay(s)], [warmup])


# --- optimizers ------------------------------------------------------------------------

def _adamw(c, lr):
    return optax.adamw(lr, b1=c.get("b1", 0.9), b2=c.get("b2", 0.999),
                       weight_decay=c.weight_decay, mask=decay_mask)


def _lars(c, lr):
    # MoCo-v3 LARS: no decay and no trust-ratio adaptation for norms and biases.
    return optax.lars(lr, weight_decay=c.weight_decay, momentum=c.get("momentum", 0.9),
                      weight_decay_mask=decay_mask, trust_ratio_mask=decay_mask)


def _sgd(c, lr):
    return optax.chain(optax.add_decayed_weights(c.weight_decay, mask=decay_mask),
                       optax.sgd(lr, momentum=c.get("momentum", 0.9),
                                 nesterov=c.get("nesterov", False)))


OPTIMIZERS = {"adamw": _adamw, "lars": _lars, "sgd": _sgd}


def make_optimizer(config) -> tuple[optax.GradientTransformation, Callable]:
    """Returns (optimizer, schedule) for `config.optimizer` and `config.schedule`."""
    name = config.optimizer.name
    if name not in OPTIMIZERS:
        raise ValueError(f"config.optimizer.name={name!r} is unknown; available: "
                         f"{sorted(OPTIMIZERS)}.")
    schedule = make_schedule(config)
    tx = OPTIMIZERS[name](config.optimizer, schedule)
    if config.optimizer.get("grad_clip_norm", 0):
        tx = optax.chain(optax.clip_by_global_norm(config.optimizer.grad_clip_norm), tx)
    return tx, schedule


def teacher_momentum(config, step):
    """MoCo-v3/BYOL cosine ramp of the EMA momentum from `start` to `end` over the run."""
    start = config.teacher.momentum
    end = config.teacher.get("momentum_end", 1.0)
    progress = jnp.minimum(step / max(config.total_steps, 1), 1.0)
    return end - (end - start) * (jnp.cos(math.pi * progress) + 1) / 2
