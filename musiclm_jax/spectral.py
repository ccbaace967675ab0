"""Spectral front ends shared by the codec's losses and discriminators, w2v-BERT and MuLan (jax; numpy tables).

Layouts: audio [batch, samples]; spectrograms [batch, frames, bins]. Frames are `num_stft_frames`.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax import layers


def hann_window(length: int) -> np.ndarray:
    """Periodic Hann window [length] float32 (as torch.hann_window and scipy.signal.get_window('hann'))."""
    n = np.arange(length, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)).astype(np.float32)


def num_stft_frames(num_samples: int, n_fft: int, hop: int, center: bool = False) -> int:
    """Frames produced by `stft` for `num_samples` samples: 1 + (N - n_fft) // hop (N + 2 * (n_fft // 2) if center)."""
    if center:
        num_samples += 2 * (n_fft // 2)
    if num_samples < n_fft:
        raise ValueError(f"stft: {num_samples} samples are fewer than n_fft={n_fft} (center={center})")
    return 1 + (num_samples - n_fft) // hop


def frame(audio: jax.Array, frame_length: int, hop: int) -> jax.Array:
    """Overlapping frames of audio [batch, samples] -> [batch, frames, frame_length], frames as `num_stft_frames`.

    When hop divides frame_length the frames are built from shifted views of a [batch, chunks, hop] reshape
    (no gather: cheap forward and backward on every backend); otherwise with one gather.
    """
    num_frames = num_stft_frames(audio.shape[-1], frame_length, hop)
    if frame_length % hop == 0:
        ratio = frame_length // hop
        chunks = num_frames - 1 + ratio
        blocks = audio[:, :chunks * hop].reshape(audio.shape[0], chunks, hop)
        return jnp.concatenate([blocks[:, j:j + num_frames] for j in range(ratio)], axis=-1)
    # A symbolic number of frames (a length-polymorphic jax.export) needs jnp.arange; a known one keeps the constant.
    arange = np.arange if isinstance(num_frames, (int, np.integer)) else jnp.arange
    index = arange(num_frames)[:, None] * hop + np.arange(frame_length)[None, :]
    return audio[:, index]


def stft(audio: jax.Array, n_fft: int, hop: int, window: str = "hann", center: bool = False,
         pad_mode: str = "constant") -> jax.Array:
    """Short-time Fourier transform of real audio.

    Args:
      audio: [batch, samples] real waveform (any float dtype; computed in float32).
      n_fft: window and FFT length in samples.
      hop: hop between frames in samples.
      window: 'hann' (periodic Hann) or None / 'boxcar' (rectangular).
      center: pad n_fft // 2 samples on both sides first (as librosa / torch with center=True).
      pad_mode: padding used when center: 'constant' (librosa >= 0.10 default) or 'reflect' (torch default).
    Returns:
      complex64 [batch, frames, n_fft // 2 + 1] with frames = `num_stft_frames(samples, n_fft, hop, center)`;
      equal to librosa.stft(audio, n_fft=n_fft, hop_length=hop, window='hann', center=center) transposed.
    """
    audio = jnp.asarray(audio).astype(jnp.float32)
    if audio.ndim != 2:
        raise ValueError(f"stft expects audio [batch, samples], got shape {audio.shape}")
    if center:
        pad = n_fft // 2
        audio = layers.pad_time(audio[..., None], pad, pad, pad_mode)[..., 0]
    frames = frame(audio, n_fft, hop)
    if window == "hann":
        frames = frames * jnp.asarray(hann_window(n_fft))
    elif window not in (None, "boxcar", "rectangular"):
        raise ValueError(f"stft window {window!r}: expected 'hann' or 'boxcar'")
    return jnp.fft.rfft(frames, n=n_fft, axis=-1).astype(jnp.complex64)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """librosa's (Slaney) mel filterbank [n_mels', n_fft // 2 + 1] float32, fmin 0, fmax sample_rate / 2.

    n_mels' is the largest value <= min(n_mels, n_fft // 2) whose filters are all non-empty (a short window has
    too few FFT bins for many narrow low-frequency filters: at 24 kHz, window 64 keeps 17, window 128 keeps 35).
    """
    import librosa  # only here: the matrix is computed once, in numpy

    n = max(1, min(n_mels, n_fft // 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # librosa warns about the empty filters we are searching past
        while True:
            bank = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n, fmin=0.0, fmax=sample_rate / 2.0)
            if n == 1 or np.all(bank.max(axis=1) > 0):
                return bank.astype(np.float32)
            n -= 1


def safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt with a zero (not infinite) gradient at 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def magnitude_spectrogram(audio: jax.Array, n_fft: int, hop: int) -> jax.Array:
    """|STFT| of audio [batch, samples] -> float32 [batch, frames, n_fft // 2 + 1] (periodic Hann, center=False).

    Gradients are finite everywhere (zero at bins of exactly zero magnitude).
    """
    spec = stft(audio, n_fft, hop)
    return safe_sqrt(jnp.square(spec.real) + jnp.square(spec.imag))


def log_mel_spectrogram(audio: jax.Array, sample_rate: int, n_fft: int, hop: int, n_mels: int,
                        eps: float = 1e-6) -> jax.Array:
    """log(mel power + eps): audio [batch, samples] -> float32 [batch, frames, n_mels] (periodic Hann window of
    n_fft samples, hop `hop`, no centring; frames = num_stft_frames(samples, n_fft, hop))."""
    spec = stft(audio, n_fft, hop)
    power = jnp.square(spec.real) + jnp.square(spec.imag)
    bank = jnp.asarray(mel_filterbank(sample_rate, n_fft, n_mels).T)
    if bank.shape[1] != n_mels:
        raise ValueError(f"log_mel_spectrogram: n_fft={n_fft} at {sample_rate} Hz supports only {bank.shape[1]} "
                         f"non-empty mel bands, fewer than n_mels={n_mels}")
    mel = jnp.einsum("btf,fm->btm", power, bank, precision=jax.lax.Precision.HIGHEST)
    return jnp.log(mel + eps)


def note_filterbank(sample_rate: int, n_fft: int, lowest_midi: int, num_notes: int) -> np.ndarray:
    """[n_fft // 2 + 1, num_notes] float32: each STFT bin counts for its nearest equal-tempered note (A4 = 440 Hz)
    among MIDI lowest_midi .. lowest_midi + num_notes - 1; bins outside that range, and DC, count for none. Notes
    narrower than a bin (low notes at short windows) may get no bin."""
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    bank = np.zeros((len(freqs), num_notes), np.float32)
    with np.errstate(divide="ignore"):
        midi = np.round(69 + 12 * np.log2(freqs / 440.0))
    inside = np.isfinite(midi) & (midi >= lowest_midi) & (midi < lowest_midi + num_notes)
    bank[np.nonzero(inside)[0], (midi[inside] - lowest_midi).astype(int)] = 1.0
    return bank


def note_spectrogram(audio: jax.Array, sample_rate: int, frames: int, samples_per_frame: int, num_notes: int,
                     lowest_midi: int = 36, n_fft: int = 2048) -> jax.Array:
    """Which notes sound in each frame: audio [batch, samples] -> float32 [batch, frames, num_notes].

    Frame t's periodic Hann window of n_fft samples is centred on the centre of its samples,
    t * samples_per_frame + samples_per_frame / 2 (zero padding at both ends); its power is summed per note
    (`note_filterbank`); the log10 of each note's power + 1e-8 is standardized over the notes of the frame (mean
    0, variance 1), so the values say which notes sound, not how loud the frame is. A semitone-resolution
    stand-in for a constant-Q transform (MERT's CQT target and CQT features), computed with one FFT per frame."""
    bank = note_filterbank(sample_rate, n_fft, lowest_midi, num_notes)
    left = n_fft // 2 - samples_per_frame // 2
    needed = (frames - 1) * samples_per_frame + n_fft
    padded = jnp.pad(jnp.asarray(audio).astype(jnp.float32),
                     ((0, 0), (left, max(0, needed - left - audio.shape[1]))))
    spec = stft(padded[:, :needed], n_fft, samples_per_frame)  # [b, frames, n_fft // 2 + 1]
    power = jnp.square(spec.real) + jnp.square(spec.imag)
    energy = jnp.log10(jnp.einsum("btf,fn->btn", power, jnp.asarray(bank), precision=jax.lax.Precision.HIGHEST)
                       + 1e-8)
    mean = jnp.mean(energy, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.mean(jnp.square(energy - mean), axis=-1, keepdims=True) + 1e-6)
    return (energy - mean) / std


def pitch_class_profile(audio: jax.Array, sample_rate: int, frames: int, samples_per_frame: int,
                        lowest_midi: int = 36, octaves: int = 6) -> jax.Array:
    """Which pitch classes sound in each frame: audio [batch, samples] -> float32 [batch, frames, 12] (C..B).

    The `note_spectrogram` of `octaves` octaves from MIDI lowest_midi (a C for the classes to start at C; 36 = C2,
    65 Hz, to B7, 3951 Hz), in a window of 128 ms (2048 samples at 16 kHz; the power of two nearest
    0.128 * sample_rate), folded by the maximum over octaves: each class's value is that of its strongest
    octave, so one loud note names its class whatever the octave."""
    if lowest_midi % 12:
        raise ValueError(f"pitch_class_profile: lowest_midi={lowest_midi} is not a C (a multiple of 12)")
    n_fft = int(2 ** round(np.log2(0.128 * sample_rate)))
    notes = note_spectrogram(audio, sample_rate, frames, samples_per_frame, 12 * octaves, lowest_midi, n_fft)
    return jnp.max(notes.reshape(*notes.shape[:2], octaves, 12), axis=2)
