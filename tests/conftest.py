"""Shared test set-up: 8 fake CPU devices (set before JAX starts), small shared fixtures."""
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"  # skip the TPU probe of libtpu (AOT topologies still work)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env() -> dict:
    """Environment for entry points run as subprocesses (8 fake CPU devices, no TPU probe)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def train_on_one_device(gin_file: str, model_dir: str, *bindings: str, timeout: int = 900) -> str:
    """Runs `python -m musiclm_jax.train` on one CPU device (no eval, no TensorBoard) -> model_dir."""
    env = subprocess_env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    command = [sys.executable, "-m", "musiclm_jax.train", f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{model_dir}'",
               "--gin.train_lib.train.eval_period=0", "--gin.train_lib.train.tensorboard=False", *bindings]
    proc = subprocess.run(command, cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model_dir


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
