"""The same pretraining steps in PyTorch, written the way users of the reference code run them.

The baseline for `train_step.py`: same cases, flags and table. Each case uses the
architecture, head sizes, loss settings and optimizer of the JAX config
(`train_cases.build_config`), built from PyTorch parts:

* SoftCon (MoCo-v3 structure): a timm backbone (`resnet50`, `vit_small_patch14_dinov2`,
  `vit_base_patch14_dinov2`, `in_chans=13`, `img_size=224`, `num_classes=0`), MoCo-v3
  projector/predictor MLPs, an EMA teacher (`copy.deepcopy`, no grad, updated parameter by
  parameter as in MoCo-v3), two views symmetrised, the soft contrastive loss (`soft_ce`
  variant, as defined in `softcon_jax.losses.soft_contrastive`) times 2T; AdamW for ViT,
  LARS (MoCo-v3 style) for ResNet.
* SeCo (MoCo-v2 structure): a timm ResNet with 3 Linear-ReLU-Linear heads, a momentum key
  encoder, one queue per subspace, the loss of `softcon_jax.losses.seasonal_infonce`
  (reference setting: positive, queue, and for subspaces > 0 the other views' keys); SGD.

On CUDA: bf16 autocast (`--dtype auto`/`bfloat16`; bf16 needs no GradScaler) and
`cudnn.benchmark`, optionally `--compile` (torch.compile of the networks) and
`--channels-last`. On CPU: float32, `torch.set_num_threads(os.cpu_count())`.
Single device (one GPU, or the CPU): the JAX/PyTorch comparison is per device.

Timing is as in train_step.py: median of `--steps` steps after `--warmup`, each ended by
`torch.cuda.synchronize()` on GPU; dispatch = time for the step function to return before
that synchronisation (on CPU PyTorch runs eagerly, so dispatch ~ step). "compile" is the
first step's time minus the median step. Peak memory: `torch.cuda.max_memory_allocated()`
on GPU, the process's peak RSS on CPU. MFU is not computed here (compare.py derives it
from the JAX FLOP count, the same work per step).

Usage:
  python benchmarks/torch_baseline.py --per-device-batch 64 [--compile] [--json out.json]
  python benchmarks/torch_baseline.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import traceback

# The case configs import softcon_jax (and so jax); keep jax off the GPU PyTorch measures.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import train_cases  # noqa: E402


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(train_cases.DEFAULT_CASES),
                   help=f"comma-separated, from {', '.join(train_cases.CASES)}")
    p.add_argument("--per-device-batch", type=int, default=32,
                   help="images per view per step (one device)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="auto",
                   help="bfloat16 (autocast) or float32, comma-separated, or auto "
                        "(bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--channels-last", action="store_true",
                   help="channels_last memory format for ResNet inputs and weights")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: os.cpu_count())")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--smoke", action="store_true",
                   help="tiny models and images, 2 steps: checks the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.image_size = train_cases.SMOKE_IMAGE_SIZE
        args.per_device_batch = train_cases.SMOKE_BATCH
        args.steps, args.warmup = train_cases.SMOKE_STEPS, 1
    args.cases = train_cases.parse_cases(args.cases)
    if args.steps < 1 or args.warmup < 0 or args.per_device_batch < 1:
        p.error("--steps and --per-device-batch must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------- pieces

def _torch():
    import torch  # imported here so --help works without torch

    return torch


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool):
    """MoCo-v3's projector/predictor: [Linear(no bias)-BN-ReLU] x (L-1), Linear [, BN]."""
    nn = _torch().nn
    layers = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def make_lars(params, lr: float, weight_decay: float, momentum: float,
              trust_coefficient: float = 0.001):
    """LARS as in the MoCo-v3 code: decay and trust ratio only for tensors with ndim > 1."""
    torch = _torch()

    class LARS(torch.optim.Optimizer):
        def __init__(self):
            super().__init__(params, dict(lr=lr, weight_decay=weight_decay,
                                          momentum=momentum,
                                          trust_coefficient=trust_coefficient))

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    dp = p.grad
                    if p.ndim > 1:
                        dp = dp.add(p, alpha=g["weight_decay"])
                        p_norm, u_norm = torch.norm(p), torch.norm(dp)
                        one = torch.ones_like(p_norm)
                        ratio = torch.where(
                            p_norm > 0,
                            torch.where(u_norm > 0, g["trust_coefficient"] * p_norm / u_norm,
                                        one), one)
                        dp = dp.mul(ratio)
                    state = self.state[p]
                    if "mu" not in state:
                        state["mu"] = torch.zeros_like(p)
                    state["mu"].mul_(g["momentum"]).add_(dp)
                    p.add_(state["mu"], alpha=-g["lr"])

    return LARS()


