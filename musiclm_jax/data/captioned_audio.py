"""Captioned audio sources as records, and the checks every clip passes (numpy only; no TensorFlow).

Two source shapes, read into `AudioRecord`s:

  audio folder  DIR with audio files (any depth; wav, flac, ogg, mp3 where decodable, ...) and an optional
                DIR/captions.jsonl: one JSON object per line with `audio_path` (relative to DIR), `caption`,
                optional `split` ('train' / 'validation' / 'test'; default 'train'); other fields are ignored.
                Files without a caption line are allowed unless captions are required.
  MusicCaps     musiccaps-public.csv (ytid, start_s, end_s, aspect_list, caption, is_audioset_eval, ...) plus a
                folder of clips named {ytid}.<ext>, already cut to [start_s, end_s]; is_audioset_eval selects the
                'test' split, the rest is 'train'. Missing clips (deleted videos are common) are always counted
                and skipped.

`decode_record` then reads a record's audio and applies the checks. Every failure goes to a `BadInputReport`
(an error naming the file and line, or a counted skip, by its policy).
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import json
import os
from typing import Optional

import numpy as np

from musiclm_jax.data import audio_io
from musiclm_jax.data.bad_input import BadInputReport, check_policy

SPLITS = ("train", "validation", "test")
CAPTIONS_FILE = "captions.jsonl"
MUSICCAPS_COLUMNS = ("ytid", "start_s", "end_s", "aspect_list", "caption", "is_audioset_eval")


@dataclasses.dataclass(frozen=True)
class AudioChecks:
    """What a usable clip is, and what happens to the others.

    Attributes:
      sample_rate: Hz the clips are converted to (mono).
      bad_input: 'skip' (count and go on) or 'error' (stop at the first bad input, naming it).
      require_captions: a clip without a caption is bad input ('no_caption').
      min_sample_rate: Hz; files recorded below it are bad input ('low_sample_rate'); others are resampled.
      silence_dbfs: a clip whose peak is below this level (dB full scale) is bad input ('silent').
      min_seconds: shorter clips are bad input ('too_short').
      max_seconds: only this much of each file is read (None: all of it).
    """

    sample_rate: int
    bad_input: str = "skip"
    require_captions: bool = False
    min_sample_rate: int = 8000
    silence_dbfs: float = -60.0
    min_seconds: float = 0.0
    max_seconds: Optional[float] = None

    def __post_init__(self):
        check_policy(self.bad_input)
        if self.sample_rate <= 0 or self.min_sample_rate <= 0:
            raise ValueError(f"AudioChecks: sample_rate={self.sample_rate} and min_sample_rate="
                             f"{self.min_sample_rate} must be positive")


@dataclasses.dataclass(frozen=True)
class AudioRecord:
    """One clip before decoding. `location` names where it came from in messages (a path or csv:line)."""

    path: str
    id: str
    split: str
    caption: str = ""
    aspects: tuple[str, ...] = ()
    location: str = ""


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split(os.sep))


def _read_captions(audio_dir: str, report: BadInputReport) -> dict[str, tuple[dict, str]]:
    """{normalised relative path: (caption record, 'captions.jsonl:LINE')} of DIR/captions.jsonl."""
    path = os.path.join(audio_dir, CAPTIONS_FILE)
    captions: dict[str, tuple[dict, str]] = {}
    if not os.path.exists(path):
        return captions
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                report.bad("bad_caption_line", where, f"not JSON ({e})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get("audio_path"), str):
                report.bad("bad_caption_line", where, "not an object with a string 'audio_path'")
                continue
            if not isinstance(record.get("caption", ""), str) or record.get("split", "train") not in SPLITS:
                report.bad("bad_caption_line", where, f"'caption' must be a string and 'split' one of {SPLITS}")
                continue
            rel = os.path.normpath(record["audio_path"])
            if rel.startswith("..") or os.path.isabs(rel):
                report.bad("bad_caption_line", where, f"audio_path {record['audio_path']!r} is outside {audio_dir}")
                continue
            if rel in captions:
                report.bad("bad_caption_line", where, f"{record['audio_path']!r} already captioned at "
                           f"{captions[rel][1]}")
                continue
            if not os.path.isfile(os.path.join(audio_dir, rel)):
                report.bad("missing_file", where, f"names {record['audio_path']!r}, which does not exist")
                continue
            if not rel.lower().endswith(audio_io.AUDIO_EXTENSIONS):
                report.bad("unsupported_format", where, f"{record['audio_path']!r} is not a supported audio format "
                           f"({', '.join(audio_io.AUDIO_EXTENSIONS)})")
                captions[rel] = (record, where)  # known, so the listing does not report it again
                continue
            captions[rel] = (record, where)
    return captions


def read_audio_folder(audio_dir: str, checks: AudioChecks, report: BadInputReport) -> list[AudioRecord]:
    """The records of audio folder `audio_dir` (sorted by path). Files that are not audio (other than
    captions.jsonl and hidden files) are reported as 'unsupported_format'."""
    if not os.path.isdir(audio_dir):
        raise FileNotFoundError(f"AUDIO_DIR {audio_dir!r} is not a directory")
    captions = _read_captions(audio_dir, report)
    records = []
    for root, dirs, names in os.walk(audio_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            rel = os.path.normpath(os.path.relpath(os.path.join(root, name), audio_dir))
            if rel == CAPTIONS_FILE or _is_hidden(rel):
                continue
            path = os.path.join(audio_dir, rel)
            if not name.lower().endswith(audio_io.AUDIO_EXTENSIONS):
                if rel not in captions:
                    report.bad("unsupported_format", path, "not a supported audio format "
                               f"({', '.join(audio_io.AUDIO_EXTENSIONS)})")
                continue
            caption, where = captions.get(rel, ({}, path))
            text = caption.get("caption", "").strip()
            if not text:
                if checks.require_captions:
                    report.bad("no_caption", where, "no caption, and captions are required")
                    continue
                report.note("uncaptioned")
            records.append(AudioRecord(path=path, id=rel, split=caption.get("split", "train"), caption=text,
                                       location=where))
    return sorted(records, key=lambda r: r.id)


def _truthy(value: str) -> bool:
    value = value.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise ValueError(f"is_audioset_eval={value!r} is not a boolean")


def read_musiccaps(csv_path: str, clips_dir: str, checks: AudioChecks, report: BadInputReport) -> list[AudioRecord]:
    """The records of MusicCaps: rows of `csv_path` whose clip {ytid}.<ext> is in `clips_dir`."""
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"MusicCaps csv {csv_path!r} does not exist")
    if not os.path.isdir(clips_dir):
        raise FileNotFoundError(f"MusicCaps clips folder {clips_dir!r} is not a directory")
    clips = {}
    for name in sorted(os.listdir(clips_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in audio_io.AUDIO_EXTENSIONS:
            clips.setdefault(stem, os.path.join(clips_dir, name))
    records = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MUSICCAPS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing columns {missing} (MusicCaps needs {list(MUSICCAPS_COLUMNS)})")
        for number, row in enumerate(reader, 2):
            where = f"{csv_path}:{number}"
            try:
                ytid = row["ytid"].strip()
                start, end = float(row["start_s"]), float(row["end_s"])
                aspects = ast.literal_eval(row["aspect_list"]) if row["aspect_list"].strip() else []
                if not ytid or end <= start or not all(isinstance(a, str) for a in aspects):
                    raise ValueError("empty ytid, end_s <= start_s, or an aspect_list that is not a list of strings")
                split = "test" if _truthy(row["is_audioset_eval"]) else "train"
            except (ValueError, SyntaxError, TypeError, AttributeError) as e:
                report.bad("bad_csv_row", where, f"bad row ({e})")
                continue
            text = (row["caption"] or "").strip()
            if ytid not in clips:
                report.bad("missing_clip", where, f"no clip {ytid}.<ext> in {clips_dir}", always_skip=True)
                continue
            if not text and checks.require_captions:
                report.bad("no_caption", where, "empty caption, and captions are required")
                continue
            records.append(AudioRecord(path=clips[ytid], id=ytid, split=split, caption=text,
                                       aspects=tuple(a.strip() for a in aspects), location=where))
    return records


def decode_record(record: AudioRecord, checks: AudioChecks, report: BadInputReport,
                  expected_seconds: Optional[float] = None) -> Optional[np.ndarray]:
    """Mono float32 [samples] of `record` at checks.sample_rate (peak at most 1), or None if it is bad input
    (reported). `expected_seconds`: a length that, if missed by more than 1 s, is noted ('duration_mismatch')."""
    try:
        audio, native_rate = audio_io.read_audio(record.path, checks.max_seconds)
    except audio_io.AudioDecodeError as e:
        report.bad(e.reason, record.path, str(e).split(": ", 1)[1])
        return None
    if native_rate < checks.min_sample_rate:
        report.bad("low_sample_rate", record.path, f"recorded at {native_rate} Hz, below min_sample_rate="
                   f"{checks.min_sample_rate}")
        return None
    if audio.shape[1] > 1:
        report.note("downmixed")
    if native_rate != checks.sample_rate:
        report.note("resampled")
    mono = audio_io.to_mono_at_rate(audio, native_rate, checks.sample_rate)
    peak = float(np.max(np.abs(mono))) if mono.size else 0.0
    if peak < 10.0 ** (checks.silence_dbfs / 20.0):
        report.bad("silent", record.path, f"peak {20 * np.log10(max(peak, 1e-12)):.1f} dBFS is below "
                   f"silence_dbfs={checks.silence_dbfs}")
        return None
    seconds = len(mono) / checks.sample_rate
    if seconds < checks.min_seconds:
        report.bad("too_short", record.path, f"{seconds:.2f} s is shorter than min_seconds={checks.min_seconds}")
        return None
    if expected_seconds is not None and abs(seconds - expected_seconds) > 1.0 and checks.max_seconds is None:
        report.note("duration_mismatch")
    if peak > 1.0:
        report.note("peak_normalized")
        mono = mono / peak
    return mono


def scan_audio_folder(audio_dir: str, sample_rate: int, bad_input: str = "skip") -> dict[str, list[str]]:
    """{split: [absolute paths]} of the decodable audio files of audio folder `audio_dir`, from their first
    0.1 s (for jobs that read files directly: the codec evaluation, the semantic tokenizer's fit). Bad inputs
    follow `bad_input`; the skips are counted and printed. Raises ValueError if nothing usable is left."""
    checks = AudioChecks(sample_rate, bad_input)
    report = BadInputReport(bad_input, f"audio_folder {audio_dir}")
    found: dict[str, list[str]] = {split: [] for split in SPLITS}
    for record in read_audio_folder(audio_dir, checks, report):
        try:
            audio_io.read_audio(record.path, max_seconds=0.1)
        except audio_io.AudioDecodeError as e:
            report.bad(e.reason, record.path, str(e).split(": ", 1)[1])
            continue
        found[record.split].append(record.path)
    if report.num_skipped:
        report.print_summary()
    if not any(found.values()):
        raise ValueError(f"AUDIO_DIR {audio_dir!r} holds no decodable audio files")
    return found
