"""Multi-process training over loopback (launch/tpu_run.sh --local): the loss curve against one process, checkpoints
moved between process counts, the per-process data shards, and SIGTERM to one worker.

Every run is the tiny semantic stage on the deterministic `synthetic_semantic_tiny` task, global batch 16, on 8 CPU
devices in total (one process with 8, or two with 4 each), mesh {'data': 8}: the same per-device batch (2
examples), the same layout, the same arithmetic, only the cross-device reductions cross a process boundary (gloo).

The input pipeline's default sharding (DatasetConfig.input_sharding='global') makes every process read the one
global stream and keep its own rows of each global batch, so the two processes together train on exactly the
one-process batches, and the saved input position does not depend on the process count.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_DIR, subprocess_env

SCRIPT = os.path.join(REPO_DIR, "launch", "tpu_run.sh")
GIN = "gin/stages/semantic_synthetic.gin"
BATCH = 16
STEPS = 8
HALF = 4
# A schedule independent of TRAIN_STEPS (runs of different lengths share it); checkpoints at 4 and 8; no eval.
COMMON = ["--gin.DECAY_STEPS=200", f"--gin.BATCH_SIZE={BATCH}", f"--gin.train_lib.train.checkpoint_period={HALF}",
          "--gin.train_lib.train.eval_period=0", "--gin.train_lib.train.keep_checkpoints=None",
          "--gin.train_lib.train.tensorboard=False", "--gin.ICI_PARALLELISM={'data': 8, 'fsdp': 1, 'model': 1}"]
# Per-step losses of two runs fed the same global batches. The per-device arithmetic is identical; the gradient
# and metric all-reduces over the 8 devices sum in another order when they cross processes (gloo) than within one
# process, i.e. float32 rounding (~1e-7 relative per reduction), which Adam carries on for a few steps.
# 1e-5 relative leaves ~100x room for that and is far below any data or logic difference (the losses of two
# different batches at the same parameters differ by ~1e-2 relative).
RTOL = 1e-5

def _train_args(model_dir, steps, *extra):
    return [f"--gin_file={GIN}", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}", *COMMON, *extra]


def _env():
    env = subprocess_env()  # 8 CPU devices; tpu_run.sh --local replaces the count with --local_devices
    for name in ("MUSICLM_COORDINATOR", "MUSICLM_NUM_PROCESSES", "MUSICLM_PROCESS_ID", "MUSICLM_DISTRIBUTED"):
        env.pop(name, None)
    return env


def _two_process_command(log_dir, command):
    return ["bash", SCRIPT, "--local", "2", "--local_devices", "4", "--log_dir", str(log_dir), "--", *command]


def _logs(log_dir):
    return {i: (log_dir / f"process-{i}.log").read_text() if (log_dir / f"process-{i}.log").exists() else ""
            for i in range(2)}


def train_run(model_dir, steps, *extra, processes, check=True, timeout=240):
    """Trains in `processes` (1: 8 devices; 2: tpu_run.sh --local 2, 4 devices each) -> (returncode, outputs)."""
    command = [sys.executable, "-m", "musiclm_jax.train", *_train_args(model_dir, steps, *extra)]
    log_dir = model_dir.parent / f"{model_dir.name}-logs-{time.monotonic_ns()}"
    if processes == 2:
        command = _two_process_command(log_dir, command)
    proc = subprocess.run(command, cwd=REPO_DIR, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    outputs = [proc.stdout + proc.stderr] if processes == 1 else [*_logs(log_dir).values(), proc.stderr]
    if check and proc.returncode != 0:
        raise AssertionError(f"{processes}-process training failed ({proc.returncode}):\n" +
                             "\n----\n".join(o[-2500:] for o in outputs))
    return proc.returncode, outputs


def losses(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def complete_steps(model_dir):
    root = os.path.join(model_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []


def copy_up_to(src, dest, step):
    """A copy of run `src` as if it had stopped right after saving checkpoint `step`."""
    shutil.copytree(src, dest)
    for sub in ("checkpoints", "input_state"):
        for name in os.listdir(dest / sub):
            if name.isdigit() and int(name) > step:
                shutil.rmtree(dest / sub / name)
    assert complete_steps(dest) == [step]
    return dest


def assert_curves_match(got, want, steps, what):
    assert sorted(got) == list(steps), (what, sorted(got))
    g, w = np.array([got[s] for s in steps]), np.array([want[s] for s in steps])
    np.testing.assert_allclose(g, w, rtol=RTOL, atol=0, err_msg=f"{what}: per-step losses {list(steps)}")


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """8 steps in one process with 8 devices (checkpoints at 4 and 8). """
    model_dir = tmp_path_factory.mktemp("mh") / "one"
    train_run(model_dir, STEPS, processes=1)
    return model_dir


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The same 8 steps in two processes with 4 devices each, every process reading its rows of the global batch."""
    model_dir = tmp_path_factory.mktemp("mh") / "two"
    _, outputs = train_run(model_dir, STEPS, processes=2)
    for i in range(2):
        assert f"distributed: process {i} of 2, 4 local devices, 8 global" in outputs[i], outputs[i][-2000:]
    return model_dir


