"""Melody tokens (quantized chroma): the pitch classes of synthesized notes, invariance to octave and timbre, and
"no melody" for silence, noise and drums."""
import numpy as np
import pytest

from musiclm_jax import melody

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
