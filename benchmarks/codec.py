"""Speed of the SoundStream codec on this CPU: encode + decode of 10 s, and one GAN training step.

    python benchmarks/codec.py [--repeats 5] [--peer_python /tmp/peer_venv/bin/python]

Two configurations: the paper codec (gin/codec/paper.gin: 24 kHz, strides 2-4-6-10, 12 x 1024 RVQ, paper
discriminators) and one matched to the peer's (audiolm-pytorch SoundStream: strides 2-4-5-8, 8 x 1024, 32
channels). Measured: `codec_seconds_per_audio_second` (encode + decode of 10 s at 24 kHz, batch 1, median over
repeats / 10) and `train_step_s` (one generator + discriminator step, AdamW, batch 2 x 1 s, median). Prints one
JSON line last with both configurations and the speedups against the peer (measured in the same run with
--peer_python, see benchmarks/peer_audiolm.py; else the issue's figures: 0.223 s per audio second, 8.6 s per step).
"""
from __future__ import annotations

import argparse
import json
import resource

import gin
import jax
import jax.numpy as jnp
import numpy as np

import common
from musiclm_jax import gin_utils, partitioning
from musiclm_jax import train as train_lib
from musiclm_jax.codec.inference import Codec

PEER_REFERENCE = {"codec_seconds_per_audio_second": 0.223, "train_step_s_median": 8.6}
PEER_MATCHED = ["seanet.SEANetConfig.strides = (2, 4, 5, 8)", "quantizers.RVQConfig.num_quantizers = 8"]


def measure(bindings: list[str], repeats: int) -> dict:
    gin_utils.parse_gin(["gin/codec/paper.gin"], ["MODEL_DIR = '/tmp/unused'", "BATCH_SIZE = 2"] + bindings)
    args = gin_utils.bound_arguments("train", ["model", "optimizer"], {})
    gin.clear_config()
    model, optimizer = args["model"], args["optimizer"]
    partitioner = partitioning.Partitioner(partitioning.create_mesh())
    setup = train_lib.make_train_setup(model=model, optimizer=optimizer, batch_size=2, partitioner=partitioner)
    state = setup.init_state(jax.random.key(0))
    codec = Codec(model.generator, model.variables(state.params, state.flax_mutables), model.sample_rate)

    audio = (np.random.RandomState(0).randn(1, 10 * model.sample_rate) * 0.1).astype(np.float32)
    codec_s, _ = common.median_seconds(lambda: codec.decode(codec.encode(audio)), repeats, warmup=1)
    batch = {"audio": jnp.asarray(np.random.RandomState(1).randn(2, model.sample_rate) * 0.1, jnp.float32)}
    step_s, _ = common.train_step_seconds(setup, state, batch, partitioner, repeats)
    gen = sum(x.size for x in jax.tree.leaves(state.params["generator"]))
    disc = sum(x.size for x in jax.tree.leaves(state.params["discriminator"]))
    return {"generator_params": gen, "discriminator_params": disc, "frame_rate": codec.frame_rate,
            "num_quantizers": codec.num_quantizers, "bitrate_kbps": codec.bitrate_kbps(),
            "codec_seconds_per_audio_second": codec_s / 10.0, "train_step_s": step_s}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer_python", default=None)
    args = parser.parse_args()
    paper = measure([], args.repeats)
    matched = measure(PEER_MATCHED, args.repeats)
    peer = common.run_peer(args.peer_python, args.repeats, ["--model", "soundstream"])
    reference = ({"codec_seconds_per_audio_second": peer["codec_seconds_per_audio_second"],
                  "train_step_s_median": peer["train_step_s_median"]} if peer else PEER_REFERENCE)
    print(json.dumps({
        "benchmark": "codec",
        "paper": paper,
        "peer_matched": matched,
        "codec_seconds_per_audio_second": paper["codec_seconds_per_audio_second"],
        "train_step_s": paper["train_step_s"],
        "peer": reference,
        "peer_source": "measured in this run" if peer else "issue figure (audiolm-pytorch 2.4.0, this machine)",
        "codec_speedup_vs_peer": (reference["codec_seconds_per_audio_second"]
                                  / matched["codec_seconds_per_audio_second"]),
        "train_step_speedup_vs_peer": reference["train_step_s_median"] / matched["train_step_s"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }))


if __name__ == "__main__":
    main()
