"""Benchmark scripts that must stay runnable where they are not timed: benchmarks/accelerator.py (written for a GPU
or TPU) at tiny sizes on 8 fake CPU devices, and benchmarks/tokenize_throughput.py at its tiny size. Figures are only
checked to be present and positive."""
import json
import os
import subprocess
import sys

from conftest import REPO_DIR, subprocess_env


def test_accelerator_script_prints_every_figure_at_tiny_size():
    command = [sys.executable, os.path.join("benchmarks", "accelerator.py"), "--size", "tiny", "--train_batch", "8",
               "--decode_batches", "1,4", "--decode_tokens", "8", "--decode_weights", "bfloat16", "--seconds", "0.5",
               "--repeats", "1", "--peak_matmul", "256"]
    proc = subprocess.run(command, cwd=REPO_DIR, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "accelerator" and result["platform"] == "cpu" and result["devices"] == 8
    train = result["train"]
    assert train["batch"] == 8 and train["sequence_length"] > 0 and train["tokens_per_s"] > 0
    assert train["mfu"] is None  # a CPU is not in the datasheet table
    assert 0 < train["mfu_measured_peak"] and train["model_flops_per_step"] > 0
    decode = result["decode"]
    assert decode["decode_weights"] == "bfloat16" and decode["tokens"] == 8
    assert decode["batch_1"]["tokens_per_s"] > 0 and decode["batch_4"]["tokens_per_s"] > 0
    end = result["end_to_end"]
    assert end["audio_s"] == 0.5 and end["guided_stages"] == ["semantic", "coarse"]
    assert end["real_time_factor"] > 0 and abs(end["real_time_factor"] * end["audio_s_per_wall_s"] - 1) < 1e-9


def test_tokenize_benchmark_prints_its_figures_at_tiny_size():
    """benchmarks/tokenize_throughput.py through the job's tokenizers and the one-function forward."""
    command = [sys.executable, os.path.join("benchmarks", "tokenize_throughput.py"), "--sizes", "tiny",
               "--repeats", "1", "--tiny_batch", "2"]
    result = subprocess.run(command, cwd=REPO_DIR, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])["tiny"]
    assert set(report["per_tokenizer"]) == {"codec", "semantic", "mulan", "melody"}
    assert report["audio_seconds_per_batch"] == 8.0
    assert report["job_audio_seconds_per_second"] > 0 and report["forward_speedup_over_job_path"] > 0


def test_profile_script_splits_a_training_step_into_matmuls_and_the_rest():
    """benchmarks/lm_profile.py on a short step: the trace holds XLA's op events, the dots are found through
    the compiled HLO, and the shares add up."""
    command = [sys.executable, os.path.join("benchmarks", "lm_profile.py"), "--job", "step", "--batch", "1",
               "--length", "32", "--top", "50"]
    proc = subprocess.run(command, cwd=REPO_DIR, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "lm_profile" and result["job"] == "step" and result["config"]["length"] == 32
    assert result["op_seconds"] > 0 and 0.05 < result["matmul_share"] < 1.0
    names = [c["name"] for c in result["categories"]]
    assert "matmul" in names and len(names) > 3
    assert abs(sum(c["share"] for c in result["categories"]) - 1.0) < 0.05  # --top 50 covers nearly all
    assert any(op["shape"].startswith("f32[") for op in result["top_ops"])


def test_profile_script_counts_the_matvec_kernel_as_matmul_time():
    """benchmarks/lm_profile.py --job sample with int8 weights in the CPU kernel: the kernel's calls are found in
    the HLO and counted with the matmuls."""
    command = [sys.executable, os.path.join("benchmarks", "lm_profile.py"), "--job", "sample", "--length", "64",
               "--decode_weights", "int8", "--matvec", "kernel", "--top", "50"]
    proc = subprocess.run(command, cwd=REPO_DIR, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["config"]["decode_weights"] == "int8" and result["config"]["matvec"] == "kernel"
    kernel_ops = [op for op in result["top_ops"] if op["name"].startswith("ffi_call")]
    assert kernel_ops and all(op["count"] == 63 for op in kernel_ops)  # one call per new token after the first
    assert 0.3 < result["matmul_share"] < 1.0
