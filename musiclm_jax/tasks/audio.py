"""Raw-audio seqio tasks (the codec's, w2v-BERT's and MuLan's input), registered on first use by name:

  synthetic_music_<rate>hz          the embedded procedural music (musiclm_jax.data.synthetic_music), split
                                    into train / validation / test by clip index, with its captions
  audio_folder_<rate>hz:<DIR>       the `audio_folder` TFDS dataset of DIR (audio files + optional captions.jsonl)
  musiccaps_<rate>hz:<DIR>          the `musiccaps` TFDS dataset: DIR/musiccaps-public.csv and clips {ytid}.<ext>
                                    in DIR (or in the folder given by the `clips_dir` option)

Folder and MusicCaps names may end with options, `?bad_input=error&require_captions=true` (see
captioned_audio.AudioChecks: bad_input, require_captions, min_sample_rate, silence_dbfs, min_seconds,
max_seconds; captioned_audio.HeldOutCarve: validation_fraction, test_fraction; and clips_dir for MusicCaps).
Names are written and read as typed values by data/dataset_config.RawAudioSource (its `task_name` and
`from_task_name`); `raw_audio_task_name` and `raw_audio_source` (gin) build them. Their TFDS datasets
are prepared at registration (once; tfds_builders).

Examples: {'audio': float32 [samples] mono at <rate>, 'text': caption ('' if none), 'id': str}; then, after
seqio's cache point (so each epoch draws new crops), random crops of the requested length (seeded; shorter
clips are zero-padded) and loudness normalisation (RMS to -20 dBFS, peak at most 1). A folder's or MusicCaps'
clip gives one crop per epoch. A synthetic clip, which costs more to render (about 7 ms for 4 s at 24 kHz on one
core) than a training step's crop of it costs to train on, gives up to SYNTHETIC_CROPS_PER_CLIP crops, as many
as fit in it: each is drawn as the single crop is, so every example has the same distribution as before, and
training's block shuffle (data/input_pipeline.block_shuffle) spreads a clip's crops over batches. The demo's codec (1 s crops) then trains 1.6 times as
fast on this 2-core machine; w2v-BERT's 2 s crops come 2 per clip, MuLan's 4 s crops 1.
"""
from __future__ import annotations

import functools
import hashlib
import os

import seqio
import tensorflow as tf

from musiclm_jax.data import synthetic_music
from musiclm_jax.data.captioned_audio import AudioChecks, HeldOutCarve
from musiclm_jax.data.dataset_config import RawAudioSource

SYNTHETIC_CLIP_SECONDS = 4.0
SYNTHETIC_CLIPS = {"train": 100_000, "validation": 1_000, "test": 1_000}
SYNTHETIC_CROPS_PER_CLIP = 4
TARGET_RMS_DB = -20.0
MUSICCAPS_CSV = "musiccaps-public.csv"
_CARVE_OPTIONS = ("validation_fraction", "test_fraction")


def random_crops(dataset: tf.data.Dataset, sequence_length, max_crops: int) -> tf.data.Dataset:
    """Each clip -> k examples, k = clamp(clip samples // sequence_length['audio'], 1, max_crops), each cropped
    to sequence_length['audio'] samples at its own seeded random offset (uniform; crops may overlap; a short clip
    is zero-padded and gives one). The other features are repeated. With max_crops 1 (folders, MusicCaps) the
    crop is the one a scalar draw from the same seed gives: stateless_uniform([1]) starts as stateless_uniform([])."""
    length = sequence_length["audio"]

    @seqio.map_over_dataset(num_seeds=1)
    def crops(ex, seed):
        audio = ex["audio"]
        audio = tf.pad(audio, [[0, tf.maximum(0, length - tf.shape(audio)[0])]])
        count = tf.clip_by_value(tf.shape(audio)[0] // length, 1, max_crops)
        starts = tf.random.stateless_uniform([count], seed, 0, tf.shape(audio)[0] - length + 1, tf.int32)
        windows = tf.gather(audio, starts[:, None] + tf.range(length)[None, :])  # [count, length]
        rest = {k: tf.repeat(tf.expand_dims(v, 0), count, axis=0) for k, v in ex.items() if k != "audio"}
        return dict(rest, audio=windows)
    return crops(dataset).unbatch()


@seqio.map_over_dataset
def normalize_loudness(ex):
    """Scales 'audio' to an RMS of -20 dBFS, then down if its peak exceeds 1 (silence is left as is)."""
    audio = ex["audio"]
    rms = tf.sqrt(tf.reduce_mean(tf.square(audio)))
    gain = tf.where(rms > 1e-6, 10.0 ** (TARGET_RMS_DB / 20.0) / tf.maximum(rms, 1e-6), 1.0)
    audio = audio * gain
    peak = tf.reduce_max(tf.abs(audio))
    return dict(ex, audio=audio / tf.maximum(peak, 1.0))


@seqio.map_over_dataset
def pcm_to_float(ex):
    """TFDS records {'audio': int16, 'caption', 'id', ...} -> {'audio': float32 in [-1, 1), 'text', 'id'}."""
    return {"audio": tf.cast(ex["audio"], tf.float32) / 32768.0, "text": ex["caption"], "id": ex["id"]}


def _audio_features():
    return {"audio": seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=tf.float32)}


