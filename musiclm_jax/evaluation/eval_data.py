"""The generation evaluation's held-out captions and their reference clips (`EVAL_DATA`).

Eval sets: None or 'synthetic' (the embedded synthetic music's test split, the clips the codec and MuLan
evaluations use), 'audio_folder:DIR' (the `split` clips of an audio folder; captions required) or
'musiccaps:DIR' (DIR/musiccaps-public.csv and the clips {ytid}.<ext> in DIR; `is_audioset_eval` rows are the
`test` split). Reference clips are read at the requested rate (Hz), cut to `seconds` and zero-padded to it;
bad files are counted in a BadInputReport and skipped.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from musiclm_jax.data import captioned_audio, synthetic_music
from musiclm_jax.data.bad_input import BadInputReport

SYNTHETIC_TEST_SEED = 2  # the test split of the synthetic_music raw-audio tasks (tasks/audio.py)
SYNTHETIC_TEST_CLIPS = 1000
EVAL_DATA_KINDS = ("synthetic", "audio_folder", "musiccaps")
MUSICCAPS_CSV = "musiccaps-public.csv"


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """A held-out caption and its reference clip (mono float32 at the requested rate)."""

    id: str
    caption: str
    audio: np.ndarray


def parse_eval_data(eval_data: Optional[str]) -> tuple[str, Optional[str]]:
    """(kind, directory) of an EVAL_DATA setting; raises naming it if it is malformed or its files are missing."""
    if eval_data is None or eval_data == "synthetic":
        return "synthetic", None
    kind, _, path = str(eval_data).partition(":")
    if kind not in EVAL_DATA_KINDS[1:] or not path:
        raise ValueError(f"EVAL_DATA={eval_data!r} is not None, 'synthetic', 'audio_folder:DIR' or 'musiccaps:DIR'")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"EVAL_DATA={eval_data!r}: {path!r} is not a directory")
    if kind == "musiccaps" and not os.path.isfile(os.path.join(path, MUSICCAPS_CSV)):
        raise FileNotFoundError(f"EVAL_DATA={eval_data!r}: {os.path.join(path, MUSICCAPS_CSV)!r} does not exist")
    return kind, path


def eval_examples(eval_data: Optional[str], sample_rate: int, seconds: float, max_examples: int,
                  split: str = "test", report: Optional[BadInputReport] = None) -> list[EvalExample]:
    """Up to max_examples captioned clips of `split` of the eval set (module docstring), each cut to
    `seconds` at `sample_rate` and zero-padded to it. Bad files are counted in `report` and skipped."""
    kind, path = parse_eval_data(eval_data)
    report = report or BadInputReport("skip", f"generation eval {eval_data or 'synthetic'}")
    length = int(round(seconds * sample_rate))

    def fit(audio):
        return np.pad(audio[:length], (0, max(0, length - len(audio)))).astype(np.float32)
    examples = []
    if kind == "synthetic":
        if split != "test":
            raise ValueError(f"the synthetic evaluation clips are the test split; got split={split!r}")
        for i in range(min(max_examples, SYNTHETIC_TEST_CLIPS)):
            clip = synthetic_music.generate_clip(i, seed=SYNTHETIC_TEST_SEED, seconds=seconds, sample_rate=sample_rate)
            examples.append(EvalExample(clip["id"], clip["caption"], fit(clip["audio"])))
        return examples
    checks = captioned_audio.AudioChecks(sample_rate, require_captions=True, max_seconds=seconds)
    if kind == "audio_folder":
        records = captioned_audio.read_audio_folder(path, checks, report)
    else:
        records = captioned_audio.read_musiccaps(os.path.join(path, MUSICCAPS_CSV), path, checks, report)
    for record in records:
        if record.split != split or len(examples) >= max_examples:
            continue
        audio = captioned_audio.decode_record(record, checks, report)
        if audio is not None:
            examples.append(EvalExample(record.id, record.caption, fit(audio)))
    if len(examples) < 2:
        raise ValueError(f"EVAL_DATA={eval_data!r} has {len(examples)} usable captioned clips in split {split!r}; "
                         f"the generation evaluation needs at least 2 (skipped: {report.summary()['skipped']})")
    return examples