def make_optimizer(config, params):
    """The config's optimizer in PyTorch, at its peak learning rate (no schedule)."""
    torch = _torch()
    o = config.optimizer
    lr = o.lr * (config.global_batch_size / o.lr_scale_batch if o.get("lr_scale_batch") else 1)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(o.b1, o.b2),
                                 weight_decay=o.weight_decay)
    if o.name in ("lars_moco", "lars"):  # MoCo-v3's LARS (optax.lars differs under warm-up)
        return make_lars(params, lr, o.weight_decay, o.momentum)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum,
                               weight_decay=o.weight_decay)
    raise ValueError(f"config.optimizer.name={o.name!r} has no PyTorch baseline.")


def soft_contrastive_loss(q, k, labels_q, labels_k, temperature: float, soft_weight: float):
    """`soft_ce` of softcon_jax.losses.soft_contrastive (one device: row i's positive is
    column i): target T = I + w * cos(labels) off the diagonal, rows normalised, CE."""
    torch = _torch()
    F = torch.nn.functional
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    logits = q @ k.t() / temperature
    lq, lk = F.normalize(labels_q.float(), dim=1), F.normalize(labels_k.float(), dim=1)
    eye = torch.eye(q.shape[0], device=q.device, dtype=torch.bool)
    target = torch.where(eye, torch.ones_like(logits), soft_weight * (lq @ lk.t()))
    p = target / target.sum(dim=1, keepdim=True)
    return (torch.logsumexp(logits, dim=1) - (p * logits).sum(dim=1)).mean()


def ema_(teacher, student, m: float):
    """MoCo's momentum update, parameter by parameter, as the reference code does it."""
    torch = _torch()
    with torch.no_grad():
        for p_t, p_s in zip(teacher.parameters(), student.parameters()):
            p_t.mul_(m).add_(p_s.detach(), alpha=1.0 - m)


def seasonal_infonce_loss(q, keys, queues, temperature: float):
    """Reference SeCo loss (= seasonal_infonce with batch_negatives=False and queues).

    q (E, B, D) queries per subspace; keys (E, E, B, D) with keys[e, j] = key view j through
    head e; queues (E, K, D). Subspace e: logits [positive keys[e, e], queue e, and for
    e > 0 the other views' keys keys[e, j != e] of the whole batch], target index 0.
    """
    torch = _torch()
    F = torch.nn.functional
    q = F.normalize(q.float(), dim=-1)
    num_spaces = q.shape[0]
    target = torch.zeros(q.shape[1], dtype=torch.long, device=q.device)
    loss = 0.0
    for e in range(num_spaces):
        parts = [(q[e] * keys[e, e]).sum(dim=1, keepdim=True), q[e] @ queues[e].t()]
        parts += [q[e] @ keys[e, j].t() for j in range(num_spaces) if e > 0 and j != e]
        loss = loss + F.cross_entropy(torch.cat(parts, dim=1) / temperature, target)
    return loss


class _SeCoEncoder:
    """Factory for backbone + E heads (a torch.nn.Module built lazily)."""

    @staticmethod
    def build(backbone, num_heads: int, hidden: int, out: int):
        nn = _torch().nn

        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = backbone
                self.heads = nn.ModuleList(
                    nn.Sequential(nn.Linear(backbone.num_features, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, out)) for _ in range(num_heads))

            def forward(self, x):
                f = self.backbone(x)
                return _torch().stack([h(f) for h in self.heads])

        return Encoder()


