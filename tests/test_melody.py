"""Melody tokens (quantized chroma): the pitch classes of synthesized notes, invariance to octave and timbre, and
"no melody" for silence, noise and drums; and a melody-conditioned semantic stage that follows a given melody."""
import json

import jax
import numpy as np
import pytest
import tensorflow as tf

from musiclm_jax.generation import melody
from musiclm_jax import train as train_lib
from musiclm_jax.data import token_cache

RATE = 24000


def _notes(midi_notes, seconds=0.4, harmonics=(1.0, 0.5, 0.25), rate=RATE):
    t = np.arange(int(seconds * rate)) / rate
    parts = []
    for note in midi_notes:
        if note is None:
            parts.append(np.zeros_like(t))
            continue
        f = 440.0 * 2 ** ((note - 69) / 12)
        parts.append(sum(0.3 * a * np.sin(2 * np.pi * f * (k + 1) * t) for k, a in enumerate(harmonics)))
    return np.concatenate(parts).astype(np.float32)


def test_tokens_are_the_pitch_classes_of_the_notes():
    notes = [60, 64, 67, 72, 71, 69, None, 62]  # C4 E4 G4 C5 B4 A4 rest D4, 0.4 s each: two 5 Hz frames per note
    tokens = melody.melody_tokens(_notes(notes), RATE)
    assert tokens.shape == (1, 16) and tokens.dtype == np.int32
    want = np.repeat([melody.NO_MELODY if n is None else n % 12 for n in notes], 2)
    np.testing.assert_array_equal(tokens[0], want)
    assert melody.describe(tokens[0][::2]) == "C E G C B A - D"


@pytest.mark.parametrize("rate", [16000, 24000, 44100])
def test_tokens_do_not_depend_on_octave_timbre_or_rate(rate):
    notes = [57, 59, 60, 62, 64]
    low = melody.melody_tokens(_notes(notes, rate=rate), rate)
    high = melody.melody_tokens(_notes([n + 12 for n in notes], harmonics=(1.0,), rate=rate), rate)
    bright = melody.melody_tokens(_notes(notes, harmonics=(1.0, 0.9, 0.8, 0.7, 0.6), rate=rate), rate)
    np.testing.assert_array_equal(low, high)
    np.testing.assert_array_equal(low, bright)


