"""Entry-point wrapper: user errors are one line (traceback in a log, or with --verbose)."""

import os
import subprocess
import sys

import pytest

from softcon_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def logdir(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTCON_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("SOFTCON_VERBOSE", raising=False)
    return tmp_path / "logs"


def _fails(exc):
    def main(argv):
        raise exc
    return main


def test_user_error_is_one_line_and_logged(logdir, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(_fails(cli.UserValueError("data/x.json: expected a list")), [])
    assert e.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: data/x.json: expected a list" and len(err) == 2
    (log,) = os.listdir(logdir)
    assert str(logdir / log) in err[1] and "--verbose" in err[1]
    assert "Traceback" in (logdir / log).read_text()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_verbose_prints_the_traceback(logdir, capsys, monkeypatch, how):
    seen = []

    def main(argv):
        seen.append(argv)
        raise cli.UserFileNotFoundError("no such run")

    if how == "env":
        monkeypatch.setenv("SOFTCON_VERBOSE", "1")
    with pytest.raises(SystemExit):
        cli.run(main, ["--x", "1"] + (["--verbose"] if how == "flag" else []))
    assert seen == [["--x", "1"]]  # the tool never sees --verbose
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("error: no such run")


def test_exit_codes_and_message_forms(logdir, capsys):
    cases = [(cli.UsageError("--step must be >= 0"), 2, "error: --step must be >= 0"),
             (cli.UserKeyError("config.optimizer.learning_rate: unknown key"), 1,
              "error: config.optimizer.learning_rate: unknown key"),
             (PermissionError(13, "Permission denied", "/data/x"), 1,
              "error: PermissionError: [Errno 13] Permission denied: '/data/x'"),
             (KeyboardInterrupt(), 130, "interrupted")]
    for exc, code, first in cases:
        assert cli.call(_fails(exc), []) == code
        assert capsys.readouterr().err.splitlines()[0] == first
    assert cli.call(lambda: 0) == 0 and cli.call(lambda: {"a": 1}) == 0
    assert cli.call(lambda: 3) == 3


def test_a_bug_keeps_its_traceback(logdir, capsys):
    with pytest.raises(ZeroDivisionError):
        cli.call(_fails(ZeroDivisionError("bug")), [])
    assert "traceback also in" in capsys.readouterr().err
    assert len(os.listdir(logdir)) == 1


def test_converter_error_is_one_line(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metadata.json").write_text('{"dataset": "mine"}\n')
    env = dict(os.environ, PYTHONPATH=REPO, SOFTCON_LOG_DIR=str(tmp_path / "logs"))
    res = subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out",
                          str(tmp_path / "out"), "--num-locations", "4", "--num-shards", "1"],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    err = res.stderr.splitlines()
    assert err[-2].startswith(f"error: {tmp_path / 'out'} already holds a dataset")
    assert (tmp_path / "out" / "metadata.json").read_text() == '{"dataset": "mine"}\n'
    res = subprocess.run([sys.executable, "-m", "softcon_jax.report", "--workdir",
                          str(tmp_path / "none")], capture_output=True, text=True, cwd=REPO,
                         env=env)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"error: --workdir {tmp_path / 'none'}: no scalars")
    assert not os.path.exists(tmp_path / "none")
