"""JAX against PyTorch, measured in one invocation on one machine: images/s ratio per case.

For each case it runs `train_step.py` (JAX, all devices or `--num-devices`) and then
`torch_baseline.py` (PyTorch, one device) back to back, each in its own subprocess (so
neither holds the other's memory or threads), `--rounds` times alternating which goes
first, and reports the median images/s per device of each and their ratio. The PyTorch
MFU uses the JAX compiled FLOP count (the same work per image) over the PyTorch step time.
This is the table BENCHMARKS.md quotes.

Usage:
  python benchmarks/compare.py --per-device-batch 64 --json cmp.json       # GPU
  python benchmarks/compare.py --per-device-batch 64 --torch-compile       # vs torch.compile
  XLA_FLAGS=--xla_force_host_platform_device_count=1 python benchmarks/compare.py \
      --per-device-batch 2 --steps 3 --warmup 1                             # CPU
  python benchmarks/compare.py --smoke --cases seco_rn18                   # seconds; for CI
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import train_cases

HERE = os.path.dirname(os.path.abspath(__file__))


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(train_cases.DEFAULT_CASES))
    p.add_argument("--per-device-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="auto", help="passed to both scripts")
    p.add_argument("--num-devices", type=int, default=None, help="JAX devices (default all)")
    p.add_argument("--peak-flops", type=float, default=None, help="for MFU (both)")
    p.add_argument("--torch-compile", action="store_true", help="torch.compile the baseline")
    p.add_argument("--channels-last", action="store_true", help="PyTorch channels_last")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat each pair, alternating the order; medians are reported")
    p.add_argument("--torch-first", action="store_true",
                   help="run PyTorch before JAX in the first round (default JAX first)")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--smoke", action="store_true", help="both scripts in --smoke mode")
    args = p.parse_args(argv)
    args.cases = train_cases.parse_cases(args.cases)
    return args


def _run(script: str, case: str, args, extra: list[str]) -> dict:
    """Runs one script for one case in a subprocess; returns its result row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [sys.executable, os.path.join(HERE, script), "--cases", case, "--json", out]
        if args.smoke:
            cmd.append("--smoke")
        else:
            cmd += ["--per-device-batch", str(args.per_device_batch), "--steps",
                    str(args.steps), "--warmup", str(args.warmup), "--image-size",
                    str(args.image_size)]
        cmd += ["--dtype", args.dtype] + extra
        print("$", " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if not os.path.exists(out):
            tail = proc.stdout[-2000:]
            return {"results": [{"case": case, "error": f"{script} exited {proc.returncode}",
                                 "log_tail": tail}], "info": {}}
        with open(out) as f:
            return json.load(f)


def _median_row(rows: list[dict]) -> dict:
    """The row whose images/s is the median of the rounds (all its fields kept)."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return rows[0]
    ok.sort(key=lambda r: r["images_per_s_per_device"])
    row = dict(ok[(len(ok) - 1) // 2])
    row["images_per_s_per_device_rounds"] = [r["images_per_s_per_device"] for r in rows
                                             if "error" not in r]
    return row


def ratio_table(pairs: list[tuple[dict, dict]]) -> str:
    f = train_cases.fmt
    lines = ["| case | dtype | JAX images/s/device | PyTorch images/s/device | JAX/PyTorch | "
             "JAX step (ms) | PyTorch step (ms) | JAX dispatch (ms) | JAX MFU | "
             "PyTorch MFU (JAX FLOPs) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for j, t in pairs:
        if "error" in j or "error" in t:
            lines.append(f"| {j['case']} | {j.get('dtype', '')} | "
                         f"{j.get('error', '')} {t.get('error', '')} |||||||||")
            continue
        ratio = j["images_per_s_per_device"] / t["images_per_s_per_device"]
        t_mfu = None
        if j.get("flops_per_step_per_device") and j.get("peak_flops_per_device"):
            # Same images per device per step in both: same FLOPs per step.
            t_mfu = j["flops_per_step_per_device"] / t["step_s"] / j["peak_flops_per_device"]
            t_mfu *= t["per_device_batch"] / j["per_device_batch"]
        pct = (lambda x: f"{100 * x:.1f}%" if x else None)
        lines.append(
            f"| {j['case']} | {j['dtype']} | {f(j['images_per_s_per_device'], '.2f')} | "
            f"{f(t['images_per_s_per_device'], '.2f')} | **{ratio:.2f}x** | "
            f"{f(1e3 * j['step_s'], '.1f')} | {f(1e3 * t['step_s'], '.1f')} | "
            f"{f(j['dispatch_ms'], '.2f')} | {f(pct(j.get('mfu')))} | {f(pct(t_mfu))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse_args(argv)
    jax_extra, torch_extra = [], []
    if args.num_devices:
        jax_extra += ["--num-devices", str(args.num_devices)]
    if args.peak_flops:
        jax_extra += ["--peak-flops", str(args.peak_flops)]
    if args.torch_compile:
        torch_extra.append("--compile")
    if args.channels_last:
        torch_extra.append("--channels-last")
    load_before = train_cases.machine_info().get("load_avg")
    pairs, infos, all_rows = [], {}, []
    for case in args.cases:
        jax_rows, torch_rows = [], []
        for r in range(args.rounds):
            order = [("jax", "train_step.py", jax_extra), ("torch", "torch_baseline.py",
                                                          torch_extra)]
            for name, script, extra in (order if (r + args.torch_first) % 2 == 0
                                        else order[::-1]):
                out = _run(script, case, args, extra)
                infos[name] = out.get("info") or infos.get(name, {})
                rows = out["results"]
                all_rows += rows
                (jax_rows if name == "jax" else torch_rows).extend(rows)
        # One dtype each when --dtype is a single value; pair them up by dtype otherwise.
        for dtype in dict.fromkeys(r.get("dtype") for r in jax_rows):
            j = _median_row([r for r in jax_rows if r.get("dtype") == dtype] or jax_rows)
            t = _median_row([r for r in torch_rows if r.get("dtype") == dtype] or torch_rows)
            pairs.append((j, t))
    load_after = train_cases.machine_info().get("load_avg")

    jinfo, tinfo = infos.get("jax", {}), infos.get("torch", {})
    print(f"\n# JAX {jinfo.get('jax', '?')} on {jinfo.get('devices', '?')} x "
          f"{jinfo.get('device_kind', '?')}; PyTorch {tinfo.get('torch', '?')} on "
          f"{tinfo.get('device_kind', '?')} ({tinfo.get('threads', '?')} threads); host "
          f"{jinfo.get('host_cpus', '?')} CPUs, {jinfo.get('host_mem_gb', '?')} GB\n")
    print(train_cases.markdown_table([row for pair in pairs for row in pair]))
    print()
    print(ratio_table(pairs))
    print(f"\nLoad average (1, 5, 15 min) before: {load_before}, after: {load_after}.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": {"jax": jinfo, "torch": tinfo, "load_avg_before": load_before,
                                "load_avg_after": load_after,
                                "command": " ".join(["python"] + sys.argv)},
                       "pairs": [{"jax": j, "torch": t} for j, t in pairs],
                       "results": all_rows}, f, indent=1)
    return 1 if any("error" in j or "error" in t for j, t in pairs) else 0


if __name__ == "__main__":
    sys.exit(main())
