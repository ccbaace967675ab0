"""launch/tpu_run.sh and musiclm_jax.distributed: dry runs, argument errors, pod mode against a fake gcloud, and a
real two-process jax.distributed run over loopback (--local)."""
import os
import shlex
import subprocess
import sys
import time

import pytest

from musiclm_jax import distributed

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_DIR, "launch", "tpu_run.sh")


def run_script(*args, env=None, timeout=60):
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO_DIR, env=env or dict(os.environ), capture_output=True,
                          text=True, timeout=timeout)


def env_with_gcloud(tmp_path, body: str) -> dict:
    """An environment whose PATH starts with a fake `gcloud` (a Python script with the given body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"#!{sys.executable}\n{body}")
    gcloud.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def remote_command(line: str) -> str:
    """The --command=... value of a printed `+ gcloud ... ssh ...` line."""
    words = shlex.split(line[2:])
    return next(w for w in words if w.startswith("--command="))[len("--command="):]


# ------------------------------------------------------------------------------------------------------ dry run
def test_dry_run_prints_the_pod_commands_and_runs_nothing(tmp_path):
    marker = tmp_path / "gcloud_was_called"
    env = env_with_gcloud(tmp_path, f"open({str(marker)!r}, 'w').close()\n")
    log_dir = tmp_path / "logs"
    proc = run_script("--tpu", "my-pod", "--zone", "us-central2-b", "--project=my-proj", "--extras", "test",
                      "--log_dir", str(log_dir), "--dry-run", "--",
                      "python", "-m", "musiclm_jax.train", "--gin_file=gin/codec/tiny.gin", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), proc.stdout
    gcloud = [line for line in lines if line.startswith("+ gcloud compute tpus tpu-vm ")]
    scp = [line for line in gcloud if " scp " in line]
    ssh = [line for line in gcloud if " ssh my-pod " in line]
    assert len(scp) == 1 and len(ssh) == 2, proc.stdout  # ship, set up, run (no --kill)
    for line in gcloud:
        assert "--worker=all" in line and "--zone=us-central2-b" in line and "--project=my-proj" in line, line
    assert "my-pod:musiclm_jax.tgz" in scp[0]
    setup, run = (remote_command(line) for line in ssh)
    assert "tar -xzf ~/musiclm_jax.tgz -C ~/musiclm_jax" in setup
    assert "bash launch/setup_env.sh tpu,test" in setup
    assert f"--output-directory={log_dir}/setup" in ssh[0]
    assert "MUSICLM_DISTRIBUTED=1" in run
    assert "python -m musiclm_jax.train --gin_file=gin/codec/tiny.gin" in run
    assert f"--output-directory={log_dir} " in ssh[1]  # gcloud writes LOG_DIR/<worker>.log
    for command in (setup, run):  # what the workers' bash would run parses
        assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0, command
    assert not marker.exists() and not log_dir.exists()


def test_dry_run_kill_only(tmp_path):
    proc = run_script("--tpu=my-pod", "--zone=europe-west4-a", "--kill", "--dry-run", "--log_dir", str(tmp_path / "l"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("+ gcloud compute tpus tpu-vm ssh my-pod "), proc.stdout
    assert "--worker=all" in lines[0] and "--project" not in lines[0]
    kill = remote_command(lines[0])
    assert "pgrep" in kill and "MUSICLM_DISTRIBUTED=1" in kill and "kill -TERM" in kill
    assert subprocess.run(["bash", "-n", "-c", kill]).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--", "echo"], "--tpu NAME is required"),
    (["--tpu", "t", "--", "echo"], "--zone ZONE is required"),
    (["--tpu", "t", "--zone", "z"], "no command given"),
    (["--tpu", "t", "--zone", "z", "--bogus", "1", "--", "echo"], "unknown argument '--bogus'"),
    (["--tpu", "t", "--zone", "z", "--bogus=1", "--", "echo"], "unknown flag '--bogus'"),
    (["--tpu", "--zone", "z", "--", "echo"], "--tpu needs a value"),
    (["--tpu", "t", "--zone", "z", "echo"], "unknown argument 'echo'"),
    (["--local", "0", "--", "echo"], "--local needs a positive number"),
    (["--local", "-2", "--", "echo"], "--local needs a positive number"),
    (["--local", "two", "--", "echo"], "--local needs a positive number"),
    (["--local", "2", "--local_devices", "0", "--", "echo"], "--local_devices needs a positive number"),
    (["--local", "2"], "no command given"),
    (["--local", "2", "--tpu", "t", "--", "echo"], "--tpu/--zone/--project are for TPU pods"),
    (["--local", "2", "--kill", "--", "echo"], "--kill is for TPU pods"),
])
def test_argument_errors(args, message):
    proc = run_script("--dry-run", *args)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert not proc.stdout.strip()  # nothing would have run


# ------------------------------------------------------------------------------------------ pod mode, fake gcloud
FAKE_GCLOUD = r'''"""Stands in for `gcloud compute tpus tpu-vm scp|ssh --worker=all` on a 2-worker pod whose worker i
has home directory $FAKE_TPU_WORKERS/i; workers run one after the other. setup_env.sh becomes an echo (no pip)."""
import os, shutil, subprocess, sys
root = os.environ["FAKE_TPU_WORKERS"]
args = sys.argv[1:]
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
verb, rest = args[3], args[4:]
opts = dict(a[2:].split("=", 1) for a in rest if a.startswith("--"))
positional = [a for a in rest if not a.startswith("--")]
assert opts["worker"] == "all" and opts["zone"] == "zz", opts
with open(os.path.join(root, "calls.txt"), "a") as f:
    f.write(verb + "\n")
homes = [os.path.join(root, str(i)) for i in range(2)]
if verb == "scp":
    src, dest = positional
    for home in homes:
        shutil.copy(src, os.path.join(home, dest.split(":", 1)[1]))
    sys.exit(0)
assert positional == ["fake-pod"], positional
command = opts["command"].replace("bash launch/setup_env.sh", "echo fake setup_env.sh")
rcs = []
for i, home in enumerate(homes):
    out = open(os.path.join(opts["output-directory"], f"{i}.log"), "w")
    rcs.append(subprocess.run(["bash", "-c", command], cwd=home, env=dict(os.environ, HOME=home), stdout=out,
                              stderr=subprocess.STDOUT).returncode)
sys.exit(max(rcs))
'''


def test_pod_mode_against_a_fake_gcloud(tmp_path):
    workers = tmp_path / "workers"
    for i in range(2):  # each worker already has a set-up venv (this checkout's)
        (workers / str(i) / "musiclm_jax").mkdir(parents=True)
        os.symlink(os.path.join(REPO_DIR, ".venv"), workers / str(i) / "musiclm_jax" / ".venv")
    (tmp_path / "tmp").mkdir()
    env = env_with_gcloud(tmp_path, FAKE_GCLOUD)
    env.update(FAKE_TPU_WORKERS=str(workers), TMPDIR=str(tmp_path / "tmp"))
    log_dir = tmp_path / "run1"
    probe = "import os, sys; print('WORKER-RUN', os.environ['MUSICLM_DISTRIBUTED'], os.getcwd(), sys.argv[1:])"
    proc = run_script("--tpu", "fake-pod", "--zone", "zz", "--log_dir", str(log_dir), "--",
                      "python", "-c", probe, "a b", "it's", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (workers / "calls.txt").read_text().split() == ["scp", "ssh", "ssh"]
    assert not os.listdir(tmp_path / "tmp")  # the local tarball is cleaned up
    for i in range(2):
        home = workers / str(i)
        code = home / "musiclm_jax"
        assert (code / "musiclm_jax" / "distributed.py").is_file() and (code / "launch" / "tpu_run.sh").is_file()
        assert not (code / ".git").exists() and not (home / "musiclm_jax.tgz").exists()
        assert "fake setup_env.sh tpu" in (log_dir / "setup" / f"{i}.log").read_text()
        log = (log_dir / f"{i}.log").read_text()
        assert f"WORKER-RUN 1 {code} ['a b', \"it's\"]" in log, log  # env, cwd, quoting of the command
        remote_logs = list((code / "logs" / "tpu_run" / "run1").glob("*.log"))
        assert len(remote_logs) == 1 and "WORKER-RUN" in remote_logs[0].read_text()
    # A failing command's exit status comes back.
    proc = run_script("--tpu", "fake-pod", "--zone", "zz", "--log_dir", str(tmp_path / "run2"), "--",
                      "python", "-c", "import sys; print('failing'); sys.exit(3)", env=env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "failing" in (tmp_path / "run2" / "1.log").read_text()


# ------------------------------------------------------------------------------------------------ local mode
LOCAL_PROBE = """
import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from musiclm_jax import distributed

