"""Does pretraining help, and do soft targets beat hard ones? A seeded study on synthetic scenes.

    python benchmarks/method_efficacy.py [--out benchmarks/results/efficacy] [--seeds 3]
        [--steps 500] [--smoke]

Every arm pretrains the same tiny DINOv2-structured ViT (the quickstart model: 32 px, patch
8, width 64, depth 2) with the same steps, batch, augmentations and schedule on
`data_prep.synthetic` scenes (13-band S2, 4 seasons, Dynamic World-style multi-labels):

- `random`: the step-0 weights, no pretraining;
- `infonce`: the MoCo-v3 baseline (`configs/softcon.py:...,baseline`: InfoNCE, hard targets);
- `soft_ce`, `bce`, `mse`: SoftCon's three variants (`config.loss.kwargs.variant`);
- `seco` against `seco_random`: a small ResNet pretrained with SeCo on 5-timestamp uint8
  scenes (`configs/seco.py`, shrunk).

Downstream, frozen teacher backbone, on held-out locations (another generator seed; the
first labelled season of each, 384 bank / 128 query locations):

- Dynamic World multi-label mAP (macro, micro) with the project's kNN (k = 20, DINO
  weighting) and linear probe (`softcon_jax.evaluators`);
- `area_r2`: R^2 of a ridge regression from the features to the per-class area fractions of
  the scene. The labels only say which classes cover more than 5 %; the fractions are a
  hidden variable of the generator that the labels do not give away, so a good
  representation must have learnt the scene's composition, not the label set;
- SeCo only: `xseason_top1`, how often the nearest held-out feature of another timestamp
  (t = 2) is the same location as the query (t = 0).

A sweep of SoftCon `soft_ce`, one factor at a time around the recipe (`soft_weight` 1,
temperature 0.2; seed 0): `soft_weight` in {0, 0.5, 1, 2}, and temperature 0.1, shows how
sensitive the result is (`soft_weight` 0 is InfoNCE exactly). Outputs in --out: `efficacy.json` (every
number), `efficacy.md` (mean +- std over seeds) and `efficacy_knn.png` (online kNN macro mAP
against steps, mean over seeds, per arm). `--smoke` runs two steps of random / soft_ce /
seco (the test suite uses it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import common, quickstart  # noqa: E402
from configs import seco as seco_config  # noqa: E402
from data_prep import synthetic  # noqa: E402
from softcon_jax import data, interop, methods, optim, report, sharding, state, train  # noqa: E402
from softcon_jax.data import augment  # noqa: E402
from softcon_jax.data.source import ensure_synthetic_data  # noqa: E402
from softcon_jax.evaluators.knn import knn_scores_chunked  # noqa: E402
from softcon_jax.evaluators.linear_probe import train_linear_probe  # noqa: E402
from softcon_jax.evaluators.metrics import mean_average_precision  # noqa: E402

SOFTCON_ARMS = {"infonce": dict(name="infonce", kwargs={}),
                "soft_ce": dict(name="soft_contrastive", kwargs=dict(variant="soft_ce")),
                "bce": dict(name="soft_contrastive", kwargs=dict(variant="bce")),
                "mse": dict(name="soft_contrastive", kwargs=dict(variant="mse"))}
SWEEP = [(0.0, 0.2), (0.5, 0.2), (1.0, 0.2), (2.0, 0.2), (1.0, 0.1)]  # (soft_weight, T)
HELD_OUT_SEED = 2        # generator seed of the downstream scenes (training data: 0)
NUM_BANK, NUM_QUERY = 384, 128


# ==== Configs =============================================================================

def softcon_config(out: str, steps: int, seed: int, loss: dict, smoke: bool):
    c = quickstart.get_config("test" if smoke else None)
    c.unlock()
    c.seed = seed
    c.total_steps = steps
    c.data.path = os.path.join(out, "data_s2c")
    c.data.synthetic.num_locations = 64 if smoke else 512
    c.loss.name = loss["name"]
    c.loss.kwargs = dict(loss["kwargs"])
    if "temperature" in loss:
        c.loss.temperature = loss["temperature"]
    c.checkpoint.every_steps = steps
    c.checkpoint.async_save = False
    c.log_every_steps = max(1, steps // 10)
    c.eval.every_steps = 0 if smoke else max(1, steps // 5)
    c.eval.data_path = os.path.join(out, "eval_s2c")
    c.eval.synthetic = common.synthetic(
        num_locations=96 if smoke else 640, num_shards=1,
        image_size=c.data.synthetic.image_size, seed=1)
    c.eval.num_train, c.eval.num_val = (64, 16) if smoke else (512, 128)
    return c


def seco_run_config(out: str, steps: int, seed: int, smoke: bool):
    c = seco_config.get_config("rn18,runlocal")
    c.unlock()
    c.seed = seed
    c.total_steps = steps
    c.global_batch_size = 16 if smoke else 64
    c.log_every_steps = max(1, steps // 10)
    c.checkpoint.every_steps = steps
    c.data.path = os.path.join(out, "data_seco")
    c.data.image_size = 16 if smoke else 32
    c.data.synthetic.update(num_locations=64 if smoke else 512, image_size=20 if smoke else 40,
                            num_shards=2)
    c.model.backbone_kwargs.widths = (16, 32, 64, 64)
    c.model.head.hidden_dim, c.model.head.out_dim = 64, 32
    c.loss.queue_size = 64 if smoke else 1024
    c.eval.every_steps = 0
    return c


# ==== Held-out scenes and features ========================================================

def held_out(config, count: int, timesteps: int, modality: str, image_size: int) -> dict:
    """Images (first labelled season and, for retrieval, t=0 / t=2), labels, area fractions."""
    meta = data.open_dataset(config.data.path).meta
    normalizer = data.make_normalizer(config.data, meta, config.data.path)
    bands = list(config.data.bands) if config.data.get("bands") else list(meta["bands"])
    index = np.array([meta["bands"].index(b) for b in bands])
    size = int(config.data.image_size)

    def prep(img):  # (C, H, W) stored values -> (S, S, C) model input, as the online monitor
        img = img[index]
        x = normalizer(img.transpose(1, 2, 0), normalizer.quantile_bounds(img))
        return augment.resize_bilinear(x, (size, size))

    out = {"x": [], "labels": [], "cover": [], "x_t0": [], "x_t2": []}
    i = 0
    while len(out["x"]) < count:
        ex = synthetic.make_example(i, seed=HELD_OUT_SEED, image_size=image_size,
                                    timesteps=timesteps, modality=modality,
                                    label_threshold=0.05, unlabelled_prob=0.1,
                                    with_targets=True)
        i += 1
        labelled = np.nonzero(ex["has_label"] & ex["labels"].any(axis=1))[0]
        if not labelled.size:
            continue
        t = int(labelled[0])
        out["x"].append(prep(ex["image"][t]))
        out["labels"].append(ex["labels"][t].astype(np.float32))
        out["cover"].append(ex["targets"]["cover"][t])
        if timesteps > 2:
            out["x_t0"].append(prep(ex["image"][0]))
            out["x_t2"].append(prep(ex["image"][2]))
    return {k: np.stack(v) for k, v in out.items() if v}


def features(model, variables, x: np.ndarray, batch: int = 128) -> np.ndarray:
    used = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    return np.concatenate([np.asarray(interop.backbone_features(model, used, x[i:i + batch]))
                           for i in range(0, len(x), batch)]).astype(np.float32)


def ridge_r2(x_train, y_train, x_test, y_test, lam: float = 1.0) -> float:
    """R^2 (pooled over outputs) of ridge regression on standardised features, float64."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a = np.c_[(x_train - mean) / std, np.ones(len(x_train))].astype(np.float64)
    b = np.c_[(x_test - mean) / std, np.ones(len(x_test))].astype(np.float64)
    reg = lam * np.eye(a.shape[1])
    reg[-1, -1] = 0.0  # no penalty on the intercept
    w = np.linalg.solve(a.T @ a + reg, a.T @ y_train.astype(np.float64))
    resid = y_test - b @ w
    return float(1.0 - np.sum(resid ** 2) / np.sum((y_test - y_train.mean(0)) ** 2))


