"""Optimizers and learning-rate schedules, chosen by name from `config.optimizer` / `config.schedule`.

Optimizers (`config.optimizer.name`):
- `adamw`: `optax.adamw`, the update of `torch.optim.AdamW` (decoupled decay lr * wd * p).
- `sgd`: decay added to the gradient, then heavy-ball momentum, then the learning rate
  (`torch.optim.SGD` with `weight_decay`, dampening 0).
- `lars_moco`: the LARS of MoCo-v3 (facebookresearch/moco-v3 `optimizer.py`, copied by
  zhu-xlab/SSL4EO-S12), see `lars_moco`.
- `lars`: `optax.lars`, which scales by the learning rate *before* the momentum buffer
  (with a warm-up its updates differ from MoCo-v3's LARS).

Weight decay applies where `config.optimizer.decay_mask` says (`DECAY_MASKS`):
`all` decays every parameter, as the official SeCo SGD and MoCo-v3 AdamW (both built on
`model.parameters()` with one weight decay); `no_bias_norm` (the default when the key is
absent) skips biases, norms, LayerScale and the ViT tokens, timm's convention.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from softcon_jax.registry import Registry
from softcon_jax.cli import UserValueError

# timm's convention: these embeddings get no weight decay, like norms and biases.
_NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token")


def decay_mask(params):
    """True where weight decay applies: kernels only, not norms, biases, LayerScale or tokens.

    The `no_bias_norm` mask; `decay_all` is the `all` one.
    """

    def wants_decay(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        if any(n in _NO_DECAY_NAMES for n in names):
            return False
        return leaf.ndim > 1

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def decay_all(params):
    """True for every parameter (the `all` mask)."""
    return jax.tree.map(lambda _: True, params)


DECAY_MASKS: Registry[Callable] = Registry("weight-decay mask", "config.optimizer.decay_mask")
DECAY_MASKS.register("all", decay_all)
DECAY_MASKS.register("no_bias_norm", decay_mask)


def get_decay_mask(c) -> Callable:
    """The mask function named by `config.optimizer.decay_mask` (default `no_bias_norm`)."""
    return DECAY_MASKS.get(c.get("decay_mask", "no_bias_norm") or "no_bias_norm")


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


SCHEDULES: Registry[Callable] = Registry("schedule", "config.schedule.name")
for _name, _fn in {"cosine": _cosine, "step": _step, "constant": _constant}.items():
    SCHEDULES.register(_name, _fn)


def make_schedule(config) -> Callable:
    """Linear warm-up from 0 to the peak, then the named decay; returns step -> lr."""
    schedule = SCHEDULES.get(config.schedule.name)
    peak = config.optimizer.lr
    # MoCo-style linear scaling: lr = base_lr * global_batch / 256 when asked for.
    if config.optimizer.get("lr_scale_batch", 0):
        peak = peak * config.global_batch_size / config.optimizer.lr_scale_batch
    warmup = int(config.schedule.get("warmup_steps", 0))
    decay = schedule(config, config.total_steps - warmup)
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    return optax.join_schedules([warm, lambda s: peak * decay(s)], [warmup])


# --- optimizers ------------------------------------------------------------------------

class LarsMocoState(NamedTuple):
    mu: Any  # momentum buffer, like the parameters


def scale_by_lars_moco(weight_decay: float = 0.0, momentum: float = 0.9,
                       trust_coefficient: float = 0.001,
                       weight_decay_mask: Any = None) -> optax.GradientTransformation:
    """MoCo-v3's LARS direction without the learning rate: returns the momentum buffer.

    For a parameter `p` with gradient `g` (facebookresearch/moco-v3 `optimizer.py`):
    if `p.ndim > 1`: `d = g + wd * p`, then `d *= trust_coefficient * |p| / |d|` when both
    norms are positive (else 1); 1-d parameters (biases, norms) keep `d = g`: neither
    decay nor adaptation. `mu = momentum * mu + d` is the output. `weight_decay_mask`
    (pytree or callable) can further restrict the decay; None = every >1-d parameter.
    """

    def init_fn(params):
        return LarsMocoState(mu=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params):
        if params is None:
            raise UserValueError("lars_moco needs the parameters (tx.update(grads, state, params)).")
        mask = weight_decay_mask(params) if callable(weight_decay_mask) else weight_decay_mask
        if mask is None:
            mask = jax.tree.map(lambda _: True, params)

        def direction(g, p, decay):
            if p.ndim <= 1:
                return g
            d = g + weight_decay * p if decay else g
            p_norm, d_norm = jnp.linalg.norm(p), jnp.linalg.norm(d)
            q = jnp.where((p_norm > 0) & (d_norm > 0), trust_coefficient * p_norm / d_norm,
                          1.0)
            return d * q.astype(d.dtype)

        d = jax.tree.map(direction, updates, params, mask)
        mu = jax.tree.map(lambda m, x: momentum * m + x, state.mu, d)
        return mu, LarsMocoState(mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def lars_moco(learning_rate, weight_decay: float = 0.0, momentum: float = 0.9,
              trust_coefficient: float = 0.001,
              weight_decay_mask: Any = None) -> optax.GradientTransformation:
    """MoCo-v3 LARS: `p -= lr * mu`, the learning rate applied *after* the momentum buffer
    (`scale_by_lars_moco`), so a warm-up changes only the step size of the buffer, not
    what is accumulated in it. `optax.lars` scales by lr before its momentum instead."""
    return optax.chain(
        scale_by_lars_moco(weight_decay, momentum, trust_coefficient, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate))


def _adamw(c, lr):
    return optax.adamw(lr, b1=c.get("b1", 0.9), b2=c.get("b2", 0.999),
                       eps=c.get("eps", 1e-8), weight_decay=c.weight_decay,
                       mask=get_decay_mask(c))


def _lars(c, lr):
    # optax's LARS (lr before momentum); no decay and no trust ratio where the mask is False.
    mask = get_decay_mask(c)
    return optax.lars(lr, weight_decay=c.weight_decay, momentum=c.get("momentum", 0.9),
                      weight_decay_mask=mask, trust_ratio_mask=mask)


def _lars_moco(c, lr):
    # 1-d parameters get neither decay nor adaptation whatever the mask (the official rule).
    return lars_moco(lr, weight_decay=c.weight_decay, momentum=c.get("momentum", 0.9),
                     trust_coefficient=c.get("trust_coefficient", 0.001),
                     weight_decay_mask=get_decay_mask(c))


def _sgd(c, lr):
    return optax.chain(optax.add_decayed_weights(c.weight_decay, mask=get_decay_mask(c)),
                       optax.sgd(lr, momentum=c.get("momentum", 0.9),
                                 nesterov=c.get("nesterov", False)))


OPTIMIZERS: Registry[Callable] = Registry("optimizer", "config.optimizer.name")
for _name, _fn in {"adamw": _adamw, "lars": _lars, "lars_moco": _lars_moco,
                   "sgd": _sgd}.items():
    OPTIMIZERS.register(_name, _fn)


def make_optimizer(config) -> tuple[optax.GradientTransformation, Callable]:
    """Returns (optimizer, schedule) for `config.optimizer` and `config.schedule`."""
    make = OPTIMIZERS.get(config.optimizer.name)
    schedule = make_schedule(config)
    tx = make(config.optimizer, schedule)
    if config.optimizer.get("grad_clip_norm", 0):
        tx = optax.chain(optax.clip_by_global_norm(config.optimizer.grad_clip_norm), tx)
    return tx, schedule


def teacher_momentum(config, step):
    """MoCo-v3/BYOL cosine ramp of the EMA momentum from `start` to `end` over the run."""
    start = config.teacher.momentum
    end = config.teacher.get("momentum_end", 1.0)
    progress = jnp.minimum(step / max(config.total_steps, 1), 1.0)
    return end - (end - start) * (jnp.cos(math.pi * progress) + 1) / 2
