"""`python -m musiclm_jax.train` as a user runs it: outputs, resume after SIGKILL, SIGTERM, flag errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from flax import traverse_util
import orbax.checkpoint as ocp
import pytest

from conftest import REPO_DIR, subprocess_env

GIN = "gin/stages/semantic_synthetic.gin"
# A schedule that does not depend on TRAIN_STEPS, so runs of different lengths share it.
COMMON = ["--gin.DECAY_STEPS=200", "--gin.BATCH_SIZE=16", "--gin.train_lib.train.checkpoint_period=10",
          "--gin.train_lib.train.eval_period=0", "--gin.train_lib.train.keep_checkpoints=None"]


def _command(model_dir, steps, *extra):
    return [sys.executable, "-m", "musiclm_jax.train", f"--gin_file={GIN}", f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.TRAIN_STEPS={steps}", *COMMON, *extra]


def _run(model_dir, steps, *extra, check=True):
    proc = subprocess.run(_command(model_dir, steps, *extra), cwd=REPO_DIR, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _records(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _complete_steps(model_dir):
    root = os.path.join(model_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []


def _params(model_dir, step):
    restored = ocp.StandardCheckpointer().restore(os.path.join(model_dir, "checkpoints", str(step), "default"))
    return restored["params"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("uninterrupted")
    _run(model_dir, 30)
    return model_dir


def test_run_writes_config_metrics_tensorboard_and_checkpoints(uninterrupted):
    records = _records(uninterrupted)
    assert [r["step"] for r in records] == list(range(1, 31))
    for r in records:
        assert {"step", "loss", "learning_rate", "steps_per_sec", "accuracy", "grad_norm"} <= set(r)
        assert np.isfinite(r["loss"]) and r["steps_per_sec"] > 0
    assert records[-1]["loss"] < records[0]["loss"]
    config = open(os.path.join(uninterrupted, "config.gin")).read()
    assert "TRAIN_STEPS = 30" in config and "MIXTURE_OR_TASK_NAME = 'synthetic_semantic_tiny'" in config
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(uninterrupted, "tensorboard")))
    assert _complete_steps(uninterrupted) == [10, 20, 30]


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_command(killed_dir, 1000), cwd=REPO_DIR, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _complete_steps(killed_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = _complete_steps(killed_dir)
    assert kept and kept[-1] <= 20, kept  # killed shortly after its first checkpoint
    resume_from = kept[-1]
    # Resume and train 10 more steps.
    out = _run(killed_dir, resume_from + 10)
    assert f"resumed from step {resume_from}" in out.stdout
    resumed = {r["step"]: r["loss"] for r in _records(killed_dir)}
    reference = {r["step"]: r["loss"] for r in _records(uninterrupted)}
    assert sorted(resumed) == list(range(1, resume_from + 11))
    for step in resumed:  # identical batches (input position restored) and identical arithmetic
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])
    final = resume_from + 10
    a, b = _params(killed_dir, final), _params(uninterrupted, final)
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_sigterm_saves_a_restorable_checkpoint_and_exits_zero(tmp_path):
    proc = subprocess.Popen(_command(tmp_path, 100000, "--gin.train_lib.train.checkpoint_period=100000"),
                            cwd=REPO_DIR, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received" in out
    steps = _complete_steps(tmp_path)
    last_logged = _records(tmp_path)[-1]["step"]
    assert steps == [last_logged] and 5 <= last_logged < 100000
    params = _params(tmp_path, last_logged)
    assert all(np.all(np.isfinite(x)) for x in jax_leaves(params))
    # Restarting resumes from that checkpoint.
    out = _run(tmp_path, last_logged + 2)
    assert f"resumed from step {last_logged}" in out.stdout


@pytest.mark.parametrize("flags, message", [
    (["--gin.transformer.TransformerConfig.num_layerz=2"], "doesn't have a parameter named 'num_layerz'"),
    (["--gin.train_lib.train.totl_steps=2"], "doesn't have a parameter named 'totl_steps'"),
    (["--gin_fle=x.gin"], "unknown flag --gin_fle"),
    (["--gin.BATCH_SIZE=12", "--gin.train_lib.train.mesh_config=@partitioning.MeshConfig()",
      "--gin.ICI_PARALLELISM={'data': 8}"], "batch_size=12 is not divisible"),
    (["--gin.ICI_PARALLELISM={'data': 3}"], r"describes 3 devices but there are 8"),
])
def test_configuration_mistakes_fail_with_a_clear_message(tmp_path, flags, message):
    proc = _run(tmp_path, 5, *flags, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr or message in proc.stdout, proc.stderr[-2000:]


def test_init_checkpoint_fine_tunes_from_another_run_on_another_mesh(uninterrupted, tmp_path):
    """INIT_CHECKPOINT restores the other run's parameters by name onto another mesh (data 4 x model 2 instead of
    data 8): with a zero learning rate the fine-tuning run's parameters stay exactly the source's last ones, and
    its first loss is the source's level, not a fresh model's."""
    tuned = tmp_path / "tuned"
    out = _run(tuned, 1, f"--gin.INIT_CHECKPOINT='{uninterrupted}'", "--gin.LEARNING_RATE=0.0",
               "--gin.ICI_PARALLELISM={'data': 4, 'fsdp': 1, 'model': 2}")
    assert f"initialised 22 of 22 variables from {uninterrupted} (step 30)" in out.stdout
    source = _params(uninterrupted, 30)
    for x, y in zip(jax_leaves(_params(tuned, 1)), jax_leaves(source)):
        np.testing.assert_array_equal(x, y)
    source_records, first = _records(uninterrupted), _records(tuned)[0]
    assert abs(first["loss"] - source_records[-1]["loss"]) < 0.1 * source_records[-1]["loss"]
    assert source_records[0]["loss"] - first["loss"] > 0.5 * (source_records[0]["loss"] - source_records[-1]["loss"])
    report = json.loads((tuned / "init_checkpoint.json").read_text())
    assert report["step"] == 30 and report["not_found"] == [] and report["shape_mismatch"] == []


def test_init_checkpoint_reports_what_it_did_not_find_and_strict_refuses(uninterrupted, tmp_path):
    """A deeper model with a wider MLP: the new layer's variables are reported as not found, the MLP kernels of
    the source's layers as shape mismatches (source and model shapes named); both keep their initial values,
    everything else is the source's; strict refuses."""
    deeper = tmp_path / "deeper"
    wider = ("--gin.transformer.TransformerConfig.num_layers=3", "--gin.transformer.TransformerConfig.mlp_dim=96")
    out = _run(deeper, 1, f"--gin.INIT_CHECKPOINT='{uninterrupted}'", *wider, "--gin.LEARNING_RATE=0.0")
    report = json.loads((deeper / "init_checkpoint.json").read_text())
    assert report["not_found"] and all(name.startswith("params/layers_2/") for name in report["not_found"])
    assert "not found there (kept at their initial values)" in out.stdout
    mismatched = sorted(entry.split(":")[0] for entry in report["shape_mismatch"])
    assert mismatched and all("/mlp/" in name and name.split("/")[1] in ("layers_0", "layers_1")
                              for name in mismatched), report["shape_mismatch"]
    assert any(" != model (" in entry and ", 96)" in entry for entry in report["shape_mismatch"])
    assert "shape mismatches (kept at their initial values)" in out.stdout
    assert len(report["restored"]) + len(mismatched) == 22
    source = traverse_util.flatten_dict(_params(uninterrupted, 30), sep="/")
    tuned = traverse_util.flatten_dict(_params(deeper, 1), sep="/")
    for name in report["restored"]:
        if name.startswith("params/"):
            np.testing.assert_array_equal(tuned[name[len("params/"):]], source[name[len("params/"):]])
    strict = _run(tmp_path / "strict", 1, f"--gin.INIT_CHECKPOINT='{uninterrupted}'", *wider,
                  "--gin.INIT_CHECKPOINT_STRICT=True", check=False)
    assert strict.returncode != 0 and "(strict): initialised" in strict.stderr and "shape mismatches" in strict.stderr


