"""Host cores per accelerator chip at 50 % MFU, with augmentations on the host or the device.

Per-sample FLOPs come from the compiled cost of the real SoftCon train step
(``jax.jit(step).lower(...).compile().cost_analysis()``, compiled for this machine's CPU on
one device, batch ``--batch``, bf16 model, 224 px, 13 bands) and of the device-side views
(``data.device_views``); the host rates (records/s per core, one record = one sample) are
the ones ``benchmarks/input_pipeline.py`` measured, passed in. A chip at 50 % of its peak
consumes ``0.5 * peak / flops_per_sample`` samples/s; the host needs that over the per-core
rate in cores.

    python benchmarks/cores_per_accelerator.py --host-rate 57.6 --device-rate 400
    python benchmarks/cores_per_accelerator.py --smoke     # tiny ViT, seconds
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import softcon as softcon_config  # noqa: E402
from softcon_jax import data, methods, optim, sharding  # noqa: E402
from softcon_jax import state as state_lib
from softcon_jax import step as step_lib  # noqa: E402
from softcon_jax.data import synthetic  # noqa: E402

# Dense bf16 peak FLOP/s per chip: Google Cloud TPU v5e / v4 system architecture pages
# (197 and 275 TFLOP/s), NVIDIA H100 SXM datasheet (989 TFLOP/s dense bf16 Tensor Core).
PEAKS = {"TPU v5e": 197e12, "TPU v4": 275e12, "H100 SXM": 989e12}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def step_flops(backbone: str, batch: int, size: int, smoke: bool) -> float:
    """FLOPs per sample of the SoftCon train step (host mode: views in)."""
    config = softcon_config.get_config(f"{backbone},s2c")
    config.unlock()
    config.global_batch_size, config.data.image_size = batch, size
    config.mesh.data, config.mesh.fsdp = 1, 1
    if smoke:
        config.model.backbone_kwargs.depth = 1
        config.model.projector.hidden_dim = config.model.predictor.hidden_dim = 64
    if "img_size" in config.model.backbone_kwargs:
        config.model.backbone_kwargs.img_size = size
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    method = methods.get(config.method)(config, mesh)
    tx, schedule = optim.make_optimizer(config)
    _, _, abstract, shardings = state_lib.create_train_state(config, method, tx, mesh)
    spec = method.views.element_spec(size, config.data.in_channels, data.input_dtype(config))
    batch_spec = {k: jax.ShapeDtypeStruct((batch,) + s, d) for k, (s, d) in spec.items()}
    fn = step_lib.jit_train_step(config, method, tx, schedule, mesh, shardings)
    return _flops(fn.lower(abstract, batch_spec).compile()) / batch


def view_flops(path: str, batch: int, size: int) -> float:
    """FLOPs per sample of the device-side SoftCon views (two views, 13 bands)."""
    cfg = data.default_config()
    cfg.path, cfg.image_size, cfg.views, cfg.augment_on = path, size, "softcon", "device"
    cfg.dtype = "bfloat16"
    b = next(iter(data.build_dataset(cfg, global_batch_size=batch, seed=0)))
    return _flops(jax.jit(data.build_device_views(cfg)).lower(b).compile()) / batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host-rate", type=float, default=57.6,
                   help="records/s per core, augment_on='host' (input_pipeline.py)")
    p.add_argument("--device-rate", type=float, required=False, default=None,
                   help="records/s per core, augment_on='device' (input_pipeline.py)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--stored-size", type=int, default=264)
    p.add_argument("--data", default="/tmp/softcon_bench_cores")
    p.add_argument("--backbones", default="vits14,vitb14,rn50")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    if a.smoke:
        a.size, a.stored_size, a.batch, a.backbones = 28, 32, 2, "vits14"
        a.data += "_smoke"
    a.device_rate = a.device_rate or a.host_rate
    synthetic.write_dataset(a.data, num_locations=max(4, a.batch), num_shards=1,
                            image_size=a.stored_size, bands=13, timesteps=4)
    aug = view_flops(a.data, a.batch, a.size)
    print(f"Device-side views: {aug / 1e6:.1f} MFLOP per sample ({a.size} px, 2 views x 13 "
          f"bands, from {a.stored_size} px uint16).")
    print(f"Host rates: {a.host_rate:.1f} records/s per core (host mode), "
          f"{a.device_rate:.1f} (device mode).\n")
    print("| model | step GFLOP/sample | device views / step | chip | samples/s per chip at "
          "50 % MFU | host cores, host mode | host cores, device mode |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for backbone in a.backbones.split(","):
        f = step_flops(backbone, a.batch, a.size, a.smoke)
        for chip, peak in PEAKS.items():
            rate = 0.5 * peak / (f + aug)
            print(f"| SoftCon {backbone} | {f / 1e9:.0f} | {aug / f:.2%} | {chip} | "
                  f"{rate:,.0f} | {rate / a.host_rate:.1f} | {rate / a.device_rate:.1f} |")


if __name__ == "__main__":
    main()
