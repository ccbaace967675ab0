"""Synthetic token tasks: a learnable family of stage-like sequences, for tests and the interim main job.

Each example has 12 conditioning tokens c (one per level of a 'mulan' group, like MuLan's RVQ tokens) and T
target tokens of a 'semantic' group, drawn by a rule a Transformer can learn:

    step    s = 1 + (c[0] mod 8)                                  ("tempo")
    start   t_0 = c[1] mod K_semantic                              ("key"), with probability 1 - noise
    walk    t_k = (t_(k-1) + s) mod K_semantic                     with probability 1 - noise
    noise   otherwise t_k is uniform over the K_semantic codes (and the walk goes on from it)

c[2..11] are distractors. Predicting t_k needs the conditioning (s, the start) and the previous token, like a
stage that must follow its conditioning and its own past. The best achievable per-token cross-entropy is
therefore `optimal_cross_entropy(noise, K_semantic)` (the noise's entropy), against log(K_semantic) for a model
that learnt only the unigram distribution.
Examples are a pure function of (split, index) (stateless random ops), so the stream is reproducible and
its tf.data iterator can be checkpointed.
"""
from __future__ import annotations

import math

import seqio
import tensorflow as tf

from musiclm_jax.generation.token_layout import TokenLayout

NUM_CONDITIONING = 12
MAX_STEP = 8
_SPLIT_SALT = {"train": 1, "validation": 2, "test": 3}

# The tiny semantic stage: 12 conditioning levels of 32 codes, 64 semantic codes.
SEMANTIC_TINY_LAYOUT = TokenLayout.from_tuples((("mulan", 12, 32), ("semantic", 1, 64)))
# Paper sizes: MuLan RVQ 12 x 1024, semantic vocabulary 1024.
SEMANTIC_PAPER_LAYOUT = TokenLayout.from_tuples((("mulan", 12, 1024), ("semantic", 1, 1024)))


def optimal_cross_entropy(noise: float, codebook_size: int) -> float:
    """Per-token cross-entropy (nats) of the true distribution of a target token."""
    p_rule = 1.0 - noise + noise / codebook_size
    p_other = noise / codebook_size
    return -(p_rule * math.log(p_rule) + (codebook_size - 1) * p_other * math.log(p_other))


def _source(split, shuffle_files=False, seed=None):
    del shuffle_files, seed  # the stream is infinite and already random; the Task shuffles with its seed.
    return tf.data.Dataset.range(2**62).map(lambda i: {"index": i, "salt": tf.constant(_SPLIT_SALT[split], tf.int64)})


def _make_preprocessor(layout: TokenLayout, noise: float):
    cond_codes = layout.group("mulan").codebook_size
    target_codes = layout.group("semantic").codebook_size
    mulan_offsets = tf.constant(layout.level_ranges("mulan")[:, 0], tf.int32)
    semantic_offset = int(layout.offset("semantic"))

    def generate(ds, sequence_length, output_features):
        del output_features
        length = sequence_length["targets"]

        def example(ex):
            seed = tf.stack([ex["salt"], ex["index"]])
            cond = tf.random.stateless_uniform([NUM_CONDITIONING], seed, 0, cond_codes, tf.int32)
            step = 1 + cond[0] % MAX_STEP
            positions = tf.range(length)
            noisy = tf.random.stateless_uniform([length], seed + [0, 2**62], 0.0, 1.0) < noise
            random_codes = tf.random.stateless_uniform([length], seed + [1, 2**62], 0, target_codes, tf.int32)
            # The walk restarts at position 0 and at every noise position; between restarts it adds `step`.
            restart = noisy | tf.equal(positions, 0)
            restart_values = tf.where(noisy, random_codes, cond[1] % target_codes)
            last_restart = tf.scan(tf.maximum, tf.where(restart, positions, 0))
            base = tf.gather(restart_values, last_restart)
            targets = (base + (positions - last_restart) * step) % target_codes
            return {"inputs": cond + mulan_offsets, "targets": targets + semantic_offset}
        return ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return generate


def register_synthetic_task(name: str, layout: TokenLayout, noise: float = 0.1) -> None:
    """Registers the synthetic semantic-stage task `name` for `layout` (which needs 'mulan' and 'semantic')."""
    if layout.group("mulan").levels != NUM_CONDITIONING:
        raise ValueError(f"synthetic task {name}: the 'mulan' group must have {NUM_CONDITIONING} levels")
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    vocab = seqio.PassThroughVocabulary(size=layout.vocab_size, eos_id=None)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(_source, splits=list(_SPLIT_SALT)),
        preprocessors=[_make_preprocessor(layout, noise)],
        output_features={"inputs": seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
                         "targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)},
        shuffle_buffer_size=256,
    )


register_synthetic_task("synthetic_semantic_tiny", SEMANTIC_TINY_LAYOUT)
register_synthetic_task("synthetic_semantic_paper", SEMANTIC_PAPER_LAYOUT)
