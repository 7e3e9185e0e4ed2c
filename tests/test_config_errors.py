"""Bad settings fail before compiling, in one line naming the config key; stops lose nothing."""

import os
import signal
import subprocess
import sys
import time

import helpers
import jax
import pytest

from configs import quickstart
from softcon_jax import data, logs, sharding, train
from softcon_jax.data import synthetic
from softcon_jax.signals import StopSignals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tmp_path, **overrides):
    c = quickstart.get_config("test")
    c.unlock()
    c.data.path = str(tmp_path / "data")
    c.checkpoint.async_save = False
    return helpers.set_dotted(c, overrides)


def _run(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": ROOT, "SOFTCON_LOG_DIR": kwargs.pop("logdir", "")}
    return subprocess.Popen([sys.executable, "-m", "softcon_jax.train", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def test_misspelt_override_is_one_line_with_the_valid_keys(tmp_path):
    workdir = tmp_path / "w"
    proc = _run(["--config", "configs/quickstart.py:test", "--workdir", str(workdir),
                 "--config.optimizer.learning_rate=0.1"], logdir=str(tmp_path / "logs"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert lines[0].startswith("error: --config.optimizer.learning_rate: config.optimizer "
                               "has no key 'learning_rate'. Did you mean 'lr'?")
    assert "Keys there:" in lines[0] and "weight_decay" in lines[0]
    assert len(lines) <= 2 and "Traceback" not in err
    assert not workdir.exists()


@pytest.mark.parametrize("key,value", [
    ("optimizer.lr", -0.1), ("checkpoint.every_steps", 0), ("total_steps", 0),
    ("log_every_steps", 0), ("loss.temperature", 0.0)])
def test_non_positive_settings_are_refused_naming_the_key(tmp_path, key, value):
    config = _config(tmp_path, **{key: value})
    with pytest.raises(ValueError, match=rf"^config\.{key}={value}; expected a positive value"):
        train.validate(config, sharding.make_mesh(config.mesh))


def test_misspelt_loss_option_names_the_key_and_the_accepted_ones(tmp_path):
    config = _config(tmp_path, **{"loss.kwargs": {"soft_wieght": 0.5}})
    with pytest.raises(ValueError, match=r"config\.loss\.kwargs\.soft_wieght: .*"
                                         r"Did you mean 'soft_weight'\?.*variant"):
        train.validate(config, sharding.make_mesh(config.mesh))


def test_resuming_past_total_steps_has_nothing_to_do(tmp_path, caplog):
    config = _config(tmp_path, total_steps=4, **{"checkpoint.every_steps": 4})
    workdir = str(tmp_path / "w")
    first = train.train(config, workdir, devices=jax.devices()[:1])
    config.total_steps = 2
    with caplog.at_level("INFO"):
        again = train.train(config, workdir, devices=jax.devices()[:1])
    assert int(again.step) == int(first.step) == 4
    assert "Nothing to do: checkpoint 4" in caplog.text and "config.total_steps=2" in caplog.text


def test_stored_size_and_preset_dtype_are_checked(tmp_path):
    path = str(tmp_path / "d")
    synthetic.write_dataset(path, num_locations=4, num_shards=1, image_size=12)  # uint16
    cfg = data.default_config()
    cfg.path, cfg.views, cfg.read_threads = path, "softcon", 1
    cfg.image_size = 16
    with pytest.raises(ValueError, match=r"config\.data\.image_size=16 is larger than the "
                                         r"stored images \(12 px.*allow_upsample=True"):
        data.build_dataset(cfg, global_batch_size=2, seed=0)
    cfg.allow_upsample = True
    assert next(iter(data.build_dataset(cfg, global_batch_size=2, seed=0)))["view1"].shape \
        == (2, 16, 16, 13)
    cfg.image_size, cfg.allow_upsample = 8, False
    cfg.bands, cfg.in_channels = ("B4", "B3", "B2"), 3
    cfg.normalization, cfg.stats = "seco_quantile", "seco"
    with pytest.raises(ValueError, match=r"config\.data\.stats='seco' is for uint8 data, "
                                         r"but .*metadata.json stores uint16"):
        data.build_dataset(cfg, global_batch_size=2, seed=0)


def test_ctrl_c_sets_a_stop_reason_and_a_second_one_interrupts():
    signals = StopSignals(sigterm=False)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert signals.reason == "Ctrl-C"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    finally:
        signals.restore()


def test_ctrl_c_saves_a_checkpoint_and_exits(tmp_path):
    workdir = tmp_path / "w"
    proc = _run(["--config", "configs/quickstart.py:test", "--workdir", str(workdir),
                 f"--config.data.path={tmp_path / 'data'}", "--config.total_steps=100000",
                 "--config.checkpoint.every_steps=100000", "--config.log_every_steps=1"],
                logdir=str(tmp_path / "logs"))
    seen = ""
    for line in proc.stderr:  # absl logs to stderr
        seen += line
        if "step 3/" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    seen += err
    assert proc.returncode == 0, seen[-2000:]
    assert "SIGINT (Ctrl-C) received" in seen and "(Ctrl-C); checkpoint saved" in seen
    steps = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
    assert steps and min(steps) >= 3


def test_progress_time_excludes_pauses(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(logs.time, "perf_counter", lambda: now[0])
    progress = logs.Progress(total_steps=10, global_batch_size=8, first_step=0)
    now[0] += 2.0             # two steps of 1 s
    with progress.paused():   # a 30 s evaluation
        now[0] += 30.0
    timing = progress.timing(2)
    assert timing["perf/step_time_s"] == pytest.approx(1.0)
    assert timing["perf/images_per_s"] == pytest.approx(8.0)