assert distributed.maybe_initialize() and distributed.maybe_initialize()  # the second call is a no-op
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("x",))
# Process p holds [10p+1, 10p+2] of a global (4,) array sharded one element per device, across both processes.
local = np.arange(1, 3, dtype=np.float32) + 10 * jax.process_index()
global_array = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")), local, (4,))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(global_array)  # a cross-process reduction
value = float(total.addressable_data(0))
assert value == 1 + 2 + 11 + 12, value
print("TPU_RUN_LOCAL_OK", jax.process_index(), value, flush=True)
"""


def test_local_two_processes_share_one_jax_distributed_run(tmp_path):
    env = dict(os.environ)  # conftest's XLA_FLAGS asks for 8 devices: the script must override it per process
    assert "device_count=8" in env.get("XLA_FLAGS", "")
    start = time.time()
    proc = run_script("--local", "2", "--local_devices", "2", "--log_dir", str(tmp_path), "--",
                      "python", "-c", LOCAL_PROBE, env=env, timeout=120)
    logs = {i: (tmp_path / f"process-{i}.log").read_text() for i in range(2)}
    assert proc.returncode == 0, (proc.stdout, proc.stderr, logs)
    for i in range(2):
        assert f"distributed: process {i} of 2, 2 local devices, 4 global" in logs[i], logs[i]
        assert f"TPU_RUN_LOCAL_OK {i} 26.0" in logs[i], logs[i]
    assert f"logs: {tmp_path}/process-*.log" in proc.stdout
    assert time.time() - start < 60


GIN_PROBE = """
import jax
from musiclm_jax import gin_utils