# ---------------------------------------------------------------------------------------------- 1. loss curve
def test_two_processes_give_the_one_process_loss_curve(one_process_run, two_process_run):
    """2 processes x 4 devices vs 1 process x 8 devices, same global batches, 8 steps: the
    per-step losses agree within rtol=RTOL (1e-5, float32 reduction order), and both runs checkpointed 4 and 8."""
    assert_curves_match(losses(two_process_run), losses(one_process_run), range(1, STEPS + 1), "2 vs 1 process")
    assert complete_steps(two_process_run) == complete_steps(one_process_run) == [HALF, STEPS]
    for step in (HALF, STEPS):  # every process saved its input position with each checkpoint
        names = sorted(os.listdir(two_process_run / "input_state" / str(step)))
        assert any(n.startswith("process_0") for n in names) and any(n.startswith("process_1") for n in names)


# ------------------------------------------------------------------------------- 2. checkpoints across counts
def test_two_process_checkpoint_resumes_in_one_process(one_process_run, two_process_run, tmp_path):
    """Checkpoint 4 written by 2 processes, resumed by 1 process (8 devices) to step 8: it restores the state and
    the input position, and losses 5..8 equal the uninterrupted run's within rtol=RTOL."""
    model_dir = copy_up_to(two_process_run, tmp_path / "resumed", HALF)
    _, (out,) = train_run(model_dir, STEPS, processes=1)
    assert f"resumed from step {HALF}" in out
    assert_curves_match(losses(model_dir), losses(one_process_run), range(1, STEPS + 1), "2 -> 1 process resume")
    assert complete_steps(model_dir) == [HALF, STEPS]


def test_one_process_checkpoint_resumes_in_two_processes(one_process_run, tmp_path):
    """Checkpoint 4 written by 1 process, resumed by 2 processes (4 devices each) to step 8: losses 5..8 equal the
    uninterrupted run's within rtol=RTOL. Only process_0's input position exists; with the global input
    sharding it is every process's position."""
    model_dir = copy_up_to(one_process_run, tmp_path / "resumed", HALF)
    assert not any(n.startswith("process_1") for n in os.listdir(model_dir / "input_state" / str(HALF)))
    _, outputs = train_run(model_dir, STEPS, processes=2)
    for i in range(2):
        assert f"resumed from step {HALF}" in outputs[i], outputs[i][-2000:]
    assert_curves_match(losses(model_dir), losses(one_process_run), range(1, STEPS + 1), "1 -> 2 process resume")


