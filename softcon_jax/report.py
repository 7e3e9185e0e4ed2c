"""PNG plots of a run: training curves and evaluation metrics over steps.

    python -m softcon_jax.report --workdir runs/quickstart [--out runs/quickstart/report]

Reads the TensorBoard event files under WORKDIR/tensorboard (all of them: a resumed run
appends new files; for a step logged twice the later value wins) with a small TFRecord
reader over tensorboardX's protobufs, so neither TensorFlow nor TensorBoard is needed.
Writes:

- `training.png`: the loss terms (`loss/*`), learning rate (`train/lr`), throughput
  (`perf/images_per_s`), and, when logged, gradient norm, teacher momentum, health metrics
  (`health/*`), step time and non-finite steps;
- `eval.png`: every `eval/*` scalar (online kNN monitor, `softcon_jax.evaluate` results);
- `scalars.json`: the last value of every tag, for scripts.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import struct

import numpy as np

from softcon_jax import cli

# Panels of training.png, in order: (title, tag prefixes or exact tags, log scale).
TRAINING_PANELS = [
    ("Loss terms", ("loss/",), False),
    ("Learning rate", ("train/lr",), False),
    ("Throughput (images/s)", ("perf/images_per_s",), False),
    ("Gradient norm", ("train/grad_norm",), True),
    ("Teacher momentum", ("teacher_momentum",), False),
    ("Representation health", ("health/",), False),
    ("Step time (s)", ("perf/step_time_s",), False),
    ("Non-finite steps", ("train/nonfinite_steps",), False),
]


def _records(path: str):
    """Payloads of a TFRecord file; stops quietly at a truncated tail (a live run)."""
    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        end = offset + 12 + length
        if end + 4 > len(data):
            break
        yield data[offset + 12:end]
        offset = end + 4


def read_scalars(logdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tag -> (steps, values), sorted by step, from every event file under `logdir`."""
    from tensorboardX.proto import event_pb2

    files = sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"),
                             recursive=True))
    latest: dict[str, dict[int, tuple[float, float]]] = {}
    for path in files:
        for payload in _records(path):
            try:
                event = event_pb2.Event.FromString(payload)
            except Exception:  # a corrupt record: skip it, keep the rest
                continue
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    v = float(value.simple_value)
                elif kind == "tensor" and value.tensor.float_val:
                    v = float(value.tensor.float_val[0])
                elif kind == "tensor" and value.tensor.double_val:
                    v = float(value.tensor.double_val[0])
                else:
                    continue
                seen = latest.setdefault(value.tag, {})
                prev = seen.get(event.step)
                if prev is None or event.wall_time >= prev[0]:
                    seen[event.step] = (event.wall_time, v)
    out = {}
    for tag, by_step in latest.items():
        steps = np.array(sorted(by_step), np.int64)
        out[tag] = (steps, np.array([by_step[s][1] for s in steps], np.float64))
    return out


def _select(scalars: dict, patterns: tuple[str, ...]) -> list[str]:
    return sorted(t for t in scalars
                  if any(t == p or (p.endswith("/") and t.startswith(p)) for p in patterns))


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def _draw(panels: list[tuple[str, list[str], bool]], scalars: dict, path: str,
          title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows, cols = _grid(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    for ax, (name, tags, log_scale) in zip(axes.ravel(), panels):
        for tag in tags:
            steps, values = scalars[tag]
            marker = "o" if len(steps) <= 30 else None
            ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.5, label=tag)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if log_scale and all(np.all(scalars[t][1] > 0) for t in tags):
            ax.set_yscale("log")
        if len(tags) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_report(workdir: str, out: str | None = None) -> dict[str, str]:
    """Writes the plots for `workdir`; returns {name: path} of the files written."""
    logdir = os.path.join(workdir, "tensorboard")
    scalars = read_scalars(logdir)
    if not scalars:
        raise cli.UserFileNotFoundError(
            f"--workdir {workdir}: no scalars in event files under {logdir}; train first "
            f"(python -m softcon_jax.train).")
    out = out or os.path.join(workdir, "report")
    os.makedirs(out, exist_ok=True)
    run = os.path.basename(os.path.abspath(workdir))
    written = {}

    panels = [(name, tags, log_scale) for name, patterns, log_scale in TRAINING_PANELS
              if (tags := _select(scalars, patterns))]
    if panels:
        written["training"] = os.path.join(out, "training.png")
        _draw(panels, scalars, written["training"], f"{run}: training")

    eval_tags = _select(scalars, ("eval/",))
    if eval_tags:
        # One panel per metric; a task's metrics (eval/<task>/<metric>) share a title.
        panels = [(tag[len("eval/"):], [tag], False) for tag in eval_tags]
        written["eval"] = os.path.join(out, "eval.png")
        _draw(panels, scalars, written["eval"], f"{run}: evaluation")

    summary = {tag: {"step": int(steps[-1]), "value": float(values[-1]),
                     "num_points": int(len(steps))}
               for tag, (steps, values) in sorted(scalars.items())}
    written["scalars"] = os.path.join(out, "scalars.json")
    with open(written["scalars"], "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return written


def main(argv: list[str] | None = None) -> dict[str, str]:
    p = argparse.ArgumentParser(prog="python -m softcon_jax.report",
                                description="PNG plots of training and evaluation scalars.")
    p.add_argument("--workdir", required=True, help="training workdir (with tensorboard/)")
    p.add_argument("--out", default=None, help="output directory (default WORKDIR/report)")
    args = p.parse_args(argv)
    written = make_report(args.workdir, args.out)
    for name, path in written.items():
        print(f"{name}: {path}")
    return written


if __name__ == "__main__":
    cli.run(main)
