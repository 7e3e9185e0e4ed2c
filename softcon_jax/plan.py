"""Plan a pod run on any machine: compile the trainer's step for a TPU slice or GPU cluster.

    python -m softcon_jax.plan --config configs/softcon.py:vitb14,s2c \
        --accelerator-type v5litepod-16 --config.global_batch_size=1024 [--json plan.json]
    python -m softcon_jax.plan --config configs/softcon.py:vitb14,s2c \
        --accelerator-type h100-16 --config.global_batch_size=512 [--gpus-per-host 8]

No TPU or GPU is needed: with libtpu (`pip install softcon-jax[tpu]`) or JAX's CUDA plugin
(`[gpu-plan]`; `softcon_jax.gpu_targets`), JAX describes the devices
(`jax.experimental.topologies.get_topology_desc`) and compiles for them on the CPU. The
program is the trainer's own: `state.create_train_state` and `step.jit_train_step` with the
same shardings, donation, gathered loss, optimizer and EMA, lowered with abstract inputs
(nothing is allocated). The report: per-chip memory against the chip's HBM (fits or not),
FLOPs per chip per step, a roofline bound, every collective of the compiled HLO with its
bytes, the data-parallel minimum, and the compile time.
On GPUs "fits" means within what JAX may use (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by
default), FLOPs are counted before optimisation, collective time is at NVLink and network.

Exit status 0 when the step fits; 3 when it does not (one line: the shortfall and the
knobs); 1 on a user error (unknown accelerator type, bad config).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from softcon_jax import cli, gpu_targets, overrides

EXIT_DOES_NOT_FIT = 3
# What the roofline's bytes are (seen with libtpu 0.0.42 on small programs: a matmul, take,
# elementwise ops); printed under every report.

# Per-chip specs. Sources, the Cloud TPU system-architecture pages:
#   v4:  https://cloud.google.com/tpu/docs/v4   (275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s;
#        ICI 2400 Gbps per chip)
#   v5e: https://cloud.google.com/tpu/docs/v5e  (197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s;
#        ICI 1600 Gbps per chip)
#   v5p: https://cloud.google.com/tpu/docs/v5p  (459 TFLOP/s bf16, 95 GiB HBM2e, 2765 GB/s;
#        ICI 4800 Gbps per chip)
#   v6e: https://cloud.google.com/tpu/docs/v6e  (918 TFLOP/s bf16, 32 GiB HBM, 1640 GB/s;
#        ICI 3584 Gbps per chip)
# `cores_per_chip`: gcloud's v4-N / v5p-N count TensorCores (2 per chip); v5e/v6e count chips.


@dataclasses.dataclass(frozen=True)
class Chip:
    family: str            # gcloud prefix
    topology_prefix: str   # libtpu topology name prefix
    peak_bf16_flops: float
    hbm_bytes: int
    hbm_bytes_per_s: float
    ici_bytes_per_s: float
    cores_per_chip: int
    dims: int              # 3-D torus (v4, v5p) or 2-D (v5e, v6e)


GiB = 1024 ** 3
CHIPS = {
    "v4": Chip("v4", "v4", 275e12, 32 * GiB, 1200e9, 2400e9 / 8, 2, 3),
    "v5litepod": Chip("v5litepod", "v5e", 197e12, 16 * GiB, 819e9, 1600e9 / 8, 1, 2),
    "v5p": Chip("v5p", "v5p", 459e12, 95 * GiB, 2765e9, 4800e9 / 8, 2, 3),
    "v6e": Chip("v6e", "v6e", 918e12, 32 * GiB, 1640e9, 3584e9 / 8, 1, 2),
}
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
       256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
       256: "16x16"}


def valid_types() -> list[str]:
    out = []
    for name, chip in CHIPS.items():
        table = _3D if chip.dims == 3 else _2D
        out += [f"{name}-{n * chip.cores_per_chip}" for n in table]
    return out


def parse_accelerator_type(text: str) -> tuple[Chip, int, str]:
    """'v5litepod-16' -> (chip, number of chips, libtpu topology 'v5e:4x4')."""
    m = re.fullmatch(r"(v4|v5litepod|v5p|v6e)-(\d+)", text.strip())
    chip = CHIPS.get(m.group(1)) if m else None
    table = (_3D if chip.dims == 3 else _2D) if chip else {}
    n = int(m.group(2)) // chip.cores_per_chip if chip else 0
    if chip is None or int(m.group(2)) % chip.cores_per_chip or n not in table:
        raise cli.UserValueError(
            f"--accelerator-type={text!r}: unknown TPU slice. Valid types (as gcloud writes "
            f"them; v4/v5p count TensorCores, 2 per chip): {', '.join(valid_types())}; "
            f"NVIDIA GPU clusters: {gpu_targets.valid_types()}.")
    return chip, n, f"{chip.topology_prefix}:{table[n]}"


# ==== The plan ============================================================================

_OOM = re.compile(r"required for [^(]*\(([\d.]+)([KMGT])\) exceeds available HBM "
                  r"\(([\d.]+)([KMGT])\)")


def _gib(value: str, unit: str) -> float:
    return float(value) * 1024 ** "KMGT".index(unit) / 1024 ** 2


def _topology_devices(topology: str, num_slices: int):
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                            num_slices=num_slices).devices
    except Exception as e:  # libtpu missing or cannot describe this slice
        if "libtpu" in str(e).lower() or "tpu" in str(e).lower():
            raise cli.UserValueError(
                f"Cannot describe TPU topology {topology!r} ({str(e).splitlines()[0]}). "
                "Install libtpu: pip install 'softcon-jax[tpu]'.") from None
        raise


def _batch_spec(config, method, stored_image_size: int | None):
    """({key: (shape, dtype)} of one sample as the trainer's step receives it, preprocess).

    'host' augmentation: the views. 'device': the raw season images at the stored size and
    the packed random draws, turned into views inside the step (what the trainer's
    `data.build_device_views` returns); the band and normalisation metadata come from a
    one-record synthetic dataset of the config's modality (`config.data.stats`), written to
    a temporary directory because a plan has no dataset at hand.
    """
    import tempfile

    from softcon_jax import data
    from softcon_jax.data import synthetic

    dtype = data.input_dtype(config)
    if (config.data.get("augment_on") or "host") == "host":
        return (method.views.element_spec(int(config.data.image_size),
                                          int(config.data.in_channels), dtype), None)
    if stored_image_size is None:  # the config's synthetic images, else SSL4EO-S12's
        written = config.data.get("synthetic") or {}
        stored_image_size = int(written.get("image_size") if written.get("enabled") else 264)
    modality = config.data.get("stats")
    modality = modality if modality in ("s2c", "s2a", "s1", "seco") else None
    data_config = config.data.copy_and_resolve_references()
    with tempfile.TemporaryDirectory() as tmp:
        meta = synthetic.write_dataset(tmp, num_locations=1, num_shards=1,
                                       image_size=stored_image_size, modality=modality)
        data_config.path = tmp
        views = data.build_views_transform(data_config, meta,
                                           os.path.join(tmp, "metadata.json"), dtype.name,
                                           method.views)
    # build_views_transform checked that the selected bands number config.data.in_channels.
    channels = int(config.data.in_channels)
    spec = views.device_element_spec((channels, stored_image_size, stored_image_size),
                                     meta["dtype"])
    return spec, views.device_views


def plan(config, accelerator_type: str, num_slices: int = 1, hlo_path: str | None = None,
         stored_image_size: int | None = None, gpus_per_host: int | None = None) -> dict:
    """Compiles the train step for the slice or cluster; returns the report (see above)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU metadata server here
    # Several plans (or tests) may run at once; libtpu otherwise locks /tmp/libtpu_lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax

    jax.config.update("jax_platforms", "cpu")
    from softcon_jax import methods, optim, sharding, state, step
    from softcon_jax.hlo import collectives, gathered_bytes
    from softcon_jax.registry import import_modules

    gpu = None
    if gpu_targets.is_gpu_type(accelerator_type):
        gpu = gpu_targets.parse_accelerator_type(accelerator_type, gpus_per_host, num_slices)
        topology, hbm_bytes = gpu.topology, gpu.gpu.hbm_bytes()
    else:
        chip, n_chips, topology = parse_accelerator_type(accelerator_type)
        hbm_bytes = chip.hbm_bytes
        if gpus_per_host is not None:
            raise cli.UserValueError("--gpus-per-host is for GPU clusters (h100-16, ...).")
    if num_slices < 1:
        raise cli.UserValueError(f"--num-slices={num_slices}; expected a positive integer.")
    import_modules(config.get("imports"))
    devices = gpu.devices() if gpu else _topology_devices(topology, num_slices)
    try:
        mesh = sharding.make_mesh(config.mesh, devices)
    except AssertionError as e:  # jax's mesh builder on a per-TensorCore v4 description
        raise cli.UserValueError(
            f"--accelerator-type={accelerator_type}: this libtpu describes the slice one "
            "device per TensorCore, and JAX builds v4 meshes from one device per chip "
            f"(megacore) only ({str(e).splitlines()[0][:120]}); plan a v5p slice of the "
            "same chip count instead.") from None
    state.validate(config, mesh)  # the trainer's own checks, before compiling
    method = methods.get(config.method)(config, mesh)
    tx, schedule = optim.make_optimizer(config)
    _, rng, abstract, shardings = state.create_train_state(config, method, tx, mesh)
    spec, preprocess = _batch_spec(config, method, stored_image_size)
    step_fn = step.jit_train_step(config, method, tx, schedule, mesh, shardings, preprocess)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((config.global_batch_size,) + tuple(s[0]), s[1],
                                       sharding=batch_sharding),
        spec, is_leaf=lambda s: isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], tuple))
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    n_dev = len(devices)
    param_bytes = sum(math.prod(x.shape) * x.dtype.itemsize
                      for x in jax.tree.leaves(abstract.params))
    report = {
        "accelerator_type": accelerator_type, "num_slices": num_slices,
        "topology": topology, "devices": n_dev, "mesh": dict(mesh.shape),
        "global_batch_size": int(config.global_batch_size),
        "augment_on": "host" if preprocess is None else "device",
        "per_device_batch": int(config.global_batch_size) // n_dev,
        "hbm_bytes": hbm_bytes,
        "param_count": sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)),
    }
    report.update(gpu.report_fields() if gpu else {})
    t0 = time.perf_counter()
    lowered = step_fn.lower(abstract_state, batch)
    jaxpr = jax.make_jaxpr(step_fn)(abstract_state, batch)
    try:
        compiled = gpu.compile(lowered, report) if gpu else lowered.compile()
    except Exception as e:  # XLA refuses a program that does not fit in HBM
        m = _OOM.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report.update(fits=False, compile_s=round(time.perf_counter() - t0, 1),
                      memory_bytes=None, error=str(e).splitlines()[0][:300])
        if m:
            report["required_gib"] = round(_gib(*m.group(1, 2)), 2)
            report["available_gib"] = round(_gib(*m.group(3, 4)), 2)
        return report
    report["compile_s"] = round(time.perf_counter() - t0, 1)

    mem = compiled.memory_analysis()
    memory = {"arguments": int(mem.argument_size_in_bytes),
              "outputs": int(mem.output_size_in_bytes),
              "temporaries": int(mem.temp_size_in_bytes),
              "aliased": int(mem.alias_size_in_bytes),
              "generated_code": int(mem.generated_code_size_in_bytes)}
    memory["total"] = (memory["arguments"] + memory["outputs"] + memory["temporaries"]
                       + memory["generated_code"] - memory["aliased"])
    if gpu:  # a deviceless GPU executable has no cost analysis
        flops, report["flops_loops_counted_once"] = gpu_targets.flops_per_device(
            lowered, jaxpr.jaxpr, n_dev)
        hbm_traffic, peak, hbm_rate = gpu.bytes_accessed(compiled), *gpu.rates()
    else:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0))
        hbm_traffic = float(cost.get("bytes accessed", 0.0))
        peak, hbm_rate = chip.peak_bf16_flops, chip.hbm_bytes_per_s
    hlo = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as out:
            out.write(hlo)
    colls, bn_bytes, unknown_loops = collectives(hlo, by_scope=True)
    sent = sum(c["bytes"] for c in colls)
    # Data-parallel minimum: the float32 gradients once, what the loss gathers, and the
    # statistics a synchronised batch norm must exchange (as sent: two-pass mean/variance
    # forward, their gradients backward; zero for models without BN or with per-device BN).
    minimum_parts = {"gradients": param_bytes, "gathered": gathered_bytes(jaxpr.jaxpr),
                     "batch_norm_statistics": bn_bytes}
    minimum = sum(minimum_parts.values())
    step_s = max(flops / peak, hbm_traffic / hbm_rate)
    report.update(
        fits=memory["total"] <= report.get("usable_bytes", hbm_bytes), memory_bytes=memory,
        flops_per_device=flops, hbm_bytes_accessed=hbm_traffic,
        roofline_step_s=step_s,
        roofline_images_per_s_per_device=(report["per_device_batch"] / step_s
                                          if step_s else None),
        collectives=colls, collective_bytes=sent, min_collective_bytes=minimum,
        min_collective_parts=minimum_parts, loops_with_unknown_trip_count=unknown_loops,
        collective_ratio=round(sent / minimum, 3) if minimum else None)
    report.update(gpu.collective_seconds(sent) if gpu else
                  {"collective_s_at_ici": sent / chip.ici_bytes_per_s})
    return report


