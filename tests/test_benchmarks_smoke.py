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
    # The project's study end to end: the RGB source run and its export, every arm
    # (untrained, InfoNCE, masking, continual from the RGB model), study.json / md / png.
    import json

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "method_efficacy.py"), "--smoke",
         "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "study.json").read_text())
    arms = results["arms"]
    assert list(arms) == ["soft_ce", "random", "infonce", "mask25", "mask50", "continual"]
    for name, a in arms.items():
        assert a["n"] == 1, name
        assert 0.0 < a["summary"]["knn_map_macro"]["mean"] <= 1.0, name
    assert arms["random"]["step"] == 0 and arms["continual"]["step"] == 3
    # Masking removes student tokens: fewer FLOPs per step.
    gflops = [arms[n]["step_gflops"] for n in ("soft_ce", "mask25", "mask50")]
    assert gflops[0] > gflops[1] > gflops[2] > 0
    assert "| continual | 1 |" in (tmp_path / "out" / "study.md").read_text()
    assert (tmp_path / "out" / "study.png").stat().st_size > 1000
