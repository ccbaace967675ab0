"""Raw-audio seqio tasks (the codec's, w2v-BERT's and MuLan's input), registered on first use by name:

  synthetic_music_<rate>hz          the embedded procedural music (musiclm_jax.data.synthetic_music), split
                                    into train / validation / test by clip index
  audio_folder_<rate>hz:<dir>       the audio files of <dir> (wav, flac, ogg, mp3 where decodable); with
                                    <dir>/captions.jsonl, each file's `split` field is honoured

Examples: {'audio': float32 [samples]} mono at <rate>, then random crops of the requested length (seeded; shorter
clips are zero-padded) and loudness normalisation (RMS to -20 dBFS, peak at most 1).
"""
from __future__ import annotations

import hashlib
import os
import re
import sys

import numpy as np
import seqio
import tensorflow as tf

from musiclm_jax.data import audio_io, synthetic_music
from musiclm_jax.data.audio_io import scan_audio_folder

SYNTHETIC_CLIP_SECONDS = 4.0
SYNTHETIC_CLIPS = {"train": 100_000, "validation": 1_000, "test": 1_000}
TARGET_RMS_DB = -20.0
_NAME = re.compile(r"^(synthetic_music|audio_folder)_(\d+)hz(?::(.+))?$")


def random_crop(dataset: tf.data.Dataset, sequence_length) -> tf.data.Dataset:
    """Crops 'audio' to sequence_length['audio'] samples at a seeded random offset (zero-pads short clips)."""
    length = sequence_length["audio"]

    @seqio.map_over_dataset(num_seeds=1)
    def crop(ex, seed):
        audio = ex["audio"]
        audio = tf.pad(audio, [[0, tf.maximum(0, length - tf.shape(audio)[0])]])
        start = tf.random.stateless_uniform([], seed, 0, tf.shape(audio)[0] - length + 1, tf.int32)
        return dict(ex, audio=audio[start:start + length])
    return crop(dataset)


@seqio.map_over_dataset
def normalize_loudness(ex):
    """Scales 'audio' to an RMS of -20 dBFS, then down if its peak exceeds 1 (silence is left as is)."""
    audio = ex["audio"]
    rms = tf.sqrt(tf.reduce_mean(tf.square(audio)))
    gain = tf.where(rms > 1e-6, 10.0 ** (TARGET_RMS_DB / 20.0) / tf.maximum(rms, 1e-6), 1.0)
    audio = audio * gain
    peak = tf.reduce_max(tf.abs(audio))
    return dict(ex, audio=audio / tf.maximum(peak, 1.0))


def _audio_features():
    return {"audio": seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=tf.float32)}


def _synthetic_source(sample_rate: int) -> seqio.DataSource:
    def render(index, split_index):
        split = list(SYNTHETIC_CLIPS)[int(split_index)]
        clip = synthetic_music.generate_clip(int(index), seed=list(SYNTHETIC_CLIPS).index(split),
                                             seconds=SYNTHETIC_CLIP_SECONDS, sample_rate=sample_rate)
        return clip["audio"]

    def dataset_fn(split, shuffle_files=False, seed=None):
        del shuffle_files, seed
        split_index = list(SYNTHETIC_CLIPS).index(split)
        indices = tf.data.Dataset.range(SYNTHETIC_CLIPS[split])
        return indices.map(lambda i: {"audio": tf.ensure_shape(
            tf.numpy_function(render, [i, split_index], tf.float32, stateful=False), [None])},
            num_parallel_calls=2, deterministic=True)
    return seqio.FunctionDataSource(dataset_fn, splits=list(SYNTHETIC_CLIPS),
                                    num_input_examples=SYNTHETIC_CLIPS)


def _folder_source(audio_dir: str, sample_rate: int) -> seqio.DataSource:
    files = scan_audio_folder(audio_dir, sample_rate)

    def decode(path):
        try:
            return audio_io.load_audio(path.decode(), sample_rate)
        except audio_io.AudioDecodeError as e:  # changed since the scan: counted as an empty example
            print(f"audio_folder: skipping {e}", file=sys.stderr)
            return np.zeros([0], np.float32)

    def dataset_fn(split, shuffle_files=False, seed=None):
        paths = tf.data.Dataset.from_tensor_slices(tf.constant(files.get(split, []), tf.string))
        if shuffle_files:
            paths = paths.shuffle(len(files.get(split, [])) or 1, seed=seed)
        audio = paths.map(lambda p: {"audio": tf.ensure_shape(
            tf.numpy_function(decode, [p], tf.float32, stateful=False), [None])}, num_parallel_calls=2,
            deterministic=True)
        return audio.filter(lambda ex: tf.size(ex["audio"]) > 0)
    return seqio.FunctionDataSource(dataset_fn, splits=[s for s, v in files.items() if v],
                                    num_input_examples={s: len(v) for s, v in files.items() if v})


def register_raw_audio_task(name: str) -> seqio.Task:
    """Registers (once) and returns the raw-audio task `name` (see the module docstring for the names).

    A folder task is registered in seqio as audio_folder_<rate>hz_<hash of the absolute path> (seqio names
    cannot hold paths).
    """
    match = _NAME.match(name)
    if not match:
        raise ValueError(f"{name!r} is not a raw-audio task name (synthetic_music_<rate>hz or "
                         f"audio_folder_<rate>hz:<dir>)")
    kind, rate, audio_dir = match.group(1), int(match.group(2)), match.group(3)
    registered = name
    if kind == "audio_folder":
        audio_dir = os.path.abspath(audio_dir)
        registered = f"audio_folder_{rate}hz_{hashlib.sha1(audio_dir.encode()).hexdigest()[:12]}"
    if registered in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(registered)
    source = _synthetic_source(rate) if kind == "synthetic_music" else _folder_source(audio_dir, rate)
    return seqio.TaskRegistry.add(registered, source=source, output_features=_audio_features(),
                                  preprocessors=[random_crop, normalize_loudness], shuffle_buffer_size=64)
