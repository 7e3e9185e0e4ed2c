"""The BENCHMARKS.md "Pod plans" tables: `softcon_jax.plan` for each model x batch x slice.

    python benchmarks/pod_plans.py --json pod_plans.json [--table pod_plans.md]
        [--only v5litepod-64] [--multiples 1,4,16] [--timeout 1500]

The grid is compiled as the recipes train: `config.data.augment_on='device'` (the step
makes the views from the raw 264 px season images). At the recipe batch on v5litepod-64
each model is compiled once more with `augment_on='host'`; the second table is the
difference, what the device augmentation costs the chip per step.

GPU clusters (`--gpu`; needs `pip install -e .[gpu-plan]`, no GPU): the same models on
h100-8, h100-64 and a100-8 at the recipe batch and 4x, the ViTs with XLA attention and with
`attention=cudnn`, written to their own JSON (default benchmarks/pod_plans_gpu.json):

    python benchmarks/pod_plans.py --gpu [--table pod_plans_gpu.md]

Each row is one `python -m softcon_jax.plan` process (TPU rows need libtpu: `[tpu]`).
A row that does not fit is compiled again with `config.model.remat=True`, then also with
`config.mesh.fsdp=4`, and the table names the first setting that fits. Results are written
to the JSON after every row, and a run with the same --json skips the rows it holds, so an
interrupted run goes on where it stopped. Rows not compiled are listed with their command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MODELS = {  # name: (config, recipe global batch)
    "SoftCon ViT-S/14": ("configs/softcon.py:vits14,s2c", 4096),
    "SoftCon ViT-B/14": ("configs/softcon.py:vitb14,s2c", 4096),
    "SoftCon RN50": ("configs/softcon.py:rn50,s2c", 4096),
    "SeCo RN50": ("configs/seco.py:rn50", 256),
}
SLICES = ("v5litepod-64", "v4-64", "v5p-128", "v5litepod-256")  # v4: see BENCHMARKS.md
KNOBS = ((), ("--config.model.remat=True",),
         ("--config.model.remat=True", "--config.mesh.fsdp=4"))


BASELINE_SLICE = "v5litepod-64"  # where the host-augmentation rows are compiled
GPU_CLUSTERS = ("h100-8", "a100-8", "h100-64")
CUDNN = "--config.model.backbone_kwargs.attention=cudnn"


def row_key(model: str, multiple: int, slice_: str, augment_on: str = "device",
            attention: str = "xla") -> str:
    key = f"{model} | x{multiple} | {slice_} | {augment_on}"
    return key + (f" | {attention}" if attention != "xla" else "")


def command(model: str, multiple: int, slice_: str, knobs=(), augment_on="device",
            attention="xla") -> list[str]:
    config, batch = MODELS[model]
    return [sys.executable, "-m", "softcon_jax.plan", "--config", config,
            "--accelerator-type", slice_, f"--config.global_batch_size={batch * multiple}",
            f"--config.data.augment_on={augment_on}", *knobs,
            *([CUDNN] if attention == "cudnn" else [])]


def run_row(model, multiple, slice_, timeout, augment_on="device", attention="xla") -> dict:
    first = None  # the default setting's report, when no setting fits
    for knobs in KNOBS:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "plan.json")
            t0 = time.time()
            try:
                res = subprocess.run(["nice", "-n", "10", *command(
                    model, multiple, slice_, knobs, augment_on, attention), "--json", out],
                                     capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return {"status": f"not compiled within {timeout} s here", "knobs": list(knobs)}
            if not os.path.exists(out):
                tail = (res.stderr.strip().splitlines() or ["?"])[-1]
                return {"status": f"failed: {tail[:200]}", "knobs": list(knobs)}
            with open(out) as f:
                report = json.load(f)
        report.update(knobs=list(knobs), wall_s=round(time.time() - t0, 1))
        if report["fits"]:
            return report
        first = first or report
    return {**first, "knobs": ["none of: " + "; ".join(" ".join(k) or "default"
                                                      for k in KNOBS)]}


def table(results: dict, multiples, slices) -> str:
    head = ("| model | global batch | slice | fits? | GiB/chip | TFLOP/chip/step | roofline "
            "img/s/chip | collective MiB/chip/step | ratio to minimum | knobs needed |\n"
            "|---|---:|---|---|---:|---:|---:|---:|---:|---|")
    rows = [head]
    for model, (_, batch) in MODELS.items():
        for m in multiples:
            for s in slices:
                r = results.get(row_key(model, m, s))
                cmd = " ".join(command(model, m, s)[1:])
                if r is None and s.startswith("v4-"):
                    rows.append(f"| {model} | {batch * m} | {s} | cannot be planned with "
                                "libtpu 0.0.42 (see the text) | | | | | | |")
                elif r is None:
                    rows.append(f"| {model} | {batch * m} | {s} | not compiled here "
                                f"(command: `python {cmd}`) | | | | | | |")
                elif "status" in r:
                    rows.append(f"| {model} | {batch * m} | {s} | {r['status']} | | | | | | |")
                elif r["memory_bytes"] is None:
                    rows.append(f"| {model} | {batch * m} | {s} | no ({r.get('required_gib')} "
                                f"GiB needed) | | | | | | {r['knobs'][0]} |")
                else:
                    mem = r["memory_bytes"]["total"] / 2**30
                    rows.append(
                        f"| {model} | {batch * m} | {s} | {'yes' if r['fits'] else 'no'} | "
                        f"{mem:.2f} | {r['flops_per_device'] / 1e12:.2f} | "
                        f"{r['roofline_images_per_s_per_device']:.0f} | "
                        f"{r['collective_bytes'] / 2**20:.1f} | {r['collective_ratio']:.2f} | "
                        f"{' '.join(r['knobs']) or 'none'} |")
    return "\n".join(rows)


def augmentation_table(results: dict) -> str:
    """Device views' cost per chip and step: the same step with augment_on host vs device."""
    rows = ["| model | per-chip batch | TFLOP/chip/step host -> device | HBM GiB accessed "
            "host -> device | roofline ms/step host -> device | added |",
            "|---|---:|---:|---:|---:|---:|"]
    for model in MODELS:
        host = results.get(row_key(model, 1, BASELINE_SLICE, "host"), {})
        dev = results.get(row_key(model, 1, BASELINE_SLICE, "device"), {})
        if not (host.get("memory_bytes") and dev.get("memory_bytes")):
            continue
        t = [r["flops_per_device"] / 1e12 for r in (host, dev)]
        b = [r["hbm_bytes_accessed"] / 2**30 for r in (host, dev)]
        s = [r["roofline_step_s"] * 1e3 for r in (host, dev)]
        rows.append(f"| {model} | {dev['per_device_batch']} | {t[0]:.2f} -> {t[1]:.2f} | "
                    f"{b[0]:.1f} -> {b[1]:.1f} | {s[0]:.1f} -> {s[1]:.1f} | "
                    f"{(s[1] / s[0] - 1) * 100:+.1f} % |")
    return "\n".join(rows)


