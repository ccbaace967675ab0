"""Melody tokens: the dominant pitch class of each 200 ms of audio (quantized chroma), or "no melody".

    tokens = melody_tokens(audio, sample_rate=24000)   # audio [batch, samples] -> [batch, frames] int32 in [0, 13)

MusicLM conditions on melody with a small ViT trained by a triplet loss on pairs of the same melody performed
differently, its embeddings quantized by RVQ. That training set (the same melody hummed, sung and played) is not
public, so this project uses a documented simpler alternative: quantized chroma. Each frame of `frame_rate` Hz
(5 Hz: 5 semantic frames at 25 Hz, 10 codec frames at 50 Hz) gets the pitch class (C=0 ... B=11) that holds the
most spectral energy between `fmin` and `fmax`, or NO_MELODY (12) when the frame is quiet (below `silence_db`
dBFS) or has no dominant pitch class (its share of the chroma energy below `min_share`, as for drums or noise).

Why chroma: it needs no training data; it does not depend on timbre or octave, which is what lets a hummed or
whistled melody steer music played by other instruments (the property the paper's triplet loss teaches its ViT);
and its tokens are readable (a test can check them against the notes of a synthesized melody). What it gives up:
octave and contour direction (C4 and C5 are one token), and in a polyphonic mix it follows the loudest pitch
class rather than a separated lead line.

The tokens condition the semantic stage (gin/stages/semantic_tiny.gin): they follow the MuLan tokens in its
prefix, one per semantic frame (each 200 ms token repeated for its frames, so every target frame's melody sits at
the same distance before it), and are dropped to PAD in training with a probability (the model's
`optional_groups`) so that generation without a melody (all PAD) works too.
"""
from __future__ import annotations

import numpy as np

NUM_PITCH_CLASSES = 12
NO_MELODY = 12
VOCAB_SIZE = 13
PITCH_CLASS_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def num_frames(num_samples: int, sample_rate: int, frame_rate: float = 5.0) -> int:
    """Melody frames of `num_samples` samples: whole frames only (a partial last frame is dropped)."""
    return int(np.floor(num_samples * frame_rate / sample_rate + 1e-9))


def pitch_class_filterbank(sample_rate: int, n_fft: int, fmin: float, fmax: float) -> np.ndarray:
    """[n_fft // 2 + 1, 12]: each STFT bin between fmin and fmax (Hz) counts for the pitch class of its nearest
    equal-tempered semitone (A4 = 440 Hz), the others for none."""
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    bank = np.zeros((len(freqs), NUM_PITCH_CLASSES), np.float32)
    inside = (freqs >= fmin) & (freqs <= fmax)
    midi = np.round(69 + 12 * np.log2(freqs[inside] / 440.0)).astype(int)
    bank[np.nonzero(inside)[0], midi % 12] = 1.0
    return bank


def chroma(audio: np.ndarray, sample_rate: int, frame_rate: float = 5.0, fmin: float = 100.0,
           fmax: float = 2100.0, stft_per_frame: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(chroma energy [batch, frames, 12], mean power in dBFS [batch, frames]) of audio [batch, samples]:
    `stft_per_frame` Hann-windowed STFTs (window 4096 samples at 24 kHz, scaled with the rate) per melody frame."""
    audio = np.atleast_2d(np.asarray(audio, np.float32))
    batch, samples = audio.shape
    frames = num_frames(samples, sample_rate, frame_rate)
    hop = sample_rate / frame_rate / stft_per_frame
    n_fft = int(2 ** np.ceil(np.log2(4096 * sample_rate / 24000)))
    bank = pitch_class_filterbank(sample_rate, n_fft, fmin, fmax)
    window = np.hanning(n_fft).astype(np.float32)
    padded = np.pad(audio, ((0, 0), (n_fft // 2, n_fft // 2)))
    centres = (np.arange(frames * stft_per_frame) * hop + hop / 2).astype(int)  # STFT centres inside each frame
    segments = np.stack([padded[:, c:c + n_fft] for c in centres], axis=1) if frames else np.zeros(
        (batch, 0, n_fft), np.float32)
    power = np.abs(np.fft.rfft(segments * window, axis=-1)) ** 2  # [batch, frames * k, bins]
    energy = (power @ bank).reshape(batch, frames, stft_per_frame, NUM_PITCH_CLASSES).sum(axis=2)
    mean_square = np.stack([np.mean(audio[:, int(i * sample_rate / frame_rate):int((i + 1) * sample_rate / frame_rate)]
                                    ** 2, axis=1) for i in range(frames)], axis=1) if frames else np.zeros((batch, 0))
    return energy, 10 * np.log10(mean_square + 1e-12)


def melody_tokens(audio: np.ndarray, sample_rate: int, frame_rate: float = 5.0, silence_db: float = -45.0,
                  min_share: float = 0.2) -> np.ndarray:
    """audio [batch, samples] (or [samples]) at sample_rate -> melody tokens [batch, frames] int32 at frame_rate
    Hz: the dominant pitch class 0..11 (C..B), or NO_MELODY for quiet frames and frames without a dominant class."""
    energy, level_db = chroma(audio, sample_rate, frame_rate)
    total = energy.sum(axis=-1)
    share = energy.max(axis=-1) / np.maximum(total, 1e-20)
    tokens = np.argmax(energy, axis=-1).astype(np.int32)
    tokens[(level_db < silence_db) | (share < min_share) | (total <= 0)] = NO_MELODY
    return tokens


def describe(tokens: np.ndarray) -> str:
    """'C E G - ...' for one example's tokens (NO_MELODY as '-')."""
    return " ".join("-" if t == NO_MELODY else PITCH_CLASS_NAMES[t] for t in np.asarray(tokens).ravel())
