"""What every recipe shares: the argument parser, the run/mesh/checkpoint/eval blocks, and
the `runlocal` shrink (a few seconds on a CPU).

Argument strings are comma-separated tokens, as big_vision's `parse_arg`:

    --config configs/softcon.py:vitb14,s2c,runlocal
    --config configs/seco.py:rn50,steps=100

A token is a choice's value (`vitb14`), a flag's name (`runlocal`), or `key=value`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from softcon_jax import defaults

# The architecture fields of each backbone family; a config lists them all so every one can
# be set from the command line (`--config.model.backbone_kwargs.depth=2`). The values are
# the registered defaults of `softcon_jax.models` (a test checks they agree).
VIT_FIELDS = dict(img_size=224, patch_size=14, mlp_ratio=4.0, init_values=1e-5,
                  drop_path_rate=0.0)
RESNET_WIDTHS = (64, 128, 256, 512)


def parse_arg(arg: str | None, where: str, **spec) -> ml_collections.ConfigDict:
    """Parses `arg` against `spec`: name=(choices...) (first is the default), name=bool,
    or name=<int|float|str> default for `key=value` tokens. Unknown tokens raise ValueError
    naming `where` and the accepted form."""
    out = {k: (v[0] if isinstance(v, tuple) else v) for k, v in spec.items()}
    usage = ",".join(f"<{'|'.join(v)}>" if isinstance(v, tuple) else
                     (f"[{k}]" if isinstance(v, bool) else f"[{k}=...]")
                     for k, v in spec.items())
    for token in filter(None, (t.strip() for t in (arg or "").split(","))):
        key, eq, value = token.partition("=")
        if eq and key in spec and not isinstance(spec[key], tuple):
            kind = type(spec[key]) if spec[key] is not None else str
            try:
                out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
            except ValueError:
                raise ValueError(f"{where}:{arg}: {key}={value!r} is not a {kind.__name__}.") from None
            continue
        choice = [k for k, v in spec.items() if isinstance(v, tuple) and token in v]
        if choice:
            out[choice[0]] = token
        elif isinstance(spec.get(token), bool):
            out[token] = True
        else:
            raise ValueError(f"{where}:{arg}: unknown token {token!r}; expected {usage}.")
    return ml_collections.ConfigDict(out)


def run_block(c: ml_collections.ConfigDict, *, batch: int, steps: int, log_every: int = 50,
              checkpoint_every: int = 1000) -> None:
    """The keys every recipe has: seed, steps, logging, guards, mesh, checkpoints, eval."""
    c.seed = 0
    c.global_batch_size = batch
    c.total_steps = steps
    c.stop_after_step = config_dict.placeholder(int)  # stop early (saving); run again to resume
    c.grad_accum_steps = 1
    c.log_every_steps = log_every
    c.nonfinite = "stop"       # or 'skip': a non-finite step is never applied either way
    c.debug_transfer_guard = config_dict.placeholder(str)  # 'log'|'disallow': implicit copies
    c.prefetch_to_device = 2   # batches placed on the devices ahead, by a thread
    c.imports = ()             # user modules that register losses/backbones/methods/views
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=checkpoint_every, keep=3,
                                                  async_save=True))
    # WORKDIR/lock of a run on another host counts as stale after this long without a
    # heartbeat (shared filesystems); on the same host a dead pid is stale at once.
    c.workdir_lock_stale_after_s = 600.0
    c.eval = defaults.online_eval()  # set eval.data_path to a held-out split to enable


def vit_kwargs(embed_dim: int, depth: int, num_heads: int, **overrides) -> ml_collections.ConfigDict:
    """Every ViT architecture field, DINOv2 values unless overridden."""
    return ml_collections.ConfigDict({
        **VIT_FIELDS, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
        # None (XLA) or 'cudnn' (flash attention, NVIDIA GPUs in bf16)
        "attention": config_dict.placeholder(str), **overrides})


def resnet_kwargs(block: str, stage_sizes: tuple, **overrides) -> ml_collections.ConfigDict:
    """Every ResNet architecture field (torchvision values unless overridden)."""
    return ml_collections.ConfigDict({"block": block, "stage_sizes": tuple(stage_sizes),
                                      "widths": RESNET_WIDTHS, **overrides})


synthetic = defaults.synthetic


def runlocal(c: ml_collections.ConfigDict, workdir_name: str, *, modality: str,
             in_channels: int) -> None:
    """Shrinks a recipe to seconds on a CPU: tiny backbone, synthetic data, a few steps.

    Everything but the sizes stays the recipe's (method, loss, optimizer kind, schedule
    kind, augmentations), so a `runlocal` run exercises the real code path.
    """
    c.total_steps = 6
    c.global_batch_size = 16
    c.log_every_steps = 2
    c.checkpoint.every_steps = 3
    c.checkpoint.async_save = False
    c.model.dtype = "float32"
    c.data.path = f"runs/{workdir_name}_runlocal/data"
    c.data.image_size = 16
    c.data.in_channels = in_channels
    c.data.num_workers = 0
    c.data.augment.crop_scale = (0.3, 1.0)  # tiny scenes: the reference 0.08 cuts 1-pixel crops
    timesteps = c.data.synthetic.timesteps if c.data.synthetic.enabled else 4
    c.data.synthetic = synthetic(modality=modality, num_locations=64, image_size=20,
                                 timesteps=timesteps)
    kw = c.model.backbone_kwargs
    if "embed_dim" in kw:  # ViT
        kw.update(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                  init_values=0.1)
    else:
        kw.update(stage_sizes=(1, 1, 1, 1), widths=(8, 16, 16, 32))
    for head in ("projector", "predictor", "head"):
        if head in c.model:
            c.model[head].hidden_dim, c.model[head].out_dim = 32, 16
    if "queue_size" in c.loss and c.loss.queue_size:
        c.loss.queue_size = 64
    c.schedule.warmup_steps = min(c.schedule.warmup_steps, 2)