def downstream(model, variables, ho: dict, num_bank: int, seed: int) -> dict:
    f = features(model, variables, ho["x"])
    fb, fq = f[:num_bank], f[num_bank:]
    lb, lq = ho["labels"][:num_bank], ho["labels"][num_bank:]
    knn = mean_average_precision(knn_scores_chunked(fb, lb, fq, k=20, temperature=0.07,
                                                    weighting="dino"), lq)
    probe = train_linear_probe(fb, lb, num_classes=lb.shape[1], multilabel=True, seed=seed,
                               epochs=50, min_steps=500)
    lin = mean_average_precision(probe.logits(fq), lq)
    result = {"knn_map_macro": knn["map_macro"], "knn_map_micro": knn["map_micro"],
              "linear_map_macro": lin["map_macro"], "linear_map_micro": lin["map_micro"],
              "area_r2": ridge_r2(fb, ho["cover"][:num_bank], fq, ho["cover"][num_bank:])}
    if "x_t0" in ho:  # cross-season retrieval: the same place at another timestamp
        q = features(model, variables, ho["x_t0"])
        b = features(model, variables, ho["x_t2"])
        q /= np.linalg.norm(q, axis=1, keepdims=True) + 1e-12
        b /= np.linalg.norm(b, axis=1, keepdims=True) + 1e-12
        result["xseason_top1"] = float(np.mean(np.argmax(q @ b.T, axis=1)
                                               == np.arange(len(q))))
    return result


