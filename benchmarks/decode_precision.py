"""What narrow decoding weights cost in quality: a trained stage's held-out cross-entropy with its kernels and
embedding tables in float32, bfloat16 and int8 (musiclm_jax.weight_precision), and in int8 as the CPU kernel holds
it ('int8+kernel': one scale per last-axis feature), on the same batches.

    python benchmarks/decode_precision.py --model_dir /tmp/musiclm_jax/demo/semantic [--batches 8]

The batches are the run's own evaluation input (its config.gin's eval dataset: the token cache's validation
split, one pass, at most --batches batches). Prints one JSON line: per precision the cross-entropy (nats per
target token), its difference from float32, the weight bytes, and the share of target tokens whose teacher-forced
argmax equals float32's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax import checkpoint_loading, gin_utils, weight_precision


def eval_dataset_config(model_dir: str):
    """The run's evaluation DatasetConfig (config.gin's train.eval_dataset_cfg), read once (num_epochs 1)."""
    with gin_utils.private_config():
        gin_utils.parse_gin([os.path.join(model_dir, checkpoint_loading.CONFIG_FILE)], [], finalize=False)
        cfg = gin_utils.bound_arguments("train", ["eval_dataset_cfg"], {})["eval_dataset_cfg"]
    if cfg is None:
        raise SystemExit(f"{model_dir}: its config names no evaluation dataset")
    return dataclasses.replace(cfg, num_epochs=1, shuffle=False)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True, help="a trained stage's run directory")
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()

    from musiclm_jax.data.input_pipeline import SeqioInputPipeline
    loaded = checkpoint_loading.load_model(args.model_dir)
    model, params = loaded.model, jax.device_get(loaded.params)
    cfg = eval_dataset_config(args.model_dir)
    with SeqioInputPipeline(cfg, model.feature_converter_name,
                            feature_converter_kwargs=model.feature_converter_kwargs) as batches:
        batches = [b for _, b in zip(range(args.batches), batches)]
    if not batches:
        raise SystemExit(f"{args.model_dir}: its evaluation split {cfg.split!r} gave no batch")

    @jax.jit
    def score(p, batch):  # (summed target log-likelihood, target tokens, teacher-forced argmax [B, L])
        logits = model.logits(p, batch)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        target = jnp.take_along_axis(logprobs, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
        weights = batch["decoder_loss_weights"].astype(jnp.float32)
        return jnp.sum(target * weights), jnp.sum(weights), jnp.argmax(logits, axis=-1)

    results, reference_argmax = {}, None
    # 'int8+kernel': the CPU kernel's int8 weights, one scale per last-axis feature (weight_precision.KernelWeight);
    # these teacher-forced batches are too many rows for the kernel, so XLA computes with those same weights.
    for precision, matvec in [(p, "xla") for p in weight_precision.PRECISIONS] + [("int8", "kernel")]:
        narrow = weight_precision.for_decoding(params, precision, matvec)
        total, count, argmaxes = 0.0, 0.0, []
        for batch in batches:
            ll, n, top = score(narrow, batch)
            total, count = total + float(ll), count + float(n)
            argmaxes.append(np.asarray(top)[batch["decoder_loss_weights"] > 0])
        argmax = np.concatenate(argmaxes)
        reference_argmax = argmax if reference_argmax is None else reference_argmax
        results[precision if matvec == "xla" else f"{precision}+{matvec}"] = {"cross_entropy": -total / count, "weight_bytes": weight_precision.weight_bytes(narrow),
                              "argmax_equal_to_float32": float(np.mean(argmax == reference_argmax))}
    for r in results.values():
        r["cross_entropy_minus_float32"] = r["cross_entropy"] - results["float32"]["cross_entropy"]
    print(json.dumps({"benchmark": "decode_precision", "model_dir": args.model_dir, "split": cfg.split,
                      "target_tokens": int(count), "batches": len(batches), "precisions": results}))


if __name__ == "__main__":
    main()
