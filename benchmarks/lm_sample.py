"""Sampling speed of the stage LM (jitted, KV-cached, lax.scan) at the peer's configuration, against the
memory-bandwidth bound, with float32, bfloat16 and int8 decoding weights, each with XLA's dots and with this
project's CPU matrix-vector kernel (musiclm_jax.kernels.matvec).

    python benchmarks/lm_sample.py [--repeats 5] [--peer_python /tmp/peer_venv/bin/python]
        [--precisions float32,bfloat16,int8] [--matvecs xla,kernel]

512 new tokens after a 1-token prompt, batch 1, temperature 1.0 sampling, dim 512, depth 6, heads 8, vocab 1024,
random weights. Compilation is excluded (one warm-up call). At batch 1 each step reads every weight once, so
tokens/s is at most (bytes/s the machine streams) / (weight bytes): the bound is measured in the same run
(common.streaming_bandwidth) on a buffer of the weights' size in each precision, so it is the bandwidth of the
memory level those weights sit in (a cache, where they fit), and also on a 1 GiB buffer (main memory).

Prints one JSON line last: per precision (named 'int8' for XLA's dots, 'int8+kernel' for the kernel) tokens_per_s, sample_s_median, weight_bytes,
bandwidth_bound_tokens_per_s, fraction_of_bound (tokens_per_s over the bound) and speedup_vs_peer; the float32
figures also at the top level (tokens_per_s, speedup_vs_peer) as before; the peer's tokens/s (measured in the
same run with --peer_python, else the issue's figure; peer_source says which).
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import common
from musiclm_jax import partitioning, weight_precision


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new_tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precisions", default=",".join(weight_precision.PRECISIONS))
    parser.add_argument("--matvecs", default=",".join(weight_precision.MATVECS))
    common.add_common_flags(parser)
    args = parser.parse_args()

    model = common.peer_model(args.kv_heads, target_length=args.new_tokens + 1)
    params = partitioning.unbox(model.get_initial_variables(jax.random.key(0), model.input_shapes(1))["params"])
    prompt = jnp.asarray(np.random.RandomState(0).randint(1, model.vocab_size, (args.batch, 1)), jnp.int32)

    sample = common.peer_sampler(model, args.new_tokens)

    main_memory = common.streaming_bandwidth(1 << 30)
    calls = iter(range(10**6))
    figures = {}
    for precision, matvec in [(p, m) for m in args.matvecs.split(",") for p in args.precisions.split(",")]:
        weights = jax.device_put(weight_precision.for_decoding(params, precision, matvec))
        nbytes = weight_precision.weight_bytes(weights)
        seconds, times = common.median_seconds(
            lambda: sample(weights, prompt, jax.random.key(next(calls))).block_until_ready(), args.repeats, warmup=1)
        bandwidth = common.streaming_bandwidth(nbytes)
        bound = bandwidth["best"] / nbytes
        tokens_per_s = args.batch * args.new_tokens / seconds
        figures[precision if matvec == "xla" else f"{precision}+{matvec}"] = {
            "tokens_per_s": tokens_per_s, "sample_s_median": seconds, "sample_s_all": times, "weight_bytes": nbytes,
            "bandwidth_bytes_per_s": bandwidth, "bandwidth_bound_tokens_per_s": bound,
            "fraction_of_bound": tokens_per_s / args.batch / bound,
            "main_memory_bound_tokens_per_s": main_memory["best"] / nbytes}
    peer = common.run_peer(args.peer_python, args.repeats)
    peer_tokens = peer["generate_tokens_per_s"] if peer else common.PEER_REFERENCE["generate_tokens_per_s"]
    for f in figures.values():
        f["speedup_vs_peer"] = f["tokens_per_s"] / peer_tokens
    first = figures[next(iter(figures))]
    print(json.dumps({
        "benchmark": "lm_sample",
        "config": dict(common.peer_config(args.kv_heads), vocab=common.PEER_VOCAB, batch=args.batch,
                       new_tokens=args.new_tokens),
        "device": jax.devices()[0].device_kind,
        "main_memory_bandwidth_bytes_per_s": main_memory,
        "precisions": figures,
        "tokens_per_s": first["tokens_per_s"],
        "sample_s_median": first["sample_s_median"],
        "peer_tokens_per_s": peer_tokens,
        "peer_source": "measured in this run" if peer else "issue figure (audiolm-pytorch 2.4.0, this machine)",
        "speedup_vs_peer": first["speedup_vs_peer"],
    }))


if __name__ == "__main__":
    main()
