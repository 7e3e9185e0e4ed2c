"""Do the methods learn? The project's own seeded study, on synthetic scenes, as a study.

    python benchmarks/method_efficacy.py [--runs runs/efficacy] [--seeds 3] [--steps 300]
        [--out benchmarks/results/efficacy] [--smoke] [--print-commands]

This file is two things. `get_config(arg)` is the study's base config (the quickstart ViT:
32 px, patch 8, width 64, depth 2; batch 64; `data_prep.synthetic` 13-band scenes with
Dynamic World-style labels; the online kNN on 512 bank / 128 query held-out locations of
another generator seed), usable with any command:

    python -m softcon_jax.study \
        --config benchmarks/method_efficacy.py:root=runs/efficacy,steps=300 \
        --workdir runs/efficacy --seeds 3 --reference soft_ce \
        --arm soft_ce= --arm random=total_steps=0 --arm infonce=loss.kwargs.soft_weight=0.0 \
        --arm mask25=model.mask_ratio=0.25 --arm mask50=model.mask_ratio=0.5 \
        --arm continual=init.weights=runs/efficacy/source_rgb/export/backbone.safetensors

and `main` runs exactly that (`ARMS`), seed by seed, then copies `study.{json,md,png}` to
--out. The arms, all at the same step budget, paired by seed against the recipe `soft_ce`
(SoftCon's soft cross-entropy, soft_weight 1, no masking):

- `random`: the initial backbone, no training (`total_steps=0`);
- `infonce`: `soft_weight=0`, whose target is the identity: InfoNCE (MoCo-v3) exactly;
- `mask25`, `mask50`: Siamese masking, the student sees 25 % / 50 % fewer patch tokens
  (`config.model.mask_ratio`); the table's GFLOP/step is XLA's count of the train step;
- `continual`: continual pretraining, both backbones initialised from a model pretrained
  with this project on other imagery: an RGB run (bands B4, B3, B2 of scenes of another
  generator seed, the same architecture and step budget, `get_config("rgb")`), exported
  with `softcon_jax.export` and imported with `config.init.weights` (first layer
  re-initialised for the 13 bands, `config.init.first_layer='reinit'`, as SoftCon does from
  DINO). Its step budget is the same as the others'; the RGB run's steps come on top.

`--smoke`: 3 steps, 1 seed, tiny sizes (the test suite).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common, quickstart  # noqa: E402

ARMS = {
    "soft_ce": "",
    "random": "total_steps=0",
    "infonce": "loss.kwargs.soft_weight=0.0",
    "mask25": "model.mask_ratio=0.25",
    "mask50": "model.mask_ratio=0.5",
    "continual": "init.weights={source}",
}
RGB = ("B4", "B3", "B2")


def get_config(arg: str | None = None):
    """arg: `[root=DIR][,steps=N][,smoke][,rgb]` (data under DIR; `rgb`: the source run)."""
    a = common.parse_arg(arg, "benchmarks/method_efficacy.py", root="runs/efficacy",
                         steps=300, smoke=False, rgb=False)
    c = quickstart.get_config("test" if a.smoke else None)
    c.total_steps = a.steps
    c.log_every_steps = max(1, min(20, a.steps // 5))
    c.checkpoint.every_steps = max(1, a.steps // 2)
    c.checkpoint.async_save = False
    c.data.path = os.path.join(a.root, "data_s2c")
    c.data.synthetic.num_locations = 64 if a.smoke else 512
    c.eval.every_steps = max(1, a.steps // 3 if a.smoke else 100)
    c.eval.data_path = os.path.join(a.root, "eval_s2c")
    c.eval.synthetic = common.synthetic(num_locations=80 if a.smoke else 640, num_shards=1,
                                        image_size=c.data.synthetic.image_size, seed=1)
    c.eval.num_train, c.eval.num_val = (48, 16) if a.smoke else (512, 128)
    c.init = dict(weights="", first_layer="reinit", pos_embed_interpolation="timm")
    if a.rgb:  # the continual arm's source: other bands of other scenes, no online kNN
        c.data.path = os.path.join(a.root, "data_rgb")
        c.data.bands, c.data.in_channels = RGB, len(RGB)
        c.data.synthetic.seed = 3
        c.eval.every_steps, c.eval.data_path = 0, ""
    return c


def _run(argv: list[str]) -> None:
    import subprocess

    print("$", " ".join(argv), flush=True)
    subprocess.run([sys.executable, *argv], check=True)


def main(argv=None):
    import argparse
    import shutil

    from softcon_jax import study

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs/efficacy", help="study workdir (and its data)")
    p.add_argument("--out", default="benchmarks/results/efficacy")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--smoke", action="store_true", help="3 steps, 1 seed, tiny sizes")
    p.add_argument("--print-commands", action="store_true",
                   help="print the study's per-run commands instead of running them")
    a = p.parse_args(argv)
    if a.smoke:
        a.seeds, a.steps = 1, 3
    spec = f"benchmarks/method_efficacy.py:root={a.runs},steps={a.steps}"
    spec += ",smoke" if a.smoke else ""
    source = os.path.join(a.runs, "source_rgb")
    weights = os.path.join(source, "export", "backbone.safetensors")
    if not a.print_commands and not os.path.exists(weights):
        _run(["-m", "softcon_jax.train", "--config", spec + ",rgb", "--workdir", source])
        _run(["-m", "softcon_jax.export", "--workdir", source, "--out", weights])
    base = ["--config", spec, "--workdir", a.runs, "--seeds", str(a.seeds),
            "--reference", "soft_ce"]
    base += [f"--arm={name}={o.format(source=weights)}" for name, o in ARMS.items()]
    if a.print_commands:
        return study.main(base + ["--print-commands"])
    for seed in range(a.seeds):  # seed-major: an early stop leaves every arm paired
        study.main(base + ["--seed-index", str(seed)])
    result = study.main(base + ["--aggregate"])
    os.makedirs(a.out, exist_ok=True)
    for name in ("study.json", "study.md", "study.png"):
        shutil.copy(os.path.join(a.runs, name), os.path.join(a.out, name))
    return result


if __name__ == "__main__":
    main()
