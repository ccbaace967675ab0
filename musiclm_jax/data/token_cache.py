"""The token cache: what `python -m musiclm_jax.tokenize` writes and the stage tasks read.

    OUTPUT_DIR/manifest.json                       format, source, chunking, tokenizers, splits, skip counts
    OUTPUT_DIR/<split>/shard-SSSSS-of-NNNNN.tfrecord    tf.train.Examples, one per chunk (written to a temporary
    OUTPUT_DIR/<split>/shard-SSSSS-of-NNNNN.json        name, then renamed); the .json (counts, seconds) is
                                                        written last and marks the shard done

Each clip is cut into chunks of `chunk_seconds`; a clip shorter than one chunk is zero-padded to one. Every
chunk has the same number of frames per tokenizer, so batches have static shapes. Example features:

    id          bytes   '<clip id>#<chunk index>'
    text        bytes   the clip's caption ('' if none)
    num_samples int64   audio samples of the chunk that are real (the rest is padding)
    <name>      int64   [frames * levels] tokens of tokenizer <name>, frame-major (frame 0's levels first),
                        codes in [0, codebook_size); e.g. codec [150 * 12], semantic [75 * 1], mulan [1 * 12]

The manifest's "tokenizers" entry gives each tokenizer's frames per chunk, levels, codebook_size, frame_rate
(Hz) and sample_rate, and the checkpoint it came from.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import numpy as np

FORMAT = "musiclm_jax.token_cache"
VERSION = 1
MANIFEST = "manifest.json"


def shard_name(split: str, index: int, num_shards: int) -> str:
    return os.path.join(split, f"shard-{index:05d}-of-{num_shards:05d}")


def write_manifest(output_dir: str, manifest: dict) -> None:
    """Writes manifest.json atomically (temporary file, then rename)."""
    path = os.path.join(output_dir, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(manifest, format=FORMAT, version=VERSION), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_manifest(token_dir: str) -> dict:
    """The manifest of a token cache; raises naming the directory if it is missing or of another format."""
    path = os.path.join(token_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{token_dir} is not a token cache (no {MANIFEST}; write one with "
                                f"`python -m musiclm_jax.tokenize`)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
                         f"code reads {FORMAT!r} version {VERSION}")
    return manifest


def completed_shards(token_dir: str, split: str, num_shards: int) -> list[str]:
    """Paths of the split's finished .tfrecord shards (those whose .json marker exists), in shard order."""
    paths = []
    for index in range(num_shards):
        base = os.path.join(token_dir, shard_name(split, index, num_shards))
        if os.path.exists(base + ".json") and os.path.exists(base + ".tfrecord"):
            paths.append(base + ".tfrecord")
    return paths


def tokenizer_spec(manifest: dict, name: str, token_dir: str = "", needed_by: Optional[str] = None) -> dict:
    """The manifest entry of tokenizer `name`; raises naming the cache and what needs it if it is absent."""
    tokenizers = manifest.get("tokenizers", {})
    if name not in tokenizers:
        raise ValueError(f"token cache {token_dir} has no {name!r} tokens (it has {sorted(tokenizers)})"
                         + (f"; {needed_by} needs them" if needed_by else ""))
    return tokenizers[name]


def encode_example(clip_id: str, text: str, num_samples: int, tokens: Mapping[str, np.ndarray]) -> bytes:
    """One chunk of the cache as a serialized tf.train.Example: 'id' ('<clip id>#<chunk>'), 'text' (the caption),
    'num_samples' (the chunk's real samples before padding) and one int64 list per tokenizer (its tokens
    [frames, levels], flattened row by row)."""
    import tensorflow as tf
    feature = {"id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[clip_id.encode()])),
               "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()])),
               "num_samples": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(num_samples)]))}
    for name, value in tokens.items():
        feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=np.asarray(value).reshape(-1).tolist()))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
