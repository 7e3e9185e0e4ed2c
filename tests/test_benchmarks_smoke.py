"""The benchmark scripts run end to end in their --smoke mode (no timing assertions)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loss_scaling_smoke():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "loss_scaling.py"), "--smoke"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| loss | N |"))
    assert "direct time (s)" in lines[header] and "blockwise XLA temp" in lines[header]
    assert lines[header + 1].startswith("|---")
    row = lines[header + 2].split("|")
    assert row[1].strip() == "soft_ce" and row[2].strip() == "256"
    assert "error" not in lines[header + 2] and "n/a" not in lines[header + 2]


def test_train_loop_smoke():
    # The real trainer loop with and without device prefetch, on 2 simulated devices.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_loop.py"), "--smoke"],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines)
                  if line.startswith("| prefetch_to_device | step (ms) |"))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2:]
            if line.startswith("|")]
    assert [r[0] for r in rows] == ["0", "2"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
    assert rows[0][3] == "1.00x"  # the baseline is the first row


def test_dispatch_smoke():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "dispatch.py"), "--smoke"],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in proc.stdout.splitlines() if line.startswith("| ") and "leaves" not in line]
    assert [r[0] for r in rows] == ["1", "10"]
    assert all(float(r[1]) > 0 for r in rows) and rows[0][3] == "1.0x"


def test_method_efficacy_smoke(tmp_path):
    # Every arm family end to end: pretraining, held-out kNN / linear / regression /
    # cross-season metrics, the JSON, the table and the plot.
    import json

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "method_efficacy.py"), "--smoke",
         "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900,
        cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "efficacy.json").read_text())
    assert set(results["arms"]) == {"random", "soft_ce", "seco_random", "seco"}
    metrics = {"knn_map_macro", "knn_map_micro", "linear_map_macro", "linear_map_micro",
               "area_r2", "xseason_top1"}
    for arm, r in results["arms"].items():
        assert set(r["mean_std"]) == metrics, arm
        assert all(0.0 < r["mean_std"][m][0] <= 1.0 for m in metrics - {"area_r2"}), arm
    table = (tmp_path / "efficacy.md").read_text()
    assert "| soft_ce |" in table and "| seco |" in table
    assert (tmp_path / "efficacy_knn.png").stat().st_size > 1000