# ---------------------------------------------------------------------------------------- 3. disjoint shards
SHARD_PROBE = r"""
import json, tempfile
import jax
from musiclm_jax import distributed
from musiclm_jax.data.dataset_config import DatasetConfig
from musiclm_jax.data.input_pipeline import SeqioInputPipeline

assert distributed.maybe_initialize() and jax.process_count() == 2
cfg = DatasetConfig("synthetic_semantic_tiny", {"inputs": 12, "targets": 32}, "train", %d, seed=0)
def rows(**kwargs):  # the first two batches of the training input, one row of tokens per example
    with SeqioInputPipeline(cfg, "prefix_lm", **kwargs) as pipe:
        return [[row.tolist() for row in next(pipe)["decoder_target_tokens"]] for _ in range(2)]
def moved(saver, restorer):  # restores a position saved by a pipeline of another process count: None or the error
    directory = tempfile.mkdtemp()
    with SeqioInputPipeline(cfg, "prefix_lm", **saver) as pipe:
        next(pipe)
        pipe.save_state(directory)
    with SeqioInputPipeline(cfg, "prefix_lm", **restorer) as pipe:
        try:
            pipe.restore_state(directory)
        except Exception as e:
            return f"{type(e).__name__}: {str(e)[:200]}"
result = {"local": rows()}  # this process, as train() builds it
# A position written by a 1-process run (only process_0's), restored by this process of 2 as train() would.
result["one_to_two"] = moved(dict(process_index=0, process_count=1), {})
if jax.process_index() == 0:
    result["one_process"] = rows(process_index=0, process_count=1)
    # Process 0's position of a 2-process run, restored by a 1-process run.
    result["two_to_one"] = moved({}, dict(process_index=0, process_count=1))
print("SHARD_PROBE " + json.dumps(result), flush=True)
""" % BATCH


@pytest.fixture(scope="module")
def shard_probe(tmp_path_factory):
    """Under tpu_run.sh --local 2: each process's first two local batches of the training input; process 0's
    one-process batches for the same DatasetConfig; and whether input positions move between process counts."""
    log_dir = tmp_path_factory.mktemp("shards")
    proc = subprocess.run(_two_process_command(log_dir, [sys.executable, "-c", SHARD_PROBE]), cwd=REPO_DIR,
                          env=_env(), capture_output=True, text=True, timeout=180)
    logs = _logs(log_dir)
    assert proc.returncode == 0, (proc.stderr[-2000:], logs)
    out = {}
    for i in range(2):
        line = next(line for line in logs[i].splitlines() if line.startswith("SHARD_PROBE "))
        out[i] = json.loads(line[len("SHARD_PROBE "):])
    return out


def test_each_process_reads_a_disjoint_shard(shard_probe):
    """Under --local 2 each process's batches have BATCH / 2 examples, and no example (token row) of process 0's
    first two batches appears in process 1's: the processes read disjoint shards."""
    for step in range(2):
        a, b = (shard_probe[i]["local"][step] for i in range(2))
        assert len(a) == len(b) == BATCH // 2
        assert len({tuple(r) for r in a}) == len(a) and len({tuple(r) for r in b}) == len(b)
        assert not {tuple(r) for r in a} & {tuple(r) for r in b}, f"batch {step}: shards overlap"
    seen = [{tuple(r) for batch in shard_probe[i]["local"] for r in batch} for i in range(2)]
    assert not seen[0] & seen[1]


def test_process_shards_together_are_the_one_process_batch(shard_probe):
    """The two processes' local batches, process 0's rows first (the order make_array_from_process_local_data puts
    them in on the {'data': 8} mesh), equal the one-process global batch, batch by batch."""
    for step in range(2):
        together = shard_probe[0]["local"][step] + shard_probe[1]["local"][step]
        assert together == shard_probe[0]["one_process"][step], f"batch {step}"