def test_sigterm_on_an_audio_folder_exits_within_30_s_with_a_small_input_position(tmp_path):
    """The tiny codec on a folder of 40 three-second clips, SIGTERM after ~15 s of training. Exits 0 within 30 s
    (the trainer's own time to leave; was 20-35 s in close() alone, from tf.data's autotuning thread), and the
    saved input position is an index: readers' offsets, counters and seeds, a few kilobytes, holding no examples
    (not the decoded folder, seqio's and TFDS's in-memory caches: > 6 MB here, 42 MB for 160 clips; nor the
    clips in flight in the parallel maps; nor, since input_pipeline.block_shuffle, a shuffle buffer's 64 crops,
    3.1 MB)."""
    import soundfile
    folder = tmp_path / "audio"
    folder.mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(3 * 24000) / 24000
    for i in range(40):
        tone = 0.3 * np.sin(2 * np.pi * 110 * 2 ** (i % 24 / 12) * t) + 0.05 * rng.standard_normal(t.size)
        soundfile.write(folder / f"clip_{i:02d}.wav", tone.astype(np.float32), 24000)
    model_dir = tmp_path / "run"
    command = [sys.executable, "-m", "musiclm_jax.train", "--gin_file=gin/codec/tiny.gin",
               f"--gin.MODEL_DIR='{model_dir}'", f"--gin.AUDIO_DIR='{folder}'", "--gin.train_lib.train.log_period=1",
               "--gin.train_lib.train.checkpoint_period=100000", "--gin.train_lib.train.eval_period=100000"]
    proc = subprocess.Popen(command + ["--gin.TRAIN_STEPS=100000"], cwd=REPO_DIR, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = model_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not metrics.exists():
        time.sleep(0.1)
    time.sleep(15)  # long enough for tf.data's autotuning period to grow to seconds
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    exit_seconds = time.time() - signalled
    assert proc.returncode == 0 and "SIGTERM received" in out, out[-3000:]
    assert exit_seconds < 30, exit_seconds
    step = _complete_steps(model_dir)[-1]
    position = model_dir / "input_state" / str(step)
    size = sum(f.stat().st_size for f in position.iterdir())
    print("input position bytes", size)
    assert size < 20_000, size  # 64 crops of 12,000 float32 samples would be 3.1 MB
    # The state restores (orbax); resuming from a SIGTERM checkpoint is test_sigterm_saves_a_restorable_checkpoint's.
    assert all(np.all(np.isfinite(x)) for x in jax_leaves(_params(model_dir, step)))
