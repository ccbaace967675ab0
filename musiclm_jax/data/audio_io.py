"""Reading and writing audio files (numpy; used by the data pipeline and the command-line tools).

`load_audio` decodes wav/flac/ogg with soundfile and anything else librosa/audioread can decode (mp3 where a
decoder is installed), mixes down to mono and resamples (soxr) to the requested rate. `scan_audio_folder` lists
a folder's decodable files by split (captions.jsonl) for the raw-audio tasks, the codec evaluation and the
semantic tokenizer's fit job, without importing TensorFlow.
"""
from __future__ import annotations

import json
import os
import sys
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


def scan_audio_folder(audio_dir: str, sample_rate: int) -> dict[str, list[str]]:
    """{split: [absolute paths]} of the decodable audio files in audio_dir; undecodable files are skipped and
    counted (printed with their reasons). Files without a split in captions.jsonl go to 'train'."""
    if not os.path.isdir(audio_dir):
        raise FileNotFoundError(f"AUDIO_DIR {audio_dir!r} is not a directory")
    splits = {}
    captions = os.path.join(audio_dir, "captions.jsonl")
    if os.path.exists(captions):
        with open(captions) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                        splits[os.path.normpath(record["audio_path"])] = record.get("split", "train")
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{captions}:{number}: bad line ({e})") from None
    found: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    skipped: dict[str, int] = {}
    for rel in list_audio_files(audio_dir):
        path = os.path.join(audio_dir, rel)
        try:
            load_audio(path, sample_rate, max_seconds=0.1)
        except AudioDecodeError as e:
            reason = str(e).split(": ", 1)[1].split(" (")[0]
            skipped[reason] = skipped.get(reason, 0) + 1
            print(f"audio_folder: skipping {e}", file=sys.stderr)
            continue
        found.setdefault(splits.get(os.path.normpath(rel), "train"), []).append(path)
    if skipped:
        print(f"audio_folder: {audio_dir}: skipped {sum(skipped.values())} files: {skipped}", file=sys.stderr)
    if not any(found.values()):
        raise ValueError(f"AUDIO_DIR {audio_dir!r} holds no decodable audio files")
    return found
