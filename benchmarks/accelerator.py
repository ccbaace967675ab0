"""Accelerator figures in one run: the semantic stage's training step, decoding at several batch sizes, and the
real-time factor of generating audio end to end, on whatever jax.devices() offers (GPU, TPU; CPU for a check).

    python benchmarks/accelerator.py [--size paper] [--train_batch 8] [--decode_batches 1,16,64]
        [--decode_tokens 256] [--seconds 10] [--guidance 3.0] [--repeats 3] [--decode_weights float32]
    python benchmarks/accelerator.py --size tiny ...   # every model tiny: a check of the script on a CPU

All weights are random (speed does not depend on their values). Parts:
  train   the semantic stage (gin/stages/semantic_{size}.gin's model and optimizer) through the training
          setup train() compiles (train.make_train_setup: the standard mesh over every device, data parallel),
          on a global batch of --train_batch random sequences of the stage's length. tokens_per_s = batch x
          sequence length / median step seconds; mfu = the model's analytic training FLOPs per step / step
          seconds / the devices' peak: the datasheet's dense bf16 peak where the device kind is in PEAK_BF16
          (`mfu`), and the bf16 matmul peak measured here on one device times the device count
          (`mfu_measured_peak`, also printed for devices not in the table).
  decode  the semantic stage sampling --decode_tokens after its conditioning prefix, KV-cached, temperature 1,
          no guidance, one jitted call per batch size in --decode_batches (weights held in --decode_weights,
          musiclm_jax.weight_precision); tokens_per_s = batch x tokens / median seconds.
  end_to_end  MusicLM's chain at --size (benchmarks/generate.py's in-memory models: MuLan tokens -> semantic ->
          coarse -> fine -> codec decode) generating --seconds of audio with classifier-free guidance
          --guidance; real_time_factor = wall seconds / audio seconds (below 1: faster than real time).
Compilation is excluded everywhere (a warm-up call with the same shapes first). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

import common
import generate as generate_benchmark
from musiclm_jax import aot, gin_utils, partitioning, weight_precision
from musiclm_jax import train as train_lib

# Dense bf16 peak FLOP/s per chip from the vendors' datasheets (no sparsity).
PEAK_BF16 = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
    "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def datasheet_peak(device_kind: str):
    """The table's bf16 peak for a device kind (exact name, else the longest table name it starts with)."""
    if device_kind in PEAK_BF16:
        return PEAK_BF16[device_kind]
    matches = [name for name in PEAK_BF16 if device_kind.startswith(name)]
    return PEAK_BF16[max(matches, key=len)] if matches else None