def _synthetic_source(sample_rate: int) -> seqio.DataSource:
    splits = list(SYNTHETIC_CLIPS)

    def render(index, split_index):
        clip = synthetic_music.generate_clip(int(index), seed=int(split_index), seconds=SYNTHETIC_CLIP_SECONDS,
                                             sample_rate=sample_rate)
        return clip["audio"], clip["caption"], clip["id"]

    def dataset_fn(split, shuffle_files=False, seed=None):
        del shuffle_files, seed
        split_index = splits.index(split)

        def example(i):
            audio, text, clip_id = tf.numpy_function(render, [i, split_index], (tf.float32, tf.string, tf.string),
                                                     stateful=False)
            return {"audio": tf.ensure_shape(audio, [None]), "text": tf.ensure_shape(text, []),
                    "id": tf.ensure_shape(clip_id, [])}
        return tf.data.Dataset.range(SYNTHETIC_CLIPS[split]).map(example, num_parallel_calls=2, deterministic=True)
    return seqio.FunctionDataSource(dataset_fn, splits=splits, num_input_examples=SYNTHETIC_CLIPS)


def prepared_builder(name: str, data_root: str | None = None, beam_options=None):
    """The prepared TFDS builder of folder or MusicCaps task `name` (see the module docstring), prepared now if it
    is not yet: in this process, or on Apache Beam with `beam_options` (tfds_builders.beam_options_from_flags).
    The same name always reads the same prepared copy, however it was prepared."""
    from musiclm_jax.data import tfds_builders
    source = RawAudioSource.from_task_name(name)
    if source.kind == "synthetic_music":
        raise ValueError(f"{name!r}: the synthetic music is rendered on the fly; there is nothing to prepare")
    path, options = os.path.abspath(source.path), dict(source.options)
    clips_dir = options.pop("clips_dir", None)
    carve = HeldOutCarve(**{k: options.pop(k) for k in _CARVE_OPTIONS if k in options})
    checks = AudioChecks(sample_rate=source.sample_rate, held_out=carve, **options)
    if source.kind == "audio_folder":
        return tfds_builders.audio_folder_builder(path, checks, data_root, beam_options=beam_options)
    return tfds_builders.musiccaps_builder(os.path.join(path, MUSICCAPS_CSV), clips_dir or path, checks, data_root,
                                           beam_options=beam_options)


def register_raw_audio_task(name: str) -> seqio.Task:
    """Registers (once) and returns the raw-audio task `name` (see the module docstring for the names).

    Folder and MusicCaps tasks are registered in seqio as <kind>_<rate>hz_<hash of the name> (seqio names
    cannot hold paths).
    """
    source = RawAudioSource.from_task_name(name)
    kind, rate = source.kind, source.sample_rate
    registered = name
    if kind != "synthetic_music":
        path, options = os.path.abspath(source.path), source.options
        registered = f"{kind}_{rate}hz_{hashlib.sha1(f'{path}?{sorted(options.items())}'.encode()).hexdigest()[:12]}"
    if registered in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(registered)
    if kind == "synthetic_music":
        source, preprocessors = _synthetic_source(rate), []
    else:
        from musiclm_jax.data import tfds_builders
        source, preprocessors = tfds_builders.PreparedTfdsSource(prepared_builder(name)), [pcm_to_float]
    crops_per_clip = SYNTHETIC_CROPS_PER_CLIP if kind == "synthetic_music" else 1
    crop = functools.partial(random_crops, max_crops=crops_per_clip)
    preprocessors += [seqio.CacheDatasetPlaceholder(), crop, normalize_loudness]
    return seqio.TaskRegistry.add(registered, source=source, output_features=_audio_features(),
                                  preprocessors=preprocessors, shuffle_buffer_size=64)


def full_clips(name: str, split: str, shard_info: seqio.ShardInfo | None = None) -> tf.data.Dataset:
    """The whole clips of raw-audio task `name`, in a fixed order, before cropping and normalisation:
    {'audio': float32 [samples], 'text', 'id'} (for jobs that process every clip, such as tokenization); with
    `shard_info`, only that shard's clips. The synthetic music's clips are SYNTHETIC_CLIP_SECONDS long."""
    source = register_raw_audio_task(name).source
    if isinstance(source, seqio.FunctionDataSource):  # the synthetic music
        ds = source.get_dataset(split=split, shuffle=False)
        return ds.shard(shard_info.num_shards, shard_info.index) if shard_info else ds
    return pcm_to_float(source.get_dataset(split=split, shuffle=False, shard_info=shard_info))


def num_clips(name: str, split: str) -> int:
    """Clips in `split` of raw-audio task `name` (the synthetic music: its nominal count)."""
    source = register_raw_audio_task(name).source
    if split not in source.splits:
        raise ValueError(f"raw-audio task {name!r} has no split {split!r}; splits: {list(source.splits)}")
    return int(source.num_input_examples(split))


def clip_range(name: str, split: str, start: int, stop: int, synthetic_seconds: float = SYNTHETIC_CLIP_SECONDS):
    """Yields clips start..stop-1 of `split` as numpy dicts {'audio': float32 [samples], 'text': str, 'id': str},
    in a fixed order (for jobs that process every clip once, such as tokenization). Synthetic clips are rendered
    `synthetic_seconds` long."""
    source = RawAudioSource.from_task_name(name)
    if source.kind == "synthetic_music":
        for index in range(start, stop):
            clip = synthetic_music.generate_clip(index, seed=list(SYNTHETIC_CLIPS).index(split),
                                                 seconds=synthetic_seconds, sample_rate=source.sample_rate)
            yield {"audio": clip["audio"], "text": clip["caption"], "id": clip["id"]}
        return
    builder = register_raw_audio_task(name).source.builder
    for ex in builder.as_dataset(split=f"{split}[{start}:{stop}]", shuffle_files=False).as_numpy_iterator():
        yield {"audio": ex["audio"].astype("float32") / 32768.0, "text": ex["caption"].decode(),
               "id": ex["id"].decode()}
