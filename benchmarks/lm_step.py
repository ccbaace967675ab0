"""Training-step speed of the stage LM at the peer's configuration, on this CPU (one process).

    python benchmarks/lm_step.py [--repeats 5] [--peer_python /tmp/peer_venv/bin/python]

Configuration (audiolm-pytorch SemanticTransformer's): dim 512, depth 6, heads 8 (one key/value head, as the
peer; --kv_heads 8 for multi-head), vocab 1024, batch 4 x 512
tokens, AdamW, fp32, no dropout. Prints one JSON line last:
  step_s_median, tokens_per_s, matmul_peak_gflops (jitted 2048^2 fp32 matmul, measured in the same run),
  mfu (analytic model FLOPs per step / step time / matmul peak), params, and the peer's tokens/s with the
  ratio: measured in the same run if --peer_python points at a venv with audiolm-pytorch (see
  benchmarks/peer_audiolm.py), else the figure quoted in the issue (peer_source says which).
"""
from __future__ import annotations

import argparse
import json

import jax

import common
from musiclm_jax.trainer import make_train_step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    common.add_common_flags(parser)
    args = parser.parse_args()

    model, optimizer, state, batch = common.peer_train_inputs(args.kv_heads, args.batch, args.length)
    step = jax.jit(make_train_step(model, optimizer), donate_argnums=(0,))
    key = jax.random.key(1)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], batch, key)
        jax.block_until_ready(metrics["loss"])

    seconds, times = common.median_seconds(one_step, args.repeats, warmup=2)
    peak = common.matmul_peak_gflops()
    flops = model.train_flops_per_example() * args.batch
    tokens_per_s = args.batch * args.length / seconds
    peer = common.run_peer(args.peer_python, args.repeats)
    peer_tokens = peer["train_tokens_per_s"] if peer else common.PEER_REFERENCE["train_tokens_per_s"]
    print(json.dumps({
        "benchmark": "lm_step",
        "config": dict(common.peer_config(args.kv_heads), vocab=common.PEER_VOCAB, batch=args.batch,
                       length=args.length),
        "params": model.network.num_params(),
        "step_s_median": seconds,
        "step_s_all": times,
        "tokens_per_s": tokens_per_s,
        "model_flops_per_step": flops,
        "matmul_peak_gflops": peak,
        "mfu": flops / seconds / (peak * 1e9),
        "peer_tokens_per_s": peer_tokens,
        "peer_source": "measured in this run" if peer else "issue figure (audiolm-pytorch 2.4.0, this machine)",
        "speedup_vs_peer": tokens_per_s / peer_tokens,
    }))


if __name__ == "__main__":
    main()
