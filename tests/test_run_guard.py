"""A run never changes silently: too few locations for the batch, a resume on another batch
size or dataset, a non-finite input batch."""

import os

import numpy as np
import pytest
from absl import logging

from configs import quickstart
from softcon_jax import cli, train


def _config(tmp_path, data="data", **overrides):
    config = quickstart.get_config("test")
    config.data.path = str(tmp_path / data)
    config.checkpoint.async_save = False
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_fewer_locations_than_the_batch_is_an_error_naming_both(tmp_path):
    config = _config(tmp_path, global_batch_size=128)  # the test dataset has 64 locations
    with pytest.raises(cli.UserValueError) as err:
        train.train(config, str(tmp_path / "run"))
    msg = str(err.value)
    assert msg.startswith("config.global_batch_size=128 (128 per process, 1 process(es)) is "
                          "larger than the 64 locations of ")
    assert os.path.join(str(tmp_path / "data"), "metadata.json") in msg
    assert len(msg.splitlines()) == 1
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_resume_with_another_batch_and_dataset_warns_once_each(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    train.train(_config(tmp_path, stop_after_step=4), workdir)
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
    other = _config(tmp_path, data="other", global_batch_size=8, total_steps=6)
    other.data.synthetic.seed = 1  # another synthetic dataset: another metadata.json
    train.train(other, workdir)
    batch = [w for w in warnings if "global_batch_size" in w]
    data = [w for w in warnings if "dataset" in w]
    assert len(batch) == 1 and len(data) == 1, warnings
    assert ("Resuming checkpoint 4, trained with config.global_batch_size=16, with "
            "config.global_batch_size=8") in batch[0]
    assert f"trained on the dataset {tmp_path / 'data'} (metadata.json sha256 " in data[0]
    assert f"with the dataset {tmp_path / 'other'} (sha256 " in data[0]
    assert "\n" not in batch[0] + data[0]

    warnings.clear()  # the same batch and data again: nothing to say
    other.total_steps = 8
    train.train(other, workdir)
    assert not [w for w in warnings if "Resuming checkpoint" in w], warnings


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_input_stops_naming_the_dataset_not_the_learning_rate(tmp_path,
                                                                        monkeypatch, mode):
    """One NaN pixel in every batch: the run stops at the first check (a log step) whatever
    config.nonfinite says, with the input message; no update was applied or saved."""
    build = train.data.build_dataset

    def poisoned(*args, **kwargs):
        def poison(batch):
            batch = dict(batch)
            key = next(k for k, v in sorted(batch.items())
                       if np.issubdtype(v.dtype, np.floating) and v.ndim == 4)
            batch[key] = batch[key].copy()
            batch[key].flat[0] = np.nan
            return batch
        return build(*args, **kwargs).map(poison)

    monkeypatch.setattr(train.data, "build_dataset", poisoned)
    config = _config(tmp_path, nonfinite=mode)
    workdir = tmp_path / "run"
    with pytest.raises(train.NonFiniteInputError) as err:
        train.train(config, str(workdir))
    msg = str(err.value)
    assert msg.startswith(f"Non-finite input: a batch from the dataset {config.data.path} held "
                          f"NaN or inf (images or labels) in the steps up to step "
                          f"{config.log_every_steps};"), msg
    assert "optimizer.lr" not in msg and "No checkpoint was written yet." in msg
    assert os.listdir(workdir / "checkpoints") == []
