"""Benchmark cases shared by `train_step.py` (JAX) and `torch_baseline.py` (PyTorch).

A case is a method plus a backbone; `build_config` turns it into the same ConfigDict the
trainer would use (configs/softcon.py, configs/seco.py) with the benchmark's batch, image
size and dtype, so both scripts measure the same networks, heads, loss and optimizer.
`--smoke` swaps in tiny widths (seconds on a CPU); the structure stays the same.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as `python benchmarks/x.py` without `pip install -e .`
    sys.path.insert(0, REPO)

# name -> (config module, get_config argument)
CASES = {
    "softcon_rn50": ("softcon", "rn50,s2c"),
    "softcon_vits14": ("softcon", "vits14,s2c"),
    "softcon_vitb14": ("softcon", "vitb14,s2c"),
    "seco_rn18": ("seco", "rn18"),
    "seco_rn50": ("seco", "rn50"),
}
DEFAULT_CASES = tuple(CASES)

SMOKE_IMAGE_SIZE = 32
SMOKE_BATCH = 2
SMOKE_STEPS = 2
# Tiny architectures with the real structure (ResNet stages, DINOv2 blocks, MoCo heads).
_SMOKE_RESNET = dict(stage_sizes=(1, 1, 1, 1), widths=(8, 8, 8, 8))  # timm needs 4 stages
_SMOKE_VIT = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)
_SMOKE_HEAD = dict(hidden_dim=32, out_dim=16)
SECO_QUEUE = 16384  # SeCo's queue length per subspace (ServiceNow/seasonal-contrast main_pretrain.py, --num-negatives)


def parse_cases(text: str) -> list[str]:
    """'a,b' -> ['a', 'b'], with a clear error naming the unknown case."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown or not names:
        raise SystemExit(f"--cases: unknown {unknown or '(empty)'}; choose from "
                         f"{', '.join(CASES)}.")
    return names


def build_config(case: str, *, global_batch: int, image_size: int, dtype: str,
                 smoke: bool = False):
    """The trainer's config for `case`, set to the benchmark's batch, size and dtype."""
    module_name, arg = CASES[case]
    if module_name == "softcon":
        from configs import softcon as module
    else:
        from configs import seco as module
    c = module.get_config(arg)
    c.unlock()
    c.global_batch_size = int(global_batch)
    c.data.image_size = int(image_size)
    c.model.dtype = dtype
    # Keep the warm-up of the real schedule out of the way: the lr does not change timing.
    c.total_steps = 1000
    c.schedule.warmup_steps = min(int(c.schedule.get("warmup_steps", 0)), 10)
    vit = "vit" in c.model.backbone
    if vit:
        c.model.backbone_kwargs.img_size = int(image_size)
    if smoke:
        for key, value in (_SMOKE_VIT if vit else _SMOKE_RESNET).items():
            c.model.backbone_kwargs[key] = value
        heads = [c.model.projector, c.model.predictor] if module_name == "softcon" \
            else [c.model.head]
        for head in heads:
            head.update(_SMOKE_HEAD)
    if module_name == "seco":
        # MoCo enqueues whole batches: the queue is a multiple of the global batch, as close
        # to SeCo's 16384 as possible (8 batches in smoke mode).
        queue = 8 * global_batch if smoke else max(SECO_QUEUE // global_batch, 1) * global_batch
        c.loss.queue_size = int(queue)
    return c


def backbone_timm_kwargs(config) -> tuple[str, dict]:
    """(timm name, kwargs) such that `timm.create_model(name, num_classes=0, **kwargs)` is
    the same architecture as the JAX backbone of `config`."""
    from softcon_jax import models

    backbone = models.build_backbone(config.model.backbone,
                                     in_channels=config.data.in_channels,
                                     **config.model.backbone_kwargs.to_dict())
    return config.model.backbone, backbone.timm_kwargs()


def machine_info() -> dict:
    """Host description for the tables: CPU count, memory, load averages."""
    import platform

    info = {"host_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        info["host_mem_gb"] = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return info


def fmt(value, spec: str = ".3g") -> str:
    """Number for a markdown cell; 'n/a' for None."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    """One markdown table; columns shared by train_step.py and torch_baseline.py.

    compile (s): JAX lower + compile; PyTorch first-step time minus the median step
    (torch.compile, cuDNN autotuning, allocator warm-up).
    """
    f = fmt
    lines = ["| case | framework | dtype | devices | batch/device | images/s | step (ms) | "
             "dispatch (ms) | compile (s) | peak mem/device (GiB) | mem source | "
             "TFLOP/s/device | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['framework']} | {r.get('dtype', '')} | "
                         f"{r.get('devices', '')} | {r.get('per_device_batch', '')} | "
                         f"error: {r['error']} |||||||||")
            continue
        compile_s = r.get("compile_s")
        if r.get("lower_s") is not None:
            compile_s = r["lower_s"] + r["compile_s"]
        mem = r["peak_mem_bytes"] / 2**30 if r.get("peak_mem_bytes") else None
        tflops = (r["achieved_flops_per_device"] / 1e12
                  if r.get("achieved_flops_per_device") else None)
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else None
        lines.append(
            f"| {r['case']} | {r['framework']} | {r['dtype']} | {r['devices']} | "
            f"{r['per_device_batch']} | {f(r['images_per_s'], '.2f')} | "
            f"{f(1e3 * r['step_s'], '.1f')} | {f(r['dispatch_ms'], '.2f')} | "
            f"{f(compile_s, '.1f')} | {f(mem, '.3g')} | {r['mem_source']} | "
            f"{f(tflops, '.3g')} | {f(mfu)} |")
    return "\n".join(lines)
