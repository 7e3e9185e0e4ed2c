"""Pieces both methods share: the encoder wrapper, the gathered loss, EMA, health metrics."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from softcon_jax import losses
from softcon_jax.registry import Registry
from softcon_jax.sharding import BATCH_AXES
from softcon_jax.cli import UserValueError

# Method classes by `config.method`; each method module registers its class.
METHODS: Registry[type] = Registry("method", "config.method")


class Encoder(nn.Module):
    """backbone -> projector [-> predictor]; returns (features, embedding)."""

    backbone: nn.Module
    projector: nn.Module
    predictor: nn.Module | None = None

    def __call__(self, x, *, train: bool, keep_indices=None):
        if keep_indices is None:
            feats = self.backbone(x, train=train)
        else:
            feats = self.backbone(x, train=train, keep_indices=keep_indices)
        z = self.projector(feats, train=train)
        if self.predictor is not None:
            z = self.predictor(z, train=train)
        return feats, z


def compute_dtype(config):
    names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if config.model.dtype not in names:
        raise UserValueError(f"config.model.dtype={config.model.dtype!r}; expected one of "
                             f"{sorted(names)}.")
    return names[config.model.dtype]


def bn_groups(config, mesh: Mesh) -> int:
    """'sync' BN: one group (the global batch); 'per_device': one group per batch shard."""
    mode = config.model.get("batch_norm", "sync")
    if mode == "sync":
        return 1
    if mode == "per_device":
        return int(jnp.prod(jnp.array([mesh.shape[a] for a in BATCH_AXES])))
    raise UserValueError(f"config.model.batch_norm={mode!r}; expected 'sync' or 'per_device'.")


def gathered_loss(loss_fn: Callable, mesh: Mesh, q, k, *, q_axis: int = 0, k_axis: int = 0,
                  extra_local=None, extra_gathered=None, extra_replicated=None,
                  options=None, **kwargs):
    """Evaluates `loss_fn` with local rows against columns gathered from every device.

    Inside `shard_map` each device holds its n rows of `q` (batch dimension `q_axis`) and of
    `extra_local` (e.g. the query labels), and all-gathers `k` (batch dimension `k_axis`) and
    `extra_gathered` to N = n x devices columns; `extra_replicated` (e.g. queues) is the same
    on every device. Row i of a device is global sample `axis_index * n + i`. The device
    means are averaged, which is the mean over the global batch; gradients w.r.t. `q` are
    exact (keys get none: the losses stop their gradient). `options` are the user's
    `config.loss.kwargs`, checked strictly (`losses.call`); `kwargs` are offered.
    """
    extra_local, extra_gathered = extra_local or {}, extra_gathered or {}
    extra_replicated = extra_replicated or {}

    def batch_spec(axis):
        return P(*([None] * axis), BATCH_AXES)

    def local(q, k, extra_local, extra_gathered, extra_replicated):
        k_all = jax.lax.all_gather(k, BATCH_AXES, axis=k_axis, tiled=True)
        gathered = jax.tree.map(
            lambda x: jax.lax.all_gather(x, BATCH_AXES, axis=0, tiled=True), extra_gathered)
        offset = jax.lax.axis_index(BATCH_AXES) * q.shape[q_axis]
        value = losses.call(loss_fn, q, k_all, row_offset=offset, **extra_local, **gathered,
                            **extra_replicated, options=options, **kwargs)
        return jax.lax.pmean(value, BATCH_AXES)

    specs = (batch_spec(q_axis), batch_spec(k_axis),
             jax.tree.map(lambda _: batch_spec(0), extra_local),
             jax.tree.map(lambda _: batch_spec(0), extra_gathered),
             jax.tree.map(lambda _: P(), extra_replicated))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(
        q, k, extra_local, extra_gathered, extra_replicated)


def with_backbone(params, model_state, variables, ema_key: str):
    """Trainable and EMA backbones (`model_state[ema_key]`) both start from `variables`."""
    params = {**params, "backbone": variables["params"]}
    ema_vars = {**model_state[ema_key]}
    ema_vars["params"] = {**ema_vars["params"], "backbone": variables["params"]}
    model_state = {**model_state, ema_key: ema_vars}
    if "batch_stats" in variables:
        stats = variables["batch_stats"]
        model_state["batch_stats"] = {**model_state["batch_stats"], "backbone": stats}
        ema_vars["batch_stats"] = {**ema_vars["batch_stats"], "backbone": stats}
    return params, model_state


def backbone_variables(params, model_state, ema_key: str, which: str):
    """{'params', 'batch_stats'?} of the EMA ('teacher') or trained ('student') backbone."""
    if which == "teacher":
        src_params = model_state[ema_key]["params"]
        src_stats = model_state[ema_key].get("batch_stats", {})
    elif which == "student":
        src_params, src_stats = params, model_state.get("batch_stats", {})
    else:
        raise UserValueError(f"which={which!r}; expected 'teacher' or 'student'.")
    variables = {"params": src_params["backbone"]}
    if "backbone" in src_stats:
        variables["batch_stats"] = src_stats["backbone"]
    return variables


def ema(teacher, student, momentum):
    return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, teacher, student)


def _normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def health_metrics(z_a, z_b, max_samples: int = 512) -> dict:
    """Alignment and uniformity (Wang & Isola 2020) of normalised embeddings of two views.

    alignment = E ||a_i - b_i||^2 (lower: views agree); uniformity = log E exp(-2 ||a_i -
    a_j||^2) over pairs i != j (lower: embeddings spread; near 0 means collapse).
    """
    a, b = _normalize(z_a.astype(jnp.float32)), _normalize(z_b.astype(jnp.float32))
    alignment = jnp.mean(jnp.sum((a - b) ** 2, axis=-1))
    s = a[:max_samples]
    sq = jnp.maximum(2.0 - 2.0 * s @ s.T, 0.0)
    n = s.shape[0]
    off = ~jnp.eye(n, dtype=bool)
    uniformity = jnp.log(jnp.sum(jnp.where(off, jnp.exp(-2.0 * sq), 0.0)) / (n * (n - 1)))
    return {"health/alignment": alignment, "health/uniformity": uniformity}


def example_batch(views, config, n: int) -> dict:
    """Zeros of a batch of `n` samples as `views.element_spec` describes them (float32)."""
    spec = views.element_spec(int(config.data.image_size), int(config.data.in_channels))
    return {k: jnp.zeros((n,) + tuple(shape), jnp.float32) for k, (shape, _) in spec.items()}