def _timm_backbone(config):
    import timm

    name, kwargs = train_cases.backbone_timm_kwargs(config)
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def build_step(config, device, dtype: str, args):
    """Returns (step() -> loss tensor, inputs dict, modules) for one case."""
    torch = _torch()
    nn = torch.nn
    b, s, c = args.per_device_batch, config.data.image_size, config.data.in_channels
    gen = torch.Generator(device="cpu").manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    def image():
        return torch.randn(b, c, s, s, generator=gen).to(device, memory_format=fmt)

    amp = dtype == "bfloat16"
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)

    def prepare(module):
        module = module.to(device)
        if args.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def maybe_compile(module):
        return torch.compile(module) if args.compile else module

    if config.method == "softcon":
        backbone = _timm_backbone(config)
        pj, pd = config.model.projector, config.model.predictor
        student = prepare(nn.Sequential(
            backbone, build_mlp(pj.num_layers, backbone.num_features, pj.hidden_dim,
                                pj.out_dim, pj.last_bn)))
        predictor = prepare(build_mlp(pd.num_layers, pj.out_dim, pd.hidden_dim, pd.out_dim,
                                      pd.last_bn))
        teacher = copy.deepcopy(student).requires_grad_(False)
        student.train(), predictor.train(), teacher.train()  # MoCo: teacher in train mode too
        params = list(student.parameters()) + list(predictor.parameters())
        opt = make_optimizer(config, params)
        s_fwd, p_fwd, t_fwd = maybe_compile(student), maybe_compile(predictor), \
            maybe_compile(teacher)
        x1, x2 = image(), image()
        l1 = (torch.rand(b, 9, generator=gen) < 0.3).float().to(device)
        l2 = (torch.rand(b, 9, generator=gen) < 0.3).float().to(device)
        tau = float(config.loss.temperature)
        w = float(config.loss.kwargs.get("soft_weight", 1.0))
        scale = 2.0 * tau if config.loss.get("moco_scale", True) else 1.0
        m = float(config.teacher.momentum)

        def step():
            with autocast:
                q1, q2 = p_fwd(s_fwd(x1)), p_fwd(s_fwd(x2))
                with torch.no_grad():
                    ema_(teacher, student, m)
                    k1, k2 = t_fwd(x1), t_fwd(x2)
                loss = scale * (soft_contrastive_loss(q1, k2, l1, l2, tau, w)
                                + soft_contrastive_loss(q2, k1, l2, l1, tau, w))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        return step, (student, predictor, teacher)

    # SeCo
    h = config.model.head
    num_spaces = 3
    query = prepare(_SeCoEncoder.build(_timm_backbone(config), num_spaces, h.hidden_dim,
                                       h.out_dim))
    key = copy.deepcopy(query).requires_grad_(False)
    query.train(), key.train()
    opt = make_optimizer(config, list(query.parameters()))
    q_fwd, k_fwd = maybe_compile(query), maybe_compile(key)
    views = {v: image() for v in ("q", "k0", "k1", "k2")}
    queue_size = int(config.loss.queue_size)
    queues = nn.functional.normalize(
        torch.randn(num_spaces, queue_size, h.out_dim, generator=gen), dim=-1).to(device)
    ptr = [0]
    tau, m = float(config.loss.temperature), float(config.teacher.momentum)

    def step():
        with autocast:
            q = q_fwd(views["q"])
            with torch.no_grad():
                ema_(key, query, m)
                keys = torch.stack([k_fwd(views[v]) for v in ("k0", "k1", "k2")], dim=1)
                keys = nn.functional.normalize(keys.float(), dim=-1)  # (E, views, B, D)
            loss = seasonal_infonce_loss(q, keys, queues, tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # FIFO enqueue of each subspace's positive keys
            e = torch.arange(num_spaces, device=device)
            queues[:, ptr[0]:ptr[0] + b] = keys[e, e]
            ptr[0] = (ptr[0] + b) % queue_size
        return loss

    return step, (query, key)


# --------------------------------------------------------------------------- one case


def measure_case(case: str, dtype: str, args, device) -> dict:
    import resource

    torch = _torch()
    config = train_cases.build_config(case, global_batch=args.per_device_batch,
                                      image_size=args.image_size, dtype=dtype,
                                      smoke=args.smoke)
    step, _ = build_step(config, device, dtype, args)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    first = None
    for i in range(max(args.warmup, 1)):
        t0 = time.perf_counter()
        loss = step()
        sync()
        if i == 0:
            first = time.perf_counter() - t0

    step_times, dispatch_times = [], []
    for _ in range(args.steps):
        s0 = time.perf_counter()
        loss = step()
        s1 = time.perf_counter()
        sync()
        s2 = time.perf_counter()
        dispatch_times.append(s1 - s0)
        step_times.append(s2 - s0)
    loss = float(loss.detach().float().cpu())
    step_s = statistics.median(step_times)
    if cuda:
        mem, source = int(torch.cuda.max_memory_allocated(device)), "torch allocator peak"
    else:
        mem, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, \
            "process peak RSS"
    return {
        "case": case, "framework": "torch" + ("+compile" if args.compile else ""),
        "dtype": dtype, "devices": 1,
        "device_kind": torch.cuda.get_device_name(device) if cuda else "cpu",
        "per_device_batch": args.per_device_batch, "global_batch": args.per_device_batch,
        "image_size": args.image_size, "in_channels": config.data.in_channels,
        "backbone": config.model.backbone, "optimizer": config.optimizer.name,
        "images_per_s": args.per_device_batch / step_s,
        "images_per_s_per_device": args.per_device_batch / step_s,
        "step_s": step_s, "step_s_all": step_times,
        "dispatch_ms": 1e3 * statistics.median(dispatch_times),
        "compile_s": max(first - step_s, 0.0), "first_step_s": first,
        "peak_mem_bytes": mem, "mem_source": source,
        "flops_per_step_per_device": None, "achieved_flops_per_device": None,
        "peak_flops_per_device": None, "mfu": None,
        "loss": loss, "finite": loss == loss and abs(loss) != float("inf"),
        "compile": bool(args.compile), "channels_last": bool(args.channels_last),
    }


def main(argv=None) -> int:
    args = _parse_args(argv)
    torch = _torch()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count())
    else:
        torch.backends.cudnn.benchmark = True  # as the MoCo-v3 / SeCo training scripts
    dtypes = (["bfloat16"] if device.type == "cuda" else ["float32"]) if args.dtype == "auto" \
        else [d.strip() for d in args.dtype.split(",")]
    info = {**train_cases.machine_info(), "torch": torch.__version__,
            "platform": device.type, "threads": torch.get_num_threads(),
            "device_kind": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "command": " ".join(["python"] + sys.argv)}
    load_before = info.pop("load_avg", None)
    print(f"# PyTorch train step: {info['device_kind']} ({device.type}), torch "
          f"{torch.__version__}, {info['threads']} threads, load {load_before}", flush=True)
    rows = []
    for case in args.cases:
        for dtype in dtypes:
            try:
                row = measure_case(case, dtype, args, device)
            except Exception as e:  # noqa: BLE001 - one failing case (e.g. OOM) keeps the rest
                traceback.print_exc()
                row = {"case": case, "framework": "torch", "dtype": dtype, "devices": 1,
                       "per_device_batch": args.per_device_batch,
                       "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            rows.append(row)
            if "error" not in row:
                print(f"{case} {dtype}: {row['images_per_s']:.2f} img/s, "
                      f"step {1e3 * row['step_s']:.1f} ms", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    info["load_avg_before"] = load_before
    info["load_avg_after"] = train_cases.machine_info().get("load_avg")
    print()
    print(train_cases.markdown_table(rows))
    print(f"\nLoad average (1, 5, 15 min) before: {load_before}, after: "
          f"{info['load_avg_after']}.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": rows}, f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
