"""No command replaces data it did not write; bad data and label files are one clear error.

Every test checks the message names what it should and that the data is intact afterwards
(byte-identical metadata.json and shards).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import snapshot

from data_prep import ssl4eo_s12, verify
from softcon_jax import cli
from softcon_jax.data import records, shards, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYN = dict(num_locations=6, num_shards=2, image_size=8)


def _example(i):
    return {"image": np.full((2, 1, 4, 4), i, np.uint8), "seasons": ["a", "b"],
            "location": str(i)}


@pytest.fixture
def user_dataset(tmp_path):
    """A converted (non-synthetic) dataset: what a user's real data looks like on disk."""
    out = str(tmp_path / "real")
    shards.write_shards(out, range(4), _example, name="real", num_shards=2,
                        metadata={"dataset": "ssl4eo_s12", "bands": ["B1"]})
    return out


# ---------------------------------------------------------------------------- synthetic

def test_synthetic_refuses_a_users_dataset_and_leaves_it_intact(user_dataset):
    before = snapshot(user_dataset)
    with pytest.raises(cli.UserValueError) as err:
        synthetic.ensure_synthetic_dataset(user_dataset, dict(enabled=True, **SYN))
    msg = str(err.value)
    assert user_dataset in msg and "ssl4eo_s12" in msg
    assert "--config.data.synthetic.enabled=False" in msg
    assert snapshot(user_dataset) == before