def test_silence_noise_and_clicks_are_no_melody():
    rng = np.random.RandomState(0)
    silence = np.zeros(RATE, np.float32)
    quiet = _notes([60, 62], seconds=0.5) * 1e-3   # -80 dBFS
    noise = 0.3 * rng.randn(RATE).astype(np.float32)
    clicks = np.zeros(RATE, np.float32)
    clicks[::RATE // 8] = 1.0                       # a drum machine's impulses
    for audio in (silence, quiet, noise, clicks):
        assert np.all(melody.melody_tokens(audio, RATE) == melody.NO_MELODY)
    # A batch keeps its rows apart, and frames are whole 200 ms.
    batch = np.stack([_notes([65, 67], seconds=0.5), silence])
    tokens = melody.melody_tokens(batch, RATE)
    assert tokens.shape == (2, 5) and melody.num_frames(RATE, RATE) == 5 and melody.num_frames(RATE - 1, RATE) == 4
    np.testing.assert_array_equal(tokens[0, [0, 1, 3, 4]], [5, 5, 7, 7])
    assert np.all(tokens[1] == melody.NO_MELODY)


def _write_melody_cache(root, clips=256, seed=0):
    """A token cache whose semantic tokens carry the melody: a clip is 10 notes of 400 ms (melody tokens at 5 Hz,
    0..12), and the semantic token of frame t (25 Hz) is the melody token of its 200 ms frame plus 16 x a random
    0..2, so the melody decides the token modulo 16 and nothing else does; MuLan tokens random. The tokenizer
    sizes of gin/stages/semantic_tiny.gin (MuLan 12 x 32, melody 13, semantic 64); 4 s chunks."""
    from musiclm_jax.data.token_cache import encode_example
    rng = np.random.RandomState(seed)
    tokenizers = {"mulan": {"frames": 1, "levels": 12, "codebook_size": 32, "frame_rate": 0.25, "sample_rate": 16000},
                  "melody": {"frames": 20, "levels": 1, "codebook_size": 13, "frame_rate": 5.0, "sample_rate": 24000},
                  "semantic": {"frames": 100, "levels": 1, "codebook_size": 64, "frame_rate": 25.0,
                               "sample_rate": 16000}}
    splits = {}
    for split, n in (("train", clips), ("validation", 16)):
        (root / split).mkdir(parents=True)
        with tf.io.TFRecordWriter(str(root / split / "shard-00000-of-00001.tfrecord")) as writer:
            for i in range(n):
                tune = np.repeat(rng.randint(0, 13, 10), 2)
                semantic = np.repeat(tune, 5) + 16 * rng.randint(0, 3, 100)
                writer.write(encode_example(f"{split}{i}#0", "", 96000, {
                    "mulan": rng.randint(0, 32, (1, 12)), "melody": tune[:, None], "semantic": semantic[:, None]}))
        (root / split / "shard-00000-of-00001.json").write_text(json.dumps({"examples": n}))
        splits[split] = {"num_shards": 1, "num_clips": n, "num_examples": n}
    token_cache.write_manifest(str(root), {"source": "hand-made", "sample_rate": 24000, "chunk_seconds": 4.0,
                                           "tokenizers": tokenizers, "splits": splits})


def test_melody_conditioned_semantic_stage_follows_the_melody(tmp_path):
    """gin/stages/semantic_tiny.gin (one melody token per semantic frame after the MuLan tokens, placed by time),
    trained 400 steps by the trainer on a cache where the melody decides each semantic token modulo 16: with a
    given melody, the stage's own sampler (stage_sampling.Stage, temperature 1) draws tokens that agree with it on > 60%
    of the frames (observed 93%, also 93% by sequence index); with the melody dropped to PAD, as in generation
    without one, on < 30% (observed 6%; 11% by sequence index; chance ~1/13 + the walk of random notes)."""
    from musiclm_jax.generation.params import GenerationParams
    from musiclm_jax.generation.stage_sampling import Stage
    cache, model_dir = tmp_path / "tokens", tmp_path / "semantic"
    _write_melody_cache(cache)
    train_lib.main(["--gin_file=gin/stages/semantic_tiny.gin", f"--gin.MODEL_DIR='{model_dir}'",
                    f"--gin.TOKEN_DIR='{cache}'", "--gin.TRAIN_STEPS=400", "--gin.train_lib.train.eval_period=0",
                    "--gin.train_lib.train.log_period=100", "--gin.train_lib.train.tensorboard=False"])
    stage = Stage.from_checkpoint(str(model_dir), "semantic")
    layout = stage.model.layout
    rng = np.random.RandomState(1)
    tunes = np.repeat(rng.randint(0, 12, (8, 5)), 10, axis=1)  # 5 notes of 400 ms over one 50-frame window
    mulan_ids = layout.to_global(rng.randint(0, 32, (8, 12)), "mulan")
    keys = jax.random.split(jax.random.key(0), 8)
    params = GenerationParams(guidance_scale=1.0)

    def agreement(melody_ids):
        prefix = np.concatenate([mulan_ids, melody_ids], axis=1).astype(np.int32)
        tokens = layout.to_local(stage.sample(prefix, 50, 0, keys, params, 1.0), "semantic")
        return float(np.mean(tokens % 16 == tunes))
    followed = agreement(layout.to_global(tunes, "melody"))
    unconditioned = agreement(np.zeros_like(tunes))
    print(f"melody followed on {followed:.2f} of the frames, {unconditioned:.2f} without it")
    assert followed > 0.6 and unconditioned < 0.3, (followed, unconditioned)
