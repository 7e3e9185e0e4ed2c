"""The input-pipeline benchmark runs end to end and prints its markdown table."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_input_pipeline_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "input_pipeline.py"), "--smoke",
         "--data", str(tmp_path / "bench")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr[-2000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith(
        "| pipeline | views | MB/sample to the devices | worker processes |")
    assert len(table) == 8  # header, rule, host x3, device x2, reference-style baseline
    assert "reference-style per-sample loop" in table[-1]
    rows = [[c.strip() for c in row.strip("|").split("|")] for row in table[2:]]
    assert [r[1] for r in rows] == ["float32", "bfloat16", "float32", "bfloat16", "bfloat16",
                                    "float32"]
    assert "augment_on='device'" in rows[3][0]
    assert abs(float(rows[1][2]) * 2 - float(rows[0][2])) < 0.02  # bf16 views: half
    assert all(float(r[4]) > 0 for r in rows)  # records/s
    assert "Device-side views" in out.stdout and "MFLOP" in out.stdout


def test_cores_per_accelerator_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "cores_per_accelerator.py"),
         "--smoke", "--data", str(tmp_path / "cores")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr[-2000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3  # header, rule, one model x three chips
