"""SeCo pretraining (Manas et al. 2021) on SeCo-100k / SeCo-1M shards.

    python -m softcon_jax.train --config configs/seco.py:rn18 --workdir runs/seco_rn18
    # arg = "<rn18|rn50>[,runlocal]"

Reference recipe (ServiceNow/seasonal-contrast main_pretrain.py, models/moco2_module.py,
datasets/seco_dataset.py): MoCo-v2 key encoder with m = 0.999, 3 subspaces with
Linear-ReLU-Linear heads (hidden 512 for RN18, 2048 for RN50) to 128-d, a 16384-key queue
per subspace, temperature 0.07, SGD lr 0.03 momentum 0.9 wd 1e-4, batch 256, 200 epochs with
the learning rate divided by 10 at epochs 120 and 160, and RGB input (B4, B3, B2) scaled by
SeCo's fixed quantiles. For all 12 bands use `--config.data.bands=None
--config.data.in_channels=12 --config.data.stats=dataset` (quantiles measured on the data:
our extension, not a reference value; the colour jitter then works on the band set, without
hue).
"""

import ml_collections

from configs import common
from softcon_jax import defaults

BACKBONES = {"rn18": ("resnet18", 512, ("basic", (2, 2, 2, 2))),
             "rn50": ("resnet50", 2048, ("bottleneck", (3, 4, 6, 3)))}
NUM_LOCATIONS = 100_000  # SeCo-100k; use ~1M for SeCo-1M
TIMESTAMPS = 5           # SeCo stores 5 acquisitions per location


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = common.parse_arg(arg, "configs/seco.py", backbone=("rn18", "rn50"), runlocal=False)
    name, hidden, (block, stages) = BACKBONES[a.backbone]

    c = ml_collections.ConfigDict()
    c.method = "seco"
    common.run_block(c, batch=256, steps=200 * NUM_LOCATIONS // 256)

    c.data = defaults.data()
    c.data.path = "gs://YOUR_BUCKET/seco_100k"
    c.data.image_size = 224
    c.data.bands = ("B4", "B3", "B2")
    c.data.in_channels = 3
    c.data.normalization = "seco_quantile"
    c.data.stats = "seco"
    # The reference: t0, t1, t2 = np.random.choice(paths, 3), with replacement.
    c.data.season_sampling = "independent"
    # Floats in training; SeCo's reader truncates the quantile-scaled bands to uint8:
    # --config.data.quantize_uint8=True reproduces it (at most 1/255 apart).
    c.data.quantize_uint8 = False
    # Augmentations as SeasonalContrastMultiAug: ColorJitter(0.4, 0.4, 0.4, 0.1), grayscale
    # with luminance weights, on the RGB image in [0, 1] before the crop and the ImageNet
    # normalisation (the 'seco' defaults of softcon_jax.data.pipeline).
    c.data.num_workers = 16
    # The accelerator crops, jitters, blurs and normalises (same views as on the host);
    # the host only reads, decodes and draws: several times more samples per host core
    # (BENCHMARKS.md, "Augmentations on the device"). 'host' for the NumPy path.
    c.data.augment_on = "device"

    c.model = ml_collections.ConfigDict()
    c.model.backbone = name
    c.model.backbone_kwargs = common.resnet_kwargs(block, stages)
    c.model.dtype = "bfloat16"
    c.model.remat = False  # True: recompute block activations in the backward (less memory)
    # The reference shuffles BN across GPUs; per-device statistics reproduce that behaviour.
    c.model.batch_norm = "per_device"
    c.model.head = ml_collections.ConfigDict(dict(hidden_dim=hidden, out_dim=128))

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "seasonal_infonce"
    c.loss.temperature = 0.07
    c.loss.queue_size = 16384
    c.loss.num_chunks = 1
    # False + queues = exactly the reference SeCo loss.
    c.loss.kwargs = ml_collections.ConfigDict(dict(batch_negatives=False))

    # decay_mask='all': the official SeCo (models/moco2_module.py configure_optimizers)
    # builds its SGD on the encoder's and heads' parameters() with weight_decay=1e-4, so
    # every parameter, biases and BatchNorm included, is decayed.
    c.optimizer = ml_collections.ConfigDict(dict(
        name="sgd", lr=0.03, lr_scale_batch=0, weight_decay=1e-4, momentum=0.9,
        grad_clip_norm=0.0, decay_mask="all"))
    c.schedule = ml_collections.ConfigDict(dict(
        name="step", warmup_steps=0, boundaries=(0.6, 0.8), decay_factor=0.1))
    c.teacher = ml_collections.ConfigDict(dict(momentum=0.999, momentum_end=0.999))

    if a.runlocal:
        c.data.synthetic = common.synthetic(modality="seco", timesteps=TIMESTAMPS)
        common.runlocal(c, f"seco_{a.backbone}", modality="seco", in_channels=3)
    return c