def gpu_table(results: dict, multiples=(1, 4), clusters=GPU_CLUSTERS) -> str:
    """The GPU rows: memory against the usable share of HBM, collective time at NVLink and,
    across hosts, at the network."""
    rows = ["| model | attention | global batch | cluster | fits? | GiB/GPU | TFLOP/GPU/step | "
            "roofline img/s/GPU | collective MiB/GPU/step | ratio to minimum | ms at NVLink | "
            "ms at network | knobs needed |", "|---|---|---:|---|---|---:|---:|---:|---:|---:|"
            "---:|---:|---|"]
    for model, (_, batch) in MODELS.items():
        for attention in (("xla", "cudnn") if "ViT" in model else ("xla",)):
            for m in multiples:
                for c in clusters:
                    r = results.get(row_key(model, m, c, attention=attention))
                    lead = f"| {model} | {attention} | {batch * m} | {c} |"
                    if r is None:
                        cmd = " ".join(command(model, m, c, attention=attention)[1:])
                        rows.append(f"{lead} not compiled here (command: `python {cmd}`) "
                                    "| | | | | | | | |")
                    elif "status" in r:
                        rows.append(f"{lead} {r['status']} | | | | | | | | |")
                    else:
                        net = r["collective_s_at_network"]
                        knobs = " ".join(r["knobs"]) or "none"
                        if r.get("compiler_options"):  # no Triton tiling without a device
                            knobs += " (cuBLAS matmuls)"
                        rows.append(
                            f"{lead} {'yes' if r['fits'] else 'no'} | "
                            f"{r['memory_bytes']['total'] / 2**30:.2f} of "
                            f"{r['usable_bytes'] / 2**30:.0f} | "
                            f"{r['flops_per_device'] / 1e12:.2f} | "
                            f"{r['roofline_images_per_s_per_device']:.0f} | "
                            f"{r['collective_bytes'] / 2**20:.1f} | "
                            f"{r['collective_ratio']:.2f} | "
                            f"{r['collective_s_at_nvlink'] * 1e3:.2f} | "
                            f"{'-' if net is None else f'{net * 1e3:.1f}'} | {knobs} |")
    return "\n".join(rows)


