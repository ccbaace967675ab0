"""Pitch measures of audio against a reference (numpy, librosa): does a round trip or a generation keep the notes?

Two independent measures of pitch-class agreement, so that a claim never rests on this project's own tokens alone:

* `melody_token_agreement`: the project's melody tokens (musiclm_jax.generation.melody: dominant pitch class of each 200 ms
  from an STFT chroma between 100 Hz and 2.1 kHz) of the estimate against the reference's, on the frames where
  the reference has a pitch (token != NO_MELODY).
* `chroma_cqt_agreement`: librosa's constant-Q chroma (`librosa.feature.chroma_cqt`, hop 512 samples, 12 bins,
  each frame scaled to a maximum of 1), the argmax pitch class of the estimate against the reference's, on the
  frames where the reference has a clear maximum (every other class at most `clarity` of the top one) and is
  not quiet (frame RMS >= `silence_db` dBFS).

Also: `dominant_frequency` (the tone test: the strongest FFT peak, refined by parabolic interpolation on the log
magnitude) and `estimate_key` (Krumhansl-Schmuckler: the major or minor key whose probe-tone profile correlates
best with the clip's mean CQT chroma).
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from musiclm_jax.generation import melody
from musiclm_jax.data.music_params import KEY_NAMES
# Krumhansl & Kessler (1982) probe-tone ratings, tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def dominant_frequency(audio: np.ndarray, sample_rate: int) -> float:
    """Frequency in Hz of the strongest spectral peak of audio [samples] (Hann window, zero-padded FFT of at
    least 4x the length, parabolic interpolation of the log magnitude around the peak; DC excluded)."""
    audio = np.asarray(audio, np.float64)
    if audio.ndim != 1 or len(audio) < 16:
        raise ValueError(f"dominant_frequency needs audio [samples] of at least 16 samples, got {audio.shape}")
    n_fft = int(2 ** np.ceil(np.log2(4 * len(audio))))
    spectrum = np.abs(np.fft.rfft((audio - audio.mean()) * np.hanning(len(audio)), n_fft))
    k = int(np.argmax(spectrum[1:])) + 1
    if 1 <= k < len(spectrum) - 1:
        a, b, c = np.log(spectrum[k - 1:k + 2] + 1e-30)
        denom = a - 2 * b + c
        offset = 0.5 * (a - c) / denom if denom < 0 else 0.0
    else:
        offset = 0.0
    return float((k + offset) * sample_rate / n_fft)


def cents(frequency: float, reference: float) -> float:
    """1200 log2(frequency / reference): the pitch difference in cents."""
    return float(1200.0 * np.log2(frequency / reference))


def level_dbfs(audio: np.ndarray) -> float:
    """RMS level of audio in dBFS: 20 log10 RMS, full scale 1.0 (a full-scale sine is -3 dBFS)."""
    rms = float(np.sqrt(np.mean(np.square(np.asarray(audio, np.float64)))))
    return 20.0 * np.log10(max(rms, 1e-12))


def melody_token_agreement(reference: np.ndarray, estimate: np.ndarray, sample_rate: int) -> tuple[int, int]:
    """(frames that agree, pitched frames) of the melody tokens of estimate [batch, samples] against those of
    reference [batch, samples] (see the module docstring)."""
    ref = melody.melody_tokens(np.atleast_2d(reference), sample_rate)
    est = melody.melody_tokens(np.atleast_2d(estimate), sample_rate)
    pitched = ref != melody.NO_MELODY
    return int(np.sum(est[pitched] == ref[pitched])), int(np.sum(pitched))


def _chroma_cqt(audio: np.ndarray, sample_rate: int, hop: int) -> np.ndarray:
    import librosa
    return librosa.feature.chroma_cqt(y=np.asarray(audio, np.float32), sr=sample_rate, hop_length=hop,
                                      tuning=0.0)  # [12, T]; A4 = 440 Hz for both signals, not estimated per clip


def chroma_cqt_classes(audio: np.ndarray, sample_rate: int, hop: int = 512, clarity: float = 0.75,
                       silence_db: float = -45.0) -> tuple[np.ndarray, np.ndarray]:
    """(argmax pitch class [frames] int, clear [frames] bool) of the librosa chroma_cqt of audio [samples], frame
    t centred on sample t * hop: a frame is clear when its second-strongest class is at most `clarity` times its
    strongest and its RMS (2048-sample window) is at least `silence_db` dBFS."""
    import librosa
    audio = np.asarray(audio, np.float32)
    chroma = _chroma_cqt(audio, sample_rate, hop)
    rms = librosa.feature.rms(y=audio, frame_length=2048, hop_length=hop)[0]
    frames = min(chroma.shape[1], len(rms))
    chroma, rms = chroma[:, :frames], rms[:frames]
    top2 = np.sort(chroma, axis=0)[-2:]
    clear = (top2[0] <= clarity * top2[1]) & (20 * np.log10(np.maximum(rms, 1e-12)) >= silence_db)
    return np.argmax(chroma, axis=0), clear


def chroma_cqt_agreement(reference: np.ndarray, estimate: np.ndarray, sample_rate: int, hop: int = 512,
                         clarity: float = 0.75, silence_db: float = -45.0) -> tuple[int, int]:
    """(frames that agree, clear frames) of the librosa chroma_cqt argmax of estimate [batch, samples] against
    that of reference [batch, samples], on the reference's clear frames (`chroma_cqt_classes`)."""
    reference, estimate = np.atleast_2d(reference), np.atleast_2d(estimate)
    if reference.shape != estimate.shape:
        raise ValueError(f"reference {reference.shape} and estimate {estimate.shape} differ in shape")
    agree = total = 0
    for ref, est in zip(reference, estimate):
        c_ref, clear = chroma_cqt_classes(ref, sample_rate, hop, clarity, silence_db)
        c_est = np.argmax(_chroma_cqt(est, sample_rate, hop), axis=0)
        frames = min(len(c_ref), len(c_est))
        c_ref, clear, c_est = c_ref[:frames], clear[:frames], c_est[:frames]
        agree += int(np.sum(c_est[clear] == c_ref[clear]))
        total += int(np.sum(clear))
    return agree, total


