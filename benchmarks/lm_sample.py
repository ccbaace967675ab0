"""Sampling speed of the stage LM (jitted, KV-cached, lax.scan) at the peer's configuration, on this CPU.

    python benchmarks/lm_sample.py [--repeats 5] [--peer_python /tmp/peer_venv/bin/python]

512 new tokens after a 1-token prompt, batch 1, temperature 1.0 sampling, fp32, dim 512, depth 6, heads 8,
vocab 1024. Compilation is excluded (one warm-up call). Prints one JSON line last: tokens_per_s,
sample_s_median and the peer's tokens/s with the ratio (measured in the same run with --peer_python, else the
issue's figure; peer_source says which).
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import common
from musiclm_jax import partitioning


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new_tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    common.add_common_flags(parser)
    args = parser.parse_args()

    model = common.peer_model(args.kv_heads, target_length=args.new_tokens + 1)
    params = partitioning.unbox(model.get_initial_variables(jax.random.key(0), model.input_shapes(1))["params"])
    prompt = jnp.asarray(np.random.RandomState(0).randint(1, model.vocab_size, (args.batch, 1)), jnp.int32)

    @jax.jit
    def sample(params, prompt, rng):
        return model.predict_batch(params, {"prefix_tokens": prompt}, rng, numdecode_steps=args.new_tokens,
                                   prompt_target_length=1, temperature=1.0)

    calls = iter(range(10**6))
    seconds, times = common.median_seconds(
        lambda: sample(params, prompt, jax.random.key(next(calls))).block_until_ready(), args.repeats, warmup=1)
    tokens_per_s = args.batch * args.new_tokens / seconds
    peer = common.run_peer(args.peer_python, args.repeats)
    peer_tokens = peer["generate_tokens_per_s"] if peer else common.PEER_REFERENCE["generate_tokens_per_s"]
    print(json.dumps({
        "benchmark": "lm_sample",
        "config": dict(common.peer_config(args.kv_heads), vocab=common.PEER_VOCAB, batch=args.batch,
                       new_tokens=args.new_tokens),
        "sample_s_median": seconds,
        "sample_s_all": times,
        "tokens_per_s": tokens_per_s,
        "peer_tokens_per_s": peer_tokens,
        "peer_source": "measured in this run" if peer else "issue figure (audiolm-pytorch 2.4.0, this machine)",
        "speedup_vs_peer": tokens_per_s / peer_tokens,
    }))


if __name__ == "__main__":
    main()
