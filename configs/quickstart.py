"""Quickstart: a tiny DINOv2-structured ViT, SoftCon loss, built-in synthetic SSL4EO-S12-like data.

    python -m softcon_jax.train --config configs/quickstart.py --workdir runs/quickstart

`get_config("test")` shrinks it further for the test suite. The synthetic dataset is written
to `config.data.path` on first use (13 bands, 4 seasons per location, 9-class labels), only
into an empty directory or one that already holds the same synthetic dataset. To train on a
real converted dataset instead: `--config.data.synthetic.enabled=False
--config.data.path=DIR` (and the same for `config.eval`).
"""

import ml_collections

from configs import common
from softcon_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    test = common.parse_arg(arg, "configs/quickstart.py", test=False).test
    c = ml_collections.ConfigDict()
    c.method = "softcon"
    # 600 steps: the online kNN score of the teacher rises clearly above the random
    # backbone's (step 0) only after ~200 steps at this size (~1.5 min on a 2-core CPU).
    common.run_block(c, batch=16 if test else 64, steps=8 if test else 600,
                     log_every=2 if test else 20, checkpoint_every=4 if test else 200)

    c.data = defaults.data()
    c.data.path = "runs/quickstart/data"
    c.data.image_size = 16 if test else 32
    c.data.in_channels = 13
    c.data.stats = "s2c"
    c.data.normalization = "softcon"
    # The reference crop scale (0.08, 1) would cut 3-pixel crops out of 40-pixel scenes.
    c.data.augment.crop_scale = (0.3, 1.0)
    # Written into c.data.path only if that is empty or holds this same synthetic dataset;
    # train on your own converted data with --config.data.synthetic.enabled=False.
    c.data.synthetic = common.synthetic(
        num_locations=64 if test else 512, num_shards=2 if test else 4,
        image_size=20 if test else 40, timesteps=4, seed=0)

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "vit_small_patch14_dinov2"
    c.model.backbone_kwargs = common.vit_kwargs(
        embed_dim=32 if test else 64, depth=2, num_heads=2, img_size=c.data.image_size,
        patch_size=4 if test else 8,
        # From scratch, DINOv2's LayerScale init (1e-5) leaves the CLS token blind to the
        # input for many steps; 0.1 (as CaiT for shallow models) trains at once.
        init_values=0.1)
    c.model.dtype = "float32"
    c.model.remat = False  # True: recompute block activations in the backward (less memory)
    c.model.batch_norm = "sync"  # or "per_device" (shuffle-BN-like)
    c.model.mask_ratio = 0.0     # Siamese masking of student patch tokens (ViT only)
    dim, hidden = (16, 32) if test else (64, 256)
    c.model.projector = ml_collections.ConfigDict(dict(
        hidden_dim=hidden, out_dim=dim, num_layers=3, last_bn=True))
    c.model.predictor = ml_collections.ConfigDict(dict(
        hidden_dim=hidden, out_dim=dim, num_layers=2, last_bn=False))

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "soft_contrastive"
    c.loss.temperature = 0.2
    c.loss.moco_scale = True  # multiply by 2*temperature, as MoCo-v3
    c.loss.num_chunks = 1     # >1: blockwise logits for very large global batches
    c.loss.kwargs = ml_collections.ConfigDict(dict(soft_weight=1.0, variant="soft_ce"))

    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=2e-3, weight_decay=0.05, b1=0.9, b2=0.999, grad_clip_norm=0.0,
        lr_scale_batch=0))
    c.schedule = ml_collections.ConfigDict(dict(name="cosine", warmup_steps=2 if test else 6,
                                                end_factor=0.0))
    c.teacher = ml_collections.ConfigDict(dict(momentum=0.99, momentum_end=1.0))

    c.checkpoint.async_save = True
    # Online kNN on a held-out synthetic split (written on first use) at step 0 and every
    # 100 steps; 512 bank / 128 query locations keep its noise below the gain it measures.
    if not test:
        c.eval.every_steps = 100
        c.eval.data_path = "runs/quickstart/eval_data"
        c.eval.num_train, c.eval.num_val = 512, 128
        c.eval.synthetic = common.synthetic(num_locations=640, num_shards=1, image_size=40,
                                            timesteps=4, seed=1)
    return c