def gpu_todo(models, clusters, multiples) -> list:
    """Recipe batch first (one host, then 8 hosts), XLA then cuDNN attention; then 4x."""
    return [(model, m, c, "device", attention) for m in multiples for c in clusters
            for attention in ("xla", "cudnn") for model in models
            if attention == "xla" or "ViT" in model]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="The GPU grid (GPU_CLUSTERS).")
    p.add_argument("--json", default=None, help="Default: pod_plans.json, with --gpu "
                   "benchmarks/pod_plans_gpu.json.")
    p.add_argument("--table", default=None, help="Also write the markdown table here.")
    p.add_argument("--only", default=None, help="Comma-separated slices or GPU clusters.")
    p.add_argument("--models", default=",".join(MODELS), help="Comma-separated models.")
    p.add_argument("--multiples", default=None, help="Default 1,4,16; with --gpu 1,4.")
    p.add_argument("--timeout", type=int, default=1500, help="Seconds per compile.")
    p.add_argument("--render-only", action="store_true", help="Only print the table.")
    a = p.parse_args(argv)
    a.json = a.json or ("benchmarks/pod_plans_gpu.json" if a.gpu else "pod_plans.json")
    multiples = [int(m) for m in (a.multiples or ("1,4" if a.gpu else "1,4,16")).split(",")]
    slices = a.only.split(",") if a.only else (GPU_CLUSTERS if a.gpu else SLICES)
    results = json.load(open(a.json)) if os.path.exists(a.json) else {}
    # Recipe batch on every slice first, with the host-augmentation baselines, then the
    # larger batches.
    models = a.models.split(",")
    todo = [(model, 1, s, "device", "xla") for s in slices for model in models]
    todo += [(model, 1, BASELINE_SLICE, "host", "xla") for model in models]
    todo += [(model, m, s, "device", "xla") for m in multiples if m != 1 for s in slices
             for model in models]
    todo = gpu_todo(models, slices, multiples) if a.gpu else todo
    for model, m, s, mode, attention in ([] if a.render_only else todo):
        key = row_key(model, m, s, mode, attention)
        if key in results and "status" not in results[key]:
            continue  # compiled before; a row that timed out or failed is tried again
        print(f"{key} ...", file=sys.stderr, flush=True)
        results[key] = run_row(model, m, s, a.timeout, mode, attention)
        with open(a.json + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(a.json + ".tmp", a.json)
    text = (gpu_table(results) if a.gpu else table(results, [1, 4, 16], list(SLICES))
            + "\n\n" + augmentation_table(results))
    print(text)
    if a.table:
        with open(a.table, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
