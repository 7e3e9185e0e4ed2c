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
import numpy as np

from softcon_jax import losses, models
from softcon_jax.data import augment
from softcon_jax.data.views import Views, register_views
from softcon_jax.methods import common
from softcon_jax.optim import teacher_momentum
from softcon_jax.cli import UserValueError

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


@register_views("seco")
class SeCoViews(Views):
    """SeCo: t0, t1, t2 random timestamps; q = crop(t0), k0 = aug(t1), k1 = crop(t2),
    k2 = aug(t0). Keys ``q, k0, k1, k2`` (S, S, C).

    The timestamps are drawn with replacement by default (``season_sampling=
    'independent'``: the official ``np.random.choice(paths, 3)``, so they coincide about
    once in T for T timestamps), or distinct (``'distinct'``)."""

    # SeCo (ServiceNow/seasonal-contrast datasets/seco_dataset.py SeasonalContrastMultiAug):
    # `augment` = ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, RandomGrayscale p=0.2, blur p=0.5,
    # flip, on the whole image in [0, 1], on k0 and k2 only; then RandomResizedCrop(224,
    # scale 0.2-1) on every view, ToTensor and ImageNet normalisation last.
    # (rgb: these are the values for B4, B3, B2 input; other band sets get hue 0.)
    augment_defaults = augment.AugmentParams(
        crop_scale=(0.2, 1.0), blur_prob=(0.5,), saturation=0.4, hue=0.1,
        per_band_jitter=False, augment_before_crop=True, rgb=True)
    # The official SeCo draws t0, t1, t2 = np.random.choice(paths, 3): with replacement.
    default_season_sampling = "independent"

    @classmethod
    def element_spec(cls, size, channels, dtype=np.float32):
        image = ((size, size, channels), dtype)
        return {"q": image, **{k: image for k in KEY_VIEWS}}

    def layout(self):
        return {"q": ("t0", True, 0.0), "k0": ("t1", False, self._blur(0)),
                "k1": ("t2", True, 0.0), "k2": ("t0", False, self._blur(1))}

    def plan(self, example: dict, rng: np.random.Generator):
        t0, t1, t2 = self._seasons(rng, example["image"].shape[0], 3)
        return {f"t{i}": self._image(example, t) for i, t in enumerate((t0, t1, t2))}, {}



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
                                         remat=bool(m.get("remat", False)),
                                         **m.get("backbone_kwargs", {}).to_dict())

        def make_encoder():
            return MultiHeadEncoder(make_backbone(), self.num_subspaces, m.head.hidden_dim,
                                    m.head.out_dim, dtype)

        self.backbone = make_backbone()
        self.query_encoder, self.key_encoder = make_encoder(), make_encoder()
        self.loss_fn = losses.get(config.loss.name)
        self.queue_size = int(config.loss.get("queue_size", 0))
        if self.queue_size and self.queue_size % config.global_batch_size:
            raise UserValueError(f"config.loss.queue_size={self.queue_size} must be a multiple of "
                                 f"config.global_batch_size={config.global_batch_size} (FIFO "
                                 "enqueue of whole batches, as in MoCo).")

    views = SeCoViews  # the batch contract: what the data pipeline yields per sample

    def example_batch(self, n: int) -> dict:
        """Zeros shaped like a batch of n samples (the views' element spec)."""
        return common.example_batch(self.views, self.config, n)

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
