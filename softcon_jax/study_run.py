"""One run of a study (`softcon_jax.study`): train, resume or reuse it, then evaluate it.

A run is a trainer workdir `WORKDIR/<arm>/seed<k>`. The trainer runs as a subprocess
(`python -m softcon_jax.train`, its output in `train.log`), so an interrupted run resumes
and a finished one (latest checkpoint >= `total_steps`) is not started again. A
`total_steps=0` run gets checkpoint 0, the state training would start from. The run's
config is kept in `study_config.json`; another config in the same directory is an error.
The final teacher is evaluated on the config's online kNN split and the TFDS tasks, and
the record (metrics, online kNN curves, train seconds, GFLOP per step) goes to
`study_run.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from typing import Any

from softcon_jax import cli, study_report

RUN_RECORD = "study_run.json"
RUN_CONFIG = "study_config.json"


@dataclasses.dataclass
class Run:
    arm: Any  # study.Arm: name, overrides
    seed: int
    config: Any
    directory: str
    command: list[str]  # the trainer's command line


def _latest_step(directory: str) -> int | None:
    if not os.path.isdir(os.path.join(directory, "checkpoints")):
        return None
    from softcon_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(directory, async_save=False, create=False)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def _flat(tree: Any, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _check_same_config(run: Run) -> None:
    """A run directory holds one config: another one there is an error, nothing is touched."""
    path = os.path.join(run.directory, RUN_CONFIG)
    new = json.loads(run.config.to_json_best_effort())
    if os.path.exists(path):
        old = json.load(open(path))
        differ = sorted(k for k in set(_flat(old)) | set(_flat(new))
                        if _flat(old).get(k, "<unset>") != _flat(new).get(k, "<unset>"))
        if differ:
            raise cli.UserValueError(
                f"{run.directory} holds a run of another config (differs in config."
                f"{', config.'.join(differ[:5])}); use another --workdir or remove it.")
        return
    os.makedirs(run.directory, exist_ok=True)
    study_report.write_json(path, new)


def write_initial_checkpoint(config: Any, directory: str) -> None:
    """Checkpoint 0 of a `total_steps=0` arm: the state training would start from."""
    from softcon_jax import methods, optim, sharding, state
    from softcon_jax.checkpoint import Checkpointer

    mesh = sharding.make_mesh(config.mesh)
    method = methods.get(config.method)(config, mesh)
    tx, _ = optim.make_optimizer(config)
    init_fn, rng, _, shardings = state.create_train_state(config, method, tx, mesh)
    s = init_fn(rng)
    if config.get("init") and config.init.get("weights"):
        s = state.load_pretrained_backbone(config, method, s, shardings)
    ckpt = Checkpointer(directory, keep=1, async_save=False)
    try:
        ckpt.save(0, s, None, config)
        ckpt.wait()
    finally:
        ckpt.close()


def train(run: Run) -> tuple[str, float]:
    """Trains, resumes or reuses the run; returns (what happened, seconds)."""
    total = int(run.config.total_steps)
    done = _latest_step(run.directory)
    if done is not None and done >= total:
        return "reused", 0.0
    t0 = time.perf_counter()
    if total == 0:
        write_initial_checkpoint(run.config, run.directory)
        return "initialised", time.perf_counter() - t0
    log_path = os.path.join(run.directory, "train.log")
    with open(log_path, "a") as out:
        rc = subprocess.run(run.command, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = open(log_path, errors="replace").read().strip().splitlines()[-3:]
        raise cli.UserValueError(f"{run.directory}: the trainer exited with status {rc}; "
                                 f"log {log_path} ends: {' | '.join(tail)}")
    return ("resumed" if done else "trained"), time.perf_counter() - t0


def online_knn_metrics(config: Any, backbone: Any) -> dict:
    """The online kNN monitor of `config.eval` on a frozen backbone, now."""
    from softcon_jax import sharding
    from softcon_jax.evaluators.online_knn import OnlineKNN

    c = config.copy_and_resolve_references()
    c.eval.every_steps = 1  # the split and its settings; the monitor's schedule is not used
    mesh = sharding.make_mesh(c.mesh)  # as in training: the same program, the same numbers
    model = backbone.model
    variables = {k: v for k, v in backbone.variables.items() if k in ("params", "batch_stats")}
    monitor = OnlineKNN(c, mesh, lambda v, x: model.apply(v, x, train=False),
                        lambda _: variables)
    scalars = monitor.run(None)
    return {k.split("/", 1)[1]: float(v) for k, v in scalars.items() if "time" not in k}


def step_gflops(config: Any) -> float:
    """XLA's cost analysis of the lowered train step, GFLOP per global batch.

    The views come from the host (`augment_on='host'`), so augmentation is not counted:
    what differs between arms is the model's forward, backward and update.
    """
    import jax

    from softcon_jax import data, methods, optim, sharding, state, step

    c = config.copy_and_resolve_references()
    c.data.augment_on = "host"
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    method = methods.get(c.method)(c, mesh)
    tx, schedule = optim.make_optimizer(c)
    _, _, abstract, shardings = state.create_train_state(c, method, tx, mesh)
    spec = method.views.element_spec(int(c.data.image_size), int(c.data.in_channels),
                                     data.input_dtype(c))
    batch = {k: jax.ShapeDtypeStruct((int(c.global_batch_size),) + tuple(shape), dtype)
             for k, (shape, dtype) in spec.items()}
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, shardings)
    fn = step.jit_train_step(c, method, tx, schedule, mesh, shardings)
    cost = fn.lower(abstract_state, batch).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) / 1e9


def evaluate(run: Run, tasks: list[str], opts: Any) -> dict:
    """Metrics of the run's final teacher: online kNN split, then the TFDS tasks."""
    from softcon_jax.evaluators.tasks import evaluate as evaluate_task
    from softcon_jax.pretrained import load_from_workdir

    backbone = load_from_workdir(run.directory)
    metrics = {}
    if run.config.eval.get("data_path"):
        metrics.update(online_knn_metrics(run.config, backbone))
    for task in tasks:
        result = evaluate_task(backbone, task, opts)
        metrics.update({f"{task}/{k}": float(v) for k, v in result["metrics"].items()
                        if isinstance(v, (int, float))})
    return {"step": int(backbone.step), "metrics": metrics}


def run_one(run: Run, tasks: list[str], opts: Any, gflops: dict | None = None) -> dict:
    """Trains (or reuses) and evaluates one run; writes and returns its record.

    `gflops`: {arm: GFLOP per step} already counted (the seeds of an arm share it).
    """
    from softcon_jax.registry import import_modules

    import_modules(run.config.get("imports"))
    _check_same_config(run)
    path = os.path.join(run.directory, RUN_RECORD)
    status, seconds = train(run)
    old = json.load(open(path)) if os.path.exists(path) else None
    if status == "reused" and old and set(old.get("tasks", [])) >= set(tasks):
        return {**old, "status": "reused"}
    record = {"arm": run.arm.name, "seed": run.seed, "overrides": list(run.arm.overrides),
              "tasks": list(tasks), **evaluate(run, tasks, opts),
              "train_s": round(seconds, 1) if status != "reused" else (old or {}).get("train_s"),
              "step_gflops": (old or {}).get("step_gflops") or (gflops or {}).get(
                  run.arm.name) or step_gflops(run.config),
              "curves": study_report.read_curves(run.directory)}
    study_report.write_json(path, record)
    if gflops is not None:
        gflops[run.arm.name] = record["step_gflops"]
    return {**record, "status": status}