def measured_bf16_peak(size: int, repeats: int) -> float:
    """bf16 FLOP/s of a jitted [size, size] @ [size, size] matmul on the default device (median)."""
    a = jnp.ones((size, size), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    seconds, _ = common.median_seconds(lambda: f(a).block_until_ready(), repeats, warmup=2)
    return 2 * size ** 3 / seconds


def stage_model_and_optimizer(size: str):
    tokens = aot.planned_token_dir(size)
    gin_utils.parse_gin([f"gin/stages/semantic_{size}.gin"], ["MODEL_DIR = '/unused'", f"TOKEN_DIR = '{tokens}'"],
                        finalize=False)
    try:
        args = gin_utils.bound_arguments("train", ["model", "optimizer"], {})
    finally:
        gin.clear_config()
    return args["model"], args["optimizer"]


def random_tokens(model, batch: int, rng: np.random.RandomState) -> np.ndarray:
    """[batch, prefix + target] valid global ids: conditioning groups, then the target group's levels."""
    layout = model.layout
    ranges = []
    for group in model.prefix_groups:
        ranges += list(layout.level_ranges(group))
    ranges = list(np.resize(np.array(ranges), (model.prefix_length, 2)))
    ranges += list(np.resize(np.array(layout.level_ranges(model.target_group)), (model.target_length, 2)))
    return np.stack([rng.randint(lo, hi, batch) for lo, hi in ranges], axis=1).astype(np.int32)


def train_figures(model, optimizer, batch: int, repeats: int, peak_size: int) -> dict:
    partitioner = partitioning.Partitioner(partitioning.create_mesh())
    setup = train_lib.make_train_setup(model=model, optimizer=optimizer, batch_size=batch, partitioner=partitioner)
    state = setup.init_state(jax.random.key(0))
    tokens = random_tokens(model, batch, np.random.RandomState(0))
    length = tokens.shape[1]
    weights = np.concatenate([np.zeros((batch, model.prefix_length)), np.ones((batch, model.target_length))], 1)
    causal = np.broadcast_to((np.arange(length) <= model.prefix_length)[None], (batch, length))
    data = {"decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), tokens[:, :-1]], 1),
            "decoder_target_tokens": tokens, "decoder_loss_weights": weights.astype(np.int32),
            "decoder_causal_attention": causal.astype(np.int32)}
    expected = model.input_shapes(batch)
    data = {k: v for k, v in data.items() if k in expected}
    seconds, times = common.train_step_seconds(setup, state, data, partitioner, repeats)
    flops = model.train_flops_per_example() * batch
    devices = jax.device_count()
    kind = jax.devices()[0].device_kind
    sheet = datasheet_peak(kind)
    measured = measured_bf16_peak(peak_size, repeats) * devices
    return {"batch": batch, "sequence_length": length, "params": model.network.num_params(), "step_s_median": seconds,
            "step_s_all": times, "tokens_per_s": batch * length / seconds, "model_flops_per_step": flops,
            "peak_bf16_flops_datasheet": sheet * devices if sheet else None,
            "mfu": flops / seconds / (sheet * devices) if sheet else None,
            "peak_bf16_flops_measured": measured, "mfu_measured_peak": flops / seconds / measured}


def decode_figures(model, batches, steps: int, repeats: int, precision: str) -> dict:
    params = partitioning.unbox(generate_benchmark.init_variables(model, 0)["params"])
    params = jax.device_put(weight_precision.for_decoding(params, precision))
    rng = np.random.RandomState(1)
    out = {"tokens": steps, "decode_weights": precision, "weight_bytes": weight_precision.weight_bytes(params)}

    @jax.jit
    def sample(params, prefix, key):
        return model.predict_batch(params, {"prefix_tokens": prefix}, key, numdecode_steps=steps, temperature=1.0)

    for batch in batches:
        prefix = jnp.asarray(random_tokens(model, batch, rng)[:, :model.prefix_length])
        calls = iter(range(10 ** 6))
        seconds, times = common.median_seconds(
            lambda: sample(params, prefix, jax.random.key(next(calls))).block_until_ready(), repeats, warmup=1)
        out[f"batch_{batch}"] = {"s_median": seconds, "s_all": times, "tokens_per_s": batch * steps / seconds}
    return out


def end_to_end_figures(size: str, seconds: float, guidance: float, repeats: int) -> dict:
    musiclm = generate_benchmark.in_memory_musiclm(size, None)
    musiclm.set_generation_params(duration_s=seconds, guidance_scale=guidance)
    levels = musiclm.stages["semantic"].model.layout.group("mulan")
    mulan_tokens = np.random.RandomState(0).randint(0, levels.codebook_size, (1, levels.levels)).astype(np.int32)
    generate_benchmark.generate_once(musiclm, None, mulan_tokens, seed=0)  # warm-up: compiles
    walls = [generate_benchmark.generate_once(musiclm, None, mulan_tokens, seed=1 + i)[0]["end_to_end"]
             for i in range(repeats)]
    wall = statistics.median(walls)
    guided = [n for n in ("semantic", "coarse", "fine") if musiclm.stages[n].model.guidance_groups]
    return {"audio_s": seconds, "guidance": guidance, "guided_stages": guided, "wall_s_median": wall,
            "wall_s_all": walls, "real_time_factor": wall / seconds, "audio_s_per_wall_s": seconds / wall}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "paper"), default="paper")
    parser.add_argument("--train_batch", type=int, default=8, help="global batch of the training step")
    parser.add_argument("--decode_batches", default="1,16,64")
    parser.add_argument("--decode_tokens", type=int, default=256)
    parser.add_argument("--decode_weights", default="float32", choices=weight_precision.PRECISIONS)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio seconds of the end-to-end part")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak_matmul", type=int, default=8192, help="side of the bf16 matmul of the peak")
    parser.add_argument("--parts", default="train,decode,end_to_end")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    unknown = parts - {"train", "decode", "end_to_end"}
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}")

    start = time.time()
    model, optimizer = stage_model_and_optimizer(args.size)
    result = {"benchmark": "accelerator", "size": args.size, "platform": jax.devices()[0].platform,
              "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count()}
    if "train" in parts:
        result["train"] = train_figures(model, optimizer, args.train_batch, args.repeats, args.peak_matmul)
    if "decode" in parts:
        batches = [int(b) for b in args.decode_batches.split(",")]
        result["decode"] = decode_figures(model, batches, args.decode_tokens, args.repeats, args.decode_weights)
    if "end_to_end" in parts:
        result["end_to_end"] = end_to_end_figures(args.size, args.seconds, args.guidance, args.repeats)
    result["wall_s"] = time.time() - start
    print(json.dumps(result))


if __name__ == "__main__":
    main()
