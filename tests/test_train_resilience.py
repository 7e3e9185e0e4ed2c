"""Resilience: exact resume, crash during a save, multi-process, no recompiles.

Every run here is the real training CLI in a subprocess (`python -m softcon_jax.train`), or
`_DRIVER` below: the same CLI with a test hook (send SIGTERM to itself at a step, stall the
asynchronous checkpoint write, count compilations). All subprocesses share one dataset and
one persistent XLA compilation cache, so only the first run of a layout pays for compiling.
"""

import glob
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import portpicker
import pytest
from tensorboardX.proto import event_pb2

from helpers import fill_disk, small_tmpfs, snapshot

from softcon_jax import methods, optim, sharding, train
from softcon_jax.checkpoint import Checkpointer, abstract_with_shardings
from softcon_jax.data.source import open_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 8         # total steps of the resume runs
HALF = K // 2
TIMEOUT = 600

# The training CLI with optional hooks, chosen by environment variables.
_DRIVER = r'''
import asyncio, json, os, signal, sys, threading
import jax, numpy as np
from absl import app
from softcon_jax import checkpoint, train

env = os.environ.get
SIGTERM_AT = int(env("HOOK_SIGTERM_AT", "0"))
STALL_SAVE_AT = int(env("HOOK_STALL_SAVE_AT", "0"))
MARKER = env("HOOK_MARKER", "")
REPORT = env("HOOK_REPORT", "")
report = {}

if SIGTERM_AT:
    # A preemption notice from outside, delivered right after step SIGTERM_AT was logged.
    write_scalars = train.MetricWriter.write_scalars

    def write_then_sigterm(self, step, scalars):
        write_scalars(self, step, scalars)
        if step == SIGTERM_AT:
            os.kill(os.getpid(), signal.SIGTERM)
            if jax.process_count() > 1:
                # JAX's preemption service tells the other processes over the network;
                # give it a moment so the run cannot reach its last step first.
                import time
                time.sleep(2)

    train.MetricWriter.write_scalars = write_then_sigterm

if STALL_SAVE_AT:
    # The asynchronous save of step STALL_SAVE_AT writes a few arrays, then never finishes:
    # the parent kills this process (kill -9) in the middle of it.
    from orbax.checkpoint._src.serialization import serialization
    stalling = threading.Event()
    save = checkpoint.Checkpointer.save

    def save_hook(self, step, *args, **kwargs):
        if step == STALL_SAVE_AT:
            stalling.set()
        return save(self, step, *args, **kwargs)

    checkpoint.Checkpointer.save = save_hook
    write_array = serialization.async_serialize_from_host
    written = [0]

    async def stalling_write(*args, **kwargs):
        if stalling.is_set():
            written[0] += 1
            if written[0] > 5:
                open(MARKER, "w").write("stalled")
                await asyncio.sleep(3600)
        return await write_array(*args, **kwargs)

    serialization.async_serialize_from_host = stalling_write

if REPORT:
    # Counts the train step's compilations and checks that the loop really runs under the
    # transfer guard (an implicit transfer inside it must raise).
    jit_train_step = train.jit_train_step

    def jit_and_remember(*args, **kwargs):
        report["step_fn"] = jit_train_step(*args, **kwargs)
        return report["step_fn"]

    train.jit_train_step = jit_and_remember
    write_scalars = train.MetricWriter.write_scalars
    report["cache_sizes"] = []

    def write_and_probe(self, step, scalars):
        write_scalars(self, step, scalars)
        report["cache_sizes"].append(report["step_fn"]._cache_size())
        # An implicit host-to-device transfer (a Python scalar into a computation). The CPU
        # backend checks only this direction: its device-to-host copies are zero-copy.
        x = jax.device_put(np.float32(1.0))
        try:
            x + 1
            report["guard_active"] = False
        except Exception as e:
            report["guard_active"] = "Disallowed host-to-device" in str(e)

    train.MetricWriter.write_scalars = write_and_probe
    run_training = train.train

    def train_with_guard(config, workdir, **kwargs):
        with config.unlocked():
            config.debug_transfer_guard = "disallow"
        return run_training(config, workdir, **kwargs)

    train.train = train_with_guard


def main(argv):
    train.main(argv)
    if REPORT:
        report.pop("step_fn")
        open(REPORT, "w").write(json.dumps(report))


train._define_flags()
app.run(main)
'''


