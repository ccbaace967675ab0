"""Stage tasks over a token cache (musiclm_jax.data.token_cache), registered on first use by name:

  semantic_stage:<TOKEN_DIR>   inputs: MuLan tokens (12)             targets: semantic tokens of a crop
  coarse_stage:<TOKEN_DIR>     inputs: MuLan tokens + semantic crop  targets: codec levels 1..Lc of the crop
  fine_stage:<TOKEN_DIR>       inputs: codec levels 1..Lc of a crop  targets: codec levels Lc+1..Lc+Lf

optionally followed by `?seconds=S&coarse_levels=Lc&fine_levels=Lf&melody=1` (defaults: semantic the whole chunk,
coarse 10 s, fine 3 s, each at most the chunk; Lc = min(4, levels // 2), Lf = the remaining levels; melody 0).
`melody=1` (semantic or coarse stage, a cache with melody tokens): the MuLan tokens are followed by the melody
token of each semantic frame of the crop (musiclm_jax.generation.melody, 13 codes; the cache's tokens, e.g. 5 Hz, repeated to
the semantic rate: 750 for 30 s), in the layout mulan, melody, semantic (, coarse), then, for the coarse stage,
by the semantic crop; the crop then starts on a melody frame. (The coarse stage with melody is MusicGen's route
of conditioning the acoustic-token model on the melody's chroma; MusicLM conditions only the semantic stage.)
One melody token per semantic frame puts the melody of target frame t exactly `target_length` positions before
it, whatever t: the relative position bias can attend to it by distance alone. With one token per 200 ms the
distance varies with t and the model must find the frame's melody by content; measured on a cache whose semantic
tokens encode the melody, 400 steps of the tiny stage follow a given melody on 89% of the frames with aligned
tokens and on 7.5% (chance ~8%) with 5 Hz tokens.

Token layout (exact; global ids of the stage's TokenLayout, see musiclm_jax.generation.token_layout): every (group, level)
has its own id range after PAD = 0, `id = offset(group) + level * codebook_size + code`, and multi-level groups
are flattened frame-major. With the paper's sizes (MuLan 12 x 1024, semantic 1024, codec 12 x 1024, 25 and
50 Hz) and a crop starting at semantic frame s (codec frame 2s):

  semantic  layout mulan(12 x 1024), semantic(1 x 1024)
            inputs  [m_0 + 1, m_1 + 1 + 1024, ..., m_11 + 1 + 11 * 1024]                      (12 tokens)
            targets [S_s + 12289, S_(s+1) + 12289, ...]                                       (25 Hz x seconds)
  coarse    layout mulan(12 x 1024), semantic(1 x 1024), coarse(4 x 1024)
            inputs  MuLan as above, then the semantic crop (12 + 25 x seconds tokens)
            targets [c(2s, 0) + 13313, c(2s, 1) + 13313 + 1024, ..., c(2s, 3) + 13313 + 3072,
                     c(2s + 1, 0) + 13313, ...]                                              (4 x 50 Hz x seconds)
  fine      layout coarse(4 x 1024), fine(8 x 1024)
            inputs  [c(f, 0) + 1, ..., c(f, 3) + 1 + 3072, c(f + 1, 0) + 1, ...]            (4 x 50 Hz x seconds)
            targets [c(f, 4) + 4097, ..., c(f, 11) + 4097 + 7 * 1024, c(f + 1, 4) + 4097, ...] (8 x 50 Hz x seconds)

where m_l is MuLan level l's code, S_t the semantic token of frame t and c(t, l) codec level l at frame t. The
prefix-LM feature converter (data/feature_converters.py) then makes decoder inputs/targets of `inputs + targets`.
Crops start at a seeded random frame within the chunk's real (not padded) audio, aligned across the semantic
and codec rates (the codec rate must be a whole multiple of the semantic rate).
"""
from __future__ import annotations

import hashlib

import seqio
import tensorflow as tf

from musiclm_jax.data import token_cache
from musiclm_jax.data.stages import StageSpec, stage_spec_from_name
from musiclm_jax.generation.token_layout import TokenLayout


def feature_description(manifest: dict) -> dict:
    """The tf.io parsing spec of a token cache's examples (data/token_cache.py), from its manifest."""
    description = {"id": tf.io.FixedLenFeature([], tf.string), "text": tf.io.FixedLenFeature([], tf.string),
                   "num_samples": tf.io.FixedLenFeature([], tf.int64)}
    for name, spec in manifest["tokenizers"].items():
        description[name] = tf.io.FixedLenFeature([spec["frames"] * spec["levels"]], tf.int64)
    return description


