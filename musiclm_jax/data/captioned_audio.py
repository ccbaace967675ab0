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

Held-out splits always exist where there is something to hold out: a source without 'validation' (or 'test')
rows gets them carved from its 'train' rows by `carve_held_out` (see `HeldOutCarve`), deterministically from a
hash of each record's id (the path relative to DIR, or the ytid), so adding files never moves a file that was
already held out back into training. MusicCaps has a 'test' split (is_audioset_eval) and gets a 'validation'
split carved from its other rows.

`decode_record` then reads a record's audio and applies the checks. Every failure goes to a `BadInputReport`
(an error naming the file and line, or a counted skip, by its policy).
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import json
import os
from typing import Optional, Sequence

import numpy as np

from musiclm_jax.data import audio_io
from musiclm_jax.data.bad_input import BadInputReport, check_policy

SPLITS = ("train", "validation", "test")
CAPTIONS_FILE = "captions.jsonl"
MUSICCAPS_COLUMNS = ("ytid", "start_s", "end_s", "aspect_list", "caption", "is_audioset_eval")


@dataclasses.dataclass(frozen=True)
class HeldOutCarve:
    """How a source without held-out rows gets them (see `carve_held_out`).

    Attributes:
      validation_fraction: share of the 'train' rows carved into 'validation' when the source has no
        'validation' rows (0: none).
      test_fraction: the same for 'test'.
      min_files: fewer 'train' rows than this: nothing is carved (a handful of files is all training data;
        the jobs then run without evaluation and say so).
    """

    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    min_files: int = 10

    def __post_init__(self):
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 0.5:
                raise ValueError(f"HeldOutCarve.{name}={value}: must be in [0, 0.5)")
        if self.validation_fraction + self.test_fraction >= 0.5:
            raise ValueError(f"HeldOutCarve: validation_fraction + test_fraction = "
                             f"{self.validation_fraction + self.test_fraction} leaves less than half for training")
        if self.min_files < 3:
            raise ValueError(f"HeldOutCarve.min_files={self.min_files}: must be at least 3 (one file per split)")


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
      held_out: how held-out splits are carved from a source that has none (see HeldOutCarve).
    """

    sample_rate: int
    bad_input: str = "skip"
    require_captions: bool = False
    min_sample_rate: int = 8000
    silence_dbfs: float = -60.0
    min_seconds: float = 0.0
    max_seconds: Optional[float] = None
    held_out: HeldOutCarve = HeldOutCarve()

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


HELD_OUT_SPLITS = ("validation", "test")


def held_out_position(record_id: str) -> float:
    """A number in [0, 1) fixed by `record_id` alone (SHA-1): the record's place in the held-out carve."""
    return int(hashlib.sha1(record_id.encode("utf-8")).hexdigest()[:13], 16) / float(16 ** 13)


