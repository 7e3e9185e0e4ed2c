"""The outputs of a study (`softcon_jax.study`): statistics, table and plot of finished runs.

`aggregate(workdir, arms, seeds, reference)` reads `WORKDIR/<arm>/seed<k>/study_run.json`
of every finished run and writes:

- `study.json`: every run's metrics; per arm and metric the mean, the sample standard
  deviation (ddof = 1) and n; per arm other than the reference, the paired differences
  d_k = arm_k - reference_k over the seeds k both have finished: their mean, standard
  deviation, n and 95 % interval mean +- t(0.975, n - 1) * std / sqrt(n) (Student t:
  the seeds are few, so the normal 1.96 would be too narrow), and whether it excludes 0;
- `study.md`: the per-arm table (with n seeds per arm) and the paired-difference table;
- `study.png`: per-arm scores of one metric (every seed a dot, mean +- std), the paired
  differences with their intervals, and the online kNN curves (mean over seeds, min-max
  band) from each run's TensorBoard logs.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from softcon_jax.report import read_scalars

CURVE_TAGS = ("eval/knn_map_macro", "eval/knn_map_micro", "eval/knn_top1")


def write_json(path: str, obj) -> None:
    """Writes atomically (a reader never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def read_curves(run_dir: str) -> dict:
    """{tag: [[step, value], ...]} of the online kNN scalars the trainer logged."""
    scalars = read_scalars(os.path.join(run_dir, "tensorboard"))
    return {tag: [[int(s), float(v)] for s, v in zip(*scalars[tag])]
            for tag in CURVE_TAGS if tag in scalars}


def t_quantile(n: int) -> float:
    """t(0.975, n - 1), the two-sided 95 % Student t factor for n paired seeds."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def summary(values: list[float]) -> dict:
    """Mean, sample std (ddof 1; None for one value) and n."""
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "std": _nan_to_none(a.std(ddof=1)) if len(a) > 1 else None,
            "n": int(len(a))}


def paired(arm: dict[int, float], reference: dict[int, float]) -> dict | None:
    """Paired differences over the seeds both have: mean, std, n, 95 % t interval."""
    seeds = sorted(set(arm) & set(reference))
    if not seeds:
        return None
    d = np.array([arm[k] - reference[k] for k in seeds], np.float64)
    out = {"mean": float(d.mean()), "std": None, "n": len(d), "seeds": seeds,
           "ci95": None, "excludes_zero": None}
    if len(d) > 1:
        std = float(d.std(ddof=1))
        half = t_quantile(len(d)) * std / math.sqrt(len(d))
        out.update(std=std, ci95=[out["mean"] - half, out["mean"] + half],
                   excludes_zero=bool(out["mean"] - half > 0 or out["mean"] + half < 0))
    return out


def load_runs(workdir: str, arms: list[str], seeds: int) -> dict[str, dict[int, dict]]:
    """{arm: {seed: run record}} of the finished runs."""
    out = {}
    for arm in arms:
        out[arm] = {}
        for k in range(seeds):
            path = os.path.join(workdir, arm, f"seed{k}", "study_run.json")
            if os.path.exists(path):
                out[arm][k] = json.load(open(path))
    return out


def aggregate(workdir: str, arms: list[str], seeds: int, reference: str, *,
              metric: str = "knn_map_macro", command: str = "") -> dict:
    """Builds study.json, study.md and study.png from the finished runs; returns the JSON."""
    runs = load_runs(workdir, arms, seeds)
    metrics = sorted({m for by_seed in runs.values() for r in by_seed.values()
                      for m in r["metrics"]})
    study = {"command": command, "seeds": seeds, "reference": reference, "metric": metric,
             "metrics": metrics, "arms": {}, "runs": []}
    for arm in arms:
        by_seed = runs[arm]
        entry = {"n": len(by_seed), "seeds": sorted(by_seed), "summary": {}, "paired": {}}
        first = next(iter(by_seed.values()), None)
        if first:
            entry["overrides"] = first["overrides"]
            entry["step"] = first["step"]
            entry["step_gflops"] = first.get("step_gflops")
        for m in metrics:
            values = {k: r["metrics"][m] for k, r in by_seed.items() if m in r["metrics"]}
            if values:
                entry["summary"][m] = summary(list(values.values()))
            ref = {k: r["metrics"][m] for k, r in runs[reference].items() if m in r["metrics"]}
            if arm != reference and (p := paired(values, ref)):
                entry["paired"][m] = p
        study["arms"][arm] = entry
        study["runs"] += [{"arm": arm, **r} for _, r in sorted(by_seed.items())]
    write_json(os.path.join(workdir, "study.json"), study)
    with open(os.path.join(workdir, "study.md"), "w") as f:
        f.write(markdown(study))
    plot(study, os.path.join(workdir, "study.png"))
    return study


def _fmt(s: dict | None) -> str:
    if not s:
        return "-"
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["std"] is not None else f"{s['mean']:.3f}"


def markdown(study: dict) -> str:
    """The per-arm table and the paired differences against the reference."""
    arms, metrics, ref = study["arms"], study["metrics"], study["reference"]
    lines = [f"Mean ± std (ddof 1) over seeds; n = finished seeds of {study['seeds']}.", "",
             "| arm | n | step | GFLOP/step | " + " | ".join(metrics) + " |",
             "|---" * (len(metrics) + 4) + "|"]
    for name, a in arms.items():
        gflops = f"{a['step_gflops']:.3g}" if a.get("step_gflops") else "-"
        lines.append(f"| {name} | {a['n']} | {a.get('step', '-')} | {gflops} | "
                     + " | ".join(_fmt(a["summary"].get(m)) for m in metrics) + " |")
    lines += ["", f"Paired differences against `{ref}` (same seed): mean [95 % t interval]; "
              "* = the interval excludes 0.", "",
              "| arm − " + ref + " | pairs | " + " | ".join(metrics) + " |",
              "|---" * (len(metrics) + 2) + "|"]
    for name, a in arms.items():
        if name == ref:
            continue
        cells = []
        for m in metrics:
            p = a["paired"].get(m)
            if not p:
                cells.append("-")
            elif p["ci95"] is None:
                cells.append(f"{p['mean']:+.3f}")
            else:
                lo, hi = p["ci95"]
                cells.append(f"{p['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                             + ("*" if p["excludes_zero"] else ""))
        pairs = max((p["n"] for p in a["paired"].values()), default=0)
        lines.append(f"| {name} | {pairs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(study: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, metric, ref = list(study["arms"]), study["metric"], study["reference"]
    runs = [r for r in study["runs"] if metric in r["metrics"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax = axes[0]
    for i, name in enumerate(names):
        values = [r["metrics"][metric] for r in runs if r["arm"] == name]
        ax.scatter([i] * len(values), values, s=14, alpha=0.6, color="gray")
        s = study["arms"][name]["summary"].get(metric)
        if s:
            ax.errorbar([i], [s["mean"]], yerr=[s["std"] or 0.0], fmt="o", color="C0",
                        capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_title(f"{metric} per arm (dots: seeds; mean ± std)")
    ax.grid(True, alpha=0.3)

    ax = axes[1]
    others = [n for n in names if n != ref]
    for i, name in enumerate(others):
        p = study["arms"][name]["paired"].get(metric)
        if not p:
            continue
        err = ([[p["mean"] - p["ci95"][0]], [p["ci95"][1] - p["mean"]]]
               if p["ci95"] else None)
        ax.errorbar([i], [p["mean"]], yerr=err, fmt="o", capsize=4,
                    color="C2" if p["excludes_zero"] else "C1")
    ax.axhline(0.0, color="k", linewidth=0.8)
    ax.set_xticks(range(len(others)), others, rotation=30, ha="right")
    ax.set_title(f"{metric}: arm − {ref}, paired (95 % t interval)")
    ax.grid(True, alpha=0.3)

    ax = axes[2]
    for i, name in enumerate(names):
        curves = [r["curves"].get("eval/knn_map_macro") for r in study["runs"]
                  if r["arm"] == name]
        curves = [np.asarray(c) for c in curves if c]
        if not curves:
            continue
        steps = curves[0][:, 0]
        same = np.stack([c[:, 1] for c in curves if c.shape == curves[0].shape])
        ax.plot(steps, same.mean(0), marker="o", markersize=3, label=name, color=f"C{i}")
        ax.fill_between(steps, same.min(0), same.max(0), alpha=0.15, color=f"C{i}")
    ax.set_xlabel("step")
    ax.set_title("online kNN mAP (macro): mean, min-max over seeds")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