# ==== Helpers ==============================================================================

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One dataset and one XLA compilation cache for every run in this file."""
    root = tmp_path_factory.mktemp("resilience")
    driver = root / "driver.py"
    driver.write_text(_DRIVER)
    return {"data": str(root / "data"), "cache": str(root / "xla_cache"),
            "driver": str(driver), "root": root}


def _env(shared, devices=8, **extra):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": shared["cache"],
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _start(shared, workdir, *overrides, driver=False, devices=8, **env):
    """Starts `softcon_jax.train` (or the hooked driver) on the quickstart test config."""
    program = [shared["driver"]] if driver else ["-m", "softcon_jax.train"]
    args = [sys.executable, *program, "--config", "configs/quickstart.py:test",
            "--workdir", str(workdir), f"--config.data.path={shared['data']}",
            f"--config.total_steps={K}", "--config.log_every_steps=1",
            "--config.checkpoint.every_steps=1000", *overrides]
    return subprocess.Popen(args, cwd=REPO, env=_env(shared, devices, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(*procs):
    """Waits for every process; asserts each exited 0; returns their logs."""
    logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-6000:]
    return logs


def _run(shared, workdir, *overrides, **kwargs):
    return _finish(_start(shared, workdir, *overrides, **kwargs))[0]


def _read_scalars(workdir, tag="loss/total"):
    """[(step, value)] of `tag` over all TensorBoard event files of a workdir, in file order.

    Event files are TFRecords: u64 length, u32 crc, Event proto, u32 crc.
    """
    out = []
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            blob = f.read()
        pos = 0
        while pos + 12 <= len(blob):
            (length,) = struct.unpack("<Q", blob[pos:pos + 8])
            event = event_pb2.Event.FromString(blob[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return out


def _restore_state(workdir, step):
    """The full train state of checkpoint `step`, restored onto one device, as numpy."""
    ckpt = Checkpointer(str(workdir), async_save=False)
    try:
        config = ml_collections.ConfigDict(ckpt.restore_config(step))
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
        method = methods.get(config.method)(config, mesh)
        tx, _ = optim.make_optimizer(config)
        _, _, abstract, shardings = train.create_train_state(config, method, tx, mesh)
        return jax.device_get(ckpt.restore(step, abstract_with_shardings(abstract, shardings)))
    finally:
        ckpt.close()


def _assert_same_state(a, b, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    worst = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if np.size(x))
    assert worst <= atol, f"max abs difference {worst}"


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                  if d.isdigit())


@pytest.fixture(scope="module")
def straight(shared):
    """K steps in one go: the reference every interrupted run must reproduce."""
    workdir = shared["root"] / "straight"
    _run(shared, workdir)
    assert _steps(workdir) == [K]
    return {"state": _restore_state(workdir, K), "losses": _read_scalars(workdir)}


# ==== 1. Exact resume ======================================================================

def test_sigterm_and_stop_after_step_resume_exactly(shared, straight, tmp_path):
    """SIGTERM at K/2 and --config.stop_after_step=K/2, each resumed, equal the straight run."""
    preempted, stopped = tmp_path / "sigterm", tmp_path / "stop_after"
    # First halves, side by side: the real SIGTERM path (signal handler -> flag -> save ->
    # exit 0) and the config's planned stop.
    log_sigterm, log_stop = _finish(
        _start(shared, preempted, driver=True, HOOK_SIGTERM_AT=HALF),
        _start(shared, stopped, f"--config.stop_after_step={HALF}"))
    assert "SIGTERM received" in log_sigterm
    assert f"Stopped at step {HALF} (preemption)" in log_sigterm
    assert f"Stopped at step {HALF} (config.stop_after_step)" in log_stop
    assert _steps(preempted) == _steps(stopped) == [HALF]

    log1, log2 = _finish(_start(shared, preempted), _start(shared, stopped))
    for log, workdir in ((log1, preempted), (log2, stopped)):
        assert "Resuming from" in log
        assert _steps(workdir) == [HALF, K]
        _assert_same_state(_restore_state(workdir, K), straight["state"])
        losses = _read_scalars(workdir)
        # Every step logged exactly once, over the two runs, with the straight run's values.
        assert [s for s, _ in losses] == list(range(1, K + 1))
        np.testing.assert_allclose([v for _, v in losses],
                                   [v for _, v in straight["losses"]], rtol=0, atol=1e-6)
    assert [s for s, _ in straight["losses"]] == list(range(1, K + 1))
    assert np.all(np.isfinite([v for _, v in straight["losses"]]))


# ==== 2. Crash during a save ===============================================================

def test_kill_during_async_save_keeps_previous_checkpoint(shared, straight, tmp_path):
    """kill -9 mid-save: step S is never half-visible, S-2 restores, the run ends as straight."""
    workdir, marker, stall = tmp_path / "run", tmp_path / "stalled", 4
    proc = _start(shared, workdir, "--config.checkpoint.every_steps=2", driver=True,
                  HOOK_STALL_SAVE_AT=stall, HOOK_MARKER=marker)
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(marker):
        assert proc.poll() is None, proc.communicate()[0][-6000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    tmp_dirs = glob.glob(str(workdir / "checkpoints" / f"{stall}.orbax-checkpoint-tmp*"))
    assert tmp_dirs, os.listdir(workdir / "checkpoints")  # the save is under way...
    proc.send_signal(signal.SIGKILL)                      # ...and dies half-written
    proc.communicate(timeout=60)

    assert _steps(workdir) == [stall - 2]  # no step `stall` without the tmp suffix
    assert Checkpointer(str(workdir), async_save=False).latest_step() == stall - 2
    restored = _restore_state(workdir, stall - 2)
    assert int(restored.step) == stall - 2

    # The killed run's lock stays behind; its process is gone, so it does not block.
    assert json.loads((workdir / "lock").read_text())["pid"] == proc.pid
    log = _run(shared, workdir, "--config.checkpoint.every_steps=2")
    assert f"Took over the stale lock of {workdir} (host " in log
    assert f"its process {proc.pid} on" in log
    assert f"Resuming from {workdir / 'checkpoints'}/{stall - 2}" in log
    assert _steps(workdir)[-1] == K
    # Same data position and state as an uninterrupted run: the same final parameters.
    _assert_same_state(_restore_state(workdir, K), straight["state"])


# ==== 3. Two processes, then one ===========================================================

def test_two_process_run_resumes_on_one_process(shared, tmp_path):
    """2 processes x 4 devices train; SIGTERM to one of them stops and checkpoints both;
    1 process x 8 devices continues from that checkpoint to the end."""
    workdir = tmp_path / "run"
    port = portpicker.pick_unused_port()
    # Only process 1 gets the preemption notice, after step 2.
    procs = [_start(shared, workdir, devices=4, driver=True,
                    JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2,
                    JAX_PROCESS_ID=i, HOOK_SIGTERM_AT=2 if i == 1 else 0) for i in range(2)]
    try:
        logs = _finish(*procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert "8 devices, 2 processes" in logs[0]
    # Both processes stopped at the same step (JAX's preemption sync point) and saved it.
    stops = [re.search(r"Stopped at step (\d+) \(preemption\)", log) for log in logs]
    assert all(stops), logs[0][-3000:]
    stop = int(stops[0].group(1))
    assert int(stops[1].group(1)) == stop and 2 <= stop < K
    assert _steps(workdir) == [stop]
    # Every process took part in the checkpoint (each saved its own input position).
    data_dir = workdir / "checkpoints" / str(stop) / "data"
    assert sorted(glob.glob("process_*.json", root_dir=data_dir)) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    # Only process 0 wrote TensorBoard logs: one event file, each step once.
    assert len(glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))) == 1
    assert [s for s, _ in _read_scalars(workdir)] == list(range(1, stop + 1))
    state_2proc = _restore_state(workdir, stop)

    log = _run(shared, workdir)  # one process, 8 devices: another mesh and process count
    assert "Resuming from" in log and "8 devices, 1 processes" in log
    # The input state was saved per process (2 of them): it is re-placed, with a warning.
    assert "written by another number of processes" in log
    assert _steps(workdir) == [stop, K]
    losses = _read_scalars(workdir)
    assert [s for s, _ in losses] == list(range(1, K + 1))
    assert np.all(np.isfinite([v for _, v in losses]))
    final = _restore_state(workdir, K)
    assert int(final.step) == K and int(final.num_nonfinite) == 0
    # It went on from the two-process state and trained.
    assert int(state_2proc.step) == stop
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(final.params), jax.tree.leaves(state_2proc.params)))
    assert moved > 0


# ==== 4. Compilation and host transfers ====================================================

def test_train_loop_compiles_once_and_makes_no_implicit_transfers(shared, tmp_path):
    """From init and from a restored checkpoint: one compilation, no implicit transfer."""
    # Saves every 2 steps and logs every step, so every kind of loop iteration is covered.
    # A run stopped at K/2, then its resumption to K.
    for name, stop in (("first", [f"--config.stop_after_step={HALF}"]), ("resumed", [])):
        report = tmp_path / f"report_{name}.json"
        _run(shared, tmp_path / "run", "--config.checkpoint.every_steps=2", *stop,
             driver=True, HOOK_REPORT=report)
        result = json.loads(report.read_text())
        # The loop ran under jax.transfer_guard('disallow') (config.debug_transfer_guard).
        assert result["guard_active"] is True
        # The step compiled once, at its first call, never again.
        assert result["cache_sizes"] == [1] * HALF


# ==== 5. One run per workdir ===============================================================

def _error_lines(log):
    return [line for line in log.splitlines() if line.startswith("error:")]


def test_second_trainer_on_a_held_workdir_stops_and_changes_nothing(shared, tmp_path):
    """A second trainer (another learning rate) on a live run's workdir: one line naming the
    holder, exit 1, the first run's files byte-identical; the first run then ends as it was
    configured, and gives the workdir back."""
    workdir = tmp_path / "run"
    first = _start(shared, workdir, "--config.total_steps=100", "--config.checkpoint.every_steps=4")
    deadline = time.monotonic() + TIMEOUT
    while not os.path.isdir(workdir / "checkpoints" / "4"):
        assert first.poll() is None, first.communicate()[0][-6000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # alive, holding the lock, writing nothing meanwhile
    try:
        before, data_before = snapshot(workdir), snapshot(shared["data"])
        second = _start(shared, workdir, "--config.optimizer.lr=0.5")
        log = second.communicate(timeout=TIMEOUT)[0]
        assert second.returncode == 1, log[-6000:]
        (line,) = _error_lines(log)
        lock = json.loads((workdir / "lock").read_text())
        assert lock["pid"] == first.pid
        assert (f"--workdir {workdir} is in use by another run (host {lock['host']}, pid "
                f"{first.pid}, started {lock['started']}" in line), line
        assert "Traceback" not in log and "use another --workdir" in line
        assert snapshot(workdir) == before and snapshot(shared["data"]) == data_before
    finally:
        first.send_signal(signal.SIGCONT)
    _finish(first)
    assert _steps(workdir)[-1] == 100 and not os.path.exists(workdir / "lock")
    config = Checkpointer(str(workdir), async_save=False).restore_config(100)
    assert config["optimizer"]["lr"] == pytest.approx(2e-3)  # the first run's own settings


def test_two_trainers_started_together_one_trains_one_stops_before_the_data(shared, tmp_path):
    """Both start on a fresh workdir and a not yet written synthetic dataset: exactly one
    trains; the other stops with the lock line, without a traceback and without touching
    the data it would have written."""
    workdir, data_dir = tmp_path / "run", tmp_path / "data"
    procs = [_start(shared, workdir, f"--config.data.path={data_dir}",
                    "--config.total_steps=200") for _ in range(2)]
    logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], [log[-3000:] for log in logs]
    loser = logs[[p.returncode for p in procs].index(1)]
    (line,) = _error_lines(loser)
    assert "is in use by another run" in line and "Traceback" not in loser
    assert "Traceback" not in logs[0] + logs[1]
    assert _steps(workdir) == [200] and not os.path.exists(workdir / "lock")
    # The dataset the winner wrote is whole: no temporary file of a second writer, and it
    # opens with every location listed.
    meta = json.loads((data_dir / "metadata.json").read_text())
    assert sorted(f for f in os.listdir(data_dir) if os.path.isfile(data_dir / f)) == sorted(
        meta["shards"] + ["metadata.json"])
    assert len(open_dataset(str(data_dir))) == 64


# ==== 6. No orphaned data workers ==========================================================

def _descendants(pid):
    """Pids of every live process below `pid` (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_trainer_leaves_no_live_data_worker(shared, tmp_path):
    """kill -9 of a trainer with Grain worker processes, while they start and while they
    produce batches: every worker exits by itself."""
    proc = _start(shared, tmp_path / "run", "--config.data.num_workers=2",
                  "--config.total_steps=100000")
    deadline = time.monotonic() + TIMEOUT
    while len(_descendants(proc.pid)) < 2:
        assert proc.poll() is None, proc.communicate()[0][-6000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(2)
    workers = _descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)  # (the workers hold its stdout open while they live)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in workers if _alive(p)], workers
    proc.communicate(timeout=60)


# ==== 7. Disk full during a checkpoint save ================================================

def test_disk_full_during_a_training_checkpoint_is_one_error_line(shared, tmp_path):
    """The trainer on a full disk: `error:` naming the checkpoint directory and the cause,
    exit 1, no traceback on the terminal (it is in the log file), the previous checkpoint
    byte-identical and no temporary directory left."""
    with small_tmpfs(tmp_path / "disk", 8192) as disk:
        workdir = os.path.join(disk, "run")
        _run(shared, workdir, f"--config.stop_after_step={HALF}",
             f"--config.checkpoint.every_steps={HALF}")
        checkpoints = os.path.join(workdir, "checkpoints")
        good = snapshot(os.path.join(checkpoints, str(HALF)))
        fill_disk(disk, leave_bytes=64 * 1024)
        proc = _start(shared, workdir, f"--config.checkpoint.every_steps={HALF}",
                      SOFTCON_LOG_DIR=tmp_path / "logs")
        log = proc.communicate(timeout=TIMEOUT)[0]
        assert proc.returncode == 1, log[-6000:]
        (line,) = _error_lines(log)
        assert line.startswith(f"error: could not write checkpoint step {K} to {checkpoints} "
                               "(No space left on device;"), line
        assert f"The last good checkpoint is step {HALF} (untouched)" in line
        assert "Traceback" not in log, log[-6000:]
        (log_file,) = os.listdir(tmp_path / "logs")
        assert "No space left on device" in (tmp_path / "logs" / log_file).read_text()
        assert os.listdir(checkpoints) == [str(HALF)]
        assert snapshot(os.path.join(checkpoints, str(HALF))) == good
