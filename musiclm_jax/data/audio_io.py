"""Reading and writing audio files (numpy; used by the data pipeline and the command-line tools).

`load_audio` decodes wav/flac/ogg with soundfile and anything else librosa/audioread can decode (mp3 where a
decoder is installed), mixes down to mono and resamples (soxr) to the requested rate.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import soundfile

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aiff", ".aif")


class AudioDecodeError(ValueError):
    """A file that is not decodable audio (the message names the file and the reason)."""


def load_audio(path: str, sample_rate: int, max_seconds: Optional[float] = None) -> np.ndarray:
    """Mono float32 samples [samples] of `path` at `sample_rate` Hz (optionally only the first max_seconds).

    Raises AudioDecodeError naming the file if it cannot be decoded or holds no samples.
    """
    try:
        try:
            with soundfile.SoundFile(path) as f:
                native_rate = f.samplerate
                frames = -1 if max_seconds is None else int(max_seconds * native_rate)
                audio = f.read(frames=frames, dtype="float32", always_2d=True)
            audio = audio.mean(axis=1)
        except (soundfile.LibsndfileError, RuntimeError, TypeError):
            import librosa  # audioread fallback (mp3 and others), imported only when needed
            audio, native_rate = librosa.load(path, sr=None, mono=True, duration=max_seconds)
    except Exception as e:  # any decoder failure is reported the same way
        raise AudioDecodeError(f"{path}: cannot decode audio ({type(e).__name__}: {e})") from None
    if audio.size == 0:
        raise AudioDecodeError(f"{path}: no samples")
    if not np.all(np.isfinite(audio)):
        raise AudioDecodeError(f"{path}: non-finite samples")
    if native_rate != sample_rate:
        import librosa
        expected = int(round(len(audio) * sample_rate / native_rate))  # librosa's ceil can add one sample
        audio = librosa.resample(audio, orig_sr=native_rate, target_sr=sample_rate, res_type="soxr_hq")[:expected]
    return np.asarray(audio, np.float32)


def save_audio(path: str, audio: np.ndarray, sample_rate: int) -> None:
    """Writes mono samples [samples] (float, clipped to [-1, 1]) as 16-bit PCM; the format follows the suffix."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    soundfile.write(path, np.clip(np.asarray(audio, np.float32), -1.0, 1.0), sample_rate, subtype="PCM_16")


def list_audio_files(directory: str) -> list[str]:
    """Audio files under `directory` (recursively, by extension), relative to it, sorted."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            if name.lower().endswith(AUDIO_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(found)
