"""Training-step cost of positions placed by time (TokenLMModel.time_aligned_groups), on this CPU.

    python benchmarks/time_aligned.py [--repeats 20]

For the tiny coarse stage (gin/stages/coarse_tiny.gin) and the tiny melody-conditioned semantic stage
(gin/stages/semantic_tiny.gin), at their training batch of 16: the median seconds of one jitted train step (AdamW)
with the gin file's time_aligned_groups and with the sequence index (time_aligned_groups=()), on the same batch of
layout-valid random tokens, measured back to back in this run. The relative bias is then per example
([batch, heads, length, length], gathered and scattered in the backward pass) instead of shared by the batch.
Prints one JSON line per stage: step_s_median for both, and aligned_over_sequence (the time ratio).
"""
from __future__ import annotations

import argparse
import json

import gin
import jax
import jax.numpy as jnp
import numpy as np

import common
from musiclm_jax import aot, gin_utils, optimizers, partitioning
from musiclm_jax.train_state import TrainState
from musiclm_jax.trainer import make_train_step

STAGES = {"coarse": "gin/stages/coarse_tiny.gin", "semantic_melody": "gin/stages/semantic_tiny.gin"}
BATCH = 16


def load_model(gin_file: str, aligned: bool):
    # The layouts and lengths of the tiny token cache, planned from the tiny tokenizers (aot.planned_token_dir).
    bindings = [f"TOKEN_DIR = '{aot.planned_token_dir('tiny')}'"]
    bindings += [] if aligned else ["models.TokenLMModel.time_aligned_groups=()"]
    gin_utils.parse_gin([gin_file], bindings, finalize=False)
    return gin.query_parameter("%MODEL").scoped_configurable_fn()


def layout_batch(model, rng: np.random.RandomState) -> dict:
    """A training batch whose prefix holds one frame of each one-frame group, then the time-aligned group's frames
    (as the stage tasks lay them out), then targets."""
    layout, groups = model.layout, list(model.prefix_groups)
    aligned = set(model.time_aligned_groups)
    lengths = {g: layout.group(g).levels for g in groups if g not in aligned}
    for g in aligned:
        lengths[g] = model.prefix_length - sum(lengths.values())
    parts = [layout.to_global(rng.randint(0, layout.group(g).codebook_size, (BATCH, lengths[g])), g) for g in groups]
    parts.append(layout.to_global(rng.randint(0, layout.group(model.target_group).codebook_size,
                                              (BATCH, model.target_length)), model.target_group))
    seq = np.concatenate(parts, axis=1).astype(np.int32)
    length = seq.shape[1]
    return {"decoder_input_tokens": np.concatenate([np.zeros((BATCH, 1), np.int32), seq[:, :-1]], axis=1),
            "decoder_target_tokens": seq,
            "decoder_loss_weights": (np.arange(length) >= model.prefix_length)[None].repeat(BATCH, 0).astype(np.int32),
            "decoder_causal_attention": (np.arange(length) <= model.prefix_length)[None].repeat(BATCH, 0).astype(
                np.int32)}


def step_seconds(model, batch, repeats: int) -> float:
    optimizer = optimizers.create_optimizer(name="adamw", learning_rate=1e-3, weight_decay=0.01)
    variables = partitioning.unbox(model.get_initial_variables(jax.random.key(0), model.input_shapes(1)))
    holder = {"state": TrainState.create(variables, optimizer.tx)}
    step = jax.jit(make_train_step(model, optimizer), donate_argnums=(0,))
    batch = jax.tree.map(jnp.asarray, batch)
    key = jax.random.key(1)

    def one_step():
        holder["state"], metrics = step(holder["state"], batch, key)
        jax.block_until_ready(metrics["loss"])

    return common.median_seconds(one_step, repeats, warmup=2)[0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    for name, gin_file in STAGES.items():
        aligned = load_model(gin_file, aligned=True)
        sequence = load_model(gin_file, aligned=False)
        batch = layout_batch(aligned, np.random.RandomState(0))
        seconds = {"aligned": step_seconds(aligned, batch, args.repeats),
                   "sequence": step_seconds(sequence, batch, args.repeats)}
        print(json.dumps({"benchmark": "time_aligned", "stage": name, "gin_file": gin_file, "batch": BATCH,
                          "length": aligned.sequence_length, "repeats": args.repeats,
                          "aligned_step_s_median": round(seconds["aligned"], 5),
                          "sequence_step_s_median": round(seconds["sequence"], 5),
                          "aligned_over_sequence": round(seconds["aligned"] / seconds["sequence"], 3)}))


if __name__ == "__main__":
    main()
