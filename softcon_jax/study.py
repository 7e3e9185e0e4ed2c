"""Seeded, paired ablation studies: is my loss (augmentation, init, ...) better than yours?

    python -m softcon_jax.study --config configs/softcon.py:vits14,s2c --workdir runs/study \
        --arm soft= --arm hard=loss.kwargs.soft_weight=0 --arm mine=loss.name=my_loss \
        --seeds 3 [--config.total_steps=N ...] [--eval eurosat_knn,...] [--reference soft]

Every arm is the base config (`--config` and its `--config.key=value` overrides) plus the
arm's own `key=value` overrides (comma-separated; the same syntax, value parsing and strict
key checking as `--config.key=value`: a misspelt key is a one-line error before anything
runs). Each arm runs with seeds 0 .. N-1 (`config.seed`: the initialisation, the data order,
the augmentation draws and the in-step randomness such as masks all follow it), so seed k
of every arm sees the same data order and draws: the seeds are paired across arms.

Run k of arm A is a normal trainer workdir, `WORKDIR/A/seed<k>` (the trainer runs as
`python -m softcon_jax.train` in a subprocess, its log in `train.log`): an interrupted run
resumes, a finished one is reused, a rerun trains nothing. An arm with
`total_steps=0` evaluates the initial backbone (random, or `config.init.weights`) without
training. Each run's frozen teacher is evaluated on the online kNN held-out split of its
config (`config.eval.data_path`) and on the TFDS tasks of `--eval` (`softcon_jax.evaluate`);
the result is `WORKDIR/A/seed<k>/study_run.json`. The outputs (`study.json`, `study.md`,
`study.png`, see `softcon_jax.study_report`) are built from whatever runs are finished.

Fan-out: `--print-commands` prints one command per run (`--arm-index I --seed-index K`) and
the final `--aggregate` call; jobs that share WORKDIR can run them in any order.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import shlex
import sys
from typing import Any

from softcon_jax import cli, overrides, study_report
from softcon_jax.study_run import Run, run_one

_ARM_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
# Overrides are split at commas followed by `key=`, so tuple values keep theirs:
# `data.augment.crop_scale=(0.3,1.0),model.mask_ratio=0.5`.
_SPLIT = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_.]*=)")
_CONFIG_FLAG = re.compile(r"^--?config\.([A-Za-z0-9_.]+)=")


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]  # "key=value"

    @property
    def flags(self) -> list[str]:
        return [f"--config.{o}" for o in self.overrides]


def parse_arm(text: str) -> Arm:
    """`name=key=value[,key=value...]` (or `name=` for the base config) -> Arm."""
    name, eq, rest = text.partition("=")
    if not eq or not _ARM_NAME.match(name):
        raise cli.UsageError(f"--arm {text}: expected NAME=[key=value[,key=value...]] with "
                             "NAME of letters, digits, '_', '-', '.'.")
    items = [s.strip() for s in _SPLIT.split(rest)] if rest.strip() else []
    for item in items:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*=", item):
            raise cli.UsageError(f"--arm {text}: {item!r} is not key=value.")
        if item.split("=", 1)[0] == "seed":
            raise cli.UsageError(f"--arm {text}: the study sets config.seed of each run "
                                 "(--seeds); arms cannot override it.")
    return Arm(name, tuple(items))


def build_config(spec: str, flag_args: list[str], where: str) -> Any:
    """The config exactly as the trainer builds it from `--config spec` and `flag_args`."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["study", f"--config={spec}", *flag_args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    try:
        fv(argv)
    except flags.Error as e:
        raise cli.UsageError(f"{where}: {e}") from None
    return fv.config


# ==== The plan: arms x seeds ==============================================================

def plan_runs(args) -> list[Run]:
    """Checks every key of every arm (one line on error), then builds each run's config."""
    base = overrides.load_config(args.config)
    overrides.check_keys(base, [m.group(1) for a in args.base_flags
                                if (m := _CONFIG_FLAG.match(a))])
    if any(_CONFIG_FLAG.match(a).group(1) == "seed" for a in args.base_flags):
        raise cli.UsageError("--config.seed: the study sets config.seed of each run "
                             "(--seeds).")
    for arm in args.arms:
        try:
            overrides.check_keys(base, [o.split("=", 1)[0] for o in arm.overrides])
        except cli.UsageError as e:
            raise cli.UsageError(f"--arm {arm.name}: {e}") from None
    runs = []
    for arm in args.arms:
        flag_args = args.base_flags + arm.flags
        config = build_config(args.config, flag_args, f"--arm {arm.name}")
        for seed in range(args.seeds):
            c = config.copy_and_resolve_references()
            c.seed = seed
            directory = os.path.join(args.workdir, arm.name, f"seed{seed}")
            command = [sys.executable, "-m", "softcon_jax.train", "--config", args.config,
                       "--workdir", directory, *flag_args, f"--config.seed={seed}"]
            runs.append(Run(arm, seed, c, directory, command))
    return runs


