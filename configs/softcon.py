"""SoftCon continual pretraining on SSL4EO-S12 (the paper's setting, as far as it is public).

    python -m softcon_jax.train --config configs/softcon.py:vits14,s2c --workdir gs://.../run
    # arg = "<rn50|vits14|vitb14>,<s2c|s2a|s1>[,baseline][,runlocal]"
    #   s2c: 13 bands, s2a: 12, s1: 2 (VV, VH)
    #   baseline: the plain MoCo-v3 seasonal baseline (InfoNCE, no label softening)
    #   runlocal: tiny backbone on built-in synthetic data, a few steps on a CPU

Start from DINO/DINOv2 weights with `--config.init.weights=/path/dinov2_vits14.pth`: the
backbone is imported with `softcon_jax.interop.import_torch` and the first layer is
re-initialised for the band count. Optimiser and schedule follow the MoCo-v3 recipe
(zhu-xlab/SSL4EO-S12 MoCo-v3): MoCo-v3's LARS for ResNet, AdamW for ViT, weight decay on
every parameter, 10 warm-up epochs of 100. docs/fidelity.md lists where this
recipe follows the reference and where it differs on purpose.
"""

import ml_collections

from configs import common
from softcon_jax import defaults

# name -> (registered backbone, architecture fields)
BACKBONES = {
    "rn50": ("resnet50", lambda: common.resnet_kwargs("bottleneck", (3, 4, 6, 3))),
    "vits14": ("vit_small_patch14_dinov2", lambda: common.vit_kwargs(384, 12, 6)),
    "vitb14": ("vit_base_patch14_dinov2", lambda: common.vit_kwargs(768, 12, 12)),
}
CHANNELS = {"s2c": 13, "s2a": 12, "s1": 2}
NUM_LOCATIONS = 250_000  # SSL4EO-S12


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = common.parse_arg(arg, "configs/softcon.py", backbone=("vits14", "rn50", "vitb14"),
                         modality=("s2c", "s2a", "s1"), baseline=False, runlocal=False)
    vit = a.backbone != "rn50"

    c = ml_collections.ConfigDict()
    c.method = "softcon"
    batch, epochs, warmup_epochs = 4096, 100, 10
    steps_per_epoch = NUM_LOCATIONS // batch
    common.run_block(c, batch=batch, steps=epochs * steps_per_epoch, checkpoint_every=500)

    c.data = defaults.data()
    c.data.path = f"gs://YOUR_BUCKET/ssl4eo_s12/{a.modality}"
    c.data.image_size = 224
    c.data.in_channels = CHANNELS[a.modality]
    c.data.stats = a.modality
    c.data.normalization = "softcon"
    # Kept different from the reference on purpose: the two views come from two *distinct*
    # seasons, because the labels are per season and the soft target compares them.
    # SSL4EO-S12 MoCo-v3 season='augment' draws them independently (they can coincide,
    # about once in 4): --config.data.season_sampling=independent.
    c.data.season_sampling = "distinct"
    # Floats in training (no quantisation noise); the SSL4EO-S12 / SoftCon normalize()
    # truncates to uint8 first: --config.data.quantize_uint8=True (at most 1/255 apart).
    c.data.quantize_uint8 = False
    c.data.num_workers = 16
    # The accelerator crops, jitters, blurs and normalises (same views as on the host);
    # the host only reads, decodes and draws: several times more samples per host core
    # (BENCHMARKS.md, "Augmentations on the device"). 'host' for the NumPy path.
    c.data.augment_on = "device"

    c.model = ml_collections.ConfigDict()
    name, kwargs = BACKBONES[a.backbone]
    c.model.backbone = name
    c.model.backbone_kwargs = kwargs()
    c.model.dtype = "bfloat16"
    c.model.remat = False  # True: recompute block activations in the backward (less memory)
    c.model.batch_norm = "sync"
    c.model.mask_ratio = 0.0  # Siamese masking of student patch tokens (ViT only)
    # MoCo-v3: ResNet projector has 2 layers and a predictor without last BN; ViT 3 and with.
    c.model.projector = ml_collections.ConfigDict(dict(
        hidden_dim=4096, out_dim=256, num_layers=3 if vit else 2, last_bn=True))
    c.model.predictor = ml_collections.ConfigDict(dict(
        hidden_dim=4096, out_dim=256, num_layers=2, last_bn=vit))

    # pos_embed_interpolation: 'timm' (what timm and torchgeo load) or 'dinov2' (DINOv2's
    # own interpolate_pos_encoding, interpolate_offset=0.1) for a DINOv2 file at 224 px.
    c.init = ml_collections.ConfigDict(dict(weights="", first_layer="reinit",
                                            pos_embed_interpolation="timm"))

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "infonce" if a.baseline else "soft_contrastive"
    c.loss.temperature = 0.2 if vit else 1.0
    c.loss.moco_scale = True  # multiply by 2 x temperature, as MoCo-v3
    c.loss.num_chunks = 1     # > 1: blockwise logits for very large global batches
    c.loss.kwargs = ml_collections.ConfigDict(
        {} if a.baseline else dict(soft_weight=1.0, variant="soft_ce"))

    # decay_mask='all': MoCo-v3 (facebookresearch/moco-v3 main_moco.py, and SSL4EO-S12's
    # copy) builds AdamW and LARS on model.parameters() with one weight decay, so every
    # parameter is decayed by AdamW; its LARS itself skips 1-d parameters (biases, norms).
    # 'no_bias_norm' is timm's convention (no decay on biases, norms, tokens, LayerScale).
    if vit:
        c.optimizer = ml_collections.ConfigDict(dict(
            name="adamw", lr=1.5e-4, lr_scale_batch=256, weight_decay=0.1, b1=0.9, b2=0.95,
            grad_clip_norm=0.0, decay_mask="all"))
    else:
        # 'lars_moco' is MoCo-v3's LARS (lr applied after the momentum buffer); 'lars' is
        # optax.lars (lr before it), which differs under the warm-up.
        c.optimizer = ml_collections.ConfigDict(dict(
            name="lars_moco", lr=0.6, lr_scale_batch=0, weight_decay=1e-6, momentum=0.9,
            grad_clip_norm=0.0, decay_mask="all"))
    c.schedule = ml_collections.ConfigDict(dict(
        name="cosine", warmup_steps=warmup_epochs * steps_per_epoch, end_factor=0.0))
    c.teacher = ml_collections.ConfigDict(dict(momentum=0.99, momentum_end=1.0))

    if a.runlocal:
        common.runlocal(c, f"softcon_{a.backbone}_{a.modality}", modality=a.modality,
                        in_channels=CHANNELS[a.modality])
    return c
