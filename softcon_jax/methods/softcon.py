"""SoftCon: MoCo-v3-style student/teacher trained with the soft contrastive loss.

Student = backbone + projector + predictor, sees (optionally patch-masked) views.
Teacher = EMA copy of backbone + projector, sees the other view unmasked, no gradient.
The loss is symmetric over the two views: L(q1, k2) + L(q2, k1), each evaluated over keys
gathered from every device, with land-cover labels softening the targets
(`softcon_jax.losses.soft_contrastive`; our reading of Wang, Albrecht, Zhu 2024).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from softcon_jax import losses, models
from softcon_jax.data import augment
from softcon_jax.data.views import NUM_CLASSES, Views, register_views
from softcon_jax.methods import common
from softcon_jax.optim import teacher_momentum
from softcon_jax.cli import UserValueError


@register_views("softcon")
class SoftConViews(Views):
    """Two views from two random seasons, each with its season's labels.

    The seasons are distinct by default (``season_sampling='distinct'``), or drawn
    independently (``'independent'``, as SSL4EO-S12 MoCo-v3 ``season='augment'``).
    Keys: ``view1``, ``view2`` (S, S, C) in the pipeline's dtype; ``labels1``, ``labels2`` (9,)
    float32 multi-hot (all zeros for an unlabelled season).
    """

    # MoCo-v3 template used by SoftCon (zhu-xlab/SSL4EO-S12 pretrain_moco_v3_s2c.py): the
    # crop first; RandomBrightness(0.4) then RandomContrast(0.4) (one factor for all bands,
    # contrast around each band's mean) p=0.8; ToGray (band mean) p=0.2; blur p=1.0 for
    # view 1, 0.1 for view 2; flip.
    augment_defaults = augment.AugmentParams(crop_scale=(0.08, 1.0), blur_prob=(1.0, 0.1),
                                             per_band_jitter=False, jitter_order="fixed")
    # Distinct on purpose: the labels are per season, and two different seasons make the
    # views' soft targets differ; SSL4EO-S12 MoCo-v3 season='augment' is 'independent'.
    default_season_sampling = "distinct"

    @classmethod
    def element_spec(cls, size, channels, dtype=np.float32):
        image, labels = ((size, size, channels), dtype), ((NUM_CLASSES,), np.float32)
        return {"view1": image, "view2": image, "labels1": labels, "labels2": labels}

    def layout(self):
        return {"view1": ("season1", False, self._blur(0)),
                "view2": ("season2", False, self._blur(1))}

    def plan(self, example: dict, rng: np.random.Generator):
        t = example["image"].shape[0]
        s1, s2 = self._seasons(rng, t, 2)
        return ({"season1": self._image(example, s1), "season2": self._image(example, s2)},
                {"labels1": example["labels"][s1].astype(np.float32),
                 "labels2": example["labels"][s2].astype(np.float32)})


@common.METHODS.register("softcon")
class SoftCon:
    """See module docstring and `softcon_jax.methods` for the interface."""

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        m = config.model
        dtype = common.compute_dtype(config)
        groups = common.bn_groups(config, mesh)

        def make_backbone():
            return models.build_backbone(m.backbone, in_channels=config.data.in_channels,
                                         dtype=dtype, bn_groups=groups,
                                         remat=bool(m.get("remat", False)),
                                         **m.get("backbone_kwargs", {}).to_dict())

        def mlp(c):
            return models.heads.MoCoV3MLP(hidden_dim=c.hidden_dim, out_dim=c.out_dim,
                                          num_layers=c.num_layers, last_bn=c.last_bn,
                                          bn_groups=groups, dtype=dtype)

        self.backbone = make_backbone()
        self.student = common.Encoder(make_backbone(), mlp(m.projector), mlp(m.predictor))
        self.teacher = common.Encoder(make_backbone(), mlp(m.projector))
        self.loss_fn = losses.get(config.loss.name)
        self.mask_ratio = float(m.get("mask_ratio", 0.0))
        if self.mask_ratio and not hasattr(self.backbone, "num_patches"):
            raise UserValueError(f"config.model.mask_ratio={self.mask_ratio} needs a ViT backbone; "
                                 f"{m.backbone!r} has no patch tokens.")

    views = SoftConViews  # the batch contract: what the data pipeline yields per sample

    def example_batch(self, n: int) -> dict:
        """Zeros shaped like a batch of n samples (the views' element spec)."""
        return common.example_batch(self.views, self.config, n)

    # --- state -------------------------------------------------------------------------

    def init(self, rng, batch):
        x = batch["view1"]
        student_vars = self.student.init(rng, x, train=False)
        params = student_vars["params"]
        # MoCo-v3 starts the teacher as an exact copy of the student.
        teacher = {"params": {k: params[k] for k in ("backbone", "projector")}}
        model_state = {"teacher": teacher}
        if "batch_stats" in student_vars:
            bs = student_vars["batch_stats"]
            model_state["batch_stats"] = bs
            teacher["batch_stats"] = {k: bs[k] for k in ("backbone", "projector") if k in bs}
        return params, model_state

    def with_backbone(self, params, model_state, variables):
        """Student and teacher backbones start from `variables` (continual pretraining)."""
        return common.with_backbone(params, model_state, variables, "teacher")

    def backbone_variables(self, model_state, params, which: str = "teacher"):
        return common.backbone_variables(params, model_state, "teacher", which)

    # --- step --------------------------------------------------------------------------

    def _forward(self, module, variables, x, keep_indices=None):
        """Train-mode forward; returns (features, embedding, new batch_stats or None)."""
        if "batch_stats" in variables:
            (feats, z), new = module.apply(variables, x, train=True, keep_indices=keep_indices,
                                           mutable=["batch_stats"])
            return feats, z, new["batch_stats"]
        feats, z = module.apply(variables, x, train=True, keep_indices=keep_indices)
        return feats, z, None

    def loss(self, params, model_state, batch, rng, step):
        c = self.config
        x1, x2 = batch["view1"], batch["view2"]
        l1, l2 = batch["labels1"], batch["labels2"]
        keep1 = keep2 = None
        if self.mask_ratio:
            r1, r2 = jax.random.split(rng)
            n, p = x1.shape[0], self.backbone.num_patches
            keep1 = models.random_keep_indices(r1, n, p, self.mask_ratio)
            keep2 = models.random_keep_indices(r2, n, p, self.mask_ratio)

        # Student: both views in sequence, threading BN running statistics like PyTorch.
        student_vars = {"params": params}
        if "batch_stats" in model_state:
            student_vars["batch_stats"] = model_state["batch_stats"]
        _, q1, bs = self._forward(self.student, student_vars, x1, keep1)
        if bs is not None:
            student_vars = {**student_vars, "batch_stats": bs}
        _, q2, bs = self._forward(self.student, student_vars, x2, keep2)

        # Teacher: unmasked, in train mode (batch statistics), no gradient.
        teacher_vars = model_state["teacher"]
        _, k1, tbs = self._forward(self.teacher, teacher_vars, x1)
        if tbs is not None:
            teacher_vars = {**teacher_vars, "batch_stats": tbs}
        _, k2, tbs = self._forward(self.teacher, teacher_vars, x2)
        k1, k2 = jax.lax.stop_gradient(k1), jax.lax.stop_gradient(k2)

        def pair(q, k, lq, lk):
            return common.gathered_loss(
                self.loss_fn, self.mesh, q.astype(jnp.float32), k.astype(jnp.float32),
                extra_local={"labels_q": lq}, extra_gathered={"labels_k": lk},
                options=c.loss.get("kwargs", {}).to_dict(), temperature=c.loss.temperature,
                num_chunks=c.loss.get("num_chunks", 1))

        loss_12, loss_21 = pair(q1, k2, l1, l2), pair(q2, k1, l2, l1)
        loss = loss_12 + loss_21
        if c.loss.get("moco_scale", True):
            loss = loss * 2.0 * c.loss.temperature  # MoCo-v3's 2*tau factor

        new_state = dict(model_state)
        if bs is not None:
            new_state["batch_stats"] = bs
        if tbs is not None:
            new_state["teacher"] = {**model_state["teacher"], "batch_stats": tbs}
        metrics = {"loss/view1_to_view2": loss_12, "loss/view2_to_view1": loss_21,
                   **common.health_metrics(q1, k2)}
        return loss, (new_state, metrics)

    def after_update(self, params, model_state, step):
        m = teacher_momentum(self.config, step)
        student = {k: params[k] for k in ("backbone", "projector")}
        teacher = dict(model_state["teacher"])
        teacher["params"] = common.ema(teacher["params"], student, m)
        return {**model_state, "teacher": teacher}, {"teacher_momentum": m}