def knobs(config) -> str:
    """The settings that lower per-chip memory, for the does-not-fit message."""
    fsdp = int(config.mesh.get("fsdp", 1))
    out = ["a smaller per-chip batch (--config.global_batch_size)",
           f"--config.mesh.fsdp={2 * fsdp} (shards parameters and optimizer state)"]
    if not config.model.get("remat"):
        out.append("--config.model.remat=True (recomputes block activations)")
    if "num_chunks" in config.loss:
        out.append(f"--config.loss.num_chunks={2 * int(config.loss.num_chunks or 1)} "
                   "(blockwise logits)")
    return ", ".join(out[:-1]) + " or " + out[-1]


def shortfall_gib(report: dict) -> float:
    """How much more than the chip has (a GPU: may use) the step needs (GiB per device)."""
    if report["memory_bytes"] is not None:
        usable = report.get("usable_bytes", report["hbm_bytes"])
        return (report["memory_bytes"]["total"] - usable) / GiB
    available = report.get("available_gib", report["hbm_bytes"] / GiB)
    return report.get("required_gib", float("nan")) - available


def format_report(r: dict) -> str:
    dev = "GPU" if "gpus_per_host" in r else "chip"
    where = (f"cluster {r['accelerator_type']} ({r['hosts']} host(s) x "
             f"{r['devices'] // r['hosts']} GPUs, topology {r['topology']})" if dev == "GPU"
             else f"slice {r['accelerator_type']} x{r['num_slices']} ({r['topology']})")
    lines = [f"{where}: {r['devices']} {dev}s, mesh {r['mesh']}, per-{dev} batch "
             f"{r['per_device_batch']} (global {r['global_batch_size']}), "
             f"{r['param_count']:,} parameters",
             f"compile: {r['compile_s']:.1f} s"]
    hbm = r["hbm_bytes"] / GiB
    if r["memory_bytes"] is None:
        lines.append(f"memory: DOES NOT FIT: XLA needs {r.get('required_gib', '?')} GiB, "
                     f"{r.get('available_gib', '?')} GiB available per chip")
        return "\n".join(lines)
    m = {k: v / GiB for k, v in r["memory_bytes"].items()}
    usable = (f" ({r['usable_bytes'] / GiB:.1f} GiB usable: JAX's share "
              f"{r['memory_fraction']:g})" if dev == "GPU" else "")
    lines.append(f"memory per {dev}: arguments {m['arguments']:.2f} GiB, outputs "
                 f"{m['outputs']:.2f}, temporaries {m['temporaries']:.2f}, aliased "
                 f"{m['aliased']:.2f}, total {m['total']:.2f} of {hbm:.0f} GiB HBM{usable}: "
                 + ("fits" if r["fits"] else "DOES NOT FIT"))
    lines.append(f"compute per {dev} per step: {r['flops_per_device'] / 1e12:.2f} TFLOP, "
                 f"{r['hbm_bytes_accessed'] / GiB:.1f} GiB HBM traffic; roofline >= "
                 f"{r['roofline_step_s'] * 1e3:.3g} ms/step, <= "
                 f"{r['roofline_images_per_s_per_device']:.0f} img/s/{dev}")
    for c in r["collectives"]:
        lines.append(f"  {c['kind']:<18} x{c['count']:<4} {c['bytes'] / 2**20:10.2f} "
                     f"MiB/{dev}")
    parts = ", ".join(f"{name.replace('_', ' ')} {n / 2**20:.2f}"
                      for name, n in r["min_collective_parts"].items())
    at, notes = (gpu_targets.report_text(r) if dev == "GPU" else
                 (f"{r['collective_s_at_ici'] * 1e3:.3g} ms at the chip's ICI bandwidth", []))
    lines.append(f"collectives: {r['collective_bytes'] / 2**20:.2f} MiB/{dev}/step; "
                 f"data-parallel minimum {r['min_collective_bytes'] / 2**20:.2f} MiB "
                 f"({parts}), ratio {r['collective_ratio']}; {at}")
    if r.get("loops_with_unknown_trip_count"):
        lines.append(f"  ({r['loops_with_unknown_trip_count']} loops with collectives have "
                     "an unknown trip count and are counted once)")
    return "\n".join(lines + notes)