# ==== Runs ================================================================================

def initial_variables(config):
    """The step-0 teacher backbone (the `random` arms), exactly as training starts."""
    mesh = sharding.make_mesh(config.mesh)
    method = methods.get(config.method)(config, mesh)
    tx, _ = optim.make_optimizer(config)
    init_fn, rng, _, _ = state.create_train_state(config, method, tx, mesh)
    s = jax.device_get(init_fn(rng))
    return method.backbone, method.backbone_variables(s.model_state, s.params, "teacher")


def pretrain(config, workdir: str):
    """Trains (or reuses a finished run in `workdir`); teacher backbone and kNN curve."""
    mesh = sharding.make_mesh(config.mesh)
    method = methods.get(config.method)(config, mesh)
    s = jax.device_get(train.train(config, workdir))
    curve = report.read_scalars(os.path.join(workdir, "tensorboard")).get(
        "eval/knn_map_macro", (np.zeros(0), np.zeros(0)))
    return (method.backbone, method.backbone_variables(s.model_state, s.params, "teacher"),
            [[int(a), float(b)] for a, b in zip(*curve)])


def _summary(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k in r})
    return {k: [float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))]
            for k in keys}


def run(out: str, seeds: int, steps: int, smoke: bool, sweep: bool) -> dict:
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    results = {"steps": steps, "seeds": seeds, "arms": {}, "curves": {}, "sweep": []}
    arms = {"soft_ce": SOFTCON_ARMS["soft_ce"]} if smoke else SOFTCON_ARMS
    base = softcon_config(out, steps, 0, SOFTCON_ARMS["soft_ce"], smoke)
    ensure_synthetic_data(base.data)
    ho = held_out(base, (64 if smoke else NUM_BANK + NUM_QUERY), 4, "s2c",
                  base.data.synthetic.image_size)
    bank = 48 if smoke else NUM_BANK

    per_arm: dict[str, list[dict]] = {"random": []}
    for seed in range(seeds):
        cfg = softcon_config(out, steps, seed, SOFTCON_ARMS["soft_ce"], smoke)
        per_arm["random"].append(downstream(*initial_variables(cfg), ho, bank, seed))
        for arm, loss in arms.items():
            cfg = softcon_config(out, steps, seed, loss, smoke)
            model, variables, curve = pretrain(cfg, os.path.join(out, "runs", f"{arm}_s{seed}"))
            per_arm.setdefault(arm, []).append(downstream(model, variables, ho, bank, seed))
            results["curves"].setdefault(arm, []).append(curve)
            print(f"[{time.perf_counter() - t0:6.0f}s] {arm} seed {seed}: "
                  f"{per_arm[arm][-1]}", flush=True)

    seco_base = seco_run_config(out, steps, 0, smoke)
    ensure_synthetic_data(seco_base.data)
    ho_seco = held_out(seco_base, (64 if smoke else NUM_BANK + NUM_QUERY), 5, "seco",
                       seco_base.data.synthetic.image_size)
    per_arm["seco_random"], per_arm["seco"] = [], []
    for seed in range(seeds):
        cfg = seco_run_config(out, steps, seed, smoke)
        per_arm["seco_random"].append(downstream(*initial_variables(cfg), ho_seco, bank, seed))
        model, variables, _ = pretrain(cfg, os.path.join(out, "runs", f"seco_s{seed}"))
        per_arm["seco"].append(downstream(model, variables, ho_seco, bank, seed))
        print(f"[{time.perf_counter() - t0:6.0f}s] seco seed {seed}: {per_arm['seco'][-1]}",
              flush=True)

    if sweep:  # one factor at a time around the recipe (soft_weight 1, temperature 0.2)
        for weight, temperature in SWEEP:
            loss = dict(name="soft_contrastive", temperature=temperature,
                        kwargs=dict(variant="soft_ce", soft_weight=weight))
            cfg = softcon_config(out, steps, 0, loss, smoke)
            # The recipe point is the soft_ce arm's seed-0 run: reuse it.
            name = "soft_ce_s0" if (weight, temperature) == (1.0, 0.2) else \
                f"sweep_w{weight}_t{temperature}"
            model, variables, _ = pretrain(cfg, os.path.join(out, "runs", name))
            results["sweep"].append({"soft_weight": weight, "temperature": temperature,
                                     **downstream(model, variables, ho, bank, 0)})
            print(f"[{time.perf_counter() - t0:6.0f}s] {name}: {results['sweep'][-1]}",
                  flush=True)

    results["arms"] = {arm: {"runs": rows, "mean_std": _summary(rows)}
                       for arm, rows in per_arm.items()}
    results["time_s"] = round(time.perf_counter() - t0, 1)
    write_outputs(out, results)
    return results


