"""Where the time of the stage LM's training step or sampling loop goes on this CPU, op by op (jax.profiler).

    python benchmarks/lm_profile.py [--job step|sample] [--kv_heads 1|8] [--top 15]
        [--decode_weights float32|bfloat16|int8] [--matvec xla|kernel]

The peer's configuration as in lm_step.py (batch 4 x 512 tokens, AdamW) and lm_sample.py (512 tokens at
batch 1; the sampling weights in --decode_weights, their products run by --matvec). The job is compiled and run once, then traced for one run with XLA's per-thunk
trace events (`--xla_cpu_enable_xprof_traceme`, set by this script before JAX starts). Events are read from the
trace's XSpace protobuf (TensorFlow's copy of the proto), summed over XLA's worker threads and grouped:

  matmul        dots, fusions whose computation holds a dot (XNNPACK/YNNPACK/oneDNN fusions around them), and
                calls of this project's matrix-vector kernel (custom call musiclm_matvec)
  other kinds   each remaining op by its name without the number (e.g. transpose_copy_fusion; a library
                fusion without a dot, such as a YNNPACK reduction, keeps its name: ynn_fusion)

Op times overlap where XLA runs thunks concurrently, and tracing slows small ops, so shares are a guide to where
the time goes, not a wall-clock split. Prints one JSON line last: job, config, traced_wall_s, op_seconds (the
sum), matmul_share, categories [{name, seconds, share}] (the `--top` largest) and top_ops (the largest single
ops with their HLO shape).
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from musiclm_jax import partitioning, weight_precision  # noqa: E402
from musiclm_jax.trainer import make_train_step  # noqa: E402



def matmul_ops(hlo: str) -> set[str]:
    """Names of the instructions in compiled HLO text that are dots or fusions whose computation holds one."""
    with_dot, calls, names = set(), {}, set()
    computation = None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if header:
            computation = header.group(1)
            continue
        instruction = re.match(r"^\s+(?:ROOT )?%(\S+) = \S+ (\S+?)\(", line)
        if not instruction:
            continue
        name, op = instruction.groups()
        if op in ("dot", "convolution") or 'custom_call_target="musiclm_matvec"' in line:
            with_dot.add(computation)
            names.add(name)
        called = re.search(r"calls=%([\w.\-]+)", line)
        if op == "fusion" and called:
            calls[name] = called.group(1)
    return names | {name for name, called in calls.items() if called in with_dot}


def step_job(kv_heads: int, batch: int, length: int):
    """(jitted function, its arguments) of one training step."""
    model, optimizer, state, data = common.peer_train_inputs(kv_heads, batch, length)
    return jax.jit(make_train_step(model, optimizer)), (state, data, jax.random.key(1))


def sample_job(kv_heads: int, new_tokens: int, precision: str = "float32", matvec: str = "xla"):
    """(jitted function, its arguments) of sampling `new_tokens` after a 1-token prompt at batch 1, the weights
    held in `precision` with their products run by `matvec` (weight_precision.for_decoding)."""
    model = common.peer_model(kv_heads, target_length=new_tokens + 1)
    params = partitioning.unbox(model.get_initial_variables(jax.random.key(0), model.input_shapes(1))["params"])
    prompt = jnp.asarray(np.random.RandomState(0).randint(1, model.vocab_size, (1, 1)), jnp.int32)
    params = jax.device_put(weight_precision.for_decoding(params, precision, matvec))
    return common.peer_sampler(model, new_tokens), (params, prompt, jax.random.key(1))


def op_times(trace_dir: str) -> tuple[dict, dict]:
    """{op name: summed seconds} and {op name: event count} over XLA's worker threads in a trace directory."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise RuntimeError(f"no *.xplane.pb under {trace_dir}: the profiler wrote no trace")
    space = xplane_pb2.XSpace()
    with open(paths[0], "rb") as f:
        space.ParseFromString(f.read())
    seconds, counts = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:  # XLA:CPU's intra-op worker threads run the thunks
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if name.startswith("ThunkExecutor") or name.startswith("while"):
                    continue  # containers of the ops counted below
                seconds[name] += event.duration_ps * 1e-12
                counts[name] += 1
    return seconds, counts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", choices=("step", "sample"), default="step")
    parser.add_argument("--kv_heads", type=int, default=1, help="1: the peer's multi-query attention; 8: multi-head")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512, help="training tokens per example, or tokens sampled")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--decode_weights", choices=weight_precision.PRECISIONS, default="float32")
    parser.add_argument("--matvec", choices=weight_precision.MATVECS, default="xla")
    args = parser.parse_args()

    fn, fn_args = (step_job(args.kv_heads, args.batch, args.length) if args.job == "step"
                   else sample_job(args.kv_heads, args.length, args.decode_weights, args.matvec))
    hlo = fn.lower(*fn_args).compile().as_text()
    jax.block_until_ready(fn(*fn_args))  # compile and warm up
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            jax.block_until_ready(fn(*fn_args))
        wall = time.perf_counter() - start
        seconds, counts = op_times(trace_dir)
    total = sum(seconds.values())
    if total <= 0:
        sys.exit("the trace holds no XLA op events (was --xla_cpu_enable_xprof_traceme honoured?)")

    def shape(name):
        found = re.search(r"%" + re.escape(name) + r" = (\S+) ", hlo)
        return found.group(1) if found else ""

    matmuls = matmul_ops(hlo)
    categories = collections.Counter()
    for name, s in seconds.items():
        categories["matmul" if name in matmuls else re.sub(r"[.\d]+$", "", name)] += s
    print(json.dumps({
        "benchmark": "lm_profile",
        "job": args.job,
        "config": dict(common.peer_config(args.kv_heads), vocab=common.PEER_VOCAB, batch=args.batch,
                       length=args.length) if args.job == "step" else
        dict(common.peer_config(args.kv_heads), vocab=common.PEER_VOCAB, batch=1, new_tokens=args.length,
             decode_weights=args.decode_weights, matvec=args.matvec),
        "device": jax.devices()[0].device_kind,
        "traced_wall_s": wall,
        "op_seconds": total,
        "matmul_share": categories["matmul"] / total,
        "categories": [{"name": n, "seconds": s, "share": s / total} for n, s in categories.most_common(args.top)],
        "top_ops": [{"name": n, "shape": shape(n), "seconds": s, "count": counts[n]}
                    for n, s in seconds.most_common(args.top)],
    }))


if __name__ == "__main__":
    main()