def test_input_position_moves_between_process_counts(shard_probe):
    """Under jax.distributed: a 1-process input position restores in each of 2 processes, and a 2-process position
    restores in 1 process (what resuming a checkpoint under another process count needs)."""
    errors = {"1 -> 2, process 0": shard_probe[0]["one_to_two"], "1 -> 2, process 1": shard_probe[1]["one_to_two"],
              "2 -> 1": shard_probe[0]["two_to_one"]}
    assert not any(errors.values()), "\n".join(f"{k}: {v}" for k, v in errors.items())


# ---------------------------------------------------------------------------------------- 4. SIGTERM one worker
def _worker_pids(launcher_pid):
    """{MUSICLM_PROCESS_ID: pid} of tpu_run.sh's children (each `env ... python` execs python)."""
    pids = {}
    for task in os.listdir(f"/proc/{launcher_pid}/task"):
        try:
            children = open(f"/proc/{launcher_pid}/task/{task}/children").read().split()
        except OSError:
            continue
        for pid in children:
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            ids = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"MUSICLM_PROCESS_ID=")]
            if ids and b"python" in cmdline:
                pids[int(ids[0])] = int(pid)
    return pids


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    """A long 2-process run (no periodic checkpoint) whose process 1 gets SIGTERM after >= 3 logged
    steps -> {model_dir, returncode, output, logs}."""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("finds the worker processes through /proc")
    model_dir = tmp_path_factory.mktemp("sigterm") / "run"
    log_dir = model_dir.parent / "logs"
    command = _two_process_command(log_dir, [sys.executable, "-m", "musiclm_jax.train",
                                             *_train_args(model_dir, 100000,
                                                          "--gin.train_lib.train.checkpoint_period=100000")])
    launcher = subprocess.Popen(command, cwd=REPO_DIR, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        metrics = model_dir / "metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline and launcher.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert launcher.poll() is None, (launcher.communicate()[0], _logs(log_dir))
        assert metrics.exists() and len(metrics.read_text().splitlines()) >= 3, _logs(log_dir)
        workers = _worker_pids(launcher.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGTERM)
        out, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    return {"model_dir": model_dir, "returncode": launcher.returncode, "output": out, "logs": _logs(log_dir)}


def test_sigterm_to_one_worker_saves_on_all_and_relaunch_resumes(sigterm_run):
    """SIGTERM to process 1 (not the coordinator, not the metrics writer) of a long 2-process run:
    both processes print `SIGTERM received; saving step S` with the same S, exit 0 (tpu_run.sh exits 0), checkpoint
    S is the only one and has both processes' input positions; relaunching the 2 processes resumes from S and
    trains on."""
    model_dir, logs = sigterm_run["model_dir"], sigterm_run["logs"]
    assert sigterm_run["returncode"] == 0, (sigterm_run["output"], logs)
    saved = []
    for i in range(2):
        lines = [line for line in logs[i].splitlines() if "SIGTERM received; saving step" in line]
        assert len(lines) == 1, logs[i][-2000:]
        saved.append(int(lines[0].split("saving step ")[1].split()[0]))
    step = saved[0]
    assert saved == [step, step] and 3 <= step < 100000, saved
    assert complete_steps(model_dir) == [step]
    assert max(losses(model_dir)) == step
    names = os.listdir(model_dir / "input_state" / str(step))
    assert any(n.startswith("process_0") for n in names) and any(n.startswith("process_1") for n in names), names
    # Relaunch: both processes resume from that checkpoint and train on (no periodic checkpoint, as in the first
    # run: with COMMON's period of 4, a step S + 1 that is a multiple of 4 would add a checkpoint between S and
    # S + 2, depending on when SIGTERM landed).
    _, outputs = train_run(model_dir, step + 2, "--gin.train_lib.train.checkpoint_period=100000", processes=2)
    for i in range(2):
        assert f"resumed from step {step}" in outputs[i], outputs[i][-2000:]
    assert sorted(losses(model_dir)) == list(range(1, step + 3))
    assert complete_steps(model_dir) == [step, step + 2]