def _level_offsets(layout: TokenLayout, group: str) -> tf.Tensor:
    return tf.constant(layout.level_ranges(group)[:, 0], tf.int32)


def _make_preprocessor(spec: StageSpec, manifest: dict):
    tokenizers, chunk_rate = manifest["tokenizers"], float(manifest["sample_rate"])
    layout = spec.layout

    def crop_start(seed, num_samples, frame_rate, window, total, align=1):
        """A random first frame (a multiple of `align`) such that the window lies in the real audio (or starts at
        0 if it cannot)."""
        real = tf.cast(tf.math.ceil(tf.cast(num_samples, tf.float64) / chunk_rate * frame_rate), tf.int32)
        last = tf.maximum(0, tf.minimum(real, total) - window) // align
        return tf.random.stateless_uniform([], seed, 0, last + 1, tf.int32) * align

    def codec_window(ex, first, frames, lo, hi, group):
        codec = tokenizers["codec"]
        codes = tf.reshape(tf.cast(ex["codec"], tf.int32), [codec["frames"], codec["levels"]])
        window = codes[first:first + frames, lo:hi]
        return tf.reshape(window + _level_offsets(layout, group)[None, :], [-1])

    @seqio.map_over_dataset(num_seeds=1)
    def to_stage(ex, seed):
        if spec.stage in ("semantic", "coarse"):
            mulan = tf.cast(ex["mulan"], tf.int32) + _level_offsets(layout, "mulan")
            semantic = tokenizers["semantic"]
            frames = int(round(spec.seconds * semantic["frame_rate"]))
            per_melody = int(round(semantic["frame_rate"] / tokenizers["melody"]["frame_rate"])) if spec.melody else 1
            first = crop_start(seed, ex["num_samples"], semantic["frame_rate"], frames, semantic["frames"], per_melody)
            sem = tf.cast(ex["semantic"][first:first + frames], tf.int32) + layout.offset("semantic")
            inputs = mulan
            if spec.melody:
                tune = tf.cast(ex["melody"][first // per_melody:(first + frames) // per_melody], tf.int32)
                tune = tf.repeat(tune, per_melody)  # each semantic frame's melody token
                inputs = tf.concat([mulan, tune + layout.offset("melody")], 0)
            if spec.stage == "semantic":
                return {"inputs": inputs, "targets": sem, "id": ex["id"], "text": ex["text"]}
            ratio = int(round(tokenizers["codec"]["frame_rate"] / semantic["frame_rate"]))
            targets = codec_window(ex, first * ratio, frames * ratio, 0, spec.coarse_levels, "coarse")
            return {"inputs": tf.concat([inputs, sem], 0), "targets": targets, "id": ex["id"], "text": ex["text"]}
        codec = tokenizers["codec"]
        frames = int(round(spec.seconds * codec["frame_rate"]))
        first = crop_start(seed, ex["num_samples"], codec["frame_rate"], frames, codec["frames"])
        lc, lf = spec.coarse_levels, spec.fine_levels
        return {"inputs": codec_window(ex, first, frames, 0, lc, "coarse"),
                "targets": codec_window(ex, first, frames, lc, lc + lf, "fine"), "id": ex["id"], "text": ex["text"]}
    return to_stage


def register_stage_task(name: str) -> seqio.Task:
    """Registers (once) and returns the stage task `name`, over the finished shards of its token cache."""
    spec = stage_spec_from_name(name)
    manifest = token_cache.read_manifest(spec.token_dir)
    registered = f"{spec.stage}_stage_{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    if registered in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(registered)  # the cache may have grown since
    files = {}
    for split, info in manifest["splits"].items():
        done = token_cache.completed_shards(spec.token_dir, split, info["num_shards"])
        if done:
            files[split] = done
    if manifest.get("planned"):
        raise ValueError(f"{spec.token_dir} is a planned token cache (a manifest without tokens, from `python -m "
                         f"musiclm_jax.aot --job=token_manifest`): it gives a stage its layout and lengths, not data; "
                         f"write the cache with `python -m musiclm_jax.tokenize`")
    if not files:
        raise ValueError(f"token cache {spec.token_dir} has no finished shards")
    vocab = seqio.PassThroughVocabulary(size=spec.layout.vocab_size, eos_id=None)
    counts = {split: manifest["splits"][split].get("num_examples") for split in files}
    source = seqio.TFExampleDataSource(files, feature_description(manifest),
                                       num_input_examples=counts if all(counts.values()) else None)
    return seqio.TaskRegistry.add(
        registered, source=source,
        preprocessors=[seqio.CacheDatasetPlaceholder(), _make_preprocessor(spec, manifest)],
        output_features={"inputs": seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
                         "targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)},
        shuffle_buffer_size=256)


