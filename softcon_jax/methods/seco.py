"""SeCo: seasonal contrast (Manas et al. 2021) with a momentum key encoder and E subspaces.

Query encoder = backbone + E Linear-ReLU-Linear heads; key encoder = its EMA copy. Per
location the pipeline gives q = t0, k0 = aug(t1), k1 = t2, k2 = aug(t0). Subspace e takes
the key view e as positive; its negatives are its queue (when `config.loss.queue_size` > 0)
and, for e > 0, the other views' keys projected by head e, gathered over the global batch
(`softcon_jax.losses.seasonal_infonce`). After each step the positive keys of each subspace
are enqueued (FIFO), as in the reference MoCo-v2 code.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from softcon_jax import losses, models
from softcon_jax.methods import common
from softcon_jax.optim import teacher_momentum

KEY_VIEWS = ("k0", "k1", "k2")


class MultiHeadEncoder(nn.Module):
    """backbone -> E heads; returns (features (B, F), embeddings (E, B, D))."""

    backbone: nn.Module
    num_heads: int
    hidden_dim: int
    out_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        feats = self.backbone(x, train=train)
        heads = [models.heads.SeCoHead(self.hidden_dim, self.out_dim, dtype=self.dtype,
                                       name=f"head{e}")(feats) for e in range(self.num_heads)]
        return feats, jnp.stack(heads)


@common.METHODS.register("seco")
class SeCo:
    """See module docstring and `softcon_jax.methods` for the interface."""

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        m = config.model
        dtype = common.compute_dtype(config)
        groups = common.bn_groups(config, mesh)
        self.num_subspaces = len(KEY_VIEWS)

        def make_backbone():
            return models.build_backbone(m.backbone, in_channels=config.data.in_channels,
                                         dtype=dtype, bn_groups=groups,
                                         **m.get("backbone_kwargs", {}).to_dict())

        def make_encoder():
            return MultiHeadEncoder(make_backbone(), self.num_subspaces, m.head.hidden_dim,
                                    m.head.out_dim, dtype)

        self.backbone = make_backbone()
        self.query_encoder, self.key_encoder = make_encoder(), make_encoder()
        self.loss_fn = losses.get(config.loss.name)
        self.queue_size = int(config.loss.get("queue_size", 0))
        if self.queue_size and self.queue_size % config.global_batch_size:
            raise ValueError(f"config.loss.queue_size={self.queue_size} must be a multiple of "
                             f"config.global_batch_size={config.global_batch_size} (FIFO "
                             "enqueue of whole batches, as in MoCo).")

    def example_batch(self, n: int) -> dict:
        s, c = self.config.data.image_size, self.config.data.in_channels
        image = jnp.zeros((n, s, s, c), jnp.float32)
        return {"q": image, **{k: image for k in KEY_VIEWS}}

    # --- state -------------------------------------------------------------------------

    def init(self, rng, batch):
        init_rng, queue_rng = jax.random.split(rng)
        variables = self.query_encoder.init(init_rng, batch["q"], train=False)
        params = variables["params"]
        # The key encoder starts as an exact copy of the query encoder (MoCo).
        model_state = {"key_encoder": dict(variables)}
        if "batch_stats" in variables:
            model_state["batch_stats"] = variables["batch_stats"]
        if self.queue_size:
            queues = jax.random.normal(queue_rng, (self.num_subspaces, self.queue_size,
                                                   self.config.model.head.out_dim))
            model_state["queues"] = queues / jnp.linalg.norm(queues, axis=-1, keepdims=True)
            model_state["queue_ptr"] = jnp.zeros((), jnp.int32)
        return params, model_state

    def with_backbone(self, params, model_state, variables):
        """Query and key backbones start from `variables` (e.g. ImageNet/DINO weights)."""
        return common.with_backbone(params, model_state, variables, "key_encoder")

    def backbone_variables(self, model_state, params, which: str = "teacher"):
        return common.backbone_variables(params, model_state, "key_encoder", which)

    # --- step --------------------------------------------------------------------------

    @staticmethod
    def _forward(module, variables, x):
        if "batch_stats" in variables:
            (_, z), new = module.apply(variables, x, train=True, mutable=["batch_stats"])
            return z, {**variables, "batch_stats": new["batch_stats"]}
        _, z = module.apply(variables, x, train=True)
        return z, variables

    def loss(self, params, model_state, batch, rng, step):
        c = self.config
        query_vars = {"params": params}
        if "batch_stats" in model_state:
            query_vars["batch_stats"] = model_state["batch_stats"]
        q, query_vars = self._forward(self.query_encoder, query_vars, batch["q"])  # (E, B, D)

        key_vars, per_view = model_state["key_encoder"], []
        for view in KEY_VIEWS:
            z, key_vars = self._forward(self.key_encoder, key_vars, batch[view])
            per_view.append(z)
        # keys[e, j] = key view j projected by head e.
        keys = jax.lax.stop_gradient(jnp.stack(per_view, axis=1).astype(jnp.float32))

        replicated = {}
        if self.queue_size:
            replicated["queues"] = model_state["queues"]
        loss = common.gathered_loss(
            self.loss_fn, self.mesh, q.astype(jnp.float32), keys, q_axis=1, k_axis=2,
            extra_replicated=replicated, temperature=c.loss.temperature,
            num_chunks=c.loss.get("num_chunks", 1), options=c.loss.get("kwargs", {}).to_dict())

        new_state = {**model_state, "key_encoder": key_vars}
        if "batch_stats" in query_vars:
            new_state["batch_stats"] = query_vars["batch_stats"]
        if self.queue_size:
            new_state.update(self._enqueue(model_state, keys))
        positives = keys[jnp.arange(self.num_subspaces), jnp.arange(self.num_subspaces)]
        metrics = {"loss/seasonal_infonce": loss,
                   **common.health_metrics(q[0], positives[0])}
        return loss, (new_state, metrics)

    def _enqueue(self, model_state, keys):
        """FIFO: the positive key of each subspace (keys[e, e]) replaces the oldest entries."""
        e = jnp.arange(self.num_subspaces)
        positives = keys[e, e]
        positives = positives / jnp.linalg.norm(positives, axis=-1, keepdims=True)
        ptr = model_state["queue_ptr"]
        queues = jax.lax.dynamic_update_slice(model_state["queues"], positives, (0, ptr, 0))
        return {"queues": queues,
                "queue_ptr": (ptr + positives.shape[1]) % self.queue_size}

    def after_update(self, params, model_state, step):
        m = teacher_momentum(self.config, step)
        key_vars = dict(model_state["key_encoder"])
        key_vars["params"] = common.ema(key_vars["params"], params, m)
        return {**model_state, "key_encoder": key_vars}, {"teacher_momentum": m}
