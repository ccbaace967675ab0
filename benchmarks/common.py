"""Shared pieces of the benchmark scripts: timing, the matmul peak, the peer's configuration, peer runs."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from musiclm_jax.models import TokenLMModel
from musiclm_jax.networks.transformer import TransformerConfig
from musiclm_jax.generation.token_layout import TokenLayout

# audiolm-pytorch's SemanticTransformer defaults at dim 512: multi-query attention (one key/value head), GEGLU
# feed-forward of width int(512 * 4 * 2 / 3), relative position bias. `--kv_heads 8` gives our multi-head default.
PEER_CONFIG = dict(embed_dim=512, num_layers=6, num_heads=8, num_kv_heads=1, head_dim=64, mlp_dim=1365,
                   gated_mlp=True, position_encoding="relative", vocab_multiple=1, causal_query_blocks=4)


def write_flac_folder(folder: str, clips: int) -> list[str]:
    """`clips` 10 s stereo 44.1 kHz FLACs of the embedded synthetic music in a new `folder` (the data-preparation
    and input benchmarks' real-format folder) -> their paths."""
    import numpy as np
    import soundfile
    from musiclm_jax.data import synthetic_music
    os.makedirs(folder)
    paths = []
    for i in range(clips):
        clip = synthetic_music.generate_clip(i, seed=5, seconds=10.0, sample_rate=44100)["audio"]
        paths.append(os.path.join(folder, f"clip{i:03d}.flac"))
        soundfile.write(paths[-1], np.stack([clip, 0.9 * clip], axis=1), 44100)
    return paths


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv_heads", type=int, default=1, help="1: the peer's multi-query attention; 8: multi-head")
    parser.add_argument("--peer_python", default=None, help="python of a venv with audiolm-pytorch (same-run peer)")


def peer_config(kv_heads: int) -> dict:
    return dict(PEER_CONFIG, num_kv_heads=kv_heads)


def peer_model(kv_heads: int, target_length: int) -> TokenLMModel:
    """A plain LM (no prefix) over the peer's 1024 semantic tokens, at the peer's configuration."""
    layout = TokenLayout.from_tuples((("semantic", 1, PEER_VOCAB),))
    return TokenLMModel(TransformerConfig(**peer_config(kv_heads)), layout, prefix_groups=(),
                        target_group="semantic", prefix_length=0, target_length=target_length)
PEER_VOCAB = 1024


def peer_train_inputs(kv_heads: int, batch: int, length: int):
    """(model, AdamW optimizer (lr 3e-4, weight decay 0.01), fresh TrainState, batch of random targets [batch,
    length] as the trainer takes it) of the training-step benchmarks (lm_step.py, lm_profile.py)."""
    import numpy as np
    from musiclm_jax import optimizers, partitioning
    from musiclm_jax.train_state import TrainState
    model = peer_model(kv_heads, target_length=length)
    optimizer = optimizers.create_optimizer(name="adamw", learning_rate=3e-4, weight_decay=0.01)
    variables = partitioning.unbox(model.get_initial_variables(jax.random.key(0), model.input_shapes(1)))
    tokens = np.random.RandomState(0).randint(1, model.vocab_size, (batch, length)).astype(np.int32)
    data = {"decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), tokens[:, :-1]], 1),
            "decoder_target_tokens": tokens, "decoder_loss_weights": np.ones_like(tokens),
            "decoder_causal_attention": np.zeros_like(tokens)}
    return model, optimizer, TrainState.create(variables, optimizer.tx), jax.tree.map(jnp.asarray, data)


def peer_sampler(model: TokenLMModel, new_tokens: int):
    """jitted sample(params, prompt [batch, 1], rng) -> [batch, new_tokens]: temperature-1 sampling after a
    1-token prompt, as lm_sample.py and lm_profile.py time it."""
    @jax.jit
    def sample(params, prompt, rng):
        return model.predict_batch(params, {"prefix_tokens": prompt}, rng, numdecode_steps=new_tokens,
                                   prompt_target_length=1, temperature=1.0)
    return sample
# Figures measured on this machine for the issue (audiolm-pytorch 2.4.0, torch 2.13 CPU, 2 threads, medians of 5).
PEER_REFERENCE = {"train_tokens_per_s": 725.0, "generate_tokens_per_s": 67.7}
PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_audiolm.py")


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of fn() (which must block until its result is ready) and all the timings."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def train_step_seconds(setup, state, batch, partitioner, repeats: int) -> tuple[float, list[float]]:
    """Median wall seconds of setup.train_step on `batch`, the state carried from step to step (after one
    warm-up step, which compiles)."""
    holder = {"state": state}

    def step():
        with partitioner.activate():
            holder["state"], metrics = setup.train_step(holder["state"], batch, jax.random.key(1))
        jax.block_until_ready(metrics)
    return median_seconds(step, repeats, warmup=1)


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """fp32 GFLOP/s of a jitted [size, size] @ [size, size] matmul on the default device (median)."""
    a = jnp.ones((size, size), jnp.float32)
    b = jnp.ones((size, size), jnp.float32)
    f = jax.jit(jnp.dot)
    seconds, _ = median_seconds(lambda: f(a, b).block_until_ready(), repeats, warmup=2)
    return 2 * size**3 / seconds / 1e9


def streaming_bandwidth(nbytes: int, repeats: int = 7) -> dict:
    """Bytes/s this machine streams through a float32 buffer of `nbytes` (medians of `repeats` jitted calls):
    'read' (a sum: nbytes read), 'copy' (x + 1 into a new buffer: nbytes read and nbytes written) and 'best', the
    larger, the bandwidth a decoder that reads nbytes of weights per token can at most use. A buffer that fits
    a cache measures that cache (decode weights up to its size stay there too)."""
    x = jnp.arange(max(nbytes // 4, 1), dtype=jnp.float32)
    read = jax.jit(jnp.sum)
    copy = jax.jit(lambda v: v + 1.0)
    read_s, _ = median_seconds(lambda: read(x).block_until_ready(), repeats, warmup=2)
    copy_s, _ = median_seconds(lambda: copy(x).block_until_ready(), repeats, warmup=2)
    rates = {"read": x.nbytes / read_s, "copy": 2 * x.nbytes / copy_s}
    return dict(rates, best=max(rates.values()), buffer_bytes=int(x.nbytes))


def run_peer(peer_python: Optional[str], repeats: int, extra_args: Sequence[str] = ()) -> Optional[dict]:
    """Runs benchmarks/peer_audiolm.py under `peer_python` (a venv with torch + audiolm-pytorch); its JSON."""
    if not peer_python:
        return None
    proc = subprocess.run([peer_python, PEER_SCRIPT, "--steps", str(repeats), *extra_args], capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"peer benchmark failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