def carve_held_out(records: Sequence[AudioRecord], carve: HeldOutCarve, report: BadInputReport
                   ) -> list[AudioRecord]:
    """`records` with the held-out splits the source lacks carved from its 'train' rows.

    Each held-out split owns a fixed interval of `held_out_position`: 'validation' [0, validation_fraction),
    'test' [validation_fraction, validation_fraction + test_fraction). For each of them that no record has (and
    whose fraction is > 0), the 'train' records in its interval move to it, or, when none is, the remaining one
    with the lowest position. A record's split depends on its own id only (while every carved split gets its
    share), so adding files to a folder does not change where the others go. With fewer than carve.min_files
    'train' records nothing is carved (noted 'no_held_out'). Counts are noted in `report` ('carved_validation',
    'carved_test') and printed to its log. Records keep their order.
    """
    present = {r.split for r in records}
    bounds = {"validation": (0.0, carve.validation_fraction),
              "test": (carve.validation_fraction, carve.validation_fraction + carve.test_fraction)}
    wanted = [split for split in HELD_OUT_SPLITS if split not in present and bounds[split][1] > bounds[split][0]]
    if not wanted:
        return list(records)
    train = [r for r in records if r.split == "train"]
    names = " and ".join(repr(split) for split in wanted)
    if len(train) < carve.min_files:
        report.note("no_held_out")
        if report.log is not None:
            print(f"{report.what}: no {names} rows, and {len(train)} training files are fewer than "
                  f"HeldOutCarve.min_files={carve.min_files}: nothing is held out; jobs that evaluate on "
                  f"{names} run without evaluation", file=report.log)
        return list(records)
    position = {r.id: held_out_position(r.id) for r in train}
    remaining = sorted(train, key=lambda r: (position[r.id], r.id))
    moved: dict[str, str] = {}
    counts: dict[str, int] = {}
    for split in wanted:
        lower, upper = bounds[split]
        taken = [r for r in remaining if lower <= position[r.id] < upper] or remaining[:1]
        moved.update((r.id, split) for r in taken)
        remaining = [r for r in remaining if r.id not in moved]
        counts[split] = len(taken)
        report.note(f"carved_{split}", len(taken))
    if report.log is not None:
        carved = ", ".join(f"{n} {split}" for split, n in counts.items())
        print(f"{report.what}: no {names} rows; carved {carved} of {len(train)} training files by a hash of their "
              f"ids (HeldOutCarve {carve.validation_fraction} / {carve.test_fraction}); {len(remaining)} stay "
              f"in 'train'", file=report.log)
    return [dataclasses.replace(r, split=moved[r.id]) if r.id in moved else r for r in records]


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
    """The records of audio folder `audio_dir` (sorted by path), with held-out splits carved if it has none
    (checks.held_out). Files that are not audio (other than captions.jsonl and hidden files) are reported as
    'unsupported_format'."""
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
    return carve_held_out(sorted(records, key=lambda r: r.id), checks.held_out, report)


def _truthy(value: str) -> bool:
    value = value.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise ValueError(f"is_audioset_eval={value!r} is not a boolean")


def read_musiccaps(csv_path: str, clips_dir: str, checks: AudioChecks, report: BadInputReport) -> list[AudioRecord]:
    """The records of MusicCaps: rows of `csv_path` whose clip {ytid}.<ext> is in `clips_dir`, with a
    'validation' split carved from the 'train' rows (checks.held_out)."""
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
    return carve_held_out(records, checks.held_out, report)


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


def scan_audio_folder(audio_dir: str, sample_rate: int, bad_input: str = "skip",
                      held_out: HeldOutCarve = HeldOutCarve()) -> dict[str, list[str]]:
    """{split: [absolute paths]} of the decodable audio files of audio folder `audio_dir`, from their first
    0.1 s (for jobs that read files directly: the codec evaluation, the semantic tokenizer's fit), with the same
    held-out carve as the folder's prepared dataset. Bad inputs follow `bad_input`; the skips are counted and
    printed. Raises ValueError if nothing usable is left."""
    checks = AudioChecks(sample_rate, bad_input, held_out=held_out)
    report = BadInputReport(bad_input, f"audio_folder {audio_dir}")
    return _decodable_by_split(read_audio_folder(audio_dir, checks, report), report, f"AUDIO_DIR {audio_dir!r}")


def scan_musiccaps(musiccaps_dir: str, sample_rate: int, bad_input: str = "skip",
                   held_out: HeldOutCarve = HeldOutCarve()) -> dict[str, list[str]]:
    """scan_audio_folder for a MusicCaps folder (musiccaps-public.csv and the clips {ytid}.<ext>): the splits of
    the prepared `musiccaps` dataset (is_audioset_eval rows are 'test', validation carved from the rest)."""
    checks = AudioChecks(sample_rate, bad_input, held_out=held_out)
    report = BadInputReport(bad_input, f"musiccaps {musiccaps_dir}")
    records = read_musiccaps(os.path.join(musiccaps_dir, "musiccaps-public.csv"), musiccaps_dir, checks, report)
    return _decodable_by_split(records, report, f"MUSICCAPS_DIR {musiccaps_dir!r}")


def _decodable_by_split(records: Sequence[AudioRecord], report: BadInputReport, what: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {split: [] for split in SPLITS}
    for record in records:
        try:
            audio_io.read_audio(record.path, max_seconds=0.1)
        except audio_io.AudioDecodeError as e:
            report.bad(e.reason, record.path, str(e).split(": ", 1)[1])
            continue
        found[record.split].append(record.path)
    if report.num_skipped:
        report.print_summary()
    if not any(found.values()):
        raise ValueError(f"{what} holds no decodable audio files")
    return found