# ==== Command line ========================================================================

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m softcon_jax.study",
        description="Seeded, paired ablation study: arms x seeds of pretraining runs, "
                    "evaluated and compared (extra --config.key=value apply to every arm).")
    p.add_argument("--config", required=True, help="configs/X.py[:arg], as the trainer's")
    p.add_argument("--workdir", required=True, help="study directory (WORKDIR/<arm>/seed<k>)")
    p.add_argument("--arm", action="append", required=True, type=parse_arm, dest="arms",
                   help="NAME=[key=value[,key=value...]]; repeat for each arm")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm (default 3)")
    p.add_argument("--reference", default=None,
                   help="arm the others are compared with (default: the first)")
    p.add_argument("--eval", default="", help="comma-separated softcon_jax.evaluate tasks")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir for --eval")
    p.add_argument("--max-examples", type=int, default=None,
                   help="--eval: read at most this many examples per split")
    p.add_argument("--metric", default="knn_map_macro", help="metric of the plot's score panels")
    p.add_argument("--arm-index", type=int, default=None, help="run only this arm (0-based)")
    p.add_argument("--seed-index", type=int, default=None, help="run only this seed")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--print-commands", action="store_true",
                      help="print one command per run and the aggregate call; run nothing")
    mode.add_argument("--aggregate", action="store_true",
                      help="only build the outputs from the finished runs")
    return p


def _fan_out(argv: list[str], runs: list[Run], arms: list[Arm]) -> list[str]:
    """One command per run, then the aggregate call (the user's own arguments kept)."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--arm-index", "--seed-index"):
            skip = True
        elif not a.startswith(("--arm-index=", "--seed-index=", "--print-commands")):
            keep.append(a)
    base = ["python", "-m", "softcon_jax.study", *keep]
    index = {a.name: i for i, a in enumerate(arms)}
    lines = [shlex.join(base + ["--arm-index", str(index[r.arm.name]), "--seed-index",
                                str(r.seed)]) for r in runs]
    return lines + [shlex.join(base + ["--aggregate"])]


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    base_flags = [a for a in argv if _CONFIG_FLAG.match(a)]
    args = _parser().parse_args([a for a in argv if not _CONFIG_FLAG.match(a)])
    args.base_flags = base_flags
    names = [a.name for a in args.arms]
    if len(set(names)) != len(names):
        raise cli.UsageError(f"--arm: names must be unique, got {names}.")
    if args.seeds < 1:
        raise cli.UsageError(f"--seeds={args.seeds}; expected a positive integer.")
    reference = args.reference or names[0]
    if reference not in names:
        raise cli.UsageError(f"--reference {reference}: not an arm ({', '.join(names)}).")
    for flag, value, n in (("--arm-index", args.arm_index, len(names)),
                           ("--seed-index", args.seed_index, args.seeds)):
        if value is not None and not 0 <= value < n:
            raise cli.UsageError(f"{flag}={value}; expected 0..{n - 1}.")
    tasks = [t for t in args.eval.split(",") if t]
    if tasks:
        from softcon_jax.evaluators.tasks import available_tasks

        unknown = [t for t in tasks if t not in available_tasks()]
        if unknown:
            raise cli.UsageError(f"--eval: unknown task(s) {unknown}; available: "
                                 f"{', '.join(available_tasks())}.")
    runs = plan_runs(args)
    if not tasks and (bare := [r.arm.name for r in runs if not r.config.eval.get("data_path")]):
        raise cli.UsageError(f"--arm {bare[0]}: nothing to evaluate: config.eval.data_path is "
                             "empty (a held-out split for the online kNN) and --eval names "
                             "no task.")
    if args.print_commands:
        print("\n".join(_fan_out(argv, runs, args.arms)))
        return None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-restore chatter
    if not args.aggregate:
        from softcon_jax.evaluators.tfds_datasets import EvalOptions

        opts = EvalOptions(data_dir=args.data_dir, max_examples=args.max_examples)
        chosen = [r for r in runs
                  if (args.arm_index is None or r.arm.name == names[args.arm_index])
                  and (args.seed_index is None or r.seed == args.seed_index)]
        gflops = {}
        for i, r in enumerate(chosen):
            record = run_one(r, tasks, opts, gflops)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(record["metrics"].items()))
            print(f"[{i + 1}/{len(chosen)}] {r.arm.name} seed {r.seed}: {record['status']} "
                  f"(step {record['step']}): {shown}", flush=True)
        if args.arm_index is not None or args.seed_index is not None:
            return None  # a fan-out job: the aggregate call builds the outputs
    study = study_report.aggregate(args.workdir, names, args.seeds, reference,
                                   metric=args.metric,
                                   command=shlex.join(["python", "-m", "softcon_jax.study",
                                                       *argv]))
    print(open(os.path.join(args.workdir, "study.md")).read())
    return study


if __name__ == "__main__":
    cli.run(main)
