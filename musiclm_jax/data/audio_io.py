"""Reading and writing audio files (numpy; used by the data pipeline and the command-line tools).

`load_audio` decodes wav/flac/ogg with soundfile and anything else librosa/audioread can decode (mp3 where a
decoder is installed), mixes down to mono and resamples (soxr) to the requested rate. `read_audio` is the same
without the conversion (native rate and channels), for the dataset builders' checks. Folders and captions are read by
`captioned_audio`.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np
import soundfile

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aiff", ".aif")


class AudioDecodeError(ValueError):
    """A file that is not usable audio. The message names the file and the reason; `reason` is one of
    'empty' (zero-length file or no samples), 'undecodable' (corrupt or unknown format), 'non_finite'."""

    def __init__(self, path: str, reason: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path, self.reason = path, reason


def read_audio(path: str, max_seconds: Optional[float] = None) -> tuple[np.ndarray, int]:
    """(samples [samples, channels] float32 as stored, native rate in Hz) of `path` (optionally only the first
    max_seconds). Raises AudioDecodeError naming the file if it is empty, cannot be decoded or is non-finite."""
    if os.path.exists(path) and os.path.getsize(path) == 0:
        raise AudioDecodeError(path, "empty", "zero-length file")
    try:
        try:
            with soundfile.SoundFile(path) as f:
                native_rate = f.samplerate
                frames = -1 if max_seconds is None else int(max_seconds * native_rate)
                audio = f.read(frames=frames, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, TypeError):
            import librosa  # audioread fallback (mp3 and others), imported only when needed
            with warnings.catch_warnings():  # librosa warns that its audioread path is deprecated
                warnings.simplefilter("ignore")
                audio, native_rate = librosa.load(path, sr=None, mono=False, duration=max_seconds)
            audio = np.atleast_2d(audio).T  # librosa: [channels, samples]
    except Exception as e:  # any decoder failure is reported the same way
        raise AudioDecodeError(path, "undecodable", f"cannot decode audio ({type(e).__name__}: {e})") from None
    if audio.size == 0:
        raise AudioDecodeError(path, "empty", "no samples")
    if not np.all(np.isfinite(audio)):
        raise AudioDecodeError(path, "non_finite", "non-finite samples")
    return np.asarray(audio, np.float32), int(native_rate)


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """audio [..., samples] at source_rate Hz -> float32 [..., round(samples * target_rate / source_rate)] at
    target_rate (soxr 'HQ' through librosa; every leading row independently). The one resampler of the package."""
    audio = np.asarray(audio, np.float32)
    if source_rate == target_rate:
        return audio
    import librosa
    length = int(round(audio.shape[-1] * target_rate / source_rate))  # librosa's ceil can add one sample
    return librosa.resample(audio, orig_sr=source_rate, target_sr=target_rate, res_type="soxr_hq",
                            axis=-1)[..., :length].astype(np.float32)


def to_mono_at_rate(audio: np.ndarray, native_rate: int, sample_rate: int) -> np.ndarray:
    """[samples, channels] (or [samples]) at native_rate -> mono [round(samples * sample_rate / native_rate)] at
    sample_rate."""
    mono = audio.mean(axis=1) if audio.ndim == 2 else audio
    return resample(mono, native_rate, sample_rate)


def load_audio(path: str, sample_rate: int, max_seconds: Optional[float] = None) -> np.ndarray:
    """Mono float32 samples [samples] of `path` at `sample_rate` Hz (optionally only the first max_seconds).

    Raises AudioDecodeError naming the file if it cannot be decoded or holds no samples.
    """
    audio, native_rate = read_audio(path, max_seconds)
    return to_mono_at_rate(audio, native_rate, sample_rate)


def pcm16(audio: np.ndarray) -> np.ndarray:
    """Float samples -> int16 PCM: NaN to 0, clipped to [-1, 1], times 32767, rounded to the nearest integer.
    The one conversion of every 16-bit file the project writes (save_audio, the server's WAV responses)."""
    return np.round(np.clip(np.nan_to_num(np.asarray(audio, np.float32)), -1.0, 1.0) * 32767).astype(np.int16)


def save_audio(path: str, audio: np.ndarray, sample_rate: int) -> None:
    """Writes mono samples [samples] (float in [-1, 1]) as 16-bit PCM (`pcm16`); the format follows the suffix."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    soundfile.write(path, pcm16(audio), sample_rate, subtype="PCM_16")


def list_audio_files(directory: str) -> list[str]:
    """Audio files under `directory` (recursively, by extension), relative to it, sorted."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            if name.lower().endswith(AUDIO_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(found)