def write_outputs(out: str, results: dict) -> None:
    with open(os.path.join(out, "efficacy.json"), "w") as f:
        json.dump(results, f, indent=1)
    metrics = ["knn_map_macro", "knn_map_micro", "linear_map_macro", "linear_map_micro",
               "area_r2", "xseason_top1"]
    lines = [f"{results['seeds']} seeds, {results['steps']} steps, "
             f"{results['time_s']:.0f} s. Mean +- std over seeds.", "",
             "| arm | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for arm, r in results["arms"].items():
        ms = r["mean_std"]
        lines.append(f"| {arm} | " + " | ".join(
            f"{ms[m][0]:.3f} ± {ms[m][1]:.3f}" if m in ms else "-" for m in metrics) + " |")
    if results["sweep"]:
        lines += ["", "SoftCon soft_ce sweep (seed 0):", "",
                  "| soft_weight | temperature | knn_map_macro | linear_map_macro | area_r2 |",
                  "|---|---|---|---|---|"]
        for r in results["sweep"]:
            lines.append(f"| {r['soft_weight']} | {r['temperature']} | "
                         f"{r['knn_map_macro']:.3f} | {r['linear_map_macro']:.3f} | "
                         f"{r['area_r2']:.3f} |")
    with open(os.path.join(out, "efficacy.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, curves in results["curves"].items():
        curves = [c for c in curves if c]
        if not curves:
            continue
        steps = np.array([s for s, _ in curves[0]])
        values = np.array([[v for _, v in c] for c in curves if len(c) == len(steps)])
        ax.plot(steps, values.mean(0), marker="o", label=arm)
    ax.set_xlabel("step")
    ax.set_ylabel("online kNN mAP (macro)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "efficacy_knn.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/efficacy")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="2 steps, 1 seed, random / soft_ce / seco only (the test suite)")
    a = p.parse_args(argv)
    if a.smoke:
        a.seeds, a.steps, a.no_sweep = 1, 2, True
    results = run(a.out, a.seeds, a.steps, a.smoke, not a.no_sweep)
    print(open(os.path.join(a.out, "efficacy.md")).read())
    return results


if __name__ == "__main__":
    main()