def _define_flags():
    config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                    lock_config=True)
    flags.DEFINE_string("accelerator-type", None, "TPU slice as gcloud writes it, e.g. "
                        "v5litepod-16, v4-32 (TensorCores), v5p-128, v6e-64; or N NVIDIA "
                        "GPUs: h100-16, a100-8, h200-64, b200-8.")
    flags.DEFINE_integer("num-slices", 1, "Slices (multislice over DCN).")
    flags.DEFINE_integer("gpus-per-host", None, "GPUs per host of a GPU cluster (default 8).")
    flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
    flags.DEFINE_string("hlo", None, "Also write the compiled HLO text to this file.")
    flags.DEFINE_integer("stored-image-size", None, "Side of the stored images, for "
                         "config.data.augment_on='device' (the step receives them whole). "
                         "Default: config.data.synthetic.image_size when the config writes "
                         "synthetic data, else 264 (SSL4EO-S12 and SeCo patches).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from softcon_jax import logs
    from softcon_jax.hlo import BYTES_ACCESSED_NOTE

    logs.quiet_library_logs()
    f = flags.FLAGS
    accelerator = f["accelerator-type"].value
    report = plan(f.config, accelerator, f["num-slices"].value, f.hlo,
                  f["stored-image-size"].value, f["gpus-per-host"].value)
    if not report["fits"]:
        report.update(shortfall_gib=round(shortfall_gib(report), 2), knobs=knobs(f.config))
    print(format_report(report))
    print(BYTES_ACCESSED_NOTE)
    if f.json:
        with open(f.json, "w") as out:
            json.dump(report, out, indent=1)
    if not report["fits"]:
        over = ("GPU over the usable memory (JAX's share of HBM) of"
                if "usable_bytes" in report else "chip over the HBM of")
        print(f"error: does not fit: {shortfall_gib(report):.2f} GiB per {over} "
              f"{accelerator}; try {knobs(f.config)}.", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return 0


if __name__ == "__main__":
    if rc := cli.call(overrides.check_argv, sys.argv[1:]):
        sys.exit(rc)
    _define_flags()
    flags.mark_flags_as_required(["config", "accelerator-type"])
    cli.run_absl(main)