def main(flags):  # by now gin_utils.run has started jax.distributed from the MUSICLM_* variables
    print("GIN_RUN_OK", jax.process_index(), jax.process_count(), jax.device_count(), flags["gin_files"], flush=True)

gin_utils.run(main, argv=["--gin_file=gin/codec/tiny.gin"], finalize=False)
"""


def test_local_entry_points_initialize_through_gin_utils(tmp_path):
    proc = run_script("--local", "2", "--local_devices", "1", "--log_dir", str(tmp_path), "--",
                      "python", "-c", GIN_PROBE, timeout=120)
    logs = {i: (tmp_path / f"process-{i}.log").read_text() for i in range(2)}
    assert proc.returncode == 0, (proc.stdout, proc.stderr, logs)
    for i in range(2):
        assert f"GIN_RUN_OK {i} 2 2 ['gin/codec/tiny.gin']" in logs[i], logs[i]


def test_local_failure_stops_the_other_processes(tmp_path):
    start = time.time()
    command = 'if [ "$MUSICLM_PROCESS_ID" = 1 ]; then echo giving up; exit 3; fi; sleep 60 & wait'
    proc = run_script("--local", "2", "--log_dir", str(tmp_path), "--", "bash", "-c", command)
    assert proc.returncode != 0
    assert "process 1 failed (exit 3)" in proc.stderr and "giving up" in proc.stderr, proc.stderr
    assert "FAILED" in proc.stdout
    assert time.time() - start < 30  # process 0 (and its `sleep`) was stopped, not waited for


# ------------------------------------------------------------------------------------------ distributed module
def test_config_from_env():
    assert distributed.config_from_env({}) is None
    assert distributed.config_from_env({"MUSICLM_DISTRIBUTED": "0"}) is None
    assert distributed.config_from_env({"MUSICLM_DISTRIBUTED": "1"}) == {}
    explicit = {"MUSICLM_COORDINATOR": "127.0.0.1:1234", "MUSICLM_NUM_PROCESSES": "4", "MUSICLM_PROCESS_ID": "3"}
    assert distributed.config_from_env(explicit) == {"coordinator_address": "127.0.0.1:1234", "num_processes": 4,
                                                      "process_id": 3}
    assert distributed.config_from_env(dict(explicit, MUSICLM_DISTRIBUTED="1"))["num_processes"] == 4


@pytest.mark.parametrize("env, variable", [
    ({"MUSICLM_DISTRIBUTED": "maybe"}, "MUSICLM_DISTRIBUTED"),
    ({"MUSICLM_COORDINATOR": "127.0.0.1:1", "MUSICLM_NUM_PROCESSES": "2"}, "MUSICLM_PROCESS_ID"),
    ({"MUSICLM_COORDINATOR": "localhost", "MUSICLM_NUM_PROCESSES": "2", "MUSICLM_PROCESS_ID": "0"},
     "MUSICLM_COORDINATOR"),
    ({"MUSICLM_COORDINATOR": "h:1", "MUSICLM_NUM_PROCESSES": "two", "MUSICLM_PROCESS_ID": "0"},
     "MUSICLM_NUM_PROCESSES"),
    ({"MUSICLM_COORDINATOR": "h:1", "MUSICLM_NUM_PROCESSES": "0", "MUSICLM_PROCESS_ID": "0"},
     "MUSICLM_NUM_PROCESSES"),
    ({"MUSICLM_COORDINATOR": "h:1", "MUSICLM_NUM_PROCESSES": "2", "MUSICLM_PROCESS_ID": "2"}, "MUSICLM_PROCESS_ID"),
])
def test_malformed_environment_names_the_variable(env, variable):
    with pytest.raises(distributed.DistributedConfigError, match=variable):
        distributed.maybe_initialize(env)


def test_maybe_initialize_without_variables_does_nothing():
    assert distributed.maybe_initialize({}) is False