def estimate_key(audio: np.ndarray, sample_rate: int, hop: int = 512) -> tuple[int, str]:
    """(tonic pitch class 0..11, 'major' | 'minor') of audio [samples] by Krumhansl-Schmuckler: the Pearson
    correlation of the clip's mean chroma_cqt with the 24 rotated key profiles, the best one chosen."""
    mean_chroma = _chroma_cqt(audio, sample_rate, hop).mean(axis=1)
    best, best_r = (0, "major"), -np.inf
    for mode, profile in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE)):
        for tonic in range(12):
            r = np.corrcoef(mean_chroma, np.roll(profile, tonic))[0, 1]
            if np.isfinite(r) and r > best_r:
                best, best_r = (tonic, mode), r
    return best


_NOTE_PITCH_CLASS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_KEY_IN_TEXT = re.compile(r"\b([A-G])([b#♭♯]?)[ -](major|minor)\b")


def parse_key(text: str) -> Optional[tuple[int, str]]:
    """(tonic pitch class, mode) of the first key named in text ('in Bb major', 'F# minor'), else None."""
    match = _KEY_IN_TEXT.search(text)
    if match is None:
        return None
    shift = {"b": -1, "♭": -1, "#": 1, "♯": 1}.get(match.group(2), 0)
    return (_NOTE_PITCH_CLASS[match.group(1)] + shift) % 12, match.group(3)


def key_name(tonic: int, mode: str) -> str:
    """'A minor' for (9, 'minor')."""
    return f"{KEY_NAMES[tonic]} {mode}"
