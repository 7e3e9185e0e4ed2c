"""The ablation-study command: arms x seeds of trainer runs, paired statistics, outputs."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import snapshot

from softcon_jax import cli, study, study_run
from softcon_jax.report import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T975 = {2: 12.706204736174707, 3: 4.302652729911275}  # t(0.975, n - 1), from tables


def _base(workdir) -> list[str]:
    data = os.path.join(workdir, "data")
    held_out = os.path.join(workdir, "held_out")
    return ["--config", "configs/quickstart.py:test", "--workdir", str(workdir),
            "--config.total_steps=2", "--config.checkpoint.every_steps=2",
            "--config.checkpoint.async_save=False", f"--config.data.path={data}",
            f"--config.eval.data_path={held_out}", "--config.eval.synthetic.enabled=True",
            "--config.eval.synthetic.seed=1", "--config.eval.synthetic.num_shards=1",
            "--config.eval.num_train=48", "--config.eval.num_val=16",
            "--config.eval.every_steps=2"]


def test_parse_arm_keeps_tuple_values_and_rejects_seed():
    arm = study.parse_arm("aug=data.augment.crop_scale=(0.2,1.0),model.mask_ratio=0.5")
    assert arm.name == "aug"
    assert arm.overrides == ("data.augment.crop_scale=(0.2,1.0)", "model.mask_ratio=0.5")
    assert study.parse_arm("base=").overrides == ()
    with pytest.raises(cli.UsageError, match="sets config.seed"):
        study.parse_arm("s=seed=3")
    with pytest.raises(cli.UsageError, match="expected NAME="):
        study.parse_arm("no_equals_sign")


def test_paired_interval_against_hand_computed_student_t():
    from softcon_jax.study_report import paired

    arm, ref = {0: 0.70, 1: 0.64, 2: 0.69}, {0: 0.66, 1: 0.65, 2: 0.60}
    d = np.array([0.04, -0.01, 0.09])
    half = T975[3] * d.std(ddof=1) / math.sqrt(3)
    p = paired(arm, ref)
    assert p["n"] == 3 and p["mean"] == pytest.approx(d.mean(), abs=1e-12)
    assert p["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], abs=1e-9)
    assert p["excludes_zero"] is False
    # Only the seeds both arms finished are paired.
    assert paired({0: 1.0, 1: 2.0}, {1: 1.5})["seeds"] == [1]


def test_two_arm_study_outputs_pairs_and_rerun_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    workdir = tmp_path / "study"
    argv = _base(workdir) + ["--arm", "soft=", "--arm",
                             "hard=loss.kwargs.soft_weight=0.0,model.mask_ratio=0.5",
                             "--seeds", "2"]
    # A fan-out job runs one run; the aggregate then reports what is finished.
    assert study.main(argv + ["--arm-index", "1", "--seed-index", "0"]) is None
    partial = study.main(argv + ["--aggregate"])
    assert partial["arms"]["soft"]["n"] == 0 and partial["arms"]["hard"]["n"] == 1

    result = study.main(argv)
    for name in ("study.json", "study.md", "study.png"):
        assert (workdir / name).stat().st_size > 100, name
    assert (workdir / "study.png").read_bytes()[:4] == b"\x89PNG"
    table = (workdir / "study.md").read_text()
    assert "| soft | 2 | 2 |" in table and "| hard | 2 | 2 |" in table

    records = {(a, k): json.loads((workdir / a / f"seed{k}" / "study_run.json").read_text())
               for a in ("soft", "hard") for k in (0, 1)}
    for (arm, k), r in records.items():
        config = json.loads((workdir / arm / f"seed{k}" / "study_config.json").read_text())
        assert config["seed"] == k  # seed k of every arm: paired
        assert r["step"] == 2
        # The study's score is the final teacher's: what the trainer's own online monitor
        # logged at the last step.
        steps, values = read_scalars(str(workdir / arm / f"seed{k}" / "tensorboard"))[
            "eval/knn_map_macro"]
        assert steps[-1] == 2
        assert r["metrics"]["knn_map_macro"] == pytest.approx(values[-1], abs=2e-3)
    # Masking half the student's patch tokens makes the step cheaper.
    assert records["hard", 0]["step_gflops"] < records["soft", 0]["step_gflops"]

    on_disk = json.loads((workdir / "study.json").read_text())
    assert len(on_disk["runs"]) == 4 and on_disk["reference"] == "soft"
    for m in ("knn_map_macro", "knn_map_micro", "knn_top1"):
        d = np.array([records["hard", k]["metrics"][m] - records["soft", k]["metrics"][m]
                      for k in (0, 1)], np.float64)
        p = on_disk["arms"]["hard"]["paired"][m]
        assert p["n"] == 2 and p["mean"] == pytest.approx(d.mean(), abs=1e-12)
        assert p["std"] == pytest.approx(d.std(ddof=1), abs=1e-12)
        half = T975[2] * d.std(ddof=1) / math.sqrt(2)
        assert p["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], abs=1e-9)
        values = [records["soft", k]["metrics"][m] for k in (0, 1)]
        s = on_disk["arms"]["soft"]["summary"][m]
        assert s["n"] == 2 and s["mean"] == pytest.approx(np.mean(values), abs=1e-12)
    assert result["arms"] == on_disk["arms"]

    # Rerun: nothing is trained or written in the run directories.
    before = {r: snapshot(str(workdir / r)) for r in ("soft", "hard")}

    def no_training(*a, **k):
        raise AssertionError(f"the rerun started a process: {a}")

    monkeypatch.setattr(study_run.subprocess, "run", no_training)
    capsys.readouterr()
    study.main(argv)
    out = capsys.readouterr().out
    assert out.count(": reused (step 2)") == 4
    assert {r: snapshot(str(workdir / r)) for r in ("soft", "hard")} == before


def test_bad_arm_key_is_one_line_before_anything_runs(tmp_path):
    workdir = tmp_path / "study"
    argv = _base(workdir) + ["--arm", "soft=", "--arm", "typo=loss.kwargs.soft_wieght=0"]
    proc = subprocess.run([sys.executable, "-m", "softcon_jax.study", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: --arm typo: --config.loss.kwargs.soft_wieght: "
                            "config.loss.kwargs has no key 'soft_wieght'. Did you mean "
                            "'soft_weight'?"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()


def test_bad_arm_value_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = _base(tmp_path / "study") + ["--arm", "m=model.mask_ratio=half"]
    with pytest.raises(cli.UsageError, match=r"^--arm m: .*--config.model.mask_ratio=half"):
        study.main(argv)
    assert not (tmp_path / "study").exists()


def test_print_commands_fans_out_one_command_per_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    argv = _base(tmp_path) + ["--arm", "a=", "--arm", "b=model.mask_ratio=0.25",
                              "--seeds", "3", "--print-commands"]
    study.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * 3 + 1
    assert lines[0].endswith("--arm-index 0 --seed-index 0")
    assert lines[5].endswith("--arm-index 1 --seed-index 2")
    assert lines[-1].endswith("--aggregate") and "--print-commands" not in lines[-1]
    assert all("--arm b=model.mask_ratio=0.25" in line for line in lines)
    assert not tmp_path.joinpath("a").exists()