def test_synthetic_refuses_a_directory_with_other_files(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("my notes")
    with pytest.raises(cli.UserValueError, match="notes.txt"):
        synthetic.write_dataset(str(d), **SYN)
    assert snapshot(str(d)) == {"notes.txt": b"my notes"}


def test_synthetic_refuses_other_parameters_and_reuses_the_same(tmp_path):
    out = str(tmp_path / "syn")
    meta = synthetic.ensure_synthetic_dataset(out, dict(enabled=True, **SYN))
    before = snapshot(out)
    with pytest.raises(cli.UserValueError) as err:
        synthetic.ensure_synthetic_dataset(out, dict(SYN, seed=3),
                                           key="config.eval.synthetic")
    assert "seed=0 there, 3 asked" in str(err.value)
    assert "--config.eval.synthetic.enabled=False" in str(err.value)
    assert synthetic.ensure_synthetic_dataset(out, dict(SYN)) == meta
    assert snapshot(out) == before


def test_synthetic_can_be_switched_off(user_dataset):
    before = snapshot(user_dataset)
    assert synthetic.ensure_synthetic_dataset(user_dataset, dict(enabled=False, **SYN)) is None
    assert synthetic.ensure_synthetic_dataset(user_dataset, None) is None
    assert snapshot(user_dataset) == before


def test_synthetic_resumes_its_own_interrupted_write(tmp_path, monkeypatch):
    out = str(tmp_path / "syn")
    real = synthetic.make_example

    def crash_on_4(index, **kw):
        if index == 4:
            raise RuntimeError("simulated crash")
        return real(index, **kw)

    monkeypatch.setattr(synthetic, "make_example", crash_on_4)
    with pytest.raises(RuntimeError, match="simulated"):
        synthetic.write_dataset(out, **SYN)
    assert not os.path.exists(os.path.join(out, "metadata.json"))
    monkeypatch.setattr(synthetic, "make_example", real)
    meta = synthetic.write_dataset(out, **SYN)
    fresh = synthetic.write_dataset(str(tmp_path / "fresh"), **SYN)
    assert meta["num_records"] == 6
    assert snapshot(out) == snapshot(str(tmp_path / "fresh")) and fresh == meta


def test_quickstart_config_switches_synthetic_off_from_the_command_line(monkeypatch):
    from absl import flags
    from ml_collections import config_flags

    argv = ["train", f"--config={REPO}/configs/quickstart.py:test",
            "--config.data.synthetic.enabled=False"]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
    fv(argv)
    assert fv.config.data.synthetic.enabled is False


# ---------------------------------------------------------------------------- shard writer

def test_converter_never_replaces_an_existing_dataset(user_dataset):
    before = snapshot(user_dataset)
    for resume in (False, True):
        with pytest.raises(cli.UserValueError) as err:
            shards.write_shards(user_dataset, range(6), _example, name="real", num_shards=2,
                                metadata={"dataset": "other"}, resume=resume)
        assert user_dataset in str(err.value) and "--out" in str(err.value)
        assert snapshot(user_dataset) == before
    # The very same dataset again: reused, nothing rewritten.
    meta = shards.write_shards(user_dataset, range(4), _example, name="real", num_shards=2,
                               metadata={"dataset": "ssl4eo_s12", "bands": ["B1"]})
    assert meta["num_records"] == 4 and snapshot(user_dataset) == before


def test_unfinished_shards_are_replaced_only_with_resume(user_dataset):
    os.remove(os.path.join(user_dataset, "metadata.json"))  # an unfinished conversion
    (open(os.path.join(user_dataset, "other.tmp-1"), "w")).write("not ours")
    before = snapshot(user_dataset)
    with pytest.raises(cli.UserValueError) as err:
        shards.write_shards(user_dataset, range(6), _example, name="real", num_shards=2,
                            metadata={"dataset": "other"})
    assert "real-00000-of-00002.array_record" in str(err.value)
    assert "--resume" in str(err.value)
    assert snapshot(user_dataset) == before
    shards.write_shards(user_dataset, range(6), _example, name="real", num_shards=2,
                        metadata={"dataset": "other"}, resume=True)
    assert open(os.path.join(user_dataset, "other.tmp-1")).read() == "not ours"


def test_skip_list_is_stored_as_json(tmp_path):
    def bad_on_1(item):
        if item[0] == "1":
            raise shards.BadInputError(f"/src/{item[0]}", "broken")
        return _example(int(item[0]))

    out = str(tmp_path / "out")
    shards.write_shards(out, [("0", ["s"]), ("1", ["s"])], bad_on_1, name="t", num_shards=1,
                        metadata={"dataset": "t"}, skip_bad=True)
    with open(os.path.join(out, "metadata.json")) as f:
        meta = json.load(f)
    assert meta["skipped"] == [{"item": ["1", ["s"]], "path": "/src/1", "reason": "broken"}]


# ---------------------------------------------------------------------------- label files

LABEL_CASES = {
    "digits_string": ("48", "'48'"),
    "bare_int": (4, "is 4"),
    "out_of_range": (["2", 9], "has 9, not a class"),
    "multi_digit_item": (["48"], "has '48', not a class"),
    "float_item": ([4.0], "has 4.0, not a class"),
}


@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_bad_label_entry_names_file_location_and_season(tmp_path, case):
    from test_data_prep import make_ssl4eo_tree

    root = str(tmp_path / "src")
    labels = make_ssl4eo_tree(root)
    season = sorted(labels["0000002"])[1]
    labels["0000002"][season], fragment = LABEL_CASES[case]
    lab = os.path.join(root, "ssl4eo_multilabel.json")
    with open(lab, "w") as f:
        json.dump(labels, f)
    out = str(tmp_path / "out")
    with pytest.raises(shards.BadInputError) as err:
        ssl4eo_s12.convert_tree(root, "s2c", out, num_shards=1, labels=lab)
    msg = str(err.value)
    assert lab in msg and "'0000002'" in msg and repr(season) in msg and fragment in msg
    assert "expected a list of class indices 0..8" in msg
    assert not os.path.exists(out)  # nothing written
    # --skip-bad: counted, that season unlabelled, the others as in the file.
    meta = ssl4eo_s12.convert_tree(root, "s2c", out, num_shards=1, labels=lab, skip_bad=True)
    assert meta["num_skipped"] == 1 and meta["skipped"][0]["item"] == f"0000002/{season}"
    from test_data_prep import read_all
    ex = {e["location"]: e for e in read_all(out)[1]}["0000002"]
    t = ex["seasons"].index(season)
    assert not ex["has_label"][t] and ex["has_label"].sum() == 3


def test_integer_class_indices_are_accepted(tmp_path):
    from test_data_prep import make_ssl4eo_tree, read_all

    root = str(tmp_path / "src")
    labels = make_ssl4eo_tree(root, n_loc=1)
    season = sorted(labels["0000000"])[0]
    labels["0000000"][season] = [4, "8"]
    lab = os.path.join(root, "ssl4eo_multilabel.json")
    with open(lab, "w") as f:
        json.dump(labels, f)
    ssl4eo_s12.convert_tree(root, "s2c", str(tmp_path / "out"), num_shards=1, labels=lab)
    ex = read_all(str(tmp_path / "out"))[1][0]
    assert np.nonzero(ex["labels"][ex["seasons"].index(season)])[0].tolist() == [4, 8]


# ---------------------------------------------------------------------------- damaged shards

@pytest.fixture
def syn_copy(tmp_path_factory):
    """A fresh copy of a small synthetic dataset (32 px: shards span several 64 KiB blocks)."""
    base = tmp_path_factory.getbasetemp() / "syn_base"
    if not base.exists():
        synthetic.write_dataset(str(base), num_locations=6, num_shards=2, image_size=32)
    out = tmp_path_factory.mktemp("syn") / "data"
    shutil.copytree(base, out)
    return str(out), shards.read_metadata(str(out))


def _truncate(path, keep=0.5):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


def _flip(path, start=200, stop=260):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[start:stop] = bytes(b ^ 0xFF for b in data[start:stop])
    with open(path, "wb") as f:
        f.write(bytes(data))


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.99])
def test_verify_reports_a_truncated_shard_as_one_bad_line(syn_copy, keep, capsys):
    out, meta = syn_copy
    shard = meta["shards"][1]
    _truncate(os.path.join(out, shard), keep)
    before = snapshot(out)
    assert verify.main([out, "--no-progress"]) == 1
    text = capsys.readouterr().out
    bad = [line for line in text.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and bad[0].startswith(f"BAD {shard}: cannot be opened"), text
    assert "metadata says 3 records" in bad[0]
    assert "1 bad" in text
    assert snapshot(out) == before


def test_verify_cli_exits_1_on_a_truncated_shard(syn_copy):
    out, meta = syn_copy
    _truncate(os.path.join(out, meta["shards"][0]))
    res = subprocess.run([sys.executable, "-m", "data_prep.verify", out, "--no-progress"],
                         capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert res.returncode == 1 and f"BAD {meta['shards'][0]}" in res.stdout
    assert "Traceback" not in res.stderr


def test_opening_a_truncated_shard_names_it(syn_copy):
    from softcon_jax import data

    out, meta = syn_copy
    _truncate(os.path.join(out, meta["shards"][1]))
    before = snapshot(out)
    with pytest.raises(data.source.CorruptShardError) as err:
        data.open_dataset(out)
    msg = str(err.value)
    assert os.path.join(out, meta["shards"][1]) in msg and "data_prep.verify" in msg
    assert snapshot(out) == before


def test_training_input_on_a_corrupt_record_names_shard_and_record(syn_copy):
    from softcon_jax import data
    from softcon_jax.data.source import CorruptShardError

    out, meta = syn_copy
    shard = os.path.join(out, meta["shards"][1])
    _flip(shard)  # inside the first location of shard 1: the reader's checksum fails
    before = snapshot(out)
    source = data.open_dataset(out).source
    assert len(source) == 6 and source.where(4) == (shard, 1)

    def read(i):  # the location record and every season
        return np.asarray(records.decode(source[i])["image"])
    read(0)  # other locations read fine
    where = rf"shard {shard} location 0 \(record \d\)"
    with pytest.raises(CorruptShardError, match=f"{where}: cannot be read"):
        read(3)
    cfg = data.default_config()
    cfg.path, cfg.image_size = out, 16
    it = iter(data.build_dataset(cfg, global_batch_size=6, seed=0, views="softcon"))
    with pytest.raises(CorruptShardError, match=where):
        next(it)
    assert snapshot(out) == before


def test_verify_names_an_unreadable_metadata_file(syn_copy):
    out, _ = syn_copy
    with open(os.path.join(out, "metadata.json"), "w") as f:
        f.write('{"shards": [')  # cut short
    before = snapshot(out)
    with pytest.raises(cli.UserValueError, match=f"{out}/metadata.json is not valid JSON"):
        verify.verify(out, progress=False)
    from softcon_jax import data
    with pytest.raises(cli.UserValueError, match=f"{out}/metadata.json is not valid JSON"):
        data.open_dataset(out)
    assert snapshot(out) == before


def test_training_on_a_truncated_shard_stops_naming_it(tmp_path):
    from configs import quickstart
    from softcon_jax import train
    from softcon_jax.data.source import CorruptShardError

    config = quickstart.get_config("test")
    config.data.path = str(tmp_path / "data")
    meta = synthetic.ensure_synthetic_dataset(config.data.path, config.data.synthetic)
    shard = os.path.join(config.data.path, meta["shards"][0])
    _truncate(shard)
    before = snapshot(config.data.path)
    with pytest.raises(CorruptShardError) as err:
        train.train(config, str(tmp_path / "run"))
    assert f"shard {shard} listed in" in str(err.value) and "data_prep.verify" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    assert snapshot(config.data.path) == before


def test_a_copy_of_the_quickstart_config_never_overwrites_a_dataset(user_dataset, tmp_path):
    from configs import quickstart
    from softcon_jax import train

    config = quickstart.get_config("test")
    config.data.path = user_dataset
    before = snapshot(user_dataset)
    with pytest.raises(cli.UserValueError, match="--config.data.synthetic.enabled=False"):
        train.train(config, str(tmp_path / "run"))
    assert snapshot(user_dataset) == before


def test_a_long_skip_list_is_capped_in_metadata_and_complete_in_a_side_file(tmp_path):
    def bad_odd(i):
        if i % 2:
            raise shards.BadInputError(f"/src/{i}", "broken")
        return _example(i)

    out = str(tmp_path / "out")
    n = 2 * (shards.MAX_SKIPPED_LISTED + 5)
    meta = shards.write_shards(out, range(n), bad_odd, name="t", num_shards=2,
                               metadata={"dataset": "t"}, skip_bad=True)
    assert meta["num_skipped"] == n // 2 and meta["num_records"] == n // 2
    assert len(meta["skipped"]) == shards.MAX_SKIPPED_LISTED
    with open(os.path.join(out, meta["skipped_file"])) as f:
        listed = [json.loads(line) for line in f]
    assert [s["path"] for s in listed] == [f"/src/{i}" for i in range(1, n, 2)]
    assert meta["skipped"] == listed[:shards.MAX_SKIPPED_LISTED]
    from data_prep import options
    assert f"... 5 more in {out}/skipped.jsonl" in options.summary(meta, out)
